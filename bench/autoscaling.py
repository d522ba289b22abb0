"""Autoscaling benchmark: the Azure conversation trace under tensorfleet's policy, an HPA-like baseline and
the oracle, for startup delays of 30 s and 120 s; plus how the KV-cache target trades GPU-hours for SLO.

    .venv/bin/python -m bench.autoscaling            # writes bench/results/autoscaling.{json,md} and figures
    .venv/bin/python -m bench.autoscaling --help     # options; runs nothing

Trace: Azure LLM inference trace 2023, conversation, one hour (Patel et al., "Splitwise: Efficient
generative LLM inference using phase splitting", ISCA 2024; CC-BY 4.0). It is read from
../shared/data (or --trace, or $TENSORFLEET_TRACE); nothing of it is copied into the repository.

All figures are ratios within one run of the same simulator, never absolute times of this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import sys
import time
from typing import Any

from tensorfleet.api import crds
from tensorfleet.api.types import AutoscalingSpec, InferenceService
from tensorfleet.autoscale import policy
from tensorfleet.autoscale.simulator import compare, model, report, trace
from tensorfleet.autoscale.simulator.controllers import TensorfleetController
from tensorfleet.autoscale.simulator.runs import replay

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIGURES = ROOT / "docs" / "figures"
TRACE_NAME = "azure_llm_trace_2023_conv.csv"
TRACE_CANDIDATES = (ROOT.parent / "shared" / "data" / TRACE_NAME, ROOT.parent.parent / "shared" / "data" / TRACE_NAME)
STARTUPS = (30.0, 120.0)
STABILITY_SECONDS, STABILITY_SETTLE_SECONDS = 1800.0, 600.0
KV_TARGETS = (60, 70, 75, 80, 90)
SLO_SECONDS = 2.0
GOAL_SLO, GOAL_RATIO = 0.99, 1.15


def autoscaling_spec(**overrides: Any) -> AutoscalingSpec:
    """The CRD's defaults (validated and defaulted as the API server would), mode tensorfleet, 1..40 replicas."""
    body = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "bench"},
            "spec": {"model": {"uri": "hf://bench/model"},
                     "autoscaling": {"mode": "tensorfleet", "minReplicas": 1, "maxReplicas": 40, **overrides}}}
    errors = crds.validate(body)
    if errors:
        raise SystemExit(f"invalid benchmark spec: {errors}")
    return InferenceService.from_body(body).spec.autoscaling


def goals(result: compare.Comparison) -> dict[str, Any]:
    ours, hpa, oracle = (result.summary(n) for n in ("tensorfleet", "hpa", "oracle"))
    ratio = ours.gpu_hours / oracle.gpu_hours
    return {
        "sloAtLeast99": ours.slo_attainment >= GOAL_SLO,
        "atMost1.15xOracle": ratio <= GOAL_RATIO,
        "cheaperThanHpaWithEqualOrBetterSlo": ours.gpu_hours < hpa.gpu_hours
        and ours.slo_attainment >= hpa.slo_attainment,
        "fewerGpuHoursThanHpa": ours.gpu_hours < hpa.gpu_hours,
    }


def kv_frontier(requests: trace.Trace, replica: model.ReplicaModel, result: compare.Comparison) -> list[dict[str, Any]]:
    """tensorfleet's policy at other KV-cache targets, against the same oracle and warm start."""
    oracle = result.summary("oracle")
    rows = []
    for target in KV_TARGETS:
        spec = autoscaling_spec(targetKVCacheUsagePercent=target)
        run = replay(requests, replica, TensorfleetController(policy.PolicyConfig.from_spec(spec)),
                     result.initial_replicas)
        summary = report.summarize(run, requests, SLO_SECONDS)
        rows.append({"targetKVCacheUsagePercent": target, "sloAttainment": round(summary.slo_attainment, 4),
                     "gpuHoursOverOracle": round(summary.gpu_hours / oracle.gpu_hours, 4),
                     "ttftP99": round(summary.ttft_p99, 2), "scaleEvents": summary.scale_events})
    return rows


def poisson_trace(rate: float, seconds: float, seed: int) -> trace.Trace:
    """Constant load: Poisson arrivals at ``rate``, each request the trace's mean (1,155 prompt, 211 output tokens)."""
    rng, times, now = random.Random(seed), [], 0.0
    while now < seconds:
        now += rng.expovariate(rate)
        times.append(now)
    return trace.Trace(tuple(t - times[0] for t in times), (1155,) * len(times), (211,) * len(times), "poisson")


