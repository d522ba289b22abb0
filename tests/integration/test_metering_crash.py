"""kill -9 at random moments: no acknowledged record is lost and the chain always verifies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from metering_builders import CONFIG
from tensorfleet.metering import chain, verify
from tensorfleet.metering.ledger import read_ledger
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.metering.sink import open_sink

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("metering_crash_child.py")
KILLS = 8


def run_and_kill(args: list[str], rng: random.Random) -> list[str]:
    """Start the child, let it work a random while, SIGKILL it; the ids it acknowledged."""
    child = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    acked: list[str] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("ACK "):
                acked.append(line.split()[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while not acked and time.monotonic() < deadline and child.poll() is None:  # wait until it writes
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    reader.join(10)
    assert acked, "the child never acknowledged anything"
    return acked


def verified(path: Path, key: object) -> list[dict]:
    recs, points, anchors, _ = verify.from_ledger_file(path)
    result = verify.verify(recs, points, chain.Verifier(key), anchors)  # type: ignore[arg-type]
    assert result.ok, result.problems
    return [json.loads(r.body_text) for r in recs]


def test_killing_a_ledger_writer_never_loses_an_acknowledged_record_or_breaks_the_chain(tmp_path: Path) -> None:
    key = chain.generate_key()
    (tmp_path / "key.pem").write_bytes(chain.private_pem(key))
    rng = random.Random(5)
    acked: list[str] = []
    for _ in range(KILLS):
        acked += run_and_kill(["ledger", str(tmp_path)], rng)
        ids = [b["id"] for b in verified(tmp_path / "usage.db", key.public_key())]
        assert len(ids) == len(set(ids))
        assert set(acked) <= set(ids)


def test_killing_the_sink_loses_no_journalled_request_and_bills_none_twice(tmp_path: Path) -> None:
    rng = random.Random(7)
    acked: list[str] = []
    for run in range(KILLS // 2):
        acked += run_and_kill(["sink", str(tmp_path), f"run{run}"], rng)
    # The next start settles everything that was journalled before the kills.
    import asyncio

    async def restart() -> None:
        sink = open_sink(CONFIG, tmp_path, "NVIDIA-L4", tmp_path / "no-devices",
                         settings=MeteringSettings(flush_interval_ms=5, devices_wait_seconds=0.1))
        await sink.start()
        await sink.close()

    asyncio.run(restart())
    key = chain.load_private_key(tmp_path / "signing-key.pem").public_key()
    bodies = [b for b in verified(tmp_path / "usage.db", key) if b["kind"] == "request"]
    billed = [b["requestId"] for b in bodies]
    assert len(billed) == len(set(billed))  # none twice
    assert set(acked) <= set(billed)  # none lost
    _, _, checkpoints = read_ledger(tmp_path / "usage.db")
    assert checkpoints
