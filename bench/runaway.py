"""Runaway control: the cost of the check per streamed chunk, as a fraction of the gateway's per-chunk cost.

    python -m bench.runaway [--seconds 4] [--rounds 3]

All figures come from the same run on the same machine:

* gateway per-chunk cost: the real gateway process (``bench/_run_gateway.py``, uvloop, in-memory
  metering queue) relays long streams (chat, 512 tokens) from the stand-in engine generating clean prose,
  with runaway control off; its CPU time (``/proc/PID/stat``, user + system) divided by the chunks it
  forwarded. Every chunk is one engine event carrying one token. Two loads: paced (5 ms between tokens,
  32 streams: one event per read, as from a GPU engine's decode steps) and unpaced (8 streams as fast as
  the stand-in writes: several events per read, the gateway's cheapest chunks, so the check's largest
  share).
* runaway check per chunk inside the gateway: a third gateway, runaway control on, adds up the thread CPU
  time of every ``RunawayGuard.check`` (one per batch of events; less the timer's own cost, measured in
  that process), divides by the events, and adds the per-event cost of keeping an event for its batch
  (a list append, measured in this process). This is the figure held against the goal (under 10 %).
* the check alone: ``RunawayGuard.on_event`` on the same event bytes in a loop in this process (warm
  caches: a lower bound), with the default thresholds and the largest window the CRD allows (past
  ``runaway.NATIVE_MAX_WINDOW``: the detector's probes, in Python); and again without the C extension
  (the fallback where it is not compiled): the event text read by the regular expression, then the
  detector's probes as well.

As a cross-check, a second gateway with runaway control on (not timed) relays the same load, the three
alternating over several rounds; its extra CPU per chunk is the check's cost as seen end to end (noisier:
a difference of two measurements on shared cores). The stand-in generates the clean test texts
(tests/data/runaway/clean-*: prose, code, tables, JSON, CJK) word by word, so nothing is stopped.
Results: bench/results/runaway.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from engines import processes  # noqa: E402
from tensorfleet.gateway import runaway, runaway_hook  # noqa: E402
from tensorfleet.gateway.config import RunawayConfig  # noqa: E402
from tensorfleet.gateway.runaway_hook import SINGLE_CHOICE_SHAPES, RunawayGuard  # noqa: E402

PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"
CLEAN_TEXTS = ROOT / "tests" / "data" / "runaway"  # clean-*: prose, code, tables, JSON, CJK
STREAM_TOKENS = 512
# (label, stand-in delay between tokens, concurrent streams). Paced: one event per read, as from a GPU
# engine's decode steps. Unpaced: the stand-in writes as fast as it can, several events arrive per read and
# the gateway's per-chunk cost is at its lowest, so the check's share at its highest.
MODES = (("paced, 5 ms per token, 32 streams", 0.005, 32), ("unpaced, 8 streams", 0.0, 8))
APPEND_US = 0.1  # replaced in run() by the measured cost of RunawayGuard.on_event between two checks
CONFIGS = {"default": RunawayConfig(enabled=True),
           "largest window": RunawayConfig(enabled=True, ngram_size=64, max_repeats=2, window_tokens=65536)}


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextlib.contextmanager
def started(command: list[str], health: str, log: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        processes.wait_http(health, 60, proc, log)
        yield proc
    finally:
        processes.stop_group(proc)


def gateway_document(folder: pathlib.Path, runaway: bool) -> str:
    doc = {"service": {"namespace": "bench", "name": "bench"}, "model": {"servedName": "tiny"}, "runtime": "vllm",
           "warmup": {"requests": [{"prompt": "warm up", "maxTokens": 2}]}, "auth": {}, "billing": {"tier": "standard"},
           "tokenPolicy": {"maxOutputTokens": 4096, "runaway": {"enabled": runaway}}}
    path = folder / f"gateway-{'on' if runaway else 'off'}.json"
    path.write_text(json.dumps(doc))
    return str(path)


async def stream_load(url: str, concurrency: int, seconds: float) -> int:
    """Streams for ``seconds``; the number of token chunks received."""
    body = {"model": "tiny", "max_tokens": STREAM_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": "tell me about serving models"}]}
    chunks = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal chunks
        while time.perf_counter() < deadline:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                raw = await response.read()
            if response.status != 200 or not raw.endswith(b"data: [DONE]\n\n"):
                raise RuntimeError(f"{url}: a broken stream ({response.status})")
            if b'"finish_reason":"length"' not in raw[-400:]:
                raise RuntimeError("the stream did not run to max_tokens")
            chunks += raw.count(b'"delta":{"content":')

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return chunks


def gateway_cost(pid: int, url: str, concurrency: int, seconds: float) -> dict[str, float]:
    before, wall = cpu_seconds(pid), time.perf_counter()
    chunks = asyncio.run(stream_load(url, concurrency, seconds))
    cpu = cpu_seconds(pid) - before
    return {"chunks": chunks, "cpu_s": cpu, "us_per_chunk": 1e6 * cpu / chunks,
            "chunks_per_s": chunks / (time.perf_counter() - wall)}


def corpus(folder: pathlib.Path) -> pathlib.Path:
    """The clean test texts one after another (about 6,000 words): what the stand-in generates, in turn.
    The identity matrix, the documented false positive of the defaults, is left out."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(CLEAN_TEXTS.glob("clean-*")) if "identity" not in p.name]
    path = folder / "corpus.txt"
    path.write_text("\n".join(texts))
    return path


