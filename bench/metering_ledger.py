"""Ledger appends per second with durability on, against baselines in the same run.

* ``ledger``: tensorfleet's Ledger.append (canonical JSON, sha256 chain, Ed25519 signature), SQLite WAL with
  ``synchronous=FULL`` (every commit fsynced: what survives kill -9 and power loss).
* ``plain sqlite``: the same rows (same JSON text) inserted into the same schema without hashing or
  signing, same durability: the cost of the chain and the signature.
* ``ledger, fsync off``: the ledger with ``synchronous=OFF``: the cost of durability.

Each is run with one record per transaction and with 100 per transaction (a writer cycle commits all
the records it settled at once). Ratios are what to read: absolute rates depend on this machine's disk.
Run: ``python -m bench.metering_ledger [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorfleet.metering import chain, records, units
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.events import RequestEvent, TokenChunk
from tensorfleet.metering.ledger import SCHEMA, Ledger

CONFIG = {"service": {"namespace": "bench", "name": "llama"}, "model": {"servedName": "llama"}, "runtime": "vllm",
          "gpusPerReplica": 1, "engine": {"precision": "fp16", "fingerprint": "sha256:" + "0" * 64},
          "billing": {"tier": "standard", "currency": "USD", "pricePerResourceUnit": "0.000002"}}


def _pool(count: int) -> list[dict[str, Any]]:
    """Realistic record bodies, built once so that no configuration pays for building them."""
    ctx = records.context_from_config(CONFIG, "pod-0", "NVIDIA-H100-80GB-HBM3", units.load_table())
    out = []
    for i in range(count):
        event = RequestEvent(f"req-{i}", f"tenant-{i % 7}", "llama", "/v1/chat/completions", 1.7e9 + i, 1.0, 1.0,
                             1.2, 3.0, (TokenChunk(3.0, 200),), 1100, 200, 0, 200, True, True)
        out.append(records.request_record(event, ctx, Settled("k", Share(gpu_ms=812.5, covered_tokens=1300), 1300,
                                                              True), "gpm"))
    return out


POOL = _pool(1000)


def bodies(count: int, offset: int) -> list[dict[str, Any]]:
    return [{**POOL[(offset + i) % len(POOL)], "id": f"rec-{offset + i}"} for i in range(count)]


def run_ledger(path: Path, batch: int, seconds: float, durable: bool) -> float:
    ledger = Ledger(path, chain.Signer(chain.generate_key()))
    if not durable:
        ledger.conn.execute("PRAGMA synchronous=OFF")
    return _timed(lambda n: _ledger_batch(ledger, n, batch), batch, seconds)


def _ledger_batch(ledger: Ledger, n: int, batch: int) -> None:
    items = bodies(batch, n)
    with ledger.transaction():
        ledger.append(items)


def run_plain(path: Path, batch: int, seconds: float) -> float:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    state = {"seq": 0}

    def insert(n: int) -> None:
        rows = []
        for body in bodies(batch, n):
            state["seq"] += 1
            text = chain.canonical({**body, "ledger": "plain", "seq": state["seq"], "prevHash": ""})
            rows.append((state["seq"], body["id"], body["time"], text, "", ""))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")

    return _timed(insert, batch, seconds)


def _timed(work: Callable[[int], None], batch: int, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work(done)
        done += batch
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time per configuration")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "metering_ledger.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for batch in (1, 100):
            rates = {
                "ledger": run_ledger(Path(directory) / f"l{batch}.db", batch, args.seconds, durable=True),
                "plain sqlite": run_plain(Path(directory) / f"p{batch}.db", batch, args.seconds),
                "ledger, fsync off": run_ledger(Path(directory) / f"o{batch}.db", batch, args.seconds, durable=False),
            }
            rows.append({"records_per_transaction": batch, **{k: round(v) for k, v in rates.items()},
                         "ledger / plain sqlite": round(rates["ledger"] / rates["plain sqlite"], 3),
                         "ledger / fsync off": round(rates["ledger"] / rates["ledger, fsync off"], 3)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("| records per transaction | ledger (appends/s) | plain SQLite, same durability | ledger, fsync off "
          "| ledger / plain | ledger / fsync off |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records_per_transaction']} | {r['ledger']} | {r['plain sqlite']} | {r['ledger, fsync off']} "
              f"| {r['ledger / plain sqlite']} | {r['ledger / fsync off']} |")
    return {"rows": rows}


if __name__ == "__main__":
    main()
