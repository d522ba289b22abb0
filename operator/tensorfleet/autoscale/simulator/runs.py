"""Replaying a trace under a controller, and under the oracle lower bound.

GPU time is counted over the trace's span (from its first to its last arrival): every replica that
exists, whether starting, serving or draining, is billed for ``model.gpus`` GPUs. After the last
arrival the run continues unbilled until every request has finished, so that each one has its
latencies.

The oracle knows the future and starts replicas instantly. Each second it picks the fewest replicas
with which every request waiting or arriving in that second is admitted within the queue-wait SLO,
trying counts on a copy of the cluster (greedy, second by second, from the previous second's count).
Replicas it removes still drain and are billed, as in the other runs; nothing else is assumed.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

from tensorfleet.autoscale.simulator.cluster import Cluster, RequestLog, Sample
from tensorfleet.autoscale.simulator.controllers import Controller, ScaleEvent
from tensorfleet.autoscale.simulator.model import ReplicaModel
from tensorfleet.autoscale.simulator.trace import Trace

DRAIN_LIMIT_SECONDS = 1800.0


@dataclasses.dataclass
class RunResult:
    name: str
    log: RequestLog
    timeline: list[Sample]
    events: list[ScaleEvent]
    billed_seconds: float  # replica-seconds over the trace's span
    gpus_per_replica: int

    @property
    def gpu_hours(self) -> float:
        return self.billed_seconds * self.gpus_per_replica / 3600.0


class _Timeline:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.next_sample = 1.0
        self.seen = 0

    def maybe_sample(self, cluster: Cluster) -> None:
        if cluster.now >= self.next_sample - 1e-9:
            self.samples.append(cluster.sample(cluster.next_request - self.seen))
            self.seen = cluster.next_request
            self.next_sample += 1.0


def replay(trace: Trace, model: ReplicaModel, controller: Controller, initial_replicas: int,
           tick: float = 0.1) -> RunResult:
    """Replay ``trace`` with ``initial_replicas`` warm replicas, letting ``controller`` scale every interval."""
    if controller.interval < tick:  # one decision per step at most: a shorter interval would not be kept
        raise ValueError(f"the controller's interval {controller.interval:g} s is shorter than the tick {tick:g} s")
    log = RequestLog(len(trace))
    cluster = Cluster(trace, model, log, tick)
    cluster.scale_to(initial_replicas, startup=0.0)
    timeline = _Timeline()
    next_decision = controller.interval
    billed = None
    while cluster.now <= trace.duration or not cluster.idle():
        if cluster.now > trace.duration + DRAIN_LIMIT_SECONDS:
            break
        cluster.step()
        timeline.maybe_sample(cluster)
        if billed is None and cluster.now > trace.duration:
            billed = cluster.billed_seconds
        if cluster.now >= next_decision - 1e-9:
            targets, metrics = cluster.pods(controller.interval)
            spec = len(cluster.active())
            wanted = controller.decide(cluster.now, spec, targets, metrics)
            if wanted != spec:
                cluster.scale_to(wanted, model.startup_seconds)
            next_decision += controller.interval
    return RunResult(controller.name, log, timeline.samples, controller.events,
                     billed if billed is not None else cluster.billed_seconds, model.gpus)


class _AdmissionWatch:
    """A recorder for the oracle's trial runs: only whether the watched requests were admitted in time."""

    def __init__(self, watched: set[int]) -> None:
        self.watched = watched
        self.admit: dict[int, float] = {}

    def admitted(self, request: int, time: float) -> None:
        if request in self.watched:
            self.admit[request] = time

    def rejected(self, request: int, time: float) -> None:
        if request in self.watched:
            self.admit[request] = -math.inf  # can never run anywhere: not the oracle's to fix

    def first_token(self, request: int, time: float) -> None:
        pass

    def finished(self, request: int, time: float) -> None:
        pass


def meets_slo(cluster: Cluster, replicas: int, until: float, slo: float) -> bool:
    """Would ``replicas`` (started instantly) admit every request waiting or arriving before ``until`` in time?"""
    arrivals = cluster.trace.arrivals
    last = bisect.bisect_left(arrivals, until)
    watched = set(cluster.queue) | set(range(cluster.next_request, last))
    if not watched:
        return True
    watch = _AdmissionWatch(watched)
    twin = cluster.clone(watch)
    twin.scale_to(replicas, startup=0.0, reuse_draining=True)

    def settled() -> bool:
        late = bool(twin.queue) and twin.queue[0] in watched and arrivals[twin.queue[0]] + slo < twin.now - 1e-9
        return late or len(watch.admit) == len(watched)

    twin.run_until(until + slo + twin.tick, settled)
    return len(watch.admit) == len(watched) and all(
        t - arrivals[r] <= slo + 1e-9 for r, t in watch.admit.items())


def oracle_run(trace: Trace, model: ReplicaModel, slo: float, min_replicas: int, max_replicas: int,
               tick: float = 0.1) -> RunResult:
    log = RequestLog(len(trace))
    cluster = Cluster(trace, model, log, tick)
    timeline = _Timeline()
    replicas, events = min_replicas, []
    second = 0
    billed = None
    while cluster.now <= trace.duration or not cluster.idle():
        if cluster.now > trace.duration + DRAIN_LIMIT_SECONDS:
            break
        fewest = _fewest(cluster, replicas, second + 1.0, slo, min_replicas, max_replicas)
        if fewest != replicas:
            events.append(ScaleEvent(cluster.now, replicas, fewest, "fewest replicas meeting the SLO"))
        replicas = fewest
        cluster.scale_to(replicas, startup=0.0, reuse_draining=True)
        while cluster.now < second + 1.0 - 1e-9:
            cluster.step()
            if billed is None and cluster.now > trace.duration:
                billed = cluster.billed_seconds
        timeline.maybe_sample(cluster)
        second += 1
    return RunResult("oracle", log, timeline.samples, events,
                     billed if billed is not None else cluster.billed_seconds, model.gpus)


def _fewest(cluster: Cluster, start: int, until: float, slo: float, low: int, high: int) -> int:
    count = max(low, min(high, start))
    if meets_slo(cluster, count, until, slo):
        while count > low and meets_slo(cluster, count - 1, until, slo):
            count -= 1
        return count
    while count < high:
        count += 1
        if meets_slo(cluster, count, until, slo):
            return count
    return high