def stream_events(words: list[str]) -> list[bytes]:
    """The event payloads the gateway's guard sees for one stream (the stand-in's format, continuous usage)."""
    events = []
    for i in range(STREAM_TOKENS):
        chunk = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1_700_000_000,
                 "model": "tiny", "choices": [{"index": 0, "delta": {"content": " " + words[i % len(words)]},
                                               "finish_reason": None}],
                 "usage": {"prompt_tokens": 11, "total_tokens": 12 + i, "completion_tokens": i + 1}}
        events.append(json.dumps(chunk, separators=(",", ":")).encode())
    return events


def guard_cost(config: RunawayConfig, events: list[bytes], streams: int, single: bool) -> float:
    """CPU microseconds per chunk of RunawayGuard.on_event (a fresh guard per stream, as per request)."""
    best = float("inf")
    shape = SINGLE_CHOICE_SHAPES["chat"] if single else None
    for _ in range(5):
        started_at = time.process_time()
        for _ in range(streams):
            guard = RunawayGuard(config, lambda signal: None, shape)
            for payload in events:
                if guard.on_event(payload) is not None:
                    raise RuntimeError("clean text was stopped")
        best = min(best, time.process_time() - started_at)
    return 1e6 * best / (streams * len(events))


def measure_mode(work: pathlib.Path, text: pathlib.Path, token_delay: float, seconds: float, rounds: int,
                 concurrency: int) -> dict[str, Any]:
    """Gateway CPU per chunk with runaway control off and on, alternating, in front of one stand-in."""
    with contextlib.ExitStack() as stack:
        engine_port = processes.free_port()
        engine = f"http://127.0.0.1:{engine_port}"
        stack.enter_context(started([PYTHON, "-m", "tests.engines.standin", "--port", str(engine_port),
                                     "--text-file", str(text), "--token-delay", str(token_delay)],
                                    engine + "/health", work / f"standin-{token_delay}.log"))
        gateways: dict[str, tuple[int, str]] = {}
        timings = work / f"guards-{token_delay}.json"
        for name, runaway in (("off", False), ("on", True), ("timed", True)):
            port, admin = processes.free_port(), processes.free_port()
            command = [PYTHON, "-m", "bench._run_gateway", "--config", gateway_document(work, runaway),
                       "--upstream", engine, "--port", str(port), "--admin-port", str(admin),
                       "--check-every", str(runaway_hook.CHECK_EVERY)]
            if name == "timed":  # a third gateway, its checks timed from inside (the timer adds its own cost)
                command += ["--time-guards", str(timings)]
            log = work / f"gateway-{name}-{token_delay}.log"
            proc = stack.enter_context(started(command, f"http://127.0.0.1:{admin}/readyz", log))
            gateways[name] = (proc.pid, f"http://127.0.0.1:{port}")
        for name in gateways:  # warm both up (connection pools, first-request work)
            gateway_cost(*gateways[name], concurrency, 1.0)
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": [], "timed": []}
        for _ in range(rounds):
            for name in ("off", "on", "timed"):
                runs[name].append(gateway_cost(*gateways[name], concurrency, seconds))
    guards = json.loads(timings.read_text())  # written by the timed gateway as it stopped
    checks = (guards["ns"] - guards["calls"] * guards["timer_ns_per_call"]) / 1000
    in_gateway = checks / guards["events"] + APPEND_US
    off = statistics.median(r["us_per_chunk"] for r in runs["off"])
    on = statistics.median(r["us_per_chunk"] for r in runs["on"])
    return {"token_delay_s": token_delay, "concurrency": concurrency, "runs": runs, "guard_timings": guards,
            "gateway_us_per_chunk_off": off, "gateway_us_per_chunk_on": on,
            "guard_us_per_chunk_in_gateway": in_gateway, "guard_fraction_in_gateway": in_gateway / off,
            "end_to_end_extra_fraction": (on - off) / off}


