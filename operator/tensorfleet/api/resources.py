"""Checks of ``spec.resources`` that compare Kubernetes quantities (``2`` == ``2000m``, ``1Gi`` > ``1000Mi``).

Apart from ``tensorfleet.api.validation`` because the quantity parser comes with the Kubernetes client package,
which the engine Jobs never load (import-linter: they import ``validation``, not this); the operator's
``reconcile.spec_errors`` and ``tensorfleet render`` run it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes.utils import quantity

from tensorfleet.api.schema import FieldError


def request_limit_errors(body: Mapping[str, Any]) -> list[FieldError]:
    """Kubernetes rejects a container whose request exceeds its limit; the CEL library cannot compare quantities."""
    resources = (body.get("spec") or {}).get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    errors = []
    for name in sorted(requests.keys() & limits.keys()):
        request, limit = _quantity(requests[name]), _quantity(limits[name])
        if request is not None and limit is not None and request > limit:
            errors.append(FieldError(
                f"spec.resources.requests.{name}",
                f'Invalid value: "{requests[name]}": must be less than or equal to '
                f'spec.resources.limits.{name} "{limits[name]}" (Kubernetes rejects a request above its limit)',
            ))
    return errors


def _quantity(value: Any) -> Any:
    try:
        return quantity.parse_quantity(value)  # type: ignore[no-untyped-call]
    except ValueError:  # not a quantity: the schema's pattern reports it
        return None
