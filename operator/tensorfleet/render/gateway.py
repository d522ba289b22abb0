"""The gateway sidecar container and the two ConfigMaps that carry its configuration.

The policy (token policy, auth, billing, metering overrides) is in ``<name>-gateway``, which every
revision of a service's pods mounts: the gateways re-read it when it changes, so those edits take
effect without restarting GPU pods (a restart costs a cold start and a warm-up). What describes the
engine beside the gateway (model, runtime, GPUs, engine, warm-up) is bound to the pod's revision: it is
in ``<name>-gateway-<hash of it>``, which only the pods of that revision mount. Changing it changes the
pod template, so the pods roll, and a pod of the old revision that starts during the rollout (a
container restart, a pod rescheduled elsewhere) still reads its own revision's facts. It is not an
environment variable because ``spec.warmup`` may hold 16 prompts of 64 KiB each, and Linux refuses to
start a process with an environment string over 128 KiB.
"""

from __future__ import annotations

import json
from typing import Any

from tensorfleet.api.types import InferenceService
from tensorfleet.api.validation import model_max_len
from tensorfleet.gateway import config as gwconfig
from tensorfleet.render import context as c
from tensorfleet.render import labels, lifecycle
from tensorfleet.render import metering as m

_PROBE_PERIOD_SECONDS = 5


def config_map_name(isvc_name: str) -> str:
    """The policy ConfigMap, shared by every revision of the service's pods."""
    return f"{isvc_name}-gateway"


def revision_config_map_name(isvc: InferenceService, ctx: c.RenderContext | None = None) -> str:
    """The ConfigMap of this revision's engine facts, named by their hash."""
    return f"{config_map_name(isvc.name)}-{gwconfig.revision_hash(gateway_config(isvc, ctx))}"


def gateway_config(isvc: InferenceService, ctx: c.RenderContext | None = None) -> dict[str, Any]:
    """Everything the gateway needs to know about its service; one JSON document."""
    spec = isvc.spec
    ctx = ctx or c.RenderContext()
    return {
        "service": {"namespace": isvc.namespace, "name": isvc.name},
        "model": {
            "servedName": spec.model.served_name,
            "uri": spec.model.uri,
            "digest": spec.model.digest,
            "maxModelLen": model_max_len(spec)[0],  # what vLLM is told, extraArgs included; None: learned
        },
        "runtime": spec.runtime.name,
        "gpusPerReplica": spec.gpu.count,
        "engine": {
            "precision": m.metered_precision(isvc),
            "maxInputLen": spec.engine.max_input_len if spec.engine else None,
            "maxBatchSize": spec.engine.max_batch_size if spec.engine else None,
            "fingerprint": m.engine_fingerprint(isvc, ctx),
        },
        "warmup": dict(spec.warmup),
        "tokenPolicy": dict(spec.token_policy),
        "auth": dict(spec.auth),
        "billing": dict(spec.billing),
        "metering": m.metering_config(ctx),
    }


def render_config_map(isvc: InferenceService, ctx: c.RenderContext | None = None) -> dict[str, Any]:
    """``<name>-gateway``: the policy sections, which the running gateways reload."""
    return _config_map(isvc, config_map_name(isvc.name), c.GATEWAY_CONFIG_FILE,
                       gwconfig.policy_part(gateway_config(isvc, ctx)))


def render_revision_config_map(isvc: InferenceService, ctx: c.RenderContext | None = None) -> dict[str, Any]:
    """``<name>-gateway-<hash>``: the revision-bound sections, which a gateway reads once, at start."""
    return _config_map(isvc, revision_config_map_name(isvc, ctx), c.GATEWAY_REVISION_FILE,
                       gwconfig.revision_part(gateway_config(isvc, ctx)), labels.GATEWAY_REVISION_COMPONENT)


def _config_map(isvc: InferenceService, name: str, key: str, document: dict[str, Any],
                component: str = "gateway") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": labels.metadata(name, isvc.namespace, isvc.name, isvc.uid, component),
        "data": {key: json.dumps(document, sort_keys=True, indent=2)},
    }


def gateway_config_volume(isvc: InferenceService, ctx: c.RenderContext) -> dict[str, Any]:
    """Both ConfigMaps in one folder (c.CONFIG_DIR); the kubelet keeps a projected ConfigMap up to date too."""
    sources = [{"configMap": {"name": name}}
               for name in (config_map_name(isvc.name), revision_config_map_name(isvc, ctx))]
    return {"name": "gateway-config", "projected": {"sources": sources}}


