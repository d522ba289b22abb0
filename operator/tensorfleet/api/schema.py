"""Structural-schema defaulting and validation of custom resources, as the API server does it.

Three steps, in the API server's order:

1. ``apply_defaults`` fills ``default`` values top-down (a defaulted ``{}`` is defaulted in turn).
2. ``validate`` checks the OpenAPI v3 structure with a real OpenAPI 3.0 validator
   (``openapi-schema-validator``), and rejects fields the schema does not declare, like
   ``kubectl apply`` with strict field validation.
3. ``validate`` then evaluates every ``x-kubernetes-validations`` CEL rule with ``self`` bound to the
   value at that node (``oldSelf`` too, for transition rules on updates), using ``cel-python``.

Errors name the field path and the limit, in the API server's wording, so the same message reaches a
user whether ``tensorfleet render`` or the cluster rejects the object.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import celpy.celtypes
import openapi_schema_validator
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError, CELFunction
from jsonschema import exceptions as jsonschema_exceptions

Schema = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class FieldError:
    """One invalid field: its dotted path (``spec.gpu.count``) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSpecError(ValueError):
    """A spec that cannot be rendered although the checks passed it: reported as InvalidSpec, like their errors."""

    def __init__(self, *errors: FieldError) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# Defaulting
# --------------------------------------------------------------------------------------------


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Return a copy of ``value`` with the schema's defaults filled in, top-down."""
    return _default(schema, copy.deepcopy(value))


