"""Attribution error per request: the Azure LLM trace replayed through a simulated continuous-batching GPU.

Trace: Azure LLM inference trace 2023 (conversation), one hour, 19,366 requests (TIMESTAMP, ContextTokens,
GeneratedTokens), CC-BY 4.0, from Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase
Splitting", ISCA 2024. Read from ../shared/data (the file is not copied into the repository).

The GPU model (an 8B-parameter model on one H100-class GPU) follows vLLM's V1 scheduler
(vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule``):
* each step first schedules the running requests: one token for every decoding request, then the next
  chunk of a prompt still being prefilled; then admits waiting requests first come first served while
  fewer than ``max_seqs`` (``max_num_seqs``) run and the ``token_budget`` (``max_num_batched_tokens``)
  has room, a prompt that does not fit being chunked (chunked prefill); prefix-cached prompt tokens are
  computed already and take no budget;
* the waiting queue holds requests in the order they reached the engine (``queue_order="engine"``;
  ``"gateway"`` reproduces the benchmark before that fix, which kept trace order even when a later request
  reached the engine first);
* the step that completes a prompt samples its first token; every step emits one token per decoding request;
* a step takes ``fixed_ms + per_token_ms x tokens`` of kernel time (reading the weights once, then compute
  per token: 16 GB of fp16 weights at 3.35 TB/s is 4.8 ms, 16 GFLOP per token at about 55 % of 989 dense
  TFLOPS is 0.03 ms), then the GPU idles ``gap_ms + gap_per_request_ms x running`` while the CPU schedules,
  samples and sends the outputs;
* ground truth: a step's kernel time is split over the requests in it in proportion to the tokens each
  had in it (the issue's token-work definition, at the resolution of single steps), so the benchmark
  measures the error the *measurement* adds: 100 ms NVML intervals, NVML's own averaging window, the
  gateway seeing tokens 0.2-1.5 ms after the GPU made them, and engine-side queueing it cannot see;
* NVML: ``gpm`` reports the exact busy fraction of each sampling interval; ``utilization`` reports, at
  each sample, the busy fraction of the driver's last complete window (1/6 s), rounded to 1%; ``timing``
  is metering without a GPU reading (busy whenever some request had work).

Run: ``python -m bench.metering_attribution [--minutes N] [--scenario NAME ...]`` (default: the whole hour,
every scenario, both attributions: about 25 minutes on two shared cores).
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

from tensorfleet.metering.attribution import Attributor, Placement, work_spans
from tensorfleet.metering.events import RequestEvent, TokenChunk

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "azure_llm_trace_2023_conv.csv"
FALLBACK_TRACE = Path("/work/shared/data/azure_llm_trace_2023_conv.csv")
BLOCK_TOKENS = 16  # vLLM's KV block: the prefix cache hits whole blocks


@dataclasses.dataclass(frozen=True)
class GpuModel:
    fixed_ms: float = 5.0  # reading the weights once per step (memory-bound decode)
    per_token_ms: float = 0.03  # compute per token in the step
    gap_ms: float = 0.8  # GPU idle between steps (CPU: schedule, sample, send outputs)
    gap_per_request_ms: float = 0.0  # more CPU time per running request (0: a constant gap)
    max_seqs: int = 128
    token_budget: int = 2048
    sample_period: float = 0.1
    sample_jitter: float = 0.003
    driver_window: float = 1 / 6
    max_tokens: int = 8192  # prompts are truncated to the model's context
    queue_order: str = "engine"  # "engine": as requests reached it (vLLM); "gateway": trace order (old benchmark)
    cached_requests: float = 0.0  # share of requests that hit the prefix cache
    cached_max_share: float = 0.9  # a hit covers a block-aligned share of the prompt, uniform in [0, this]


@dataclasses.dataclass(frozen=True)
class Attribution:
    placement: Placement = "steps"
    step_tokens: int | None = None  # None: learned
    prefill_weight: float = 1.0
    report_cached: bool = True  # the engine reports prefix-cached tokens to the gateway


@dataclasses.dataclass
class Seq:
    key: str
    arrival: float
    prompt: int
    out: int
    admitted: float
    cached: int = 0
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
    def __init__(self, trace: list[tuple[float, int, int]], model: GpuModel, mode: str, seed: int,
                 attribution: Attribution | None = None) -> None:
        self.trace, self.model, self.mode = trace, model, mode
        self.attribution = attribution or Attribution()
        self.rng = random.Random(seed)
        self.cache_rng = random.Random(seed + 1)  # its own stream: the same hits under every attribution
        self.measure = Measurement(mode, model)
        self.attributor = Attributor(1, placement=self.attribution.placement,
                                     step_tokens=self.attribution.step_tokens)
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
            busy = None if self.mode == "timing" else self.measure.busy_ms(self.last_sample, end)
            self.attributor.add_interval(self.last_sample, end, busy, None, self.mode)  # type: ignore[arg-type]
            self.last_sample = end
            jitter = self.rng.uniform(-self.model.sample_jitter, self.model.sample_jitter)
            self.next_sample = (round(end / self.model.sample_period) + 1) * self.model.sample_period + jitter
            self.settle(end)

    def settle(self, now: float) -> None:
        watermark = min([now, *self.in_flight.values()])
        for item in self.attributor.finalise(watermark):
            self.measured_ms += item.busy_ms
            self.billed_ms += item.billed_ms
            self.unattributed_ms += item.unattributed_ms
        for settled in self.attributor.settle():
            self.attributed[settled.key] = settled.share.gpu_ms

    def finish(self, seq: Seq, done: float) -> None:
        attribution = self.attribution
        event = RequestEvent(
            request_id=seq.key, tenant="t", model="m", endpoint="/v1/completions", received_at=seq.arrival,
            received=seq.arrival, admitted=seq.admitted, first_token=seq.first_token, done=done,
            chunks=tuple(TokenChunk(at, n) for at, n in seq.chunks), prompt_tokens=seq.prompt,
            completion_tokens=seq.out, cached_tokens=seq.cached if attribution.report_cached else 0, status=200,
            streaming=True, billable=True)
        self.attributor.add_request(seq.key, work_spans(event, attribution.prefill_weight), True)
        del self.in_flight[seq.key]
        self.truth[seq.key] = seq.truth_ms

    def arrive(self, arrival: float, prompt: int, out: int, n: int, waiting: collections.deque[Seq]) -> None:
        model = self.model
        prompt = min(prompt, model.max_tokens - out)
        seq = Seq(f"r{n}", arrival, prompt, out, arrival + self.delay() / 3)
        if self.cache_rng.random() < model.cached_requests:  # a prefix cache hit: whole blocks, never all
            share = self.cache_rng.uniform(0.0, model.cached_max_share)
            seq.cached = seq.prefilled = min(prompt - 1, int(prompt * share) // BLOCK_TOKENS * BLOCK_TOKENS)
        if model.queue_order == "engine":  # vLLM appends a request to its waiting queue when it arrives
            index = len(waiting)
            while index > 0 and waiting[index - 1].admitted > seq.admitted:
                index -= 1
            waiting.insert(index, seq)
        else:
            waiting.append(seq)
        self.in_flight[seq.key] = seq.admitted

    def run(self) -> None:
        arrivals = collections.deque(self.trace)
        waiting: collections.deque[Seq] = collections.deque()
        running: list[Seq] = []
        t, n = 0.0, 0
        while arrivals or waiting or running:
            while arrivals and arrivals[0][0] <= t:
                arrival, prompt, out = arrivals.popleft()
                n += 1
                self.arrive(arrival, prompt, out, n, waiting)
            if not waiting and not running:
                t = max(t, arrivals[0][0])
                self.sample_until(t)
                continue
            self.sample_until(t)
            t = self.step(t, waiting, running)
        self.sample_until(t + 1.0)
        self.attributor.place_all()
        self.settle(math.inf)

    def schedule(self, t: float, waiting: collections.deque[Seq], running: list[Seq]) -> list[tuple[Seq, int]]:
        """vLLM's ``Scheduler.schedule``: running requests first (decodes, then a prompt's next chunk), then
        waiting ones in order while a sequence slot and budget are left."""
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
            chunk = min(budget, seq.prompt - seq.prefilled)
            batch.append((seq, chunk))
            budget -= chunk
        return batch

    def step(self, t: float, waiting: collections.deque[Seq], running: list[Seq]) -> float:
        model = self.model
        batch = self.schedule(t, waiting, running)
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
        return end + (model.gap_ms + model.gap_per_request_ms * len(running)) / 1000.0

    def report(self) -> dict[str, Any]:
        errors = sorted(abs(self.attributed[k] - v) / v for k, v in self.truth.items() if v > 0)
        true_busy = self.measure.cumulative[-1] * 1000.0

        def pct(q: float) -> float:
            return errors[min(len(errors) - 1, int(q * len(errors)))] * 100

        steps = self.attributor.steps
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
            "learned": {**self.attributor.learned(), "budget_in_use": steps.budget} if steps else None,
            "prompt_placements": dict(steps.outcomes) if steps else None,
        }


@dataclasses.dataclass(frozen=True)
class Scenario:
    mode: str = "gpm"
    time_scale: float = 1.0
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    attributions: tuple[Attribution, ...] = (Attribution("admission"), Attribution("steps"))


SCENARIOS: dict[str, Scenario] = {
    "gpm": Scenario(),
    "utilization": Scenario("utilization"),
    "timing (no GPU reading)": Scenario("timing"),
    "gpm, trace at half rate": Scenario(time_scale=2.0),  # less engine-side queueing
    # vLLM's defaults on an H100 (EngineArgs.get_batch_defaults, OpenAI server: >= 70 GiB and not an A100)
    "gpm, vLLM H100 defaults (8192 tokens/step, 1024 seqs)": Scenario(
        model={"token_budget": 8192, "max_seqs": 1024}),
    "gpm, prefix cache (half the requests hit 0-90 %)": Scenario(
        model={"cached_requests": 0.5},
        attributions=(Attribution("admission"), Attribution("steps"), Attribution("steps", report_cached=False))),
    "gpm, CPU gap grows with the batch (0.3 ms + 8 us per request)": Scenario(
        model={"gap_ms": 0.3, "gap_per_request_ms": 0.008}),
    "gpm, step budget configured": Scenario(attributions=(Attribution("steps", step_tokens=2048),)),
}


def label(attribution: Attribution) -> str:
    text = attribution.placement
    if attribution.step_tokens:
        text += f", budget {attribution.step_tokens}"
    if attribution.prefill_weight != 1.0:
        text += f", prompt weight {attribution.prefill_weight:g}"
    if not attribution.report_cached:
        text += ", cached tokens not reported"
    return text


def run_scenario(name: str, scenario: Scenario, attribution: Attribution, trace: list[tuple[float, int, int]],
                 seed: int, queue_order: str) -> dict[str, Any]:
    model = dataclasses.replace(GpuModel(queue_order=queue_order), **scenario.model)
    started = time.perf_counter()
    scaled = [(t * scenario.time_scale, c, g) for t, c, g in trace]
    replay = Replay(scaled, model, scenario.mode, seed, attribution)
    replay.run()
    row = {"scenario": name, "attribution": label(attribution), **replay.report(),
           "model": dataclasses.asdict(model), "wall_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(row), file=sys.stderr)
    return row


def variants(attributions: tuple[Attribution, ...], args: argparse.Namespace) -> list[Attribution]:
    """A scenario's attributions, narrowed to ``--placement`` and multiplied by the weights and budgets asked for."""
    chosen = []
    for attribution in attributions:
        if args.placement and attribution.placement != args.placement:
            continue
        budgets = args.step_tokens if args.step_tokens and attribution.placement == "steps" else [None]
        for weight in args.prefill_weight or [attribution.prefill_weight]:
            for budget in budgets:
                chosen.append(dataclasses.replace(attribution, prefill_weight=weight,
                                                  step_tokens=budget or attribution.step_tokens))
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="replay only the first N minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument("--placement", choices=["admission", "steps"], help="run only this attribution")
    parser.add_argument("--prefill-weight", type=float, action="append",
                        help="work of a prompt token vs a generated one (default 1; repeatable: one row each)")
    parser.add_argument("--step-tokens", type=int, action="append",
                        help="configure this step budget in the steps attribution instead of learning it "
                             "(repeatable: one row each)")
    parser.add_argument("--queue-order", choices=["engine", "gateway"], default="engine",
                        help="the engine's waiting queue: as requests reached it (vLLM), or in trace order "
                             "(the benchmark before the fix)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "metering_attribution.json"))
    args = parser.parse_args(argv)
    trace = load_trace(args.minutes)
    results = []
    for name in args.scenario or list(SCENARIOS):
        for attribution in variants(SCENARIOS[name].attributions, args):
            results.append(run_scenario(name, SCENARIOS[name], attribution, trace, args.seed, args.queue_order))
    summary = {"trace_requests": len(trace), "minutes": args.minutes or 60, "seed": args.seed,
               "queue_order": args.queue_order, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("| scenario | attribution | p50 error | p95 error | p99 error | max | conservation | GPU busy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['attribution']} | {r['error_p50_pct']}% | {r['error_p95_pct']}% | "
              f"{r['error_p99_pct']}% | {r['error_max_pct']}% | {r['conservation_pct']}% | {r['gpu_busy_pct']}% |")
    return summary


if __name__ == "__main__":
    main()
