"""The journal across restarts: a reboot (settled with what measured it) and a signing-key change (carried into
the new ledger, never lost with the old one, which is set aside under a name no other file has)."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, records, sink, units, verify
from tensorfleet.metering.events import RequestEvent
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.nvml import GpuInterval
from tensorfleet.metering.writer import UsageWriter

LABELS = {"namespace": "team-a", "service": "llama", "pod": "pod-1"}
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
A, B = chain.Signer(chain.generate_key()), chain.Signer(chain.generate_key())


def measured(kind: str = "gpm", energy: float | None = 30.0) -> list[GpuInterval]:
    """One second of GPU intervals, 80 % busy, 30 mJ each (``energy`` None: a GPU without an energy counter)."""
    return [GpuInterval(1.0 + 0.1 * i, 1.1 + 0.1 * i, 80.0, energy, 0, 0.8, kind)  # type: ignore[arg-type]
            for i in range(10)]


def traffic() -> list[RequestEvent]:
    return [request(f"r{i}", admitted=1.05 + 0.02 * i, first_token=1.2 + 0.02 * i, done=1.5 + 0.02 * i,
                    chunks=tuple((1.2 + 0.02 * i + 0.1 * k, 1) for k in range(4))) for i in range(3)]


def half_measured(ledger: Ledger, kind: str = "gpm", energy: float | None = 30.0) -> UsageWriter:
    """A writer that journalled the requests and finalised the intervals up to 1.35 s: each request is pending
    with part of its share."""
    writer = UsageWriter(ledger, 1)
    writer.restore()
    writer.measurement = kind  # type: ignore[assignment]  # as the sink sets it once the sampler runs
    writer.cycle([(CTX, e) for e in traffic()], measured(kind, energy), watermark=1.35, now=2.0)
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


# -- energy --------------------------------------------------------------------------------------------------------
PREVIOUS_PENDING = """CREATE TABLE pending (
    key TEXT PRIMARY KEY, arrival INTEGER NOT NULL, event TEXT NOT NULL, context TEXT NOT NULL,
    gpu_ms REAL NOT NULL DEFAULT 0, energy_mj REAL NOT NULL DEFAULT 0, covered REAL NOT NULL DEFAULT 0)"""


def as_the_previous_version_journalled(path: Path) -> None:
    """The journal of ``path`` as a writer before "not measured" energy wrote it: 0 mJ where nothing measured."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("ALTER TABLE pending RENAME TO now")
        conn.execute(PREVIOUS_PENDING)
        conn.execute("INSERT INTO pending SELECT key, arrival, event, context, gpu_ms, COALESCE(energy_mj, 0), "
                     "covered FROM now")
        conn.execute("DROP TABLE now")
    finally:
        conn.close()


@pytest.mark.parametrize("restarted", [False, True])
def test_a_gpu_without_an_energy_counter_bills_no_energy_and_the_records_verify(tmp_path: Path,
                                                                                restarted: bool) -> None:
    writer = half_measured(Ledger(tmp_path / "usage.db", A), energy=None)
    if restarted:  # the journal keeps "not measured" across a restart
        writer.ledger.close()
        writer = UsageWriter(Ledger(tmp_path / "usage.db", A), 1)
        assert writer.restore() == 3
        writer.measurement = "gpm"
    writer.cycle([], measured(energy=None)[3:], watermark=math.inf, now=3.0, final=True)
    found = bodies(tmp_path / "usage.db")
    assert sorted(found) == ["r0", "r1", "r2"]
    assert all(b["gpuMs"] > 0 and b["energyMj"] is None for b in found.values())
    records_, points, anchors, _ = verify.from_ledger_file(tmp_path / "usage.db")
    assert verify.verify(records_, points, chain.Verifier(A.public_key), anchors).ok


@pytest.mark.parametrize("energy", [None, 30.0])
def test_a_journal_the_previous_version_wrote_restores_with_its_energy(tmp_path: Path, energy: float | None) -> None:
    control = half_measured(Ledger(tmp_path / "control.db", A), energy=energy)
    control.cycle([], measured(energy=energy)[3:], watermark=math.inf, now=3.0, final=True)
    half_measured(Ledger(tmp_path / "usage.db", A), energy=energy).ledger.close()
    as_the_previous_version_journalled(tmp_path / "usage.db")
    writer = UsageWriter(Ledger(tmp_path / "usage.db", A), 1)
    assert writer.restore() == 3
    writer.measurement = "gpm"
    writer.cycle([(CTX, request("r3", admitted=2.0, first_token=2.1, chunks=((2.1, 1),)))],
                 measured(energy=energy)[3:], watermark=math.inf, now=3.0, final=True)
    found, expected = bodies(tmp_path / "usage.db"), bodies(tmp_path / "control.db")
    assert {r: (b["gpuMs"], b["energyMj"]) for r, b in found.items() if r != "r3"} == {
        r: (b["gpuMs"], b["energyMj"]) for r, b in expected.items()}
    assert (found["r0"]["energyMj"] is None) == (energy is None)


