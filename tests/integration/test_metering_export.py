"""Export to a loopback CloudEvents sink that fails and recovers: nothing lost, nothing billed twice."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gateway_support import wait_until
from metering_builders import CONFIG, request
from tensorfleet.metering import chain, export, metrics, records, units, verify
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.ledger import Ledger, read_ledger
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.metering.sink import open_sink

pytestmark = pytest.mark.integration


class LoopbackSink:
    """A CloudEvents batch endpoint on 127.0.0.1: 'down' answers 503, 'ack-lost' stores then answers 500."""

    def __init__(self) -> None:
        self.mode = "down"
        self.received: list[dict] = []
        self.attempts = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                sink.attempts += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == export.CONTENT_TYPE
                assert self.headers["Authorization"] == "Bearer s3cret"
                if sink.mode != "down":
                    sink.received.extend(json.loads(body))
                status = {"down": 503, "ack-lost": 500, "up": 200}[sink.mode]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v1/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def deduplicated(self) -> dict[str, dict]:
        return {event["id"]: event for event in self.received}


@pytest.fixture
def loopback() -> Iterator[LoopbackSink]:
    sink = LoopbackSink()
    sink.thread.start()
    yield sink
    sink.server.shutdown()
    sink.server.server_close()


async def test_an_outage_loses_nothing_and_dedupe_bills_each_request_once(tmp_path: Path,
                                                                          loopback: LoopbackSink) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "devices").write_text("")
    settings = MeteringSettings(sink_url=loopback.url, sink_token_file=str(tmp_path / "token"), flush_interval_ms=10,
                                settle_after_seconds=0.05, export_batch_size=7, export_interval_seconds=0.02,
                                retry_initial_seconds=0.02, retry_max_seconds=0.1, devices_wait_seconds=0.5,
                                checkpoint_every_records=10)
    failures_before = metrics.EXPORT_FAILURES._value.get()
    sink = open_sink(CONFIG, tmp_path / "usage", "NVIDIA-L4", tmp_path / "devices", settings=settings)
    await sink.start()
    for phase, count in (("down", 25), ("ack-lost", 10), ("up", 10)):
        loopback.mode = phase
        for i in range(count):
            now = time.monotonic()
            sink.submit(request(f"{phase}-{i}", admitted=now - 0.01, first_token=now - 0.005, received=now - 0.01,
                                chunks=((now, 2),), done=now, tenant=f"t{i % 3}", received_at=time.time()))
            await asyncio.sleep(0.01)
        if phase == "down":
            await asyncio.sleep(0.3)
            assert metrics.SPOOL._value.get() > 0
            assert metrics.EXPORT_FAILURES._value.get() > failures_before
            assert loopback.received == []
        if phase == "ack-lost":  # the exporter backs off after the outage: wait for a batch to lose its ack
            await wait_until(lambda: bool(loopback.received), 10, "a batch sent while acks were being lost")
    await sink.drain()
    _, rows, _ = read_ledger(tmp_path / "usage" / "usage.db")
    await wait_until(lambda: len([e for e in loopback.deduplicated().values()
                                  if e["type"] != export.CHECKPOINT_TYPE]) >= 45,
                     20, "the exporter to catch up after the sink recovered")
    await sink.close()
    unique = loopback.deduplicated()
    billed = [e for e in unique.values() if e["type"] == export.EVENT_TYPES["request"]]
    _, rows, _ = read_ledger(tmp_path / "usage" / "usage.db")
    ledger_ids = {json.loads(body)["id"] for _, body, _, _ in rows}
    assert {e["id"] for e in billed} == ledger_ids
    assert len(billed) == 45
    assert len(loopback.received) > len(unique)  # acks were lost, so some batches came twice...
    ru = sum(e["data"]["resourceUnits"] for e in billed)
    assert ru == pytest.approx(sum(json.loads(b)["resourceUnits"] for _, b, _, _ in rows))  # ...billed once
    key = chain.load_private_key(tmp_path / "usage" / "signing-key.pem").public_key()
    recs, points = verify.from_events(loopback.received)
    assert verify.verify(recs, points, chain.Verifier(key)).ok
    assert all(e["subject"] == e["data"]["tenant"] for e in billed)


def test_hours_of_outage_are_retried_with_capped_backoff_and_then_delivered(tmp_path: Path) -> None:
    signer = chain.Signer(chain.generate_key())
    ledger = Ledger(tmp_path / "usage.db", signer)
    ctx = records.context_from_config(CONFIG, "pod", "NVIDIA-L4", units.load_table())
    received: dict[str, dict] = {}
    state = {"up": False}

    def handler(req: httpx.Request) -> httpx.Response:
        if not state["up"]:
            raise httpx.ConnectError("connection refused")
        for event in json.loads(req.content):
            received[event["id"]] = event
        return httpx.Response(202)

    settings = MeteringSettings(sink_url="http://sink.invalid/events", retry_initial_seconds=1,
                                retry_max_seconds=300, export_batch_size=100)
    thread = export.ExporterThread(export.Exporter(Ledger(tmp_path / "usage.db", signer), settings,
                                                   transport=httpx.MockTransport(handler)), settings)
    simulated, waits, appended = 0.0, [], 0
    while simulated < 3 * 3600:  # three hours of a dead sink while the pod keeps serving
        with ledger.transaction():
            event = request(f"r{appended}", chunks=((0.1, 1),))
            ledger.append([records.request_record(event, ctx, Settled("k", Share(gpu_ms=2.0), 1, True), "gpm")])
            ledger.checkpoint()
        appended += 1
        wait = thread.step()
        waits.append(wait)
        simulated += wait
    assert thread.failures == len(waits)
    assert max(waits) <= 300
    assert waits[0] <= 1
    assert metrics.SPOOL._value.get() == appended
    state["up"] = True
    thread.step()
    assert len([e for e in received.values() if e["type"] == export.EVENT_TYPES["request"]]) == appended
    assert thread.failures == 0
    assert metrics.SPOOL._value.get() == 0


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    delay = export.backoff_delays(1.0, 60.0, random.Random(1))
    values = [delay(n) for n in range(1, 12)]
    assert 0.5 <= values[0] <= 1.0
    assert 1.0 <= values[1] <= 2.0
    assert 2.0 <= values[2] <= 4.0
    assert all(30.0 <= v <= 60.0 for v in values[7:])
