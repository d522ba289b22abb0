"""Resource units, prices, records, reports and settings."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from pathlib import Path

import pytest

from metering_builders import CONFIG, request
from tensorfleet import config
from tensorfleet.metering import records, report, units
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.events import ColdStartEvent
from tensorfleet.metering.settings import MeteringSettings


def test_reference_gpu_at_fp16_is_one_ru_per_ms_and_faster_gpus_are_more() -> None:
    table = units.load_table()
    assert table.factor("NVIDIA-A100-SXM4-80GB", "fp16") == (1.0, "datasheet")
    h100, _ = table.factor("NVIDIA-H100-80GB-HBM3", "fp16")
    assert h100 == pytest.approx(((989.4 / 312) * (3350 / 2039)) ** 0.5, abs=1e-4)
    assert table.factor("NVIDIA-H100-80GB-HBM3", "fp8")[0] == pytest.approx(2 * h100, rel=1e-3)
    assert table.factor("NVIDIA-L4", "fp16")[0] < 1.0
    assert all(entry for entry in table.sources.values())  # every default names its public source


def test_missing_precision_and_unknown_product_are_flagged_not_hidden() -> None:
    table = units.load_table()
    assert table.factor("NVIDIA-A100-SXM4-80GB", "fp8") == (1.0, "fallback-precision")  # Ampere has no fp8
    assert table.factor("NVIDIA-Imaginary", "fp16") == (1.0, "unknown-product")


def test_overrides_from_config_and_file_win(tmp_path: Path) -> None:
    (tmp_path / "ru.yaml").write_text("NVIDIA-L4: {fp16: 0.5}\ntiers: {economy: {pricePerResourceUnit: '0.1'}}\n")
    table = units.load_table({"NVIDIA-L4": {"fp16": 0.3, "int8": 0.6}}, str(tmp_path / "ru.yaml"))
    assert table.factor("NVIDIA-L4", "fp16") == (0.5, "override")
    assert table.factor("NVIDIA-L4", "int8") == (0.6, "override")
    assert table.tier_prices == {"economy": {"pricePerResourceUnit": "0.1"}}


@pytest.mark.parametrize(("data", "message"), [
    ({"NVIDIA-L4": {"fp64": 1.0}}, "metering.resourceUnits.NVIDIA-L4.fp64: unknown precision"),
    ({"NVIDIA-L4": {"fp16": -1}}, r"metering.resourceUnits.NVIDIA-L4.fp16=-1: must be a number in \(0, 1000\]"),
    ({"NVIDIA-L4": 3}, "metering.resourceUnits.NVIDIA-L4: expected"),
    ({"tiers": {"gold": {"pricePerResourceUnit": "-1"}}}, "metering.resourceUnits.tiers.gold.pricePerResourceUnit"),
])
def test_bad_overrides_name_the_field(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        units.load_table(data)


def test_prices_are_exact_decimals_from_the_rounded_figures() -> None:
    prices = {"pricePerResourceUnit": "0.000002", "pricePerMillionInputTokens": "0.1",
              "pricePerMillionOutputTokens": "0.4"}
    out = units.price(1234.5678911, 1000, 500, prices)
    assert out["resourceUnits"] == "0.002469135782"
    assert out["inputTokens"] == "0.0001"
    assert out["outputTokens"] == "0.0002"
    assert Decimal(out["total"]) == Decimal("0.002469135782") + Decimal("0.0003")


def test_prices_come_from_billing_then_tier_defaults() -> None:
    table = units.ResourceUnitTable({}, {}, {}, {"economy": {"pricePerResourceUnit": "0.5",
                                                             "pricePerMillionInputTokens": "9"}})
    ctx = records.context_from_config({**CONFIG, "billing": {"tier": "economy", "pricePerMillionInputTokens": "1"}},
                                      "pod", "NVIDIA-L4", table)
    assert ctx.prices == {"pricePerResourceUnit": "0.5", "pricePerMillionInputTokens": "1"}
    with pytest.raises(ValueError, match=r"spec\.billing\.pricePerResourceUnit='abc'"):
        records.context_from_config({**CONFIG, "billing": {"pricePerResourceUnit": "abc"}}, "p", "x", table)


def test_request_record_has_every_field_and_a_deterministic_id() -> None:
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
    event = request("req-9", received=9.0, admitted=10.0, first_token=10.25, chunks=((10.25, 1), (10.5, 4)),
                    prompt=300, cached=100)
    settled = Settled("k", Share(gpu_ms=12.3456, covered_tokens=205), 205, True)
    body = records.request_record(event, ctx, settled, "gpm")
    again = records.request_record(event, ctx, settled, "gpm")
    assert body["id"] == again["id"] == records.request_record_id(ctx, "req-9")
    assert (body["queueMs"], body["ttftMs"], body["durationMs"]) == (1000.0, 1250.0, 1500.0)
    assert body["gpuMs"] == 12.346
    assert body["resourceUnits"] == round(12.346 * ctx.ru_per_gpu_ms, 6)
    assert (body["inputTokens"], body["outputTokens"], body["cachedTokens"]) == (300, 5, 100)
    assert body["engineFingerprint"] == "sha256:abc"
    assert body["precision"] == "fp16"
    assert body["tier"] == "standard"
    assert body["estimated"] is False
    assert body["measurement"] == "gpm"
    assert body["coverage"] == 1.0
    assert {"cacheHit", "truncated", "error", "tenant", "namespace", "service", "model", "gpuProduct"} <= set(body)
    assert body["time"].endswith("Z")


def test_cold_start_record_is_not_billable() -> None:
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-L4", units.load_table())
    body = records.cold_start_record(ColdStartEvent("pod-1", 1_700_000_000.0, (("engine", 40.0), ("warm", 5.0)),
                                                    45.0), ctx)
    assert body["billable"] is False
    assert body["kind"] == "coldStart"
    assert body["price"] == "0"


def test_events_round_trip_through_the_journal() -> None:
    event = request("r", admitted=1.0, first_token=1.5, chunks=((1.5, 2), (2.0, 3)))
    assert records.event_from_json(records.event_to_json(event)) == event
    cold = ColdStartEvent("p", 1.0, (("a", 1.0),), 1.0)
    assert records.event_from_json(records.event_to_json(cold)) == cold
    # Chunk times are packed doubles: exact to the last bit, not a decimal rendering of it.
    odd = request("o", admitted=0.1, first_token=1.0 / 3,
                  chunks=((1.0 / 3, 1), (12345.678901234567, 4), (0.1 + 0.2, 0)))
    assert records.event_from_json(records.event_to_json(odd)).chunks == odd.chunks
    empty = request("e", admitted=None, first_token=None, chunks=())
    assert records.event_from_json(records.event_to_json(empty)) == empty


def test_events_journalled_before_packed_chunk_times_still_restore() -> None:
    """An event journalled before chunk times were packed (chunks as pairs) still restores. The operator's pods
    never meet one (the usage volume is an emptyDir), but a journal kept on other storage could hold one."""
    event = request("r", admitted=1.0, first_token=1.5, chunks=((1.5, 2), (2.0, 3)))
    body = json.loads(records.event_to_json(event))
    del body["chunk_times"], body["chunk_tokens"]
    body["chunks"] = [[1.5, 2], [2.0, 3]]
    assert records.event_from_json(json.dumps(body)) == event


def _bodies() -> list[dict]:
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-A100-SXM4-80GB", units.load_table())
    out = []
    for i, (tenant, minute) in enumerate([("acme", 0), ("acme", 61), ("globex", 5), ("acme", 10)]):
        event = request(f"r{i}", chunks=((0.1, 10),), tenant=tenant, received_at=1_700_000_000.0 + minute * 60)
        out.append(records.request_record(event, ctx, Settled("k", Share(gpu_ms=100.0), 110, True), "gpm"))
    return out


def test_report_totals_per_tenant_and_window() -> None:
    rows = report.aggregate(_bodies(), ["tenant", "window"], datetime.timedelta(hours=1))
    acme = [r for r in rows if r["tenant"] == "acme"]
    assert [r["requests"] for r in acme] == [2, 1]
    assert acme[0]["gpuMs"] == 200.0
    assert acme[0]["resourceUnits"] == 200.0
    assert Decimal(acme[0]["cost"]) == 2 * Decimal(_bodies()[0]["price"])
    csv_text = report.render(rows, "csv")
    assert csv_text.splitlines()[0].startswith("tenant,window,currency,requests,inputTokens")
    assert json.loads(report.render(rows, "json")) == rows
    assert "acme" in report.render(rows, "table")
    with pytest.raises(ValueError, match="--by colour"):
        report.aggregate(_bodies(), ["colour"], None)
    with pytest.raises(ValueError, match="--window='7x'"):
        report.parse_window("7x")


def test_report_chart_is_a_png(tmp_path: Path) -> None:
    report.chart(_bodies(), datetime.timedelta(minutes=30), tmp_path / "ru.png")
    assert (tmp_path / "ru.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    settings = config.from_env(MeteringSettings, {"TENSORFLEET_METERING_SAMPLE_PERIOD_MS": "50",
                                                  "TENSORFLEET_METERING_SINK_URL": "ftp://x"})
    assert settings.sample_period_ms == 50.0
    assert settings.validate() == [
        "TENSORFLEET_METERING_SINK_URL='ftp://x': must be an http:// or https:// URL with a host"]
    assert "TENSORFLEET_METERING_SAMPLE_PERIOD_MS=5.0: must be between 10 and 10000" in \
        MeteringSettings(sample_period_ms=5.0).validate()


def test_a_product_added_in_the_overrides_falls_back_to_its_own_fp16_factor() -> None:
    # Before, a precision the override did not list priced such a product as unknown (1.0, a fifth of its fp16 5.0).
    table = units.load_table({"NVIDIA-B200": {"fp16": 5.0}})
    assert table.factor("NVIDIA-B200", "fp16") == (5.0, "override")
    assert table.factor("NVIDIA-B200", "bf16") == (5.0, "fallback-precision")
    assert table.factor("NVIDIA-B200", "int4-awq") == (5.0, "fallback-precision")
    assert units.load_table({"NVIDIA-B200": {"fp8": 9.0}}).factor("NVIDIA-B200", "bf16") == (1.0, "unknown-product")
