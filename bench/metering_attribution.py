"""Attribution error per request: the Azure LLM trace replayed through a simulated continuous-batching GPU.

Trace: Azure LLM inference trace 2023 (conversation), one hour, 19,366 requests (TIMESTAMP, ContextTokens,
GeneratedTokens), CC-BY 4.0, from Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase
Splitting", ISCA 2024. Read from ../shared/data (the file is not copied into the repository).

The GPU model (an 8B-parameter model on one H100-class GPU, vLLM-like scheduler):
* continuous batching, at most ``max_seqs`` sequences, chunked prefill within a ``token_budget`` per step;
* a step takes ``fixed_ms + per_token_ms x tokens`` of kernel time, then the GPU idles ``gap_ms``
  (scheduling, sampling, detokenisation on the CPU);
* ground truth: a step's kernel time is split over the requests in it in proportion to the tokens each
  had in it (the same token-work definition the metering uses, so the benchmark measures the error the
  *measurement* adds: 100 ms NVML intervals, NVML's own averaging window, and the gateway seeing tokens
  0.2-1.5 ms after the GPU made them, with engine-side queueing it cannot see);
* NVML: ``gpm`` reports the exact busy fraction of each sampling interval; ``utilization`` reports, at
  each sample, the busy fraction of the driver's last complete window (1/6 s), rounded to 1%.

Run: ``python -m bench.metering_attribution [--minutes N]`` (default: the whole hour).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import dataclasses
import datetime
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tensorfleet.metering.attribution import Attributor, work_spans
from tensorfleet.metering.events import RequestEvent, TokenChunk

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "azure_llm_trace_2023_conv.csv"
FALLBACK_TRACE = Path("/work/shared/data/azure_llm_trace_2023_conv.csv")


@dataclasses.dataclass(frozen=True)
class GpuModel:
    fixed_ms: float = 5.0  # reading the weights once per step (memory-bound decode)
    per_token_ms: float = 0.03  # compute per token in the step
    gap_ms: float = 0.8
    max_seqs: int = 128
    token_budget: int = 2048
    sample_period: float = 0.1
    sample_jitter: float = 0.003
    driver_window: float = 1 / 6
    max_tokens: int = 8192  # prompts are truncated to the model's context


@dataclasses.dataclass
class Seq:
    key: str
    arrival: float
    prompt: int
    out: int
    admitted: float
    prefilled: int = 0
    generated: int = 0
    truth_ms: float = 0.0
    first_token: float | None = None
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)


def load_trace(minutes: float | None) -> list[tuple[float, int, int]]:
    path = TRACE if TRACE.exists() else FALLBACK_TRACE
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            moment = datetime.datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((moment.timestamp(), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    start = rows[0][0]
    trace = [(t - start, max(1, c), max(1, g)) for t, c, g in rows]
    return [r for r in trace if minutes is None or r[0] < minutes * 60]


class Measurement:
    """Busy time per sampling interval, as GPM or as NVML's utilization rate would report it."""

    def __init__(self, mode: str, model: GpuModel) -> None:
        self.mode, self.model = mode, model
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cumulative: list[float] = [0.0]  # busy time before step i

    def add_step(self, start: float, end: float) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.cumulative.append(self.cumulative[-1] + end - start)

    def busy_until(self, t: float) -> float:
        i = bisect.bisect_right(self.starts, t)
        if i == 0:
            return 0.0
        return self.cumulative[i - 1] + min(t, self.ends[i - 1]) - self.starts[i - 1]

    def busy_ms(self, a: float, b: float) -> float:
        if self.mode == "gpm":
            return (self.busy_until(b) - self.busy_until(a)) * 1000.0
        window = self.model.driver_window
        w1 = math.floor(b / window) * window
        fraction = (self.busy_until(w1) - self.busy_until(w1 - window)) / window
        return (b - a) * 1000.0 * round(fraction * 100) / 100


