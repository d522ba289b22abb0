"""The CustomResourceDefinitions shipped with tensorfleet (canonical copies live in ``crds/``)."""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping
from typing import Any

import yaml

from tensorfleet import API_GROUP
from tensorfleet.api import schema


@functools.cache
def definitions() -> tuple[dict[str, Any], ...]:
    """All CRD documents in the package, sorted by name."""
    folder = importlib.resources.files("tensorfleet") / "crds"
    docs: list[dict[str, Any]] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(entry.read_text()) if d)
    return tuple(docs)


def definition(kind: str) -> dict[str, Any]:
    for crd in definitions():
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(f"no CustomResourceDefinition for kind {kind!r}")


def version_schema(kind: str, version: str) -> dict[str, Any]:
    for ver in definition(kind)["spec"]["versions"]:
        if ver["name"] == version:
            return ver["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} has no version {version!r}")


def kind_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, version) when ``obj`` is one of our custom resources, else None."""
    api_version = str(obj.get("apiVersion", ""))
    group, _, version = api_version.partition("/")
    if group != API_GROUP:
        return None
    return str(obj.get("kind", "")), version


def default(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object with the CRD's defaults applied, as the API server stores it."""
    kind, version = _require_kind(obj)
    return schema.apply_defaults(version_schema(kind, version), obj)


def validate(obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[schema.FieldError]:
    """Default, then validate ``obj`` as the API server would on create (or update, given ``old``)."""
    try:
        kind, version = _require_kind(obj)
        crd_schema = version_schema(kind, version)
    except KeyError as exc:
        return [schema.FieldError("apiVersion", str(exc.args[0]))]
    errors = []
    name = obj.get("metadata", {}).get("name")
    if not name:
        errors.append(schema.FieldError("metadata.name", "Required value: name is required"))
    defaulted = schema.apply_defaults(crd_schema, obj)
    old_defaulted = schema.apply_defaults(crd_schema, old) if old is not None else None
    errors.extend(schema.validate(crd_schema, defaulted, old=old_defaulted))
    return errors


def _require_kind(obj: Mapping[str, Any]) -> tuple[str, str]:
    found = kind_of(obj)
    if found is None:
        raise KeyError(f"apiVersion must be {API_GROUP}/<version>, got {obj.get('apiVersion')!r}")
    return found
