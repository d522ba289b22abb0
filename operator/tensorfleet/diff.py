"""Does a child object need a write? A converged service must cause zero API writes.

A child is written when it is missing, when the spec it was rendered from changed (the hash
annotation differs), or when someone edited a field we own (it is no longer a subset of what the
API server stores). Fields the API server or other controllers add are not ours and are ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kubernetes.utils import quantity

from tensorfleet import API_GROUP

HASH_ANNOTATION = f"{API_GROUP}/applied-hash"
_QUANTITY_PARENTS = frozenset({"requests", "limits"})
_QUANTITY_KEYS = frozenset({"sizeLimit"})
# (parent, key) of quantities under a name too common to be a quantity everywhere (an env var's
# ``value`` is not one): an HPA metric's target.
_QUANTITY_FIELDS = frozenset({("target", "averageValue"), ("target", "value")})


def content_hash(obj: Mapping[str, Any]) -> str:
    """sha256 over the object as we render it, minus the hash annotation itself."""
    clean = copy.deepcopy(dict(obj))
    meta = clean.get("metadata", {})
    meta.get("annotations", {}).pop(HASH_ANNOTATION, None)
    if "annotations" in meta and not meta["annotations"]:
        del meta["annotations"]
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def stamp(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` carrying its content hash, so spec changes are seen without a deep compare."""
    stamped = copy.deepcopy(dict(obj))
    stamped.setdefault("metadata", {}).setdefault("annotations", {})[HASH_ANNOTATION] = content_hash(obj)
    return stamped


def needs_apply(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> str | None:
    """Why ``desired`` must be written over ``observed`` ('create', 'update', 'drift'), or None."""
    if observed is None:
        return "create"
    want = desired.get("metadata", {}).get("annotations", {}).get(HASH_ANNOTATION)
    have = (observed.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    if want != have:
        return "update"
    if not is_subset(_without_status(desired), observed):
        return "drift"
    return None


def _without_status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "status"}


def is_subset(want: Any, have: Any, key: str = "", parent: str = "") -> bool:
    """True when every field of ``want`` is present in ``have`` with an equal value."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return not want and have is None
        return all(_field_matches(k, v, have, key) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return not want and have is None
        return len(want) == len(have) and all(is_subset(w, h, key, parent) for w, h in zip(want, have, strict=True))
    if want == have:
        return True
    if parent in _QUANTITY_PARENTS or key in _QUANTITY_KEYS or (parent, key) in _QUANTITY_FIELDS:
        return _same_quantity(want, have)
    return False


def _field_matches(name: str, want: Any, have: Mapping[str, Any], parent: str) -> bool:
    if name not in have:
        return want in ({}, [], None, "")  # the API server drops empty values
    return is_subset(want, have[name], name, parent)


def _same_quantity(want: Any, have: Any) -> bool:
    try:
        return bool(quantity.parse_quantity(want) == quantity.parse_quantity(have))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        return False
