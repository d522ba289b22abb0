"""What the autoscaler knows about a service at one instant: its pods and what their gateways report.

Pure: the operator feeds it pods from its watch index and the text each gateway served at
``/metrics``; the simulator feeds it modelled replicas. Both end in the same ``Observation``, so the
policy cannot tell them apart.

Pods are classified the way capacity should be counted:

* ``ready``: the Pod is Ready (the gateway's readiness gate passed: engine up and warmed) and, when it
  was scraped, its gateway says ``tensorfleet_gateway_ready 1``. Only these serve traffic, so only
  these are averaged;
* ``warming``: running but not ready (engine loading, warm-up). Not capacity yet and not idle either:
  they take no traffic, so their zero queue must not pull averages down;
* ``pending``: accepted but not running (scheduling, image pull); ``unschedulable``: the scheduler
  said no (``PodScheduled=False``, reason ``Unschedulable``). Neither is capacity;
* ``terminating`` / ``finished``: leaving; ignored.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from tensorfleet import telemetry
from tensorfleet.render import context

PodPhase = Literal["ready", "warming", "pending", "unschedulable", "terminating", "finished"]
GATEWAY_CONTAINER = "gateway"
ADMIN_PORT_NAME = "admin"


class MetricsError(ValueError):
    """A gateway answered /metrics with something that is not Prometheus text exposition."""


@dataclasses.dataclass(frozen=True)
class PodTarget:
    """One serving pod as the operator sees it: its phase and, when it has an IP, where to scrape it."""

    name: str
    phase: PodPhase
    metrics_url: str | None = None
    reason: str = ""  # why it is pending or unschedulable, from the pod's conditions


@dataclasses.dataclass(frozen=True)
class PodMetrics:
    """The gateway metrics of one pod (``tensorfleet.telemetry`` names); None where it did not report one."""

    gateway_queue: float | None = None
    engine_waiting: float | None = None
    in_flight: float | None = None
    gpu_utilization: float | None = None
    kv_cache_usage: float | None = None
    ready: bool | None = None
    startup_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Observation:
    """One service at one instant. Totals are over ready pods; ratios are their means.

    ``concurrency`` is Knative's notion of load: requests in flight plus those waiting in the gateway
    for admission (``in_flight`` already includes the engine's own waiting requests). When some ready
    pods could not be scraped, totals are scaled up from the ones that answered.
    """

    time: float
    spec_replicas: int
    ready: int
    warming: int = 0
    pending: int = 0
    unschedulable: int = 0
    scraped: int = 0
    queue_depth: float | None = None
    concurrency: float | None = None
    gpu_utilization: float | None = None
    kv_cache_usage: float | None = None
    startup_seconds: float | None = None
    unschedulable_reason: str = ""


# ---- pods ------------------------------------------------------------------------------------------


def classify_pod(pod: Mapping[str, Any]) -> PodPhase:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "terminating"
    if status.get("phase") in ("Succeeded", "Failed"):
        return "finished"
    conditions = {c.get("type"): c for c in status.get("conditions") or () if isinstance(c, Mapping)}
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return "unschedulable"
    if (conditions.get("Ready") or {}).get("status") == "True":
        return "ready"
    if status.get("phase") == "Running":
        return "warming"
    return "pending"


def admin_port(pod: Mapping[str, Any]) -> int:
    """The gateway container's port named ``admin``, as the pod declares it, else the default."""
    for container in ((pod.get("spec") or {}).get("containers")) or ():
        if container.get("name") != GATEWAY_CONTAINER:
            continue
        for port in container.get("ports") or ():
            if port.get("name") == ADMIN_PORT_NAME and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return context.ADMIN_PORT


def pod_target(pod: Mapping[str, Any]) -> PodTarget:
    phase = classify_pod(pod)
    status = pod.get("status") or {}
    ip = status.get("podIP")
    url = None
    if ip and phase in ("ready", "warming"):
        host = f"[{ip}]" if ":" in str(ip) else str(ip)
        url = f"http://{host}:{admin_port(pod)}/metrics"
    reason = ""
    if phase == "unschedulable":
        for cond in status.get("conditions") or ():
            if cond.get("type") == "PodScheduled":
                reason = str(cond.get("message") or cond.get("reason") or "")
    return PodTarget(name=str((pod.get("metadata") or {}).get("name", "")), phase=phase, metrics_url=url,
                     reason=reason)


# ---- metrics ---------------------------------------------------------------------------------------

_FIELDS = {
    telemetry.QUEUE_DEPTH: "gateway_queue",
    telemetry.ENGINE_WAITING: "engine_waiting",
    telemetry.IN_FLIGHT: "in_flight",
    telemetry.GPU_UTILIZATION: "gpu_utilization",
    telemetry.KV_CACHE_USAGE: "kv_cache_usage",
    telemetry.READY: "ready",
    telemetry.STARTUP_SECONDS: "startup_seconds",
}
_MEANS = {"gpu_utilization", "kv_cache_usage"}  # one series per GPU or engine: average them
_RATIOS = _MEANS
# The largest integer a float64 holds exactly. No real count or duration comes near it, so a sample
# beyond it is garbage, and sums of samples within it cannot overflow.
LARGEST_SAMPLE = float(2**53)
SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> PodMetrics:
    """The autoscaler's metrics from one gateway's exposition text; other metrics are ignored.

    Series of one name with different labels are summed (counts) or averaged (per-GPU ratios).
    A series repeated with the same labels counts once, with its first sample: Prometheus's scrape
    keeps the first and drops the rest as duplicates. A sample that is not a finite number (NaN,
    +Inf, -Inf) or is larger than ``LARGEST_SAMPLE`` is missing; ratios are clamped to [0, 1] and
    counts to >= 0. Text that is not Prometheus exposition raises ``MetricsError``.
    """
    found: dict[str, list[float]] = {}
    for (name, _labels), value in _series(text).items():
        if math.isfinite(value) and abs(value) <= LARGEST_SAMPLE:
            found.setdefault(_FIELDS[name], []).append(value)
    values: dict[str, Any] = {}
    for field, samples in found.items():
        if field == "ready":
            values[field] = min(samples) >= 1.0
        elif field == "startup_seconds":
            values[field] = max(0.0, max(samples))
        elif field in _RATIOS:
            values[field] = min(1.0, max(0.0, statistics.fmean(samples)))
        else:
            values[field] = max(0.0, sum(samples))
    return PodMetrics(**values)


def _series(text: str) -> dict[SeriesKey, float]:
    """The autoscaler's series in ``text`` by name and labels, each with its first sample."""
    series: dict[SeriesKey, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _FIELDS:
                    key = (sample.name, frozenset(sample.labels.items()))
                    series.setdefault(key, float(sample.value))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsError(f"not Prometheus text exposition: {exc}") from None
    return series


# ---- one observation -------------------------------------------------------------------------------


def observe(time: float, spec_replicas: int, targets: Sequence[PodTarget],
            metrics: Mapping[str, PodMetrics]) -> Observation:
    """Fold pods and their scraped metrics into one Observation.

    A pod that is Ready to Kubernetes but whose gateway says it is not ready counts as warming.
    """
    counts = {"ready": 0, "warming": 0, "pending": 0, "unschedulable": 0}
    serving: list[PodMetrics] = []
    reasons = []
    for target in targets:
        phase = target.phase
        sample = metrics.get(target.name)
        if phase == "ready" and sample is not None and sample.ready is False:
            phase = "warming"
        if phase in counts:
            counts[phase] += 1
        if phase == "ready" and sample is not None:
            serving.append(sample)
        if phase == "unschedulable" and target.reason:
            reasons.append(target.reason)
    ready, scraped = counts["ready"], len(serving)
    scale = ready / scraped if scraped else 0.0
    startups = [s.startup_seconds for s in serving if s.startup_seconds]
    return Observation(
        time=time, spec_replicas=spec_replicas, ready=ready, warming=counts["warming"], pending=counts["pending"],
        unschedulable=counts["unschedulable"], scraped=scraped,
        queue_depth=_total(serving, ("gateway_queue", "engine_waiting"), scale),
        concurrency=_total(serving, ("in_flight", "gateway_queue"), scale, required="in_flight"),
        gpu_utilization=_mean(s.gpu_utilization for s in serving),
        kv_cache_usage=_mean(s.kv_cache_usage for s in serving),
        startup_seconds=statistics.median(startups) if startups else None,
        unschedulable_reason=reasons[0] if reasons else "",
    )


def _total(samples: Sequence[PodMetrics], fields: tuple[str, ...], scale: float,
           required: str | None = None) -> float | None:
    needed = fields if required is None else (required,)
    if not any(getattr(s, f) is not None for s in samples for f in needed):
        return None
    return scale * sum(getattr(s, f) or 0.0 for s in samples for f in fields)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
