"""Status conditions: computed fresh on every reconcile, written only when they change.

``lastTransitionTime`` moves only when a condition's status flips, so a steady service produces a
byte-identical status and therefore no write (and no Argo CD diff churn).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
ORDER = ("Ready", "Progressing", "Degraded")


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the InferenceService (type is Normal or Warning)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(previous: Iterable[Mapping[str, Any]], current: Sequence[Condition],
                     generation: int, now: datetime.datetime) -> list[dict[str, Any]]:
    """The conditions to store: ``current``, keeping each previous transition time where status held."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    merged = []
    for cond in current:
        old = before.get(cond.type)
        moved = old is None or old.get("status") != cond.status or not old.get("lastTransitionTime")
        merged.append({
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": timestamp(now) if moved or old is None else old["lastTransitionTime"],
        })
    return sorted(merged, key=_condition_order)


def _condition_order(cond: Mapping[str, Any]) -> tuple[int, str]:
    kind = str(cond["type"])
    return (ORDER.index(kind) if kind in ORDER else len(ORDER), kind)


def transitions(previous: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Events for notable condition transitions (Ready flips, Degraded turns on or off)."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    events = []
    for cond in current:
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        if cond["type"] == "Ready" and (old is not None or cond["status"] == "True"):
            kind: Literal["Normal", "Warning"] = "Normal" if cond["status"] == "True" else "Warning"
            if cond["status"] == "True" or (old is not None and old.get("status") == "True"):
                events.append(Event(kind, "Ready" if cond["status"] == "True" else "NotReady", cond["message"]))
        elif cond["type"] == "Degraded" and cond["status"] == "True":
            events.append(Event("Warning", cond["reason"], cond["message"]))
        elif cond["type"] == "Degraded" and old is not None and old.get("status") == "True":
            events.append(Event("Normal", "Recovered", cond["message"]))
    return events


def condition(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for cond in (status or {}).get("conditions", ()) or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond
    return None
