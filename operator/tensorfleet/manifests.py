"""`tensorfleet render`: manifests in, the objects the operator would create out, no cluster needed."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import yaml

from tensorfleet.api import manifest_yaml
from tensorfleet.api.schema import InvalidSpecError
from tensorfleet.api.types import InferenceService
from tensorfleet.api.validation import advisories
from tensorfleet.reconcile import desired_objects, spec_errors
from tensorfleet.render.context import RenderContext


@dataclasses.dataclass
class RenderResult:
    objects: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def render_text(text: str, ctx: RenderContext, gpu_product: str | None = None,
                source: str = "<input>") -> RenderResult:
    """``source`` names the input (a file name) in YAML errors, with the line and column."""
    result = RenderResult()
    stream = io.StringIO(text)
    stream.name = source  # PyYAML's marks name a stream by its ``name``
    try:
        docs = manifest_yaml.load_all(stream)
    except yaml.YAMLError as exc:
        result.errors.append(f"error: {source} is not valid YAML: {exc}")
        return result
    for index, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != "InferenceService":
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            result.warnings.append(f"document {index}: skipped {kind}: only InferenceService is rendered")
            continue
        name = (doc.get("metadata") or {}).get("name", f"document {index}")
        errors = spec_errors(doc, ctx)
        if errors:
            result.errors.extend(f"InferenceService {name}: {error}" for error in errors)
            continue
        isvc = InferenceService.from_body(doc)
        result.warnings.extend(f"InferenceService {name}: {note}" for note in advisories(isvc.spec))
        products = (gpu_product,) if gpu_product else None
        if gpu_product and isvc.spec.gpu.products and gpu_product not in isvc.spec.gpu.products:
            allowed = ", ".join(isvc.spec.gpu.products)
            result.errors.append(f"InferenceService {name}: spec.gpu.products: Unsupported value: "
                                 f"{gpu_product!r}: the service allows {allowed}")
            continue
        try:
            result.objects.extend(desired_objects(isvc, ctx, products))
        except InvalidSpecError as exc:
            result.errors.extend(f"InferenceService {name}: {error}" for error in exc.errors)
    return result


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the gateway's JSON configuration) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
