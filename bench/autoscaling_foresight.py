"""How far the autoscaling goal is from what foresight can do once replicas take time to start.

    .venv/bin/python -m bench.autoscaling_foresight      # writes bench/results/autoscaling_foresight.json
    .venv/bin/python -m bench.autoscaling_foresight --help   # options; runs nothing

The issue's oracle knows the future *and* starts replicas instantly. This benchmark separates the two:
a clairvoyant controller (a reference for the benchmark, not a policy anyone can run) is handed the
oracle's replica count for every second of the trace and, every 2 s, asks for what the oracle will use
over the next startup delay: the largest count (``q = 1``), or a quantile of it (``q < 1``: the short
peaks are left to queue, spending some of the 1 % the SLO allows). Its replicas start with the same delay
as everyone else's, in the same simulator, so its GPU-hours and SLO are measured, not assumed. Beside it,
tensorfleet's policy at the CRD defaults, in the same run.

Same trace, profile and warm start as ``bench.autoscaling`` (A10G, Azure conversation trace, queue-wait
SLO 2 s). Figures are ratios to the oracle's GPU-hours within one run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench.autoscaling import RESULTS, SLO_SECONDS, STARTUPS, autoscaling_spec, find_trace, trace_parser
from tensorfleet.autoscale import policy
from tensorfleet.autoscale.signals import PodMetrics, PodTarget
from tensorfleet.autoscale.simulator import compare, model, report, trace
from tensorfleet.autoscale.simulator.controllers import ScaleEvent, TensorfleetController
from tensorfleet.autoscale.simulator.runs import oracle_run, replay

QUANTILES = (1.0, 0.9, 0.8)


class Foresight:
    """Every ``interval``, the ``quantile`` of the oracle's counts over the next ``lead`` seconds."""

    def __init__(self, counts: Sequence[int], lead: float, quantile: float, interval: float = 2.0) -> None:
        self.name = f"foresight q={quantile:g}"
        self.counts, self.lead, self.quantile, self.interval = list(counts), lead, quantile, interval
        self.events: list[ScaleEvent] = []

    def decide(self, now: float, spec: int, targets: Sequence[PodTarget], metrics: Mapping[str, PodMetrics]) -> int:
        ahead = sorted(self.counts[int(now):int(now + self.lead + self.interval) + 1] or self.counts[-1:])
        wanted = max(1, ahead[min(len(ahead) - 1, int(self.quantile * len(ahead)))])
        if wanted != spec:
            self.events.append(ScaleEvent(now, spec, wanted, self.name))
        return wanted


def row(name: str, run: Any, requests: trace.Trace, oracle_hours: float) -> dict[str, Any]:
    summary = report.summarize(run, requests, SLO_SECONDS)
    return {"controller": name, "gpuHoursOverOracle": round(summary.gpu_hours / oracle_hours, 4),
            "sloAttainment": round(summary.slo_attainment, 4), "scaleEvents": summary.scale_events}


def main() -> int:
    path = find_trace(trace_parser(__doc__ or "").parse_args().trace)
    if path is None:
        return 0
    started = time.monotonic()
    requests = trace.load_trace(path)
    spec = autoscaling_spec()
    base = model.PROFILES[model.DEFAULT_PROFILE]
    oracle = oracle_run(requests, base, SLO_SECONDS, spec.min_replicas, spec.max_replicas)  # no startup delay
    counts = [sample.billed for sample in oracle.timeline]
    initial = compare.warm_start(oracle, spec)
    rows = []
    for startup in STARTUPS:
        replica = dataclasses.replace(base, startup_seconds=startup)
        ours = replay(requests, replica, TensorfleetController(policy.PolicyConfig.from_spec(spec)), initial)
        rows.append({"startupSeconds": startup, **row("tensorfleet", ours, requests, oracle.gpu_hours)})
        for quantile in QUANTILES:
            clairvoyant = Foresight(counts, startup, quantile)
            run = replay(requests, replica, clairvoyant, initial)
            rows.append({"startupSeconds": startup, **row(clairvoyant.name, run, requests, oracle.gpu_hours)})
    print("| startup | controller | x oracle GPU-hours | wait <= 2 s | scale events |")
    print("| --- | --- | --- | --- | --- |")
    for entry in rows:
        print(f"| {entry['startupSeconds']:g} s | {entry['controller']} | {entry['gpuHoursOverOracle']:.3f} | "
              f"{entry['sloAttainment']:.2%} | {entry['scaleEvents']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"command": "python -m bench.autoscaling_foresight", "trace": path.name, "rows": rows}
    (RESULTS / "autoscaling_foresight.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'autoscaling_foresight.json'} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