def constant_load_stability() -> list[dict[str, Any]]:
    """Closed loop at constant load from an over-provisioned start (8 replicas): does it settle and stay?

    Settled: no change after the first 10 minutes of 30, and at most two scale-ups on the way.
    """
    rows = []
    for startup in STARTUPS:
        replica = dataclasses.replace(model.PROFILES[model.DEFAULT_PROFILE], startup_seconds=startup)
        for rate in (2.0, 3.0, 4.0, 5.0, 6.0):
            for seed in (1, 2, 3):
                ours = TensorfleetController(policy.PolicyConfig.from_spec(autoscaling_spec()))
                run = replay(poisson_trace(rate, STABILITY_SECONDS, seed), replica, ours, 8)
                changes = [(round(e.time), e.after) for e in run.events]
                ups = sum(1 for e in run.events if e.after > e.before)
                settled = ups <= 2 and all(t < STABILITY_SETTLE_SECONDS for t, _ in changes)
                rows.append({"startupSeconds": startup, "requestsPerSecond": rate, "seed": seed,
                             "settled": settled, "changes": changes})
    return rows


def run_profile(requests: trace.Trace, profile: str, startup: float, with_frontier: bool) -> dict[str, Any]:
    replica = dataclasses.replace(model.PROFILES[profile], startup_seconds=startup)
    result = compare.compare(requests, replica, autoscaling_spec(), SLO_SECONDS)
    out = {**result.as_dict(), "goals": goals(result)}
    if with_frontier:
        out["kvTargetFrontier"] = kv_frontier(requests, replica, result)
    if profile == model.DEFAULT_PROFILE:
        FIGURES.mkdir(parents=True, exist_ok=True)
        report.plot(result.runs, requests, FIGURES / f"autoscaling-startup-{int(startup)}s.png",
                    f"{profile}, startup {startup:g} s, queue-wait SLO {SLO_SECONDS:g} s")
    print(f"\n{profile}, startup {startup:g} s (warm start {result.initial_replicas} replicas)")
    print(report.table(result.summaries, SLO_SECONDS))
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| profile | startup | policy | GPU-hours | x oracle | wait <= 2 s | TTFT p50 | TTFT p99 | scale events |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in results:
        for name, row in entry["results"].items():
            lines.append(f"| {entry['model']['name']} | {entry['model']['startup_seconds']:g} s | {name} | "
                         f"{row['gpu_hours']:.2f} | {row['gpuHoursOverOracle']:.3f} | {row['slo_attainment']:.2%} | "
                         f"{row['ttft_p50']:.2f} s | {row['ttft_p99']:.2f} s | {row['scale_events']} |")
    return "\n".join(lines) + "\n"


def trace_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of the trace-replay benchmarks: ``--help`` and where the trace is."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=pathlib.Path, default=os.environ.get("TENSORFLEET_TRACE"),
                        help=f"the {TRACE_NAME} to replay (default: $TENSORFLEET_TRACE, else ../shared/data)")
    return parser


def find_trace(given: pathlib.Path | None) -> pathlib.Path | None:
    """``given``, else the Azure trace in ../shared/data; None (and a line on stderr) without one."""
    found = [given] if given else [p for p in TRACE_CANDIDATES if p.exists()]
    if not found or not found[0].exists():
        where = f"no trace at {given}" if given else f"no {TRACE_NAME} in ../shared/data (set --trace)"
        print(f"skipping the benchmark: {where}", file=sys.stderr)
        return None
    return found[0]


def main() -> int:
    path = find_trace(trace_parser(__doc__ or "").parse_args().trace)
    if path is None:
        return 0
    started = time.monotonic()
    requests = trace.load_trace(path)
    results = [run_profile(requests, model.DEFAULT_PROFILE, s, with_frontier=True) for s in STARTUPS]
    results += [run_profile(requests, "l4-llama3-8b", s, with_frontier=False) for s in STARTUPS]
    stability = constant_load_stability()
    settled = sum(1 for row in stability if row["settled"])
    print(f"\nconstant load: {settled} of {len(stability)} closed-loop runs settled within 10 minutes and stayed")
    for row in stability:
        if not row["settled"]:
            print(f"  not settled: startup {row['startupSeconds']:g} s, {row['requestsPerSecond']:g} req/s, "
                  f"seed {row['seed']}: {row['changes']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"command": "python -m bench.autoscaling", "trace": str(path.name), "results": results,
                "constantLoadStability": stability}
    (RESULTS / "autoscaling.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "autoscaling.md").write_text(markdown(results))
    print(f"\nwrote {RESULTS / 'autoscaling.json'} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
