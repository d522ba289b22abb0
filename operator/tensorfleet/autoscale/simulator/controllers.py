"""Who sets the replicas in a simulated run: tensorfleet's policy, an HPA-like baseline, or the oracle.

``TensorfleetController`` is the operator's decision path without the I/O: the pods the cluster
reports go through ``signals.observe`` and ``policy.decide``, exactly as the operator's daemon does
with scraped gateways.

``HPAController`` is the Kubernetes HorizontalPodAutoscaler's algorithm on one Pods metric, GPU
utilization, as users commonly configure it (via DCGM exporter and a Prometheus adapter):
a 15 s sync period, ``desired = ceil(ready x mean utilization / target)``, a 10% tolerance, a 300 s
scale-down stabilization window (the max recommendation over it), and the default scale-up
policies (+100% or +4 pods per 15 s, whichever is more).

The oracle is not a controller; see ``runs.oracle_run``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from tensorfleet.autoscale import policy, signals
from tensorfleet.autoscale.signals import PodMetrics, PodTarget


@dataclasses.dataclass(frozen=True)
class ScaleEvent:
    time: float
    before: int
    after: int
    reason: str


class Controller(Protocol):
    name: str
    interval: float
    events: list[ScaleEvent]

    def decide(self, now: float, spec: int, targets: Sequence[PodTarget], metrics: Mapping[str, PodMetrics]) -> int:
        ...


class TensorfleetController:
    """tensorfleet's policy, fed the same Observation the operator builds from scraped gateways."""

    def __init__(self, config: policy.PolicyConfig, interval: float = 2.0, name: str = "tensorfleet") -> None:
        self.name = name
        self.config = config
        self.interval = interval
        self.history = policy.History()
        self.events: list[ScaleEvent] = []
        self.decisions: list[policy.Decision] = []

    def decide(self, now: float, spec: int, targets: Sequence[PodTarget], metrics: Mapping[str, PodMetrics]) -> int:
        observation = signals.observe(now, spec, targets, metrics)
        decision = policy.decide(self.config, self.history, observation)
        self.history = decision.history
        if decision.changed:
            self.events.append(ScaleEvent(now, spec, decision.replicas, decision.message))
        return decision.replicas


class HPAController:
    """The HorizontalPodAutoscaler's algorithm on GPU utilization, with Kubernetes' default behavior."""

    def __init__(self, min_replicas: int, max_replicas: int, target_utilization: float, interval: float = 15.0,
                 stabilization_seconds: float = 300.0, tolerance: float = 0.1, name: str = "hpa",
                 initial_replicas: int | None = None) -> None:
        self.name = name
        self.interval = interval
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.target = target_utilization
        self.stabilization_seconds = stabilization_seconds
        self.tolerance = tolerance
        # A run starts from a steady state: as if the HPA had recommended the initial replicas all along.
        self.recommendations: list[tuple[float, int]] = [] if initial_replicas is None else [(0.0, initial_replicas)]
        self.events: list[ScaleEvent] = []

    def decide(self, now: float, spec: int, targets: Sequence[PodTarget], metrics: Mapping[str, PodMetrics]) -> int:
        utilization = [m.gpu_utilization for t in targets if t.phase == "ready"
                       if (m := metrics.get(t.name)) is not None and m.gpu_utilization is not None]
        if not utilization:
            return spec
        ready = len(utilization)
        ratio = sum(utilization) / ready / self.target
        recommendation = spec if abs(ratio - 1.0) <= self.tolerance else math.ceil(ready * ratio - 1e-9)
        recommendation = max(self.min_replicas, min(self.max_replicas, recommendation))
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - self.stabilization_seconds]
        self.recommendations.append((now, recommendation))
        if recommendation > spec:
            desired = min(recommendation, max(2 * spec, spec + 4))  # default scaleUp policies per 15 s
        else:
            desired = max(r for _, r in self.recommendations)  # scale-down stabilization
            desired = min(desired, spec)
        if desired != spec:
            self.events.append(ScaleEvent(now, spec, desired, f"utilization {ratio * self.target:.0%} of GPUs"))
        return desired
