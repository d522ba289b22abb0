"""The gateway's metering sink end to end: threads, journal, ledger; timing-only and with an NVML double."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sqlite3
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway_support import wait_until
from metering_builders import CONFIG, request
from nvml_double import DeviceDouble, NvmlDouble
from tensorfleet import telemetry
from tensorfleet.metering import chain, verify
from tensorfleet.metering import sink as sink_module
from tensorfleet.metering.events import ColdStartEvent
from tensorfleet.metering.ledger import Ledger, read_ledger
from tensorfleet.metering.nvml import GpuInterval
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.metering.sink import MeteringSink, open_sink
from tensorfleet.metering.writer import UsageWriter

pytestmark = pytest.mark.integration

FAST = MeteringSettings(flush_interval_ms=20, settle_after_seconds=0.3, sample_period_ms=20,
                        devices_wait_seconds=2, checkpoint_interval_seconds=0.2)


def live_request(request_id: str, start: float, tenant: str = "acme", billable: bool = True) -> object:
    return request(request_id, admitted=start, first_token=start + 0.02, received=start, tenant=tenant,
                   chunks=((start + 0.02, 1), (start + 0.04, 2), (start + 0.06, 2)), done=start + 0.06,
                   billable=billable, received_at=time.time())


def bodies(usage_dir: Path) -> list[dict]:
    _, rows, _ = read_ledger(usage_dir / "usage.db")
    return [json.loads(body) for _, body, _, _ in rows]


async def run_traffic(sink: object, count: int, billable: bool = True, tenant: str = "acme") -> None:
    for i in range(count):
        start = time.monotonic()
        await asyncio.sleep(0.07)
        sink.submit(live_request(f"{tenant}-{billable}-{i}", start, tenant, billable))  # type: ignore[attr-defined]


async def test_without_a_gpu_records_are_estimated_from_timing_and_the_chain_verifies(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text("")
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=FAST)
    await sink.start()
    sink.submit(ColdStartEvent("pod-1", time.time(), (("engine", 30.0), ("warm", 4.0)), 34.0))
    sink.submit(ColdStartEvent("pod-1", sink_time := time.time(), (("engine", 1.0),), 1.0))
    sink.submit(ColdStartEvent("pod-1", sink_time, (("engine", 1.0),), 1.0))  # the same start twice: once
    await run_traffic(sink, 3, billable=False)  # warm-up
    await run_traffic(sink, 5)
    assert sink.gpu_utilization() is None
    await sink.close()
    found = bodies(tmp_path / "usage")
    assert [b["kind"] for b in found].count("coldStart") == 2
    billed = [b for b in found if b["kind"] == "request"]
    assert len(billed) == 5
    assert all(b["tenant"] == "acme" for b in billed)
    assert all(b["estimated"] and b["measurement"] == "timing" and 0 < b["gpuMs"] <= 61 for b in billed)
    assert all(b["gpuProduct"] == "NVIDIA-L4" and b["ruSource"] == "datasheet" for b in billed)
    key = chain.load_private_key(tmp_path / "usage" / "signing-key.pem").public_key()
    recs, points, anchors, _ = verify.from_ledger_file(tmp_path / "usage" / "usage.db")
    result = verify.verify(recs, points, chain.Verifier(key), anchors)
    assert result.ok
    assert not result.warnings


async def test_with_an_nvml_double_busy_time_is_measured_and_split(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text("GPU-engine")
    device = DeviceDouble("GPU-engine", gpm_activity=50.0)
    other = DeviceDouble("GPU-neighbour", gpm_activity=100.0)
    sink = open_sink(CONFIG, tmp_path / "usage", "", tmp_path / "devices", settings=FAST,
                     nvml_module=NvmlDouble([other, device]))
    await sink.start()
    await asyncio.sleep(0.2)
    assert sink.gpu_utilization() == pytest.approx(0.5)
    await run_traffic(sink, 4)
    await run_traffic(sink, 2, tenant="globex")
    await sink.close()
    billed = [b for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    assert {b["tenant"] for b in billed} == {"acme", "globex"}
    assert len(billed) == 6
    assert all(b["measurement"] == "gpm" and not b["estimated"] for b in billed)
    assert all(b["gpuProduct"] == "NVIDIA-H100-80GB-HBM3" for b in billed)  # read from NVML, GFD form
    # Alone on a GPU that is always 50% busy, a request gets half of the intervals its 60 ms of work touched:
    # at least 30 ms, plus at most the two partly covered intervals at its ends (20 ms periods, some jitter).
    assert all(27.0 <= b["gpuMs"] <= 0.5 * (60 + 2 * 20) + 8 for b in billed), [b["gpuMs"] for b in billed]


async def slow_sink_with_traffic(tmp_path: Path) -> MeteringSink:
    """A sink with an hour's settling horizon (nothing settles before close) that has taken 3 requests."""
    (tmp_path / "devices").write_text("")
    slow = MeteringSettings(flush_interval_ms=20, settle_after_seconds=3600, devices_wait_seconds=1)
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=slow)
    await sink.start()
    await run_traffic(sink, 3)
    return sink


