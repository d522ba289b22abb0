"""``status.autoscaling``: the autoscaler's last decision and why, written only when a decision is made.

Nothing in it changes from one scrape to the next (no live metric values), so a steady service causes
no status writes: it changes when replicas change, when the autoscaler is blocked or unblocked, or
when the mode changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Literal

from tensorfleet.api.types import InferenceService
from tensorfleet.autoscale.policy import Decision
from tensorfleet.status import Event, timestamp

WARNING_REASONS = frozenset({"ConflictingAutoscaler", "NoMetrics"})
AUTOSCALER_KINDS = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}


def decision_status(decision: Decision, previous: Mapping[str, Any] | None, now: datetime.datetime) -> dict[str, Any]:
    """What to store after ``decision``: its outcome and reason, the windows it used, what each signal asked."""
    windows = decision.windows
    status: dict[str, Any] = {
        "mode": "tensorfleet",
        "desiredReplicas": decision.replicas,
        "reason": decision.reason,
        "message": decision.message,
        "startupSeconds": round(windows.startup_seconds),
        "startupMeasured": windows.startup_measured,
        "windows": {"panicSeconds": round(windows.panic_seconds), "stableSeconds": round(windows.stable_seconds),
                    "scaleDownSeconds": round(windows.scale_down_seconds)},
        "signals": [{"name": r.name, "target": _target(r.name, r.target), "replicas": round(max(r.stable, r.burst), 2)}
                    for r in decision.signals],
    }
    if decision.gpu_utilization is not None:
        status["gpuUtilizationPercent"] = round(decision.gpu_utilization * 100)
    last = timestamp(now) if decision.changed else (previous or {}).get("lastScaleTime")
    if last:
        status["lastScaleTime"] = last
    return status


def blocked_status(previous: Mapping[str, Any] | None, reason: str, message: str) -> dict[str, Any]:
    """The previous decision's record with the reason the autoscaler cannot act now."""
    return {**(previous or {"mode": "tensorfleet"}), "reason": reason, "message": message}


def decision_event(reason: str, message: str) -> Event:
    return Event("Warning" if reason in WARNING_REASONS else "Normal", reason, message)


def mode_status(isvc: InferenceService, current: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """status.autoscaling for the modes tensorfleet's daemon does not own (none, hpa, keda)."""
    mode = isvc.spec.autoscaling.mode
    if mode == "none":
        return None
    kind: Literal["HorizontalPodAutoscaler", "ScaledObject"] = (
        "HorizontalPodAutoscaler" if mode == "hpa" else "ScaledObject")
    return {
        "mode": mode,
        "autoscaler": f"{kind}/{isvc.name}",
        "message": f"replicas are set by the {kind} {isvc.name} through the scale subresource; "
                   "tensorfleet renders it and leaves replicas alone",
    }


def merge_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A JSON merge patch turning ``current`` into ``desired`` (None removes the whole object)."""
    if desired is None:
        return None
    patch: dict[str, Any] = {key: None for key in (current or {}) if key not in desired}
    patch.update(desired)
    return patch


def _target(name: str, target: float) -> str:
    return f"{target:.0%}" if name == "kvCacheUsage" else f"{target:g}"


def reconcile_fields(isvc: InferenceService, body: Mapping[str, Any]) -> dict[str, Any]:
    """What reconcile's status carries about autoscaling: nothing in mode tensorfleet (the daemon owns
    status.autoscaling then), else ``mode_status`` as a merge patch, or the stored value when it is current."""
    if isvc.spec.autoscaling.mode == "tensorfleet":
        return {}
    current = (body.get("status") or {}).get("autoscaling")
    wanted = mode_status(isvc, current)
    if current == wanted:
        return {} if current is None else {"autoscaling": current}
    return {"autoscaling": merge_patch(current, wanted)}  # None (remove it) when the mode is none