def append_cost(events: list[bytes]) -> float:
    """CPU microseconds of RunawayGuard.on_event for an event that does not complete a batch."""
    guard = RunawayGuard(CONFIGS["default"], lambda signal: None, SINGLE_CHOICE_SHAPES["chat"])
    calls, best = runaway_hook.CHECK_EVERY - 1, float("inf")
    for _ in range(5):
        started_at = time.process_time()
        for _ in range(20000):
            for payload in events[:calls]:
                guard.on_event(payload)
            guard._events.clear()
        best = min(best, time.process_time() - started_at)
    return 1e6 * best / (20000 * calls)


def run(seconds: float, rounds: int) -> dict[str, Any]:
    global APPEND_US
    modes = {}
    with tempfile.TemporaryDirectory(prefix="bench-runaway-") as tmp:
        text = corpus(pathlib.Path(tmp))
        events = stream_events(text.read_text(encoding="utf-8").split())
        APPEND_US = append_cost(events)
        for label, delay, concurrency in MODES:
            modes[label] = measure_mode(pathlib.Path(tmp), text, delay, seconds, rounds, concurrency)
    single = {label: guard_cost(config, events, 20, single=True) for label, config in CONFIGS.items()}
    general = {label: guard_cost(config, events, 20, single=False) for label, config in CONFIGS.items()}
    native, runaway_hook.native_string_bodies = runaway_hook.native_string_bodies, None
    core = runaway.native_detector_core
    try:  # the same check without the C extension: the text read by the regular expression, then the probes too
        python_reading = {label: guard_cost(config, events, 20, single=True) for label, config in CONFIGS.items()}
        runaway.native_detector_core = None
        python = {label: guard_cost(config, events, 20, single=True) for label, config in CONFIGS.items()}
    finally:
        runaway_hook.native_string_bodies, runaway.native_detector_core = native, core
    return {"machine": f"{os.cpu_count()} cores (shared)", "seconds": seconds, "rounds": rounds,
            "check_every_events": runaway_hook.CHECK_EVERY, "append_us_per_event": APPEND_US,
            "stream_tokens": STREAM_TOKENS, "native_extraction": native is not None,
            "native_detector": core is not None, "guard_us_per_chunk": single,
            "guard_us_per_chunk_python_extraction": python_reading, "guard_us_per_chunk_python": python,
            "guard_us_per_chunk_general_path": general,
            "modes": modes}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| load | gateway CPU µs per chunk (runaway off) | runaway check per chunk, in the gateway | "
             "= fraction of the gateway's per-chunk cost | gateway with runaway on, end to end |",
             "|---|---|---|---|---|"]
    for label, mode in result["modes"].items():
        lines.append(f"| {label} | {mode['gateway_us_per_chunk_off']:.1f} | "
                     f"{mode['guard_us_per_chunk_in_gateway']:.2f} µs | **{mode['guard_fraction_in_gateway']:.1%}** | "
                     f"{mode['gateway_us_per_chunk_on']:.1f} µs ({mode['end_to_end_extra_fraction']:+.1%}) |")
    guard, general = result["guard_us_per_chunk"], result["guard_us_per_chunk_general_path"]
    reading, python = result["guard_us_per_chunk_python_extraction"], result["guard_us_per_chunk_python"]
    native = "with the C extension" if result["native_detector"] else "(the C extension is not compiled here)"
    lines.append("")
    lines.append(f"Check alone in a loop (this process), {native}: {guard['default']:.2f} µs per chunk with the "
                 f"default thresholds, {guard['largest window']:.2f} µs with the largest window (the probes); "
                 f"without the C extension: {reading['default']:.2f} µs with the text read by the regular "
                 f"expression, {python['default']:.2f} µs with the probes as well; requests with several choices "
                 f"(general path): {general['default']:.2f} µs.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="load per gateway per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check-every", type=int, default=runaway_hook.CHECK_EVERY,
                        help="stream events per check (to price another batch size)")
    args = parser.parse_args()
    runaway_hook.CHECK_EVERY = args.check_every
    result = run(args.seconds, args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runaway.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
