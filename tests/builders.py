"""Small builders for test objects (instead of pasted YAML)."""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "tensorfleet.io/v1alpha1"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def inference_service(name: str = "llama", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A valid InferenceService; keyword arguments deep-merge into spec."""
    base_spec: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct@main", "maxModelLen": 8192},
        "gpu": {"count": 1},
        "replicas": 1,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": deep_merge(base_spec, spec),
    }


def triton_service(name: str = "llama-trt", **spec: Any) -> dict[str, Any]:
    base = {
        "runtime": {"name": "triton"},
        "engine": {"precision": "fp16", "maxBatchSize": 32, "maxInputLen": 4096, "maxSeqLen": 8192},
        "gpu": {"count": 1, "products": ["NVIDIA-H100-80GB-HBM3"]},
    }
    return inference_service(name, **deep_merge(base, spec))


def stored(obj: dict[str, Any], uid: str = "uid-1", generation: int = 1, **status: Any) -> dict[str, Any]:
    """``obj`` as the API server returns it: with a uid, generation and optional status."""
    out = copy.deepcopy(obj)
    out["metadata"].update(uid=uid, generation=generation, resourceVersion="1")
    if status:
        out["status"] = status
    return out


def engine_spec(**overrides: Any) -> dict[str, Any]:
    """A valid Engine spec; keyword arguments deep-merge into it."""
    base: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct@5f0b02c7"},
        "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "computeCapability": "9.0"},
        "precision": "fp16", "maxBatchSize": 32, "maxInputLen": 4096, "maxSeqLen": 8192,
        "storeRef": {"s3": {"bucket": "engines"}},
    }
    return deep_merge(base, overrides)


def engine(spec: dict[str, Any] | None = None, namespace: str = "default", name: str | None = None) -> dict[str, Any]:
    """An Engine named by its fingerprint (or ``name``)."""
    from tensorfleet.engines.fingerprint import engine_manifest

    manifest = engine_manifest(spec or engine_spec(), namespace)
    if name:
        manifest["metadata"]["name"] = name
    return manifest


def rolled_out(children: list[dict[str, Any]], ready: int) -> list[dict[str, Any]]:
    """Deployments as the controller reports them once the current revision rolled out completely, with
    ``ready`` of their replicas available now (fewer: pods lost since, or a scale-up starting new ones)."""
    for child in children:
        if child["kind"] == "Deployment":
            want = child["spec"]["replicas"]
            available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.") \
                if ready >= want else ("False", "MinimumReplicasUnavailable",
                                       "Deployment does not have minimum availability.")
            child["status"] = {"observedGeneration": 1, "replicas": want, "updatedReplicas": want,
                               "readyReplicas": ready, "availableReplicas": ready, "conditions": [
                                   dict(zip(("status", "reason", "message"), available, strict=True),
                                        type="Available"),
                                   {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                    "message": 'ReplicaSet "llama-5d8f9" has successfully progressed.'}]}
    return children
