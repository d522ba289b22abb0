"""The metering writer's CPU per request, against another commit's writer in the same run.

The production sink's writer thread runs inside the gateway's process, so every microsecond it spends on a
request is taken from the gateway's core and GIL. This replays requests from the Azure conversation trace
(Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0): their arrival times and token counts, decoding at 30 ms
per token, one streamed chunk per token, into a ``UsageWriter`` with a signed ledger on local disk
(timing-only measurement, as without a GPU), one cycle per 200 ms of trace time as the sink runs it. It
reports the writer thread's CPU time per request (journal, attribution, settling, signing, appending),
for this tree and for each ``--baseline REF`` (a git worktree), interleaved over rounds; read the ratio.
``--short-rate RPS`` replays short requests at a fixed rate instead, as the gateway benchmark's stand-in engine
answers them: tokens that show no engine steps, the step model's worst case.

Run: ``python -m bench.metering_writer [--requests 3000] [--rounds 5] [--baseline REF] [--short-rate RPS]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gateway import tree_env, worktree
from bench.metering_attribution import load_trace

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"service": {"namespace": "bench", "name": "llama"}, "model": {"servedName": "llama"}, "runtime": "vllm",
          "billing": {"tier": "standard"}}
DECODE_SECONDS = 0.03
CYCLE_SECONDS = 0.2


def trace_events(count: int) -> list[Any]:
    """The first ``count`` trace requests, decoding at 30 ms per token, one chunk per token, an hour ago."""
    from tensorfleet.metering.events import RequestEvent, TokenChunk

    trace = load_trace(None)[:count]
    base = time.monotonic() - trace[-1][0] - 3600.0  # the whole replay lies in the past
    events = []
    for index, (at, prompt, generated) in enumerate(trace):
        start = base + at
        first = start + 0.05 + prompt * 0.0001
        chunks = tuple(TokenChunk(first + k * DECODE_SECONDS, 1) for k in range(generated))
        events.append(RequestEvent(f"req-{index}", f"tenant-{index % 7}", "llama", "/v1/chat/completions",
                                   1.7e9 + at, start, start, first, chunks[-1].at, chunks, prompt, generated, 0,
                                   200, True, True))
    return events


def short_events(count: int, rate: float) -> list[Any]:
    """``count`` requests at ``rate`` per second as the gateway benchmark's stand-in engine answers them: 12
    prompt tokens, 16 generated in two chunks (the first token, then 15) 0.3 and 0.7 ms after admission. Their
    tokens show no engine steps: every gap between two forwarded tokens is shorter than the learned spread."""
    from tensorfleet.metering.events import RequestEvent, TokenChunk

    base = time.monotonic() - count / rate - 3600.0
    events = []
    for index in range(count):
        start = base + index / rate
        first = start + 0.0003
        chunks = (TokenChunk(first, 1), TokenChunk(first + 0.0004, 15))
        events.append(RequestEvent(f"req-{index}", f"tenant-{index % 7}", "llama", "/v1/completions",
                                   1.7e9 + index / rate, start, start + 0.00005, first, chunks[-1].at, chunks, 12, 16,
                                   0, 200, True, True))
    return events


def replay(count: int, short_rate: float | None = None) -> dict[str, float]:
    """In this process: the writer's thread CPU time per request over ``count`` requests (trace or short)."""
    from tensorfleet.metering import chain, ledger, records, units
    from tensorfleet.metering.writer import UsageWriter

    ctx = records.context_from_config(CONFIG, "pod-0", "NVIDIA-L4", units.load_table())
    events = short_events(count, short_rate) if short_rate else trace_events(count)
    base = events[0].received - 1.0
    with tempfile.TemporaryDirectory(prefix="tf-bench-writer-") as tmp:
        signer = chain.Signer(chain.generate_key())
        writer = UsageWriter(ledger.Ledger(Path(tmp) / "usage.db", signer, {"namespace": "bench",
                                                                             "service": "llama", "pod": "pod-0"}), 1)
        writer.restore()
        writer.start_timing(base, 0.1)
        spent = 0.0
        taken = 0
        moment = base
        while taken < len(events) or moment < events[-1].done + 5.0:
            moment += CYCLE_SECONDS
            batch = []
            while taken < len(events) and events[taken].done <= moment:
                batch.append((ctx, events[taken]))
                taken += 1
            started = time.thread_time()
            writer.cycle(batch, [], moment - 2 * CYCLE_SECONDS, moment)
            spent += time.thread_time() - started
        started = time.thread_time()
        writer.cycle([], [], float("inf"), moment, final=True)
        spent += time.thread_time() - started
        settled = writer.ledger.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    if settled != len(events):
        raise RuntimeError(f"{settled} records for {len(events)} requests")
    return {"us_per_request": spent / len(events) * 1e6, "requests": len(events),
            "tokens_per_request": statistics.mean(e.completion_tokens for e in events)}


def run_tree(tree: Path | None, count: int, short_rate: float | None) -> dict[str, float]:
    env = {**os.environ, **(tree_env(tree) if tree is not None else {})}
    short = ["--short-rate", str(short_rate)] if short_rate else []
    done = subprocess.run([sys.executable, "-m", "bench.metering_writer", "--worker", str(count), *short], cwd=ROOT,
                          env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", action="append", default=[], metavar="REF")
    parser.add_argument("--short-rate", type=float, metavar="RPS",
                        help="replay short requests at this rate (as the gateway benchmark's stand-in answers them) "
                             "instead of the trace")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "metering_writer.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(replay(args.worker, args.short_rate)))
        return
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp, contextlib.ExitStack() as stack:
        trees: dict[str, Path | None] = {"this tree": None}
        for ref in args.baseline:
            trees[ref] = stack.enter_context(worktree(ref, Path(tmp) / f"tree-{len(trees)}"))
        rounds: dict[str, list[float]] = {name: [] for name in trees}
        for index in range(args.rounds):
            for name, tree in trees.items():
                cell = run_tree(tree, args.requests, args.short_rate)
                rounds[name].append(cell["us_per_request"])
                print(f"round {index + 1} {name}: {cell}", file=sys.stderr)
    mine = statistics.median(rounds["this tree"])
    result = {"requests": args.requests, "short_rate": args.short_rate, "rounds": args.rounds,
              "tokens_per_request": cell["tokens_per_request"],
              "us_per_request": {name: statistics.median(values) for name, values in rounds.items()},
              "rounds_us": rounds}
    print("| writer | CPU µs per request (median) | vs this tree |\n|---|---|---|")
    for name, values in rounds.items():
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / mine:.2f}x |")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