class Replay:
    def __init__(self, trace: list[tuple[float, int, int]], model: GpuModel, mode: str, seed: int) -> None:
        self.trace, self.model, self.mode = trace, model, mode
        self.rng = random.Random(seed)
        self.measure = Measurement(mode, model)
        self.attributor = Attributor(1)
        self.truth: dict[str, float] = {}
        self.attributed: dict[str, float] = {}
        self.in_flight: dict[str, float] = {}  # key -> admitted, what the gateway would report as hints
        self.next_sample = model.sample_period
        self.last_sample = 0.0
        self.measured_ms = self.billed_ms = self.unattributed_ms = 0.0

    def delay(self) -> float:
        return self.rng.uniform(0.0002, 0.0015)

    def sample_until(self, t: float) -> None:
        """Emit every sampling interval that ends by ``t`` (all steps before it are known)."""
        while self.next_sample <= t:
            end = self.next_sample
            busy = self.measure.busy_ms(self.last_sample, end)
            self.attributor.add_interval(self.last_sample, end, busy, None, self.mode)  # type: ignore[arg-type]
            self.measured_ms += busy
            self.last_sample = end
            jitter = self.rng.uniform(-self.model.sample_jitter, self.model.sample_jitter)
            self.next_sample = (round(end / self.model.sample_period) + 1) * self.model.sample_period + jitter
            self.settle(end)

    def settle(self, now: float) -> None:
        watermark = min([now, *self.in_flight.values()])
        for item in self.attributor.finalise(watermark):
            self.billed_ms += item.billed_ms
            self.unattributed_ms += item.unattributed_ms
        for settled in self.attributor.settle():
            self.attributed[settled.key] = settled.share.gpu_ms

    def finish(self, seq: Seq, done: float) -> None:
        event = RequestEvent(
            request_id=seq.key, tenant="t", model="m", endpoint="/v1/completions", received_at=seq.arrival,
            received=seq.arrival, admitted=seq.admitted, first_token=seq.first_token, done=done,
            chunks=tuple(TokenChunk(at, n) for at, n in seq.chunks), prompt_tokens=seq.prompt,
            completion_tokens=seq.out, cached_tokens=0, status=200, streaming=True, billable=True)
        self.attributor.add_request(seq.key, work_spans(event), True)
        del self.in_flight[seq.key]
        self.truth[seq.key] = seq.truth_ms

    def run(self) -> None:
        model = self.model
        arrivals = collections.deque(self.trace)
        waiting: collections.deque[Seq] = collections.deque()
        running: list[Seq] = []
        t, n = 0.0, 0
        while arrivals or waiting or running:
            while arrivals and arrivals[0][0] <= t:
                arrival, prompt, out = arrivals.popleft()
                n += 1
                seq = Seq(f"r{n}", arrival, min(prompt, model.max_tokens - out), out, arrival + self.delay() / 3)
                waiting.append(seq)
                self.in_flight[seq.key] = seq.admitted
            if not waiting and not running:
                t = max(t, arrivals[0][0])
                self.sample_until(t)
                continue
            self.sample_until(t)
            t = self.step(t, waiting, running)
        self.sample_until(t + 1.0)
        self.attributor.place_all()
        self.settle(math.inf)

    def step(self, t: float, waiting: collections.deque[Seq], running: list[Seq]) -> float:
        model = self.model
        batch: list[tuple[Seq, int]] = [(s, 1) for s in running if s.prefilled == s.prompt]
        budget = model.token_budget - len(batch)
        for seq in [s for s in running if s.prefilled < s.prompt]:
            if budget <= 0:
                break
            chunk = min(budget, seq.prompt - seq.prefilled)
            batch.append((seq, chunk))
            budget -= chunk
        while waiting and budget > 0 and len(running) < model.max_seqs and waiting[0].admitted <= t:
            seq = waiting.popleft()
            running.append(seq)
            chunk = min(budget, seq.prompt)
            batch.append((seq, chunk))
            budget -= chunk
        if not batch:  # only requests still on their way from the gateway
            return min(s.admitted for s in waiting)
        tokens = sum(n for _, n in batch)
        duration = (model.fixed_ms + model.per_token_ms * tokens) / 1000.0
        end = t + duration
        self.measure.add_step(t, end)
        for seq, count in batch:
            seq.truth_ms += duration * 1000.0 * count / tokens
            if seq.prefilled < seq.prompt:
                seq.prefilled += count
                if seq.prefilled < seq.prompt:
                    continue
            seen = end + self.delay()
            seq.generated += 1
            seq.first_token = seq.first_token or seen
            seq.chunks.append((seen, 1))
            if seq.generated >= seq.out:
                running.remove(seq)
                self.finish(seq, seen)
        return end + model.gap_ms / 1000.0

    def report(self) -> dict[str, Any]:
        errors = sorted(abs(self.attributed[k] - v) / v for k, v in self.truth.items() if v > 0)
        true_busy = self.measure.cumulative[-1] * 1000.0

        def pct(q: float) -> float:
            return errors[min(len(errors) - 1, int(q * len(errors)))] * 100

        return {
            "mode": self.mode, "requests": len(errors),
            "error_p50_pct": round(pct(0.50), 3), "error_p95_pct": round(pct(0.95), 3),
            "error_p99_pct": round(pct(0.99), 3), "error_max_pct": round(errors[-1] * 100, 3),
            "error_mean_pct": round(statistics.fmean(errors) * 100, 3),
            "conservation_pct": round(abs(self.billed_ms + self.unattributed_ms - self.measured_ms)
                                      / self.measured_ms * 100, 9),
            "unattributed_pct": round(self.unattributed_ms / self.measured_ms * 100, 4),
            "measured_vs_true_busy_pct": round((self.measured_ms - true_busy) / true_busy * 100, 4),
            "gpu_busy_pct": round(true_busy / 1000.0 / max(1e-9, self.measure.ends[-1]) * 100, 1),
        }


SCENARIOS: dict[str, tuple[str, float]] = {  # name: (NVML mode, trace time scale)
    "gpm": ("gpm", 1.0),
    "utilization": ("utilization", 1.0),
    "gpm, trace at half rate": ("gpm", 2.0),  # less engine-side queueing: how much of the error it causes
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="replay only the first N minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "metering_attribution.json"))
    args = parser.parse_args(argv)
    trace = load_trace(args.minutes)
    results = []
    for name, (mode, scale) in SCENARIOS.items():
        started = time.perf_counter()
        replay = Replay([(t * scale, c, g) for t, c, g in trace], GpuModel(), mode, args.seed)
        replay.run()
        row = {"scenario": name, **replay.report()}
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    summary = {"trace_requests": len(trace), "minutes": args.minutes or 60, "seed": args.seed,
               "model": dataclasses.asdict(GpuModel()),
               "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("| scenario | requests | p50 error | p95 error | p99 error | max | conservation | GPU busy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['requests']} | {r['error_p50_pct']}% | {r['error_p95_pct']}% | "
              f"{r['error_p99_pct']}% | {r['error_max_pct']}% | {r['conservation_pct']}% | {r['gpu_busy_pct']}% |")
    return summary


if __name__ == "__main__":
    main()