def test_a_journal_the_previous_version_wrote_keeps_no_energy_across_a_key_change(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    half_measured(sink._open_ledger(path, A, LABELS), energy=None).ledger.close()
    as_the_previous_version_journalled(path)
    writer = UsageWriter(sink._open_ledger(path, B, LABELS), 1)
    assert writer.restore() == 3
    writer.measurement = "gpm"
    writer.cycle([], measured(energy=None)[3:], watermark=math.inf, now=3.0, final=True)
    assert [b["energyMj"] for b in bodies(path).values()] == [None, None, None]


# -- a signing-key change -----------------------------------------------------------------------------------------
def test_requests_journalled_before_a_key_change_are_billed_once_by_the_new_ledger(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    control = half_measured(Ledger(tmp_path / "control.db", A))
    control.cycle([], measured()[3:], watermark=math.inf, now=3.0, final=True)
    path = tmp_path / "usage.db"
    old = half_measured(sink._open_ledger(path, A, LABELS))
    old_id = old.ledger.ledger_id
    old.ledger.close()
    # The container restarts with the rotated key: the old ledger is set aside, its journal moves with the key.
    new = UsageWriter(sink._open_ledger(path, B, LABELS), 1)
    assert new.restore() == 3
    new.measurement = "gpm"
    new.cycle([], measured()[3:], watermark=math.inf, now=3.0, final=True)  # the intervals the old one had not seen
    aside = tmp_path / f"usage.{A.key_id}.db"
    assert sorted(bodies(path)) == ["r0", "r1", "r2"]
    assert bodies(aside) == {}
    # With the shares journalled before the change: the same bill as without a key change.
    assert {r: b["gpuMs"] for r, b in bodies(path).items()} == {
        r: b["gpuMs"] for r, b in bodies(tmp_path / "control.db").items()}
    assert count(aside, "pending") == 0
    assert count(aside, "intervals") == 0
    conn = sqlite3.connect(aside)
    assert conn.execute("SELECT value FROM meta WHERE key = 'journal_carried_to'").fetchone()[0] == new.ledger.ledger_id
    assert new.ledger.get_meta("journal_carried_from") == old_id
    assert "its 3 requests not settled yet moved to the new ledger" in caplog.text


def test_a_key_changed_back_and_forth_sets_every_ledger_aside_under_a_name_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    appended = 0

    def use(signer: chain.Signer, records_to_add: int) -> None:
        nonlocal appended
        ledger = sink._open_ledger(path, signer, LABELS)
        writer = UsageWriter(ledger, 1)
        writer.start_timing(0.0, 0.1)
        events = [request(f"q{appended + i}", admitted=0.1, first_token=0.2, chunks=((0.3, 2),))
                  for i in range(records_to_add)]
        appended += records_to_add
        writer.cycle([(CTX, e) for e in events], [], math.inf, now=1.0, final=True)
        ledger.close()

    use(A, 3)
    use(B, 1)
    use(A, 2)  # back to A: B's ledger set aside
    use(B, 0)  # and to B again: the second A ledger must not replace the first
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db")
    assert names == sorted(["usage.db", f"usage.{A.key_id}.db", f"usage.{B.key_id}.db", f"usage.{A.key_id}.2.db"])
    assert [len(bodies(tmp_path / n)) for n in (f"usage.{A.key_id}.db", f"usage.{B.key_id}.db",
                                                f"usage.{A.key_id}.2.db", "usage.db")] == [3, 1, 2, 0]
    for name, signer in ((f"usage.{A.key_id}.db", A), (f"usage.{A.key_id}.2.db", A), (f"usage.{B.key_id}.db", B)):
        found, points, anchors, _ = verify.from_ledger_file(tmp_path / name)
        assert verify.verify(found, points, chain.Verifier(signer.public_key), anchors).ok, name
    assert not list(tmp_path.glob("*.db-wal")) or all(p.stat().st_size == 0 for p in tmp_path.glob("*.db-wal"))


def test_a_key_change_stopped_between_its_renames_is_finished_at_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "usage.db"
    half_measured(sink._open_ledger(path, A, LABELS)).ledger.close()
    renames = []
    real_rename = sink._rename

    def crash_on_the_second(source: Path, target: Path) -> None:
        renames.append(target.name)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")  # the process dies: the new ledger is not in place yet
        real_rename(source, target)

    monkeypatch.setattr(sink, "_rename", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        sink._open_ledger(path, B, LABELS)
    monkeypatch.undo()
    assert not path.exists()
    assert (tmp_path / "usage.db.new").exists()
    writer = UsageWriter(sink._open_ledger(path, B, LABELS), 1)
    assert writer.restore() == 3
    finish(writer)
    assert sorted(bodies(path)) == ["r0", "r1", "r2"]
    assert not (tmp_path / "usage.db.new").exists()


@pytest.mark.parametrize("next_key", ["new", "old"])
def test_a_key_change_stopped_before_its_renames_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               next_key: str) -> None:
    # Killed after the new ledger got its copy of the journal, before the old one was set aside: the old ledger
    # still has its journal. The next start redoes the change (same new key) or drops the copy (old key back).
    path = tmp_path / "usage.db"
    half_measured(sink._open_ledger(path, A, LABELS)).ledger.close()

    def killed(source: Path, target: Path) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sink, "_rename", killed)
    with pytest.raises(KeyboardInterrupt):
        sink._open_ledger(path, B, LABELS)
    monkeypatch.undo()
    assert count(tmp_path / "usage.db.new", "pending") == 3
    assert count(path, "pending") == 3
    signer = B if next_key == "new" else A
    writer = UsageWriter(sink._open_ledger(path, signer, LABELS), 1)
    assert writer.restore() == 3
    finish(writer)
    assert sorted(bodies(path)) == ["r0", "r1", "r2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == sorted(
        ["usage.db"] + ([f"usage.{A.key_id}.db"] if next_key == "new" else []))
