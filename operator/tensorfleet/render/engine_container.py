"""The engine container: vLLM or Triton (TensorRT-LLM backend), bound to localhost behind the gateway."""

from __future__ import annotations

from typing import Any

from tensorfleet.api.types import InferenceService, InferenceServiceSpec
from tensorfleet.render import context as c
from tensorfleet.render import lifecycle

# Records which GPUs the device plugin gave the engine, so the gateway's NVML sampler watches
# exactly those (the gateway container gets no GPU of its own).
_RECORD_DEVICES = (
    f'printf "%s" "${{NVIDIA_VISIBLE_DEVICES:-}}" > {c.SHARED_RUN_DIR}/visible-devices 2>/dev/null || true; '
    'exec "$@"'
)
_PROBE_PERIOD_SECONDS = 10


def engine_image(spec: InferenceServiceSpec, ctx: c.RenderContext) -> str:
    if spec.runtime.image:
        return spec.runtime.image
    if spec.runtime.name == "vllm":
        return ctx.vllm_image
    return ctx.triton_image_template


# vLLM reports prefix-cache hits (usage.prompt_tokens_details.cached_tokens) only with the first flag; metering
# bills cached prompt tokens as no GPU work and leaves them out of the engine step's budget. extraArgs may opt out.
_PROMPT_DETAILS_FLAGS = ("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details")


def vllm_args(isvc: InferenceService) -> list[str]:
    spec = isvc.spec
    source = spec.model.source
    if source.scheme == "hf":
        model = [source.location] + (["--revision", source.revision] if source.revision else [])
    elif source.scheme == "s3":
        model = [f"s3://{source.location}/{source.path}".rstrip("/"), "--load-format", "runai_streamer"]
    else:
        model = [f"{c.PVC_MODEL_DIR}/{source.path}".rstrip("/")]
    args = ["vllm", "serve", *model,
            "--served-model-name", spec.model.served_name,
            "--tensor-parallel-size", str(spec.gpu.count),
            "--host", "127.0.0.1",
            "--port", str(c.ENGINE_PORT)]
    if spec.model.max_model_len is not None:
        args += ["--max-model-len", str(spec.model.max_model_len)]
    if not any(arg.split("=")[0] in _PROMPT_DETAILS_FLAGS for arg in spec.runtime.extra_args):
        args.append(_PROMPT_DETAILS_FLAGS[0])  # metering needs the cached prompt tokens (docs/metering.md)
    return args + list(spec.runtime.extra_args)


def triton_args(isvc: InferenceService) -> list[str]:
    return ["tritonserver",
            f"--model-repository={c.ENGINE_DIR}/repository",
            f"--http-port={c.ENGINE_PORT}",
            "--http-address=127.0.0.1",
            "--allow-grpc=false",
            "--allow-metrics=true",
            f"--metrics-port={c.ENGINE_METRICS_PORT}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            *isvc.spec.runtime.extra_args]


def _health_path(spec: InferenceServiceSpec) -> str:
    return "/health" if spec.runtime.name == "vllm" else "/v2/health/live"


def _exec_probe(spec: InferenceServiceSpec, failure_threshold: int) -> dict[str, Any]:
    # The engine listens on 127.0.0.1 only, out of reach of the kubelet's HTTP probes.
    url = f"http://127.0.0.1:{c.ENGINE_PORT}{_health_path(spec)}"
    check = f"import urllib.request; urllib.request.urlopen('{url}', timeout=5)"
    return {
        "exec": {"command": ["python3", "-c", check]},
        "periodSeconds": _PROBE_PERIOD_SECONDS,
        "timeoutSeconds": 8,
        "failureThreshold": failure_threshold,
        # Restarts the engine alone: the preStop hook would wait for a gateway that is not exiting.
        "terminationGracePeriodSeconds": lifecycle.ENGINE_RESTART_GRACE_SECONDS,
    }


def _env(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """The operator's variables, then spec.runtime.env. A user entry of the same name replaces the operator's in
    its place (so $(HF_HOME) references still resolve): env is a list keyed by name, and server-side apply
    refuses a Deployment that repeats a name."""
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{c.MODEL_CACHE_DIR}/hf"}]
    ref: dict[str, Any]
    secret = spec.model.credentials_secret
    if secret:
        keys = ["HF_TOKEN"] if spec.model.source.scheme == "hf" else ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        for key in keys:
            ref = {"name": secret, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    by_name = {item["name"]: item for item in [*env, *(dict(item) for item in spec.runtime.env)]}
    return list(by_name.values())


def _resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    gpus = str(spec.gpu.count)
    requests = {**spec.resources.get("requests", {}), "nvidia.com/gpu": gpus}
    limits = {**spec.resources.get("limits", {}), "nvidia.com/gpu": gpus}
    return {"requests": requests, "limits": limits}


def _mounts(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "model-cache", "mountPath": c.MODEL_CACHE_DIR},
        {"name": "run", "mountPath": c.SHARED_RUN_DIR},
    ]
    if spec.model.source.scheme == "pvc":
        mounts.append({"name": "model", "mountPath": c.PVC_MODEL_DIR, "readOnly": True})
    if spec.runtime.name == "triton":
        mounts.append({"name": "engines", "mountPath": c.ENGINE_DIR})
    return mounts


def render_engine_container(isvc: InferenceService, ctx: c.RenderContext) -> dict[str, Any]:
    spec = isvc.spec
    args = vllm_args(isvc) if spec.runtime.name == "vllm" else triton_args(isvc)
    return {
        "name": "engine",
        "image": engine_image(spec, ctx),
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["/bin/sh", "-c", _RECORD_DEVICES, "engine"],
        "args": args,
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec),
        "startupProbe": _exec_probe(spec, lifecycle.startup_failure_threshold(spec, _PROBE_PERIOD_SECONDS)),
        "livenessProbe": _exec_probe(spec, 3),
        "lifecycle": lifecycle.engine_lifecycle(),  # serves on until the gateway has drained
    }