def _probe(path: str, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": _PROBE_PERIOD_SECONDS,
        "timeoutSeconds": 3,
        "failureThreshold": failure_threshold,
    }


def api_keys_secret(isvc: InferenceService) -> str | None:
    """The Secret of hashed API keys the gateway checks, when spec.auth names one."""
    ref = isvc.spec.auth.get("apiKeysSecretRef") or {}
    return ref.get("name") or None


def api_keys_volume(isvc: InferenceService) -> dict[str, Any] | None:
    """The auth Secret as a volume: the kubelet refreshes it in place and the gateway reloads it, so the
    operator never reads Secrets and key rotation needs no restart."""
    secret = api_keys_secret(isvc)
    if secret is None:
        return None
    return {"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o444}}


def _env(isvc: InferenceService, gpu_product: str | None, ctx: c.RenderContext) -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env: list[dict[str, Any]] = [
        {"name": "TENSORFLEET_GATEWAY_CONFIG", "value": f"{c.CONFIG_DIR}/{c.GATEWAY_CONFIG_FILE}"},
        {"name": "TENSORFLEET_GATEWAY_REVISION_CONFIG", "value": f"{c.CONFIG_DIR}/{c.GATEWAY_REVISION_FILE}"},
        {"name": "TENSORFLEET_GATEWAY_UPSTREAM", "value": f"http://127.0.0.1:{c.ENGINE_PORT}"},
        {"name": "TENSORFLEET_GATEWAY_RUNTIME", "value": isvc.spec.runtime.name},
        {"name": "TENSORFLEET_GATEWAY_PORT", "value": str(c.GATEWAY_PORT)},
        {"name": "TENSORFLEET_GATEWAY_ADMIN_PORT", "value": str(c.ADMIN_PORT)},
        {"name": "TENSORFLEET_GATEWAY_USAGE_DIR", "value": c.USAGE_DIR},
        {"name": "TENSORFLEET_GATEWAY_DEVICES_FILE", "value": f"{c.SHARED_RUN_DIR}/visible-devices"},
        {"name": "TENSORFLEET_GATEWAY_GPU_PRODUCT", "value": gpu_product or ""},
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
        # NVML read access (utility capability only) to sample the GPUs the engine was given.
        {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
        *lifecycle.gateway_drain_env(),
        *m.metering_env(ctx, isvc),
    ]
    if api_keys_secret(isvc):
        env.append({"name": "TENSORFLEET_GATEWAY_API_KEYS_DIR", "value": c.API_KEYS_DIR})
    if isvc.spec.runtime.name == "triton":
        env.append({"name": "TENSORFLEET_GATEWAY_ENGINE_METRICS_URL",
                    "value": f"http://127.0.0.1:{c.ENGINE_METRICS_PORT}/metrics"})
    return env


def render_gateway_container(isvc: InferenceService, ctx: c.RenderContext,
                             gpu_product: str | None) -> dict[str, Any]:
    startup_failures = lifecycle.startup_failure_threshold(isvc.spec, _PROBE_PERIOD_SECONDS)
    return {
        "name": "gateway",
        "image": ctx.gateway_image,
        "imagePullPolicy": ctx.image_pull_policy,
        "args": ["gateway"],
        "env": _env(isvc, gpu_product, ctx),
        "ports": [
            {"name": "http", "containerPort": c.GATEWAY_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": c.ADMIN_PORT, "protocol": "TCP"},
        ],
        # Ready only once the engine is healthy and warm: cold start and warm-up are never billed.
        "startupProbe": _probe("/readyz", startup_failures),
        "readinessProbe": _probe("/readyz", 2),
        "livenessProbe": _probe("/livez", 3),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": _mounts(isvc, ctx),
    }


def _mounts(isvc: InferenceService, ctx: c.RenderContext) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "gateway-config", "mountPath": c.CONFIG_DIR, "readOnly": True},
        {"name": "usage", "mountPath": c.USAGE_DIR},
        {"name": "run", "mountPath": c.SHARED_RUN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        *m.metering_mounts(ctx),
    ]
    if api_keys_secret(isvc):
        mounts.append({"name": "api-keys", "mountPath": c.API_KEYS_DIR, "readOnly": True})
    return mounts
