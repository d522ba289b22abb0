"""`tensorfleet usage report`: costs per currency, and bad options or records named in a clear error."""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import io
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, export, records, report, units
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.cli import usage
from tensorfleet.metering.ledger import Ledger

SIGNER = chain.Signer(chain.generate_key())
USD = records.context_from_config(CONFIG, "pod-1", "NVIDIA-L4", units.load_table())
EUR = dataclasses.replace(USD, currency="EUR")


def record(request_id: str, ctx: records.RecordContext = USD, tenant: str = "acme") -> dict[str, Any]:
    event = request(request_id, chunks=((0.2, 10),), tenant=tenant)
    return records.request_record(event, ctx, Settled(request_id, Share(gpu_ms=1000.0), 110, True), "gpm")


def ledger_of(path: Path, bodies: list[dict[str, Any]]) -> Path:
    ledger = Ledger(path, SIGNER)
    with ledger.transaction():
        ledger.append(bodies)
        ledger.checkpoint()
    ledger.close()
    return path


def run_report(*args: str) -> Any:
    return CliRunner().invoke(usage, ["report", *args])


def test_costs_in_two_currencies_stay_apart_in_every_output(tmp_path: Path) -> None:
    usd, eur, usd2 = record("a"), record("b", EUR), record("c")
    path = ledger_of(tmp_path / "usage.db", [usd, eur, usd2])
    result = run_report("--ledger", str(path), "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["tenant"], r["currency"], r["requests"]) for r in rows] == [("acme", "EUR", 1), ("acme", "USD", 2)]
    assert Decimal(rows[0]["cost"]) == Decimal(eur["price"])
    assert Decimal(rows[1]["cost"]) == Decimal(usd["price"]) + Decimal(usd2["price"])
    table = run_report("--ledger", str(path), "--by", "tenant").output
    assert table.splitlines()[0].split() == ["tenant", "currency", "requests", "inputTokens", "outputTokens",
                                             "cachedTokens", "gpuMs", "resourceUnits", "cost", "estimatedRequests",
                                             "truncatedRequests", "truncatedTokens", "runawayStopped"]
    assert [line.split()[:3] for line in table.splitlines()[1:]] == [["acme", "EUR", "1"], ["acme", "USD", "2"]]
    rows_csv = list(csv.DictReader(io.StringIO(run_report("--ledger", str(path), "--by", "model", "-o", "csv").output)))
    assert [(r["model"], r["currency"], r["cost"]) for r in rows_csv] == [("llama3", "EUR", rows[0]["cost"]),
                                                                        ("llama3", "USD", rows[1]["cost"])]


def test_currency_may_be_placed_in_the_grouping_and_is_not_repeated() -> None:
    rows = report.aggregate([record("a"), record("b", EUR, tenant="globex")], ["currency", "tenant"], None)
    assert [list(r)[:2] for r in rows] == [["currency", "tenant"]] * 2
    assert [(r["currency"], r["tenant"]) for r in rows] == [("EUR", "globex"), ("USD", "acme")]


@pytest.mark.parametrize("window", ["infh", "nanh", "1e12d", "-1h", "0s", "0.5s", "3651d"])
def test_a_window_out_of_range_is_an_option_error_naming_the_limit(tmp_path: Path, window: str) -> None:
    path = ledger_of(tmp_path / "usage.db", [record("a")])
    result = run_report("--ledger", str(path), "--by", "tenant,window", "--window", window)
    assert result.exit_code == 2
    assert not isinstance(result.exception, ArithmeticError | ValueError)
    assert f"--window={window!r}: must be between 1s and 3650d" in result.output


def test_the_widest_window_still_reports() -> None:
    assert report.parse_window("3650d") == datetime.timedelta(days=3650)
    rows = report.aggregate([record("a")], ["window"], report.parse_window("3650d"))
    assert rows[0]["window"] == "2019-12-20T00:00:00Z"  # 5 x 3650 days after the epoch
    with pytest.raises(ValueError, match=r"time='0001-01-01T00:00:00\+00:00': its 3650d window would start"):
        report.aggregate([{**record("a"), "time": "0001-01-01T00:00:00Z"}], ["window"], report.parse_window("3650d"))


def exported(tmp_path: Path, change: dict[str, Any], drop: str | None = None) -> tuple[Path, str]:
    """An export of one record whose data is edited (the report does not verify signatures)."""
    body = record("a")
    ledger = Ledger(tmp_path / "usage.db", SIGNER)
    with ledger.transaction():
        ledger.append([body])
    rows, _ = ledger.unexported(10)
    ledger.close()
    events = [export.record_event(text, digest, sig, SIGNER.key_id) for _, text, digest, sig in rows]
    edited = copy.deepcopy(events)
    edited[0]["data"].update(change)
    if drop:
        del edited[0]["data"][drop]
    (tmp_path / "export.json").write_text(json.dumps(edited))
    return tmp_path / "export.json", body["id"]


@pytest.mark.parametrize(("change", "drop", "message"), [
    ({"inputTokens": "12x"}, None, "inputTokens='12x': must be a whole number, 0 or more"),
    ({"outputTokens": -3}, None, "outputTokens=-3: must be a whole number, 0 or more"),
    ({"gpuMs": "fast"}, None, "gpuMs='fast': must be a finite number, 0 or more"),
    ({"resourceUnits": -1.5}, None, "resourceUnits=-1.5: must be a finite number, 0 or more"),
    ({"price": "lots"}, None, "price='lots': must be a decimal string, 0 or more"),
    ({"price": "NaN"}, None, "price='NaN': must be a decimal string, 0 or more"),
    ({"currency": 840}, None, "currency=840: must be a currency code"),
    ({}, "time", "time is missing"),
    ({"time": "yesterday"}, None, "time='yesterday': must be an RFC 3339 time"),
    ({"time": 1700000000}, None, "time=1700000000: must be an RFC 3339 string"),
], ids=["token-text", "token-negative", "gpu-ms-text", "ru-negative", "price-text", "price-nan", "currency-number",
        "no-time", "time-text", "time-number"])
def test_a_bad_record_field_is_named_with_the_record_and_no_traceback(
        tmp_path: Path, change: dict[str, Any], drop: str | None, message: str) -> None:
    path, record_id = exported(tmp_path, change, drop)
    result = run_report("--export", str(path), "--by", "tenant,window")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert f"Error: record {record_id}: {message}" in result.output


def test_a_record_that_is_not_an_object_is_named_by_its_position() -> None:
    with pytest.raises(ValueError, match=r"record #2: must be a JSON object, not list"):
        report.billable([record("a"), [1, 2]], None, None)  # type: ignore[list-item]


def test_an_infinite_amount_is_named() -> None:  # JSON exports cannot hold one; a caller's dict can
    with pytest.raises(ValueError, match=r"record [-0-9a-f]+: gpuMs=inf: must be a finite number, 0 or more"):
        report.aggregate([{**record("a"), "gpuMs": math.inf}], ["tenant"], None)


def test_a_chart_that_cannot_be_written_is_refused_before_the_report(tmp_path: Path) -> None:
    """--chart in a missing folder was an OSError traceback after the table had been printed."""
    path = ledger_of(tmp_path / "usage.db", [record("a")])
    chart = tmp_path / "no-dir" / "ru.png"
    result = run_report("--ledger", str(path), "--chart", str(chart))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for --chart: {chart}: no such folder" in result.output
    assert "acme" not in result.output


def test_since_not_before_until_is_a_usage_error(tmp_path: Path) -> None:
    """A swapped pair printed 'no billable usage in the selection' with exit 0: a file reading as a zero bill."""
    path = ledger_of(tmp_path / "usage.db", [record("a")])
    result = run_report("--ledger", str(path), "--since", "2030-01-01", "--until", "2020-01-01")
    assert result.exit_code == 2, result.output
    assert ("Invalid value for --since: 2030-01-01T00:00:00Z must be before --until 2020-01-01T00:00:00Z"
            in result.output)
