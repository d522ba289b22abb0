"""The journal across restarts: after a reboot, pending requests are settled with what measured them."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, records, units
from tensorfleet.metering.events import RequestEvent
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.nvml import GpuInterval
from tensorfleet.metering.writer import UsageWriter

LABELS = {"namespace": "team-a", "service": "llama", "pod": "pod-1"}
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
A, B = chain.Signer(chain.generate_key()), chain.Signer(chain.generate_key())


def measured(kind: str = "gpm") -> list[GpuInterval]:
    """One second of GPU intervals, 80 % busy, 30 mJ each."""
    return [GpuInterval(1.0 + 0.1 * i, 1.1 + 0.1 * i, 80.0, 30.0, 0, 0.8, kind) for i in range(10)]  # type: ignore[arg-type]


def traffic() -> list[RequestEvent]:
    return [request(f"r{i}", admitted=1.05 + 0.02 * i, first_token=1.2 + 0.02 * i, done=1.5 + 0.02 * i,
                    chunks=tuple((1.2 + 0.02 * i + 0.1 * k, 1) for k in range(4))) for i in range(3)]


def half_measured(ledger: Ledger, kind: str = "gpm") -> UsageWriter:
    """A writer that journalled the requests and finalised the intervals up to 1.35 s: each request is pending
    with part of its share."""
    writer = UsageWriter(ledger, 1)
    writer.restore()
    writer.measurement = kind  # type: ignore[assignment]  # as the sink sets it once the sampler runs
    writer.cycle([(CTX, e) for e in traffic()], measured(kind), watermark=1.35, now=2.0)
    assert ledger.conn.execute("SELECT COUNT(*) FROM pending WHERE gpu_ms > 0").fetchone()[0] == 3
    return writer


def finish(writer: UsageWriter) -> None:
    writer.cycle([], [], math.inf, now=3.0, final=True)


def bodies(path: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        found = [json.loads(row[0]) for row in conn.execute("SELECT body FROM records")]
    finally:
        conn.close()
    return {b["requestId"]: b for b in found if b["kind"] == "request"}


def count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


# -- a reboot ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpm", "utilization"])
def test_requests_settled_after_a_reboot_carry_the_measurement_that_measured_them(tmp_path: Path, kind: str) -> None:
    control = half_measured(Ledger(tmp_path / "control.db", A), kind)  # the same, settled without a reboot
    finish(control)
    writer = half_measured(Ledger(tmp_path / "usage.db", A), kind)
    with writer.ledger.transaction():
        writer.ledger.set_meta("boot_id", "an-earlier-boot")  # the node rebooted; the usage volume survived
    writer.ledger.close()
    again = UsageWriter(Ledger(tmp_path / "usage.db", A), 1)
    assert again.restore() == 3  # settles the earlier boot's journal, before the sink knows today's measurement
    assert again.measurement is None  # the sink still sets it (a GPU may be gone after the reboot)
    found, expected = bodies(tmp_path / "usage.db"), bodies(tmp_path / "control.db")
    assert sorted(found) == ["r0", "r1", "r2"]
    for request_id, body in found.items():
        assert (body["measurement"], body["estimated"]) == (kind, False)
        assert body["energyMj"] is not None
        assert body["energyMj"] > 0
        assert body["gpuMs"] <= expected[request_id]["gpuMs"]  # what was measured before the reboot, no more