def refuse_appends(monkeypatch: pytest.MonkeyPatch, count: int) -> list[int]:
    """The ledger refuses the next ``count`` appends of records, as a full disk would; [refusals left]."""
    refusals = [count]
    append = Ledger.append

    def failing_append(self: Ledger, records: Any) -> list[int]:
        if records and refusals[0]:
            refusals[0] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return append(self, records)

    monkeypatch.setattr(Ledger, "append", failing_append)
    return refusals


@pytest.mark.parametrize("gpu", [True, False], ids=["nvml", "timing"])
async def test_a_failed_cycle_is_retried_without_counting_twice_or_losing_an_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, gpu: bool) -> None:
    # The ledger refuses the first two cycles that settle records (as a full disk would), after the cycle has
    # journalled events, taken intervals and placed requests; the transaction rolls back and the cycle is retried.
    refusals = refuse_appends(monkeypatch, 2)
    (tmp_path / "devices").write_text("GPU-engine" if gpu else "")
    nvml = NvmlDouble([DeviceDouble("GPU-engine", gpm_activity=50.0)]) if gpu else None
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=FAST, nvml_module=nvml)
    await sink.start()
    await asyncio.sleep(0.1)
    await run_traffic(sink, 6)
    await sink.close()
    assert refusals == [0]
    assert "metering writer cycle failed; will retry" in caplog.text
    billed = [b for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    assert sorted(b["requestId"] for b in billed) == [f"acme-True-{i}" for i in range(6)]  # each once
    if gpu:  # half of each request's ~60 ms of work, as without failures: no interval counted twice
        assert all(27.0 <= b["gpuMs"] <= 0.5 * (60 + 2 * 20) + 8 for b in billed), [b["gpuMs"] for b in billed]
    else:
        assert all(0 < b["gpuMs"] <= 61 for b in billed), [b["gpuMs"] for b in billed]


async def test_a_failed_last_cycle_is_retried_before_the_sink_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing settles before close (an hour's horizon), so the last cycle is the first to append, and the ledger
    refuses it once: it is retried, not given up with the thread (which lost the events it had taken)."""
    refusals = refuse_appends(monkeypatch, 1)
    sink = await slow_sink_with_traffic(tmp_path)
    await sink.close()
    assert refusals == [0]
    billed = [b for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    assert sorted(b["requestId"] for b in billed) == [f"acme-True-{i}" for i in range(3)]


async def test_new_prices_apply_to_requests_submitted_after_reconfigure(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text("none")
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-A100-SXM4-80GB", tmp_path / "devices", settings=FAST)
    await sink.start()
    await run_traffic(sink, 1, tenant="before")
    sink.reconfigure({**CONFIG, "billing": {**CONFIG["billing"], "tier": "premium", "pricePerResourceUnit": "1"}})
    await run_traffic(sink, 1, tenant="after")
    await sink.close()
    by_tenant = {b["tenant"]: b for b in bodies(tmp_path / "usage") if b["kind"] == "request"}
    assert by_tenant["before"]["tier"] == "standard"
    assert by_tenant["after"]["tier"] == "premium"
    after = by_tenant["after"]
    assert after["priceBreakdown"]["resourceUnits"] == format(after["resourceUnits"], "f").rstrip("0").rstrip(".")


async def test_a_restart_settles_what_was_journalled_before(tmp_path: Path) -> None:
    sink = await slow_sink_with_traffic(tmp_path)
    await sink.drain()
    # Simulate the process dying without close(): its writer runs no further cycle, not even the last one.
    # (Setting _stop alone let the old writer run its final cycle concurrently with the check below and with
    # the second sink: a race that failed this test once in a loaded run.)
    sink._cycle = lambda final, failures: failures  # type: ignore[method-assign]
    sink._stop.set()
    for thread in sink._threads:
        thread.join()
    assert bodies(tmp_path / "usage") == []  # nothing settled yet (an hour's horizon)...
    again = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=FAST)
    await again.start()
    await again.close()
    billed = [b for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    assert sorted(b["requestId"] for b in billed) == [f"acme-True-{i}" for i in range(3)]  # ...now each once


async def test_admission_hints_settle_records_without_waiting_for_the_horizon(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text("")
    hinted = MeteringSettings(flush_interval_ms=20, settle_after_seconds=3600, sample_period_ms=20,
                              devices_wait_seconds=1)
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=hinted)
    await sink.start()
    start = time.monotonic()
    sink.admitted("hinted-1", start)
    await asyncio.sleep(0.07)
    sink.submit(live_request("hinted-1", start))
    await asyncio.sleep(0.5)
    assert [b["requestId"] for b in bodies(tmp_path / "usage")] == ["hinted-1"]
    await sink.close()


async def test_without_a_sink_no_record_waits_for_export(tmp_path: Path) -> None:
    # Before, the writer published every record ever written as waiting for export: the chart's
    # TensorfleetUsageExportBacklog fired for ever once a service without a sink had written 10,000 of them.
    (tmp_path / "devices").write_text("")
    settings = MeteringSettings(**{**FAST.__dict__, "spool_max_records": 2})
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=settings)
    await sink.start()
    await run_traffic(sink, 4)
    await sink.close()
    assert len(bodies(tmp_path / "usage")) == 4  # recorded in the ledger all the same
    for gauge in ("spool_records", "spool_alert", "spool_full"):
        assert REGISTRY.get_sample_value(f"tensorfleet_metering_{gauge}") == 0, gauge
    assert not sink.spool_full()


def test_open_sink_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TENSORFLEET_METERING_EXPORT_BATCH_SIZE=0"):
        open_sink(CONFIG, tmp_path, "", tmp_path / "d", settings=MeteringSettings(export_batch_size=0))


async def test_per_tenant_gpu_ms_and_resource_units_are_exported_as_recorded(tmp_path: Path) -> None:
    """The dashboard's GPU-ms and RU per tenant: counters of exactly what the ledger holds, tenants capped."""
    from prometheus_client import REGISTRY

    def counted(metric: str, tenant: str) -> float:
        return REGISTRY.get_sample_value(metric, {"tenant": tenant, "tier": "standard"}) or 0.0

    names = ("tensorfleet_metering_tenant_gpu_milliseconds_total", "tensorfleet_metering_tenant_resource_units_total")
    tenants = ("acme", telemetry.OTHER_TENANT, "globex")
    before = {(name, tenant): counted(name, tenant) for name in names for tenant in tenants}
    (tmp_path / "devices").write_text("")
    settings = MeteringSettings(**{**FAST.__dict__, "max_tenant_labels": 1})
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=settings)
    await sink.start()
    await run_traffic(sink, 3)
    await run_traffic(sink, 2, tenant="globex")  # over the cap of one tenant label: counted as _other
    await sink.close()
    billed = [b for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    for tenant, label in (("acme", "acme"), ("globex", telemetry.OTHER_TENANT)):
        mine = [b for b in billed if b["tenant"] == tenant]
        assert len(mine) == (3 if tenant == "acme" else 2)
        for name, field in zip(names, ("gpuMs", "resourceUnits"), strict=True):
            grown = counted(name, label) - before[(name, label)]
            assert grown == pytest.approx(sum(b[field] for b in mine))
            assert grown > 0
    assert counted(names[0], "globex") == before[(names[0], "globex")]  # never its own label


async def test_an_event_no_record_can_be_made_of_is_refused_and_every_other_request_is_billed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before, the NaN time was journalled, its record failed every cycle (and every restart), and after five
    # failures each cycle's events were dropped: no tenant was billed again.
    (tmp_path / "devices").write_text("")
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=FAST)
    await sink.start()
    counted = ("tensorfleet_metering_events_rejected_total", {"field": "received_at"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    start = time.monotonic()
    await asyncio.sleep(0.07)
    sink.submit(dataclasses.replace(live_request("bad", start), received_at=math.nan))  # type: ignore[type-var]
    await run_traffic(sink, 5, tenant="other-team")
    await sink.close()  # the last cycle settles everything
    billed = [b["requestId"] for b in bodies(tmp_path / "usage") if b["kind"] == "request"]
    assert sorted(billed) == [f"other-team-True-{i}" for i in range(5)]
    assert REGISTRY.get_sample_value(*counted) == before + 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == ["metering: request 'bad' of tenant 'acme' refused, not billed (kept in the quarantine "
                        "table): received_at=nan: must be a wall-clock time within [0, 1e+10]"]
    conn = sqlite3.connect(tmp_path / "usage" / "usage.db")
    assert conn.execute("SELECT request_id, problem FROM quarantine").fetchall() == [
        ("bad", "received_at=nan: must be a wall-clock time within [0, 1e+10]")]
    assert conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0


@pytest.mark.parametrize("change", [{"received_at": math.inf}, {"prompt_tokens": -5}, {"done": math.nan}])
def test_submit_refuses_an_event_no_record_can_be_made_of_on_entry(tmp_path: Path, change: dict[str, Any],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Refused by submit itself, before any writer cycle (this sink is not even started): counted by field.
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", None, settings=FAST)
    [(field, value)] = change.items()
    counted = ("tensorfleet_metering_events_rejected_total", {"field": field})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    sink.submit(live_request("fine", time.monotonic()))
    sink.submit(dataclasses.replace(live_request("bad", time.monotonic()), **change))  # type: ignore[type-var]
    assert REGISTRY.get_sample_value(*counted) == before + 1
    assert f"request 'bad' of tenant 'acme' refused, not billed (kept in the quarantine table): {field}={value!r}" \
        in caplog.text
    assert "'fine'" not in caplog.text


def test_close_releases_a_drain_whose_caller_stopped_waiting(tmp_path: Path) -> None:
    # drain() waits in a worker thread; a caller that bounds it with asyncio.timeout (as the docstring says) and then
    # closes the sink must not leave that thread waiting, or asyncio.run (the gateway's exit) waits for it forever.
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", None, settings=FAST)  # not started: nothing journals
    sink.submit(live_request("r1", time.monotonic()))

    async def give_up_then_close() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await sink.drain()
        await sink.close()

    runner = threading.Thread(target=asyncio.run, args=(give_up_then_close(),), daemon=True)
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive()


def drive_with_a_fake_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: MeteringSettings,
                            seconds: float, step: Callable[[MeteringSink, float], None]) -> Ledger:
    """Writer cycles of a sink every flush interval of a fake monotonic clock, a fully busy GPU sampled every 100
    ms; ``step(sink, now)`` before each cycle. The ledger after the closing cycle."""
    clock = [0.0]
    monkeypatch.setattr(sink_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    sink = MeteringSink(CONFIG, tmp_path, "NVIDIA-H100-80GB-HBM3", None, settings, None)
    ledger = Ledger(tmp_path / "usage.db", chain.Signer(chain.generate_key()), {"namespace": "n", "service": "s"})
    sink._writer = UsageWriter(ledger, 1)
    sink._writer.measurement = "gpm"
    sampled = 0.0
    while clock[0] < seconds:
        clock[0] = round(clock[0] + settings.flush_interval_ms / 1000.0, 6)
        while sampled + 0.1 <= clock[0]:
            sink._intervals.append(GpuInterval(sampled, sampled + 0.1, 100.0, None, 0, 1.0, "gpm"))
            sampled = round(sampled + 0.1, 6)
        step(sink, clock[0])
        sink._cycle(final=False, failures=0)
    sink._cycle(final=True, failures=0)
    return ledger


def test_a_request_in_flight_past_the_settle_horizon_is_not_billed_to_its_neighbours(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, the sink stopped waiting for a request admitted longer than settle_after_seconds ago: a 400 s stream
    # (the gateway has no total timeout) was billed 800 GPU-ms, and a 1 s stream of another tenant beside it 1,100,
    # the whole GPU. Now the long one holds a share while in flight and takes it over when its event comes.
    step = 0.05  # one token per 50 ms engine step each
    long = request("long", admitted=0.0, first_token=0.1, chunks=tuple((0.1 + step * i, 1) for i in range(799)),
                   done=0.1 + step * 798, prompt=10, tenant="tenant-a")  # 40 s
    short_chunks = tuple((31.0 + step * i + 0.0003, 1) for i in range(1, 21))
    short = request("short", admitted=31.0, first_token=short_chunks[0][0], chunks=short_chunks,
                    done=short_chunks[-1][0], prompt=10, tenant="tenant-b")  # 1 s, 31 s after the long one began

    def gateway(sink: MeteringSink, now: float) -> None:
        for event in (long, short):
            if event.admitted is not None and event.admitted <= now and event.request_id not in sent:
                sink.admitted(event.request_id, event.admitted)
                sent[event.request_id] = False
            if event.done <= now and not sent.get(event.request_id, True):
                sink.submit(event)
                sent[event.request_id] = True

    sent: dict[str, bool] = {}
    settings = MeteringSettings(settle_after_seconds=30)  # shorter than the long request
    ledger = drive_with_a_fake_clock(tmp_path, monkeypatch, settings, 41.0, gateway)
    rows = dict(ledger.conn.execute("SELECT json_extract(body, '$.requestId'), json_extract(body, '$.gpuMs') "
                                    "FROM records"))
    assert rows["short"] == pytest.approx(500.0, rel=0.1)  # half of each step it shared
    assert rows["long"] == pytest.approx(40_000.0 - 500.0, rel=0.01)
    assert ledger.get_meta("holds") == "{}"


def requests_billed(usage_dir: Path) -> list[dict]:
    return [b for b in bodies(usage_dir) if b["kind"] == "request"]


async def settled_within(usage_dir: Path, count: int, seconds: float) -> list[dict]:
    await wait_until(lambda: len(requests_billed(usage_dir)) >= count, seconds, f"{count} request records")
    return requests_billed(usage_dir)


async def test_a_gpu_lost_mid_run_falls_back_to_timing_and_requests_settle_within_the_horizon(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before, a lost GPU (every read NVML_ERROR_GPU_IS_LOST) made no interval, so no later request settled while the
    # pod ran; at close they were written as measured ("gpm", estimated false) with 0 GPU-ms; sampler_up stayed 1,
    # the last reading was reported as the GPU's utilization forever and a warning was logged every period.
    (tmp_path / "devices").write_text("GPU-engine")
    device = DeviceDouble("GPU-engine", gpm_activity=50.0)
    sink = open_sink(CONFIG, tmp_path / "usage", "", tmp_path / "devices", settings=FAST,
                     nvml_module=NvmlDouble([device]))
    await sink.start()
    await asyncio.sleep(0.2)
    await run_traffic(sink, 3)
    measured = await settled_within(tmp_path / "usage", 3, 3.0)
    assert [(b["measurement"], b["estimated"]) for b in measured] == [("gpm", False)] * 3
    device.lost = True
    await run_traffic(sink, 5, tenant="globex")
    billed = await settled_within(tmp_path / "usage", 8, 3.0)  # 10x the settle horizon
    assert REGISTRY.get_sample_value("tensorfleet_metering_sampler_up") == 0
    assert sink.gpu_utilization() is None
    await sink.close()
    after = [b for b in billed if b["tenant"] == "globex"]
    assert len(after) == 5
    assert all(b["measurement"] == "timing" and b["estimated"] and 40 <= b["gpuMs"] <= 61 for b in after), after
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1  # once, not every period


class HangingNvml(NvmlDouble):
    """An NVML whose memory reads stop answering once ``hang`` is set (a GPU falling off the bus, a reset)."""

    def __init__(self, devices: list[DeviceDouble]) -> None:
        super().__init__(devices)
        self.hang, self.release = threading.Event(), threading.Event()

    def nvmlDeviceGetMemoryInfo(self, handle: DeviceDouble) -> Any:
        if self.hang.is_set():
            self.release.wait()
        return super().nvmlDeviceGetMemoryInfo(handle)


async def test_close_settles_by_timing_when_an_nvml_call_hangs(tmp_path: Path) -> None:
    # Before, close() joined the sampler without a bound before the writer's last cycle: a hung NVML call held the
    # final settle, sign and export until the pod was killed, and the requests of its last moments were lost.
    (tmp_path / "devices").write_text("GPU-engine")
    double = HangingNvml([DeviceDouble("GPU-engine", gpm_activity=50.0)])
    slow = dataclasses.replace(FAST, settle_after_seconds=3600)  # nothing settles before close
    sink = open_sink(CONFIG, tmp_path / "usage", "", tmp_path / "devices", settings=slow, nvml_module=double)
    try:
        await sink.start()
        await asyncio.sleep(0.2)
        await run_traffic(sink, 3)
        double.hang.set()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(sink.close(), timeout=10)
        assert time.monotonic() - started < 5
        billed = requests_billed(tmp_path / "usage")
        assert len(billed) == 3
        # What the sampler never delivered is estimated, not claimed as measured with 0 GPU-ms.
        assert all(b["measurement"] == "timing" and b["estimated"] and b["gpuMs"] >= 25 for b in billed), billed
    finally:
        double.release.set()


async def test_an_unreadable_devices_file_falls_back_to_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # Before, the PermissionError killed the thread that starts metering: nothing settled while the pod ran, and at
    # close every request was written as a timing estimate of 0 GPU-ms.
    devices = tmp_path / "devices"
    devices.write_text("GPU-engine")
    read_text = Path.read_text

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == devices:  # a root-owned 0600 file, as an engine running as root with umask 077 writes it
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-H100-80GB-HBM3", devices, settings=FAST,
                     nvml_module=NvmlDouble([DeviceDouble("GPU-engine", gpm_activity=50.0)]))
    await sink.start()
    await run_traffic(sink, 3)
    billed = await settled_within(tmp_path / "usage", 3, 3.0)
    await sink.close()
    assert len(billed) == 3
    assert all(b["measurement"] == "timing" and b["estimated"] and 40 <= b["gpuMs"] <= 61 for b in billed), billed
    assert REGISTRY.get_sample_value("tensorfleet_metering_sampler_up") == 0
    assert any(f"{devices}: cannot read it" in r.getMessage() and "Permission denied" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
