"""Typed view of an InferenceService, parsed from a body that the CRD schema has defaulted and validated.

Parsing never guesses: ``InferenceService.from_body`` applies the CRD defaults itself (so objects
stored before a default was added read the same) and expects a structurally valid body. Callers
validate first with ``tensorfleet.api.crds.validate``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

from tensorfleet.api import crds

RuntimeName = Literal["vllm", "triton"]
AutoscalingMode = Literal["none", "tensorfleet", "hpa", "keda"]

_HF = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(@(?P<revision>.+))?$")
_S3 = re.compile(r"^s3://(?P<bucket>[^/]+)(/(?P<key>.*))?$")
_PVC = re.compile(r"^pvc://(?P<claim>[^/]+)(/(?P<path>.*))?$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where weights come from. ``scheme`` is hf, s3 or pvc."""

    scheme: Literal["hf", "s3", "pvc"]
    location: str  # hf: org/name; s3: bucket; pvc: claim name
    path: str = ""  # s3 key prefix or path inside the claim
    revision: str | None = None  # hf only

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        if match := _HF.match(uri):
            return cls("hf", match["repo"], revision=match["revision"])
        if match := _S3.match(uri):
            return cls("s3", match["bucket"], path=match["key"] or "")
        if match := _PVC.match(uri):
            return cls("pvc", match["claim"], path=match["path"] or "")
        raise ValueError(f"spec.model.uri {uri!r} is not hf://ORG/NAME[@REV], s3://BUCKET/PATH or pvc://CLAIM[/PATH]")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    uri: str
    source: ModelSource
    served_name: str
    digest: str | None
    max_model_len: int | None
    credentials_secret: str | None


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    name: RuntimeName
    image: str | None
    image_pull_policy: str
    extra_args: tuple[str, ...]
    env: tuple[Mapping[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    count: int
    products: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    precision: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    tensor_parallel_size: int
    trtllm_version: str
    builder_image: str | None
    build_options: tuple[tuple[str, str], ...]
    store_ref: Mapping[str, Any] | None
    build_timeout_seconds: int


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    mode: AutoscalingMode
    min_replicas: int
    max_replicas: int
    target_queue_depth: int
    target_in_flight: int | None
    target_gpu_utilization_percent: int
    target_kv_cache_usage_percent: int | None
    scale_down_stabilization_seconds: int | None
    panic_window_seconds: int | None
    max_scale_up_rate: int


@dataclasses.dataclass(frozen=True)
class ModelCacheSpec:
    claim_name: str | None
    size_limit: str


@dataclasses.dataclass(frozen=True)
class InferenceServiceSpec:
    model: ModelSpec
    runtime: RuntimeSpec
    gpu: GPUSpec
    replicas: int | None
    resources: Mapping[str, Any]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any]
    service_account_name: str | None
    priority_class_name: str | None
    pod_annotations: Mapping[str, str]
    model_cache: ModelCacheSpec
    shm_size: str
    engine: EngineSpec | None
    autoscaling: AutoscalingSpec
    # Sections the gateway consumes as they are (already defaulted and validated by the schema).
    warmup: Mapping[str, Any]
    token_policy: Mapping[str, Any]
    auth: Mapping[str, Any]
    billing: Mapping[str, Any]

    @property
    def scale_replicas(self) -> int:
        """spec.replicas as written by the user or, through /scale, the autoscaler (when unset: minReplicas with
        autoscaling on, else 1). The autoscaler decides from this value."""
        if self.replicas is not None:
            return self.replicas
        return self.autoscaling.min_replicas if self.autoscaling.mode != "none" else 1

    @property
    def desired_replicas(self) -> int:
        """Replicas to run: scale_replicas, moved into [minReplicas, maxReplicas] when autoscaling is on. The
        bounds may just have changed under replicas the autoscaler set; it moves them on its next decision."""
        if self.autoscaling.mode == "none":
            return self.scale_replicas
        return max(self.autoscaling.min_replicas, min(self.autoscaling.max_replicas, self.scale_replicas))


@dataclasses.dataclass(frozen=True)
class InferenceService:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: InferenceServiceSpec

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> InferenceService:
        defaulted = crds.default(body)
        meta = defaulted.get("metadata", {})
        return cls(
            namespace=meta.get("namespace") or "default",
            name=meta["name"],
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            spec=_parse_spec(defaulted["spec"], default_served_name=meta["name"]),
        )


def _parse_spec(spec: Mapping[str, Any], default_served_name: str) -> InferenceServiceSpec:
    gpu = GPUSpec(count=int(spec["gpu"]["count"]), products=tuple(spec["gpu"].get("products", ())))
    cache = spec["modelCache"]
    return InferenceServiceSpec(
        model=_parse_model(spec["model"], default_served_name),
        runtime=_parse_runtime(spec["runtime"]),
        gpu=gpu,
        replicas=spec.get("replicas"),
        resources=spec.get("resources", {}),
        node_selector=spec.get("nodeSelector", {}),
        tolerations=tuple(spec.get("tolerations", ())),
        affinity=spec.get("affinity", {}),
        service_account_name=spec.get("serviceAccountName"),
        priority_class_name=spec.get("priorityClassName"),
        pod_annotations=spec.get("podAnnotations", {}),
        model_cache=ModelCacheSpec(claim_name=cache.get("claimName"), size_limit=str(cache["sizeLimit"])),
        shm_size=str(spec["shmSize"]),
        engine=_parse_engine(spec["engine"], gpu) if "engine" in spec else None,
        autoscaling=_parse_autoscaling(spec["autoscaling"]),
        warmup=spec["warmup"],
        token_policy=spec["tokenPolicy"],
        auth=spec["auth"],
        billing=spec["billing"],
    )


def _parse_model(model: Mapping[str, Any], default_served_name: str) -> ModelSpec:
    secret = model.get("credentialsSecretRef", {}).get("name")
    return ModelSpec(
        uri=model["uri"],
        source=ModelSource.parse(model["uri"]),
        served_name=model.get("servedName") or default_served_name,
        digest=model.get("digest"),
        max_model_len=model.get("maxModelLen"),
        credentials_secret=secret,
    )


def _parse_runtime(runtime: Mapping[str, Any]) -> RuntimeSpec:
    return RuntimeSpec(
        name=runtime["name"],
        image=runtime.get("image"),
        image_pull_policy=runtime["imagePullPolicy"],
        extra_args=tuple(runtime.get("extraArgs", ())),
        env=tuple(runtime.get("env", ())),
    )


def _parse_engine(engine: Mapping[str, Any], gpu: GPUSpec) -> EngineSpec:
    return EngineSpec(
        precision=engine["precision"],
        max_batch_size=int(engine["maxBatchSize"]),
        max_input_len=int(engine["maxInputLen"]),
        max_seq_len=int(engine["maxSeqLen"]),
        tensor_parallel_size=int(engine.get("tensorParallelSize") or gpu.count),
        trtllm_version=str(engine["trtllmVersion"]),
        builder_image=engine.get("builderImage"),
        build_options=tuple(sorted(engine.get("buildOptions", {}).items())),
        store_ref=engine.get("storeRef"),
        build_timeout_seconds=int(engine["buildTimeoutSeconds"]),
    )


def _parse_autoscaling(autoscaling: Mapping[str, Any]) -> AutoscalingSpec:
    return AutoscalingSpec(
        mode=autoscaling["mode"],
        min_replicas=int(autoscaling["minReplicas"]),
        max_replicas=int(autoscaling["maxReplicas"]),
        target_queue_depth=int(autoscaling["targetQueueDepth"]),
        target_in_flight=autoscaling.get("targetInFlight"),
        target_gpu_utilization_percent=int(autoscaling["targetGPUUtilizationPercent"]),
        target_kv_cache_usage_percent=autoscaling.get("targetKVCacheUsagePercent"),
        scale_down_stabilization_seconds=autoscaling.get("scaleDownStabilizationSeconds"),
        panic_window_seconds=autoscaling.get("panicWindowSeconds"),
        max_scale_up_rate=int(autoscaling["maxScaleUpRate"]),
    )