def _default(schema: Schema, value: Any) -> Any:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if "default" in sub and (name not in value or (value[name] is None and not sub.get("nullable"))):
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _default(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in list(value):
                if name not in schema.get("properties", {}):
                    value[name] = _default(extra, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [_default(schema["items"], item) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate(schema: Schema, value: Any, old: Any = None, root_path: str = "") -> list[FieldError]:
    """Validate ``value`` (already defaulted) against a structural schema. ``old`` enables oldSelf rules."""
    errors = list(_structural_errors(schema, value, root_path))
    errors.extend(_unknown_fields(schema, value, root_path))
    if not errors:  # the API server evaluates CEL only on structurally valid objects
        errors.extend(_cel_errors(schema, value, old, root_path))
    return sorted(set(errors))


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _structural_errors(schema: Schema, value: Any, root_path: str) -> Iterator[FieldError]:
    validator = openapi_schema_validator.OAS30Validator(_strip_extensions(schema))
    for error in validator.iter_errors(value):
        yield from _translate(error, root_path)


def _translate(error: jsonschema_exceptions.ValidationError, root_path: str) -> Iterator[FieldError]:
    path = root_path
    for part in error.absolute_path:
        path = _join(path, part)
    kind = error.validator
    limit = error.validator_value
    shown = json.dumps(error.instance) if not isinstance(error.instance, dict | list) else _type_name(error.instance)
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else str(limit)
        yield FieldError(_join(path, missing), "Required value")
    elif kind == "enum":
        supported = ", ".join(json.dumps(v) for v in limit)
        yield FieldError(path, f"Unsupported value: {shown}: supported values: {supported}")
    elif kind == "minimum":
        yield FieldError(path, f"Invalid value: {shown}: must be greater than or equal to {limit}")
    elif kind == "maximum":
        yield FieldError(path, f"Invalid value: {shown}: must be less than or equal to {limit}")
    elif kind == "maxLength":
        yield FieldError(path, f"Too long: may not be more than {limit} bytes")
    elif kind == "minLength":
        yield FieldError(path, f"Invalid value: {shown}: must be at least {limit} characters")
    elif kind == "minItems":
        yield FieldError(path, f"Required value: must have at least {limit} item{'' if limit == 1 else 's'}")
    elif kind == "maxItems":
        yield FieldError(path, f"Too many: {len(error.instance)}: must have at most {limit} items")
    elif kind == "maxProperties":
        yield FieldError(path, f"Too many: {len(error.instance)}: must have at most {limit} properties")
    elif kind == "pattern":
        yield FieldError(path, f"Invalid value: {shown}: should match '{limit}'")
    elif kind == "type":
        yield FieldError(path, f"Invalid value: {shown}: must be of type {limit}")
    elif kind == "anyOf":
        yield FieldError(path, f"Invalid value: {shown}: must be an integer or a string")
    elif kind == "uniqueItems":
        yield FieldError(path, f"Duplicate value: {shown}")
    else:
        yield FieldError(path, f"Invalid value: {shown}: {error.message}")


def _type_name(value: Any) -> str:
    return '"object"' if isinstance(value, dict) else '"array"'


@functools.lru_cache(maxsize=64)
def _strip_cached(schema_json: str) -> dict[str, Any]:
    return _strip(json.loads(schema_json))


def _strip_extensions(schema: Schema) -> dict[str, Any]:
    return _strip_cached(json.dumps(schema, sort_keys=True))


def _strip(node: Any) -> Any:
    """Remove Kubernetes extensions the OpenAPI validator does not know, and list-type sets."""
    if isinstance(node, dict):
        out = {k: _strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-list-type") == "set":
            out["uniqueItems"] = True
        return out
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _list_map_duplicates(schema: Schema, value: Any, path: str) -> Iterator[FieldError]:
    """x-kubernetes-list-type: map lists must not repeat a key (the API server merges by it)."""
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys", ())
        seen: set[tuple[Any, ...]] = set()
        for index, item in enumerate(value):
            if isinstance(item, dict):
                key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
                if key in seen:
                    shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                    yield FieldError(_join(path, index), f"Duplicate value: {{{shown}}}")
                seen.add(key)


def _unknown_fields(schema: Schema, value: Any, path: str) -> Iterator[FieldError]:
    yield from _list_map_duplicates(schema, value, path)
    if isinstance(value, dict):
        props = schema.get("properties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
        for name, sub_value in value.items():
            if props is not None and name in props:
                yield from _unknown_fields(props[name], sub_value, _join(path, name))
            elif isinstance(schema.get("additionalProperties"), Mapping):
                yield from _unknown_fields(schema["additionalProperties"], sub_value, _join(path, name))
            elif props is not None and not preserve:
                yield FieldError(_join(path, name), f'unknown field "{_join(path, name)}"')
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _unknown_fields(schema["items"], item, _join(path, index))


# --------------------------------------------------------------------------------------------
# CEL rules
# --------------------------------------------------------------------------------------------

_CEL_ENV = celpy.Environment()


def _split(text: str, separator: str, limit: int = -1) -> celpy.celtypes.ListType:
    """Kubernetes' CEL strings library: ``s.split(sep[, n])`` is Go's strings.SplitN (n < 0: all parts)."""
    if limit == 0:
        parts: list[str] = []
    elif separator == "":
        chars = list(text)
        parts = chars if limit < 0 or limit >= len(chars) else [*chars[:limit - 1], "".join(chars[limit - 1:])]
    else:
        parts = text.split(separator, limit - 1 if limit > 0 else -1)
    return celpy.celtypes.ListType([celpy.celtypes.StringType(part) for part in parts])


def _replace(text: str, old: str, new: str, limit: int = -1) -> celpy.celtypes.StringType:
    """Kubernetes' CEL strings library: ``s.replace(old, new[, n])`` is Go's strings.Replace (n < 0: all)."""
    return celpy.celtypes.StringType(text.replace(old, new, limit if limit >= 0 else -1))


# Functions of the Kubernetes CEL environment (>= 1.30, the chart's minimum) that cel-python lacks.
_K8S_FUNCTIONS: dict[str, CELFunction] = {"split": _split, "replace": _replace}


@functools.lru_cache(maxsize=512)
def _program(rule: str) -> celpy.Runner:
    return _CEL_ENV.program(_CEL_ENV.compile(rule), functions=_K8S_FUNCTIONS)


def _cel_errors(schema: Schema, value: Any, old: Any, path: str) -> Iterator[FieldError]:
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", ()):
        expression = rule["rule"]
        uses_old = "oldSelf" in expression
        if uses_old and old is None:
            continue  # transition rules are only evaluated on updates
        activation: dict[str, Any] = {"self": json_to_cel(value)}
        if uses_old:
            activation["oldSelf"] = json_to_cel(old)
        where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
        result: Any
        try:
            result = _program(expression).evaluate(activation)
        except CELEvalError as exc:
            result = exc
        if isinstance(result, CELEvalError):
            yield FieldError(where, f"Invalid value: {_type_of(value)}: rule {expression!r} failed: {result.args[0]}")
        elif not bool(result):
            message = rule.get("message") or f"failed rule: {expression}"
            yield FieldError(where, f"Invalid value: {_type_of(value)}: {message}")
    yield from _cel_children(schema, value, old, path)


def _cel_children(schema: Schema, value: Any, old: Any, path: str) -> Iterator[FieldError]:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, sub_value in value.items():
            sub_schema = props.get(name) if name in props else extra if isinstance(extra, Mapping) else None
            if sub_schema is not None:
                sub_old = old.get(name) if isinstance(old, dict) else None
                yield from _cel_errors(sub_schema, sub_value, sub_old, _join(path, name))
    elif isinstance(value, list) and "items" in schema:
        # Correlating list items with their old values needs list-map keys; transition rules
        # inside lists are therefore only evaluated for create (as for atomic lists in Kubernetes).
        for index, item in enumerate(value):
            yield from _cel_errors(schema["items"], item, None, _join(path, index))


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return '"boolean"'
    if isinstance(value, int):
        return '"integer"'
    if isinstance(value, str):
        return '"string"'
    if isinstance(value, list):
        return '"array"'
    return '"object"'
