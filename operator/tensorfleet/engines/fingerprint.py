"""The engine fingerprint: every input that changes the bytes of an engine, hashed into its identity.

The fingerprint document (version 1) is canonical JSON (sorted keys, no spaces) of::

    {"fingerprintVersion": 1,
     "model": {"uri": <uri without @revision>, "revision": <hf revision or null>, "digest": <sha256:... or null>},
     "gpu": {"product": <nvidia.com/gpu.product>, "computeCapability": "<major>.<minor>"},
     "precision": ..., "maxBatchSize": ..., "maxInputLen": ..., "maxSeqLen": ..., "tensorParallelSize": ...,
     "trtllmVersion": ..., "builderImage": <only when set explicitly and not empty, else null>,
     "buildOptions": {<flag>: <value>, ...}}

``buildOptions`` holds only the options that change the build command: one set to tensorfleet's own
default for the precision (``trtllm.default_options``), or a bare flag set to ``false``, is left out, so a
spec that spells out a default names the engine that leaving it out names (and a GitOps tool that writes
``builderImage: ""`` does not cause a rebuild).

Its sha256 (hex) is the store path, and ``engine-<first 32 hex>`` is the Engine's name. Where the
engine is stored, how long a build may take and where its Job runs (``nodeSelector``, ``tolerations``)
are not inputs and are left out. A change of this
document's layout bumps ``fingerprintVersion``, so old and new keys never collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tensorfleet import API_GROUP, API_VERSION
from tensorfleet.api.types import InferenceService, ModelSource
from tensorfleet.engines import trtllm

FINGERPRINT_VERSION = 1
NAME_PREFIX = "engine-"
NAME_HEX_CHARS = 32  # 128 bits of the sha256: collisions are not a practical concern
ENGINE_LABEL = f"{API_GROUP}/engine"
FINGERPRINT_ANNOTATION = f"{API_GROUP}/fingerprint"


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """The fingerprint document, its sha256 and the Engine name derived from it."""

    document: Mapping[str, Any]

    @property
    def canonical(self) -> bytes:
        return json.dumps(self.document, sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.sha256[:NAME_HEX_CHARS]


def _model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    uri = str(model["uri"])
    source = ModelSource.parse(uri)
    revision = source.revision if source.scheme == "hf" else None
    base = uri.split("@", 1)[0] if source.scheme == "hf" else uri
    return {"uri": base, "revision": revision, "digest": model.get("digest")}


def key_of(spec: Mapping[str, Any]) -> EngineKey:
    """The key of an Engine spec (already defaulted by the CRD schema)."""
    options = trtllm.distinct_options(spec["precision"], spec.get("buildOptions") or {})
    return _key(spec, options, spec.get("builderImage") or None)


def _key(spec: Mapping[str, Any], options: Mapping[str, str], builder_image: str | None) -> EngineKey:
    document = {
        "fingerprintVersion": FINGERPRINT_VERSION,
        "model": _model_identity(spec["model"]),
        "gpu": {"product": spec["gpu"]["product"], "computeCapability": str(spec["gpu"]["computeCapability"])},
        "precision": spec["precision"],
        "maxBatchSize": int(spec["maxBatchSize"]),
        "maxInputLen": int(spec["maxInputLen"]),
        "maxSeqLen": int(spec["maxSeqLen"]),
        "tensorParallelSize": int(spec["tensorParallelSize"]),
        "trtllmVersion": str(spec["trtllmVersion"]),
        "builderImage": builder_image,
        "buildOptions": dict(sorted(options.items())),
    }
    return EngineKey(document)


def engine_spec(isvc: InferenceService, product: str, compute_capability: str) -> dict[str, Any]:
    """The Engine spec an InferenceService needs on one GPU product (its ``spec.engine`` x that product)."""
    engine = isvc.spec.engine
    if engine is None:
        raise ValueError("spec.engine is required to derive an Engine")
    model: dict[str, Any] = {"uri": isvc.spec.model.uri}
    if isvc.spec.model.digest:
        model["digest"] = isvc.spec.model.digest
    if isvc.spec.model.credentials_secret:
        model["credentialsSecretRef"] = {"name": isvc.spec.model.credentials_secret}
    spec: dict[str, Any] = {
        "model": model,
        "gpu": {"product": product, "computeCapability": compute_capability},
        "precision": engine.precision,
        "maxBatchSize": engine.max_batch_size,
        "maxInputLen": engine.max_input_len,
        "maxSeqLen": engine.max_seq_len,
        "tensorParallelSize": engine.tensor_parallel_size,
        "trtllmVersion": engine.trtllm_version,
        "buildTimeoutSeconds": engine.build_timeout_seconds,
    }
    if engine.builder_image:
        spec["builderImage"] = engine.builder_image
    if engine.build_options:
        spec["buildOptions"] = dict(engine.build_options)
    if engine.store_ref:
        spec["storeRef"] = dict(engine.store_ref)
    if isvc.spec.node_selector:  # the build runs where the service may: a dedicated (tainted) pool, say
        spec["nodeSelector"] = dict(isvc.spec.node_selector)
    if isvc.spec.tolerations:
        spec["tolerations"] = [dict(t) for t in isvc.spec.tolerations]
    return spec


def engine_manifest(spec: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """A complete Engine object for ``spec``, named by its fingerprint."""
    from tensorfleet.api import crds

    body: dict[str, Any] = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "Engine",
                            "metadata": {"name": "pending"}, "spec": dict(spec)}
    defaulted = crds.default(body)
    key = key_of(defaulted["spec"])
    meta: dict[str, Any] = {"name": key.name, "annotations": {FINGERPRINT_ANNOTATION: key.sha256}}
    if namespace:
        meta["namespace"] = namespace
    return {**body, "metadata": meta}


def key_of_body(body: Mapping[str, Any]) -> EngineKey:
    """The key of a stored or applied Engine object (defaults applied first, as the API server does)."""
    from tensorfleet.api import crds

    return key_of(crds.default(body)["spec"])
