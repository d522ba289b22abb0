"""The autoscaling policy: an observation and the history so far in, desired replicas (and new history) out.

Pure and deterministic; the operator's daemon and the simulator call the same ``decide``.

Every signal is turned into the replicas it asks for, ``current x value / target``, which for a total
over the ready pods is ``total / target`` (Knative's and the HPA's formula):

* ``concurrency`` (requests in flight plus those queued in the gateway) over ``targetInFlight``;
* ``queueDepth`` (gateway queue plus the engine's waiting requests) over ``targetQueueDepth``;
* ``kvCacheUsage`` (mean over ready pods) over ``targetKVCacheUsagePercent``.

GPU utilization is not one of them. NVML reports the share of time a kernel ran, which is ~100% as
soon as an engine batches even a few requests, far below its capacity; as a replica count it would
pin the service at maxReplicas (what an HPA on utilization does), and as a floor it would forbid
every scale-down under load. It is used as a gate instead: replicas are added only while the GPUs
are busy (mean utilization over the panic window at or above ``targetGPUUtilizationPercent``), so a
queue that idle GPUs are not working through (a stuck engine, a rate limit) adds no GPUs.

Each decision asks, per signal, for the larger of two averages: over the stable window (the trend)
and over the short panic window (bursts), and takes the largest signal. An ask more than 10% (the
tolerance band) above the current replicas adds replicas at once, bounded by ``maxScaleUpRate`` x the
*ready* replicas (so capacity that is still starting never multiplies). A burst that asks for ``panic_threshold`` (2) x
the ready replicas enters panic mode, as Knative's KPA: no scale-down for a stable window.

A queue is a stock, not a rate: the backlog that builds while new replicas start must not be read as
lasting demand. When the queue fell over the panic window from a backlog (more than
``targetQueueDepth`` x the ready replicas) fast enough to empty within a startup time (least-squares
slope), any replica ordered now would arrive after it is gone. That observation, and every one before
it, then asks for at most the replicas the service had (``spec.replicas``, counting those still
starting): what they measured was the backlog, and so were the full KV caches it left behind.

Scaling down is the HPA's stabilization: to the largest ask of the last scale-down window, when that
is more than the tolerance below the current replicas; at most halving at once, and not again until
a stable window has seen the replicas as they are now (a lightly loaded fleet under-predicts what
fewer replicas will need: on an LLM engine, prefill steals decode time, so per-replica load grows
faster than linearly as replicas are removed; a scale-down that the next change undoes is remembered,
see ``_remember``). The policy never scales down before it has watched a whole window: after an
operator restart or a leader change it starts with no history, and a decision without metrics asks
for the replicas the service has (a window spent blind is not a window watched).

The windows follow the service's measured startup time (engine load plus warm-up, which each
gateway reports as ``tensorfleet_gateway_startup_seconds``; 60 s until one does):

* panic window = startup / 10, within [6 s, 60 s]: a burst is seen in a tenth of the time a new
  replica needs to arrive;
* stable window = startup / 2, within [60 s, 5 min]: the averaging horizon, at least a minute
  (several LLM request lifetimes) so that request-level noise does not move replicas;
* scale-down stabilization = the larger of startup and two stable windows (at most 30 min).
  Removing a replica that is needed again within a startup time costs a cold start (GPU time that
  serves nobody) and a startup's worth of queueing; waiting as long as that costs before removing it
  bounds the waste to twice the optimum (the ski-rental argument). Two stable windows make one quiet
  minute between bursts no reason to remove capacity.

Explicit ``scaleDownStabilizationSeconds`` and ``panicWindowSeconds`` override the derived values (an
explicit scale-down window also caps the stable window, so that it is the longest wait).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Literal

from tensorfleet.api.types import AutoscalingSpec
from tensorfleet.autoscale.signals import LARGEST_SAMPLE, Observation

SignalName = Literal["concurrency", "queueDepth", "kvCacheUsage"]
Reason = Literal["ScaledUp", "ScaledDown", "BelowMinimum", "AboveMaximum", "Stable", "NoReadyReplicas",
                 "NoMetrics", "NoSignals", "GPUsNotBusy", "ScaleUpLimited"]
EPSILON = 1e-9
DEFAULT_STARTUP_SECONDS = 60.0  # before any pod of the service has reported its own
MAX_SCALE_DOWN_WINDOW = 1800.0
UNDONE_MEMORY_SECONDS = 3600.0  # how long an undone scale-down keeps its lesson
MOST_REPLICAS = 2**31 - 1  # spec.replicas is an int32: no ask means more than this


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_queue_depth: float = 4.0
    target_in_flight: float | None = None
    target_gpu_utilization: float | None = 0.85  # a ratio; None turns the gate off
    target_kv_cache_usage: float | None = None  # a ratio
    scale_down_stabilization_seconds: float | None = None  # None: derived from the startup time
    panic_window_seconds: float | None = None  # None: derived from the startup time
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0  # at most halve per step, then measure again before the next
    tolerance: float = 0.1
    panic_threshold: float = 2.0
    default_startup_seconds: float = DEFAULT_STARTUP_SECONDS

    @classmethod
    def from_spec(cls, spec: AutoscalingSpec) -> PolicyConfig:
        return cls(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            target_queue_depth=float(spec.target_queue_depth),
            target_in_flight=float(spec.target_in_flight) if spec.target_in_flight else None,
            target_gpu_utilization=spec.target_gpu_utilization_percent / 100.0,
            target_kv_cache_usage=(spec.target_kv_cache_usage_percent / 100.0
                                   if spec.target_kv_cache_usage_percent else None),
            scale_down_stabilization_seconds=_optional_float(spec.scale_down_stabilization_seconds),
            panic_window_seconds=_optional_float(spec.panic_window_seconds),
            max_scale_up_rate=float(spec.max_scale_up_rate),
        )

    def bound(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclasses.dataclass(frozen=True)
class Windows:
    startup_seconds: float
    startup_measured: bool
    panic_seconds: float
    stable_seconds: float
    scale_down_seconds: float


def derive_windows(config: PolicyConfig, startup_seconds: float | None) -> Windows:
    measured = _measured(startup_seconds)
    startup = float(startup_seconds) if measured and startup_seconds else config.default_startup_seconds
    panic = config.panic_window_seconds if config.panic_window_seconds is not None else _clamp(startup / 10, 6, 60)
    stable = _clamp(startup / 2, 60, 300)
    explicit_down = config.scale_down_stabilization_seconds
    if explicit_down is not None:  # asked to scale down sooner than the derived windows would
        stable = min(stable, explicit_down)
    stable = max(panic, stable)
    down = explicit_down if explicit_down is not None else min(MAX_SCALE_DOWN_WINDOW, max(startup, 2 * stable))
    return Windows(startup, measured, panic, stable, down)


@dataclasses.dataclass(frozen=True)
class History:
    """What the policy remembers between decisions. Start with ``History()``; keep what ``decide`` returns."""

    observations: tuple[Observation, ...] = ()
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, stable-window replicas), for scale-down
    since: float | None = None  # the first observation: how much history there is
    panic_until: float | None = None
    startup_seconds: float | None = None  # the last measured startup time, kept when no pod reports one
    last_change: float | None = None  # when spec.replicas was last seen to change (by anyone)
    last_down: tuple[float, int, int, float] | None = None  # the last scale-down: (time, from, to, ask at from)
    undone_downs: tuple[tuple[float, int, int, float], ...] = ()  # scale-downs the next change undid
    drained_at: float | None = None  # the last observation of a backlog that the replicas there drain in time

    def recorded(self, obs: Observation, keep_seconds: float) -> History:
        kept = tuple(o for o in self.observations if o.time > obs.time - keep_seconds)
        changed = bool(self.observations) and self.observations[-1].spec_replicas != obs.spec_replicas
        return dataclasses.replace(
            self, observations=(*kept, obs), since=obs.time if self.since is None else self.since,
            startup_seconds=obs.startup_seconds if _measured(obs.startup_seconds) else self.startup_seconds,
            last_change=obs.time if changed else self.last_change)

    def recommended(self, time: float, replicas: int, keep_seconds: float) -> History:
        kept = tuple((t, r) for t, r in self.recommendations if t > time - keep_seconds)
        return dataclasses.replace(self, recommendations=(*kept, (time, replicas)))


@dataclasses.dataclass(frozen=True)
class SignalReading:
    """Replicas one signal asks for, averaged over the stable and over the panic window."""

    name: SignalName
    target: float
    stable: float
    burst: float


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: int
    current: int
    reason: Reason
    message: str
    history: History
    windows: Windows
    signals: tuple[SignalReading, ...] = ()
    gpu_utilization: float | None = None
    panic: bool = False

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def replicas_asked(config: PolicyConfig, obs: Observation) -> dict[SignalName, float]:
    """Fractional replicas each available signal asks for in one observation (``current x value / target``).

    A signal whose value is not a finite number (NaN, infinite) is missing; an ask is at most
    ``MOST_REPLICAS``, so that averages over a window never overflow.
    """
    asked: dict[SignalName, float] = {}
    if obs.concurrency is not None and config.target_in_flight:
        asked["concurrency"] = obs.concurrency / config.target_in_flight
    if obs.queue_depth is not None:
        asked["queueDepth"] = obs.queue_depth / config.target_queue_depth
    if obs.kv_cache_usage is not None and config.target_kv_cache_usage:
        asked["kvCacheUsage"] = obs.ready * obs.kv_cache_usage / config.target_kv_cache_usage
    return {name: min(float(MOST_REPLICAS), ask) for name, ask in asked.items() if math.isfinite(ask)}


def decide(config: PolicyConfig, history: History, obs: Observation) -> Decision:
    windows = derive_windows(config, obs.startup_seconds if _measured(obs.startup_seconds) else history.startup_seconds)
    history = history.recorded(obs, max(windows.stable_seconds, windows.scale_down_seconds))
    current = obs.spec_replicas
    if obs.ready == 0 or obs.scraped == 0:
        reason: Reason = "NoReadyReplicas" if obs.ready == 0 else "NoMetrics"
        why = ("no replica is ready yet" if obs.ready == 0 else
               f"none of the {obs.ready} ready replicas answered with metrics")
        return _held(config, history, obs, windows, reason, why)
    drain = _drain_seconds(history, obs.time - windows.panic_seconds, config.target_queue_depth * obs.ready)
    if drain is not None and drain <= windows.startup_seconds:
        history = dataclasses.replace(history, drained_at=obs.time)
    readings = _readings(config, history, obs.time, windows)
    if not readings:
        return _held(config, history, obs, windows, "NoSignals", "the gateways report no load signal")
    stable_ask = max(r.stable for r in readings)
    burst_ask = max(r.burst for r in readings)
    if burst_ask >= config.panic_threshold * obs.ready:
        history = dataclasses.replace(history, panic_until=obs.time + windows.stable_seconds)
    panic = history.panic_until is not None and obs.time < history.panic_until
    ask = max(stable_ask, burst_ask)
    history = history.recommended(obs.time, config.bound(_ceil(ask)), windows.scale_down_seconds)
    utilization = _window_mean(history, obs.time - windows.panic_seconds, "gpu_utilization")
    base = Decision(current, current, "Stable", _steady_message(history, obs, windows, drain), history, windows,
                    tuple(readings), utilization, panic)
    up = _scale_up(config, base, obs, ask)
    # The load at this replica count over the whole scale-down window: the least noisy measure to learn from.
    long_window = max(windows.scale_down_seconds, windows.stable_seconds)
    long_ask = max(_asked_over(config, history, obs.time - long_window).values(), default=stable_ask)
    decision = _bounded(config, up if up is not None else (_scale_down(config, base, obs, long_ask) or base))
    return _remember(decision, long_ask, obs.time)


def _held(config: PolicyConfig, history: History, obs: Observation, windows: Windows, reason: Reason,
          why: str) -> Decision:
    """Hold while the load cannot be seen. The hold is recorded as a recommendation of the current
    replicas, so that a scale-down window made of missing data asks for what the service had, and a
    single sample after an outage (or after a restart during one) cannot remove capacity."""
    current = obs.spec_replicas
    history = history.recommended(obs.time, config.bound(current), windows.scale_down_seconds)
    return _bounded(config, Decision(current, current, reason, why, history, windows))


def _remember(decision: Decision, long_ask: float, now: float) -> Decision:
    """Learn from scale-downs that had to be undone.

    Load per replica grows faster than linearly as replicas are removed (prefill steals decode time,
    queues form), so a linear prediction can remove one replica too many, and a constant load then
    cycles n, m, n, m. When the change after a scale-down from n to m is a scale-up above m, m is
    remembered as too few for the load that was measured at n: the policy will not scale from n to m
    again unless the load at n has fallen by twice the tolerance below it (a lesson kept for an hour).
    """
    history = decision.history
    kept = tuple(u for u in history.undone_downs if u[0] > now - UNDONE_MEMORY_SECONDS)
    last = history.last_down
    if decision.reason == "ScaledDown":
        last = (now, decision.current, decision.replicas, long_ask)
    elif decision.replicas > decision.current and last is not None:
        if decision.replicas > last[2] and now - last[0] <= UNDONE_MEMORY_SECONDS:
            kept = (*kept, (now, last[1], last[2], last[3]))
        last = None
    if kept == history.undone_downs and last == history.last_down:
        return decision
    return dataclasses.replace(decision, history=dataclasses.replace(history, undone_downs=kept, last_down=last))


def _scale_up(config: PolicyConfig, base: Decision, obs: Observation, ask: float) -> Decision | None:
    current = base.current
    if not (ask > current * (1 + config.tolerance) and _ceil(ask) > current):
        return None
    gate = config.target_gpu_utilization
    if gate is not None and base.gpu_utilization is not None and base.gpu_utilization < gate:
        return dataclasses.replace(base, reason="GPUsNotBusy", message=(
            f"load asks for {ask:.1f} replicas but GPU utilization is {base.gpu_utilization:.0%}, below the "
            f"{gate:.0%} target: adding GPUs would not help"))
    limit = max(current, math.ceil(config.max_scale_up_rate * max(obs.ready, 1)))
    target = config.bound(min(_ceil(ask), limit))
    driver = _driver(base.signals, ask)
    if target <= current:
        return dataclasses.replace(base, reason="ScaleUpLimited", message=(
            f"{driver}, but " + (f"spec.autoscaling.maxReplicas is {config.max_replicas}"
                                 if current >= config.max_replicas else
                                 f"at most {config.max_scale_up_rate:g}x the {obs.ready} ready may be asked for "
                                 f"(spec.autoscaling.maxScaleUpRate) and {current} already are")))
    limited = f", limited to {config.max_scale_up_rate:g}x the {obs.ready} ready" if target < _ceil(ask) else ""
    mode = " (panic: a burst)" if base.panic else ""
    return dataclasses.replace(base, replicas=target, reason="ScaledUp", message=(
        f"{current} -> {target}{mode}: {driver}{limited}"))


def _scale_down(config: PolicyConfig, base: Decision, obs: Observation, long_ask: float) -> Decision | None:
    history, windows, current = base.history, base.windows, base.current
    if base.panic or history.since is None or obs.time - history.since < windows.scale_down_seconds:
        return None
    if history.last_change is not None and obs.time - history.last_change < windows.stable_seconds:
        return None  # let the stable window see the replicas as they are now before removing more
    floor = math.ceil(current / config.max_scale_down_rate - EPSILON)
    learned = max((to + 1 for _, source, to, ask in history.undone_downs
                   if source == current and long_ask >= ask * (1 - 2 * config.tolerance)), default=0)
    target = config.bound(max(floor, learned, *(r for _, r in history.recommendations)))
    if target >= current or target > current * (1 - config.tolerance):
        return None
    return dataclasses.replace(base, replicas=target, reason="ScaledDown", message=(
        f"{current} -> {target}: no more than {target} replicas asked for over the last "
        f"{windows.scale_down_seconds:.0f}s (now {_driver(base.signals, None)})"))


def _bounded(config: PolicyConfig, decision: Decision) -> Decision:
    """Bounds win over everything, including a hold for lack of metrics."""
    bounded = config.bound(decision.replicas)
    if bounded == decision.replicas:
        return decision
    reason: Reason = "BelowMinimum" if bounded > decision.replicas else "AboveMaximum"
    limit = "minReplicas" if reason == "BelowMinimum" else "maxReplicas"
    return dataclasses.replace(decision, replicas=bounded, reason=reason, message=(
        f"{decision.current} -> {bounded}: spec.autoscaling.{limit} is {bounded}"))


def _readings(config: PolicyConfig, history: History, now: float, windows: Windows) -> list[SignalReading]:
    stable = _asked_over(config, history, now - windows.stable_seconds)
    burst = _asked_over(config, history, now - windows.panic_seconds)
    targets: Mapping[SignalName, float | None] = {
        "concurrency": config.target_in_flight, "queueDepth": config.target_queue_depth,
        "kvCacheUsage": config.target_kv_cache_usage}
    return [SignalReading(name, float(targets[name] or 0.0), stable[name], burst.get(name, stable[name]))
            for name in stable]


def _asked_over(config: PolicyConfig, history: History, start: float) -> dict[SignalName, float]:
    """Mean replicas each signal asked for over the observations after ``start`` (the latest at least).

    Observations up to the last one of a backlog that drains in time (``History.drained_at``) ask for
    at most the replicas the service had then: what they measured was that backlog.
    """
    seen: dict[SignalName, list[float]] = {}
    drained = history.drained_at if history.drained_at is not None else -math.inf
    window = [o for o in history.observations if o.time > start and o.ready > 0 and o.scraped > 0]
    for obs in window or history.observations[-1:]:
        cap = obs.spec_replicas if obs.time <= drained else MOST_REPLICAS
        for name, value in replicas_asked(config, obs).items():
            seen.setdefault(name, []).append(min(value, cap))
    return {name: statistics.fmean(values) for name, values in seen.items()}


def _drain_seconds(history: History, start: float, backlog: float) -> float | None:
    """How long the queue takes to empty at the rate it fell since ``start``; None unless it fell from a
    backlog (at least ``backlog`` requests: more than the ready replicas' target).

    The slope is a least-squares fit over the window's observations with a queue, so that one noisy
    sample neither starts nor ends a drain.
    """
    points = [(o.time, min(o.queue_depth, LARGEST_SAMPLE)) for o in history.observations
              if o.time > start and o.ready > 0 and o.scraped > 0 and o.queue_depth is not None
              and math.isfinite(o.queue_depth)]
    if len(points) < 2 or points[-1][0] - points[0][0] <= EPSILON or points[0][1] < backlog:
        return None
    slope = statistics.linear_regression([t for t, _ in points], [q for _, q in points]).slope
    return points[-1][1] / -slope if slope < 0 else None


def _steady_message(history: History, obs: Observation, windows: Windows, drain: float | None) -> str:
    if history.drained_at != obs.time or drain is None:
        return "load is within the tolerance band"
    return (f"a backlog of {obs.queue_depth or 0:.0f} queued requests is falling and empties in about {drain:.0f}s, "
            f"before a replica ordered now could start ({windows.startup_seconds:.0f}s): it asks for no more "
            f"than the {obs.spec_replicas} replicas already ordered")


def _window_mean(history: History, start: float, field: str) -> float | None:
    values = [getattr(o, field) for o in history.observations if o.time > start and getattr(o, field) is not None]
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _driver(readings: tuple[SignalReading, ...], ask: float | None) -> str:
    """The signal asking for the most, in words."""
    if not readings:
        return "no signal"
    top = max(readings, key=lambda r: max(r.stable, r.burst) if ask is not None else r.stable)
    value = max(top.stable, top.burst) if ask is not None else top.stable
    target = f"{top.target:.0%}" if top.name == "kvCacheUsage" else f"{top.target:g}"
    return f"{top.name} asks for {value:.1f} replicas at a target of {target} per replica"


def _ceil(value: float) -> int:
    """Whole replicas for a fractional ask, within [0, MOST_REPLICAS] (NaN asks for none)."""
    if not value > 0:
        return 0
    return min(MOST_REPLICAS, math.ceil(min(value, MOST_REPLICAS) - EPSILON))


def _measured(startup_seconds: float | None) -> bool:
    return startup_seconds is not None and math.isfinite(startup_seconds) and startup_seconds > 0


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _optional_float(value: int | None) -> float | None:
    return None if value is None else float(value)
