"""One comparison: the trace under tensorfleet's policy, the HPA-like baseline and the oracle, in one run.

Every run starts from the same steady state: as many warm replicas as the oracle uses at most during
the trace's first five minutes (a service that was already up when the trace begins). The HPA-like
baseline's recommendations are seeded with that count; tensorfleet's policy starts without history,
as after an operator restart, and so removes nothing before it has watched a whole scale-down window.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tensorfleet.api.types import AutoscalingSpec
from tensorfleet.autoscale import policy
from tensorfleet.autoscale.simulator import report
from tensorfleet.autoscale.simulator.controllers import HPAController, TensorfleetController
from tensorfleet.autoscale.simulator.model import ReplicaModel
from tensorfleet.autoscale.simulator.runs import RunResult, oracle_run, replay
from tensorfleet.autoscale.simulator.trace import Trace

WARM_START_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class Comparison:
    trace: Trace
    model: ReplicaModel
    spec: AutoscalingSpec
    slo_seconds: float
    initial_replicas: int
    runs: tuple[RunResult, ...]
    summaries: tuple[report.Summary, ...]

    def summary(self, name: str) -> report.Summary:
        return next(s for s in self.summaries if s.name == name)

    def as_dict(self) -> dict[str, Any]:
        oracle = self.summary("oracle")
        return {
            "trace": {"source": self.trace.source, "requests": len(self.trace), "seconds": round(self.trace.duration)},
            "model": dict(dataclasses.asdict(self.model).items()),
            "autoscaling": dataclasses.asdict(self.spec),
            "sloSeconds": self.slo_seconds,
            "initialReplicas": self.initial_replicas,
            "results": {s.name: {**s.as_dict(), "gpuHoursOverOracle": round(s.gpu_hours / oracle.gpu_hours, 4)}
                        for s in self.summaries},
            "scaleEvents": {run.name: [{"time": round(e.time, 1), "from": e.before, "to": e.after, "reason": e.reason}
                                       for e in run.events] for run in self.runs if run.name != "oracle"},
        }


def warm_start(oracle: RunResult, spec: AutoscalingSpec) -> int:
    """The replicas every run starts with: the oracle's most in the first five minutes, within the bounds."""
    initial = max((s.billed for s in oracle.timeline[:WARM_START_SECONDS]), default=spec.min_replicas)
    return max(spec.min_replicas, min(spec.max_replicas, initial))


def compare(trace: Trace, model: ReplicaModel, spec: AutoscalingSpec, slo_seconds: float = 2.0,
            interval: float = 2.0, tick: float = 0.1) -> Comparison:
    oracle = oracle_run(trace, model, slo_seconds, spec.min_replicas, spec.max_replicas, tick)
    initial = warm_start(oracle, spec)
    ours = TensorfleetController(policy.PolicyConfig.from_spec(spec), interval)
    hpa = HPAController(spec.min_replicas, spec.max_replicas, spec.target_gpu_utilization_percent / 100,
                        initial_replicas=initial)
    runs = (replay(trace, model, ours, initial, tick), replay(trace, model, hpa, initial, tick), oracle)
    summaries = tuple(report.summarize(run, trace, slo_seconds) for run in runs)
    return Comparison(trace, model, spec, slo_seconds, initial, runs, summaries)
