"""A writer the crash test kills with SIGKILL: prints ``ACK <id>`` only after the write is durable.

``ledger DIR``: appends batches of records straight to the ledger, one transaction per batch.
``sink DIR``: runs the gateway's MeteringSink (timing only) and acknowledges events once journalled.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, records, units
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.metering.sink import open_sink


def ledger_writer(directory: Path) -> None:
    key_file = directory / "key.pem"
    ledger = Ledger(directory / "usage.db", chain.Signer(chain.load_private_key(key_file)))
    ctx = records.context_from_config(CONFIG, "pod", "NVIDIA-L4", units.load_table())
    start = ledger.head_seq
    for batch in itertools.count():
        bodies = []
        for i in range(1 + batch % 7):
            event = request(f"{start}-{batch}-{i}", chunks=((0.1, 3),))
            bodies.append(records.request_record(event, ctx, Settled("k", Share(gpu_ms=1.0), 3, True), "timing"))
        with ledger.transaction():
            ledger.append(bodies)
            if batch % 5 == 0:
                ledger.checkpoint()
        print("\n".join(f"ACK {b['id']}" for b in bodies), flush=True)


async def sink_writer(directory: Path, run: str) -> None:
    settings = MeteringSettings(flush_interval_ms=5, settle_after_seconds=0.05, devices_wait_seconds=0.1,
                                sample_period_ms=10)
    sink = open_sink(CONFIG, directory, "NVIDIA-L4", directory / "no-devices", settings=settings)
    await sink.start()
    for i in itertools.count():
        now = time.monotonic()
        event = request(f"{run}-{i}", admitted=now - 0.02, first_token=now - 0.01, received=now - 0.02,
                        chunks=((now - 0.01, 1), (now, 1)), done=now)
        sink.submit(event)
        await sink.drain()
        print(f"ACK {event.request_id}", flush=True)
        await asyncio.sleep(0.002)


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "ledger":
        ledger_writer(target)
    else:
        asyncio.run(sink_writer(target, sys.argv[3]))
