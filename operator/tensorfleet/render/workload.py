"""Serving Deployments, the Service in front of them and their PodDisruptionBudget."""

from __future__ import annotations

import copy
import json
from typing import Any

from tensorfleet.api.schema import FieldError, InvalidSpecError
from tensorfleet.api.types import InferenceService, InferenceServiceSpec
from tensorfleet.render import context as c
from tensorfleet.render import labels, lifecycle
from tensorfleet.render.engine_container import render_engine_container
from tensorfleet.render.gateway import api_keys_volume, gateway_config_volume, render_gateway_container
from tensorfleet.render.metering import metering_volumes

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_NODE_AFFINITY = "spec.affinity.nodeAffinity"
_REQUIRED = f"{_NODE_AFFINITY}.requiredDuringSchedulingIgnoredDuringExecution"


def deployment_name(isvc_name: str, variant: str) -> str:
    return isvc_name if variant == labels.DEFAULT_VARIANT else f"{isvc_name}-{variant}"


def _volumes(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    cache: dict[str, Any]
    if spec.model_cache.claim_name:
        cache = {"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}}
    else:
        cache = {"name": "model-cache", "emptyDir": {"sizeLimit": spec.model_cache.size_limit}}
    volumes = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        cache,
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "usage", "emptyDir": {"sizeLimit": "2Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    if spec.model.source.scheme == "pvc":
        claim = spec.model.source.location
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    if spec.runtime.name == "triton":
        volumes.append({"name": "engines", "emptyDir": {"sizeLimit": spec.model_cache.size_limit}})
    return volumes


def _gateway_volumes(isvc: InferenceService, ctx: c.RenderContext) -> list[dict[str, Any]]:
    keys = api_keys_volume(isvc)
    return [gateway_config_volume(isvc, ctx), *([keys] if keys is not None else [])]


def _product_affinity(spec: InferenceServiceSpec, products: list[str]) -> dict[str, Any]:
    """The user's affinity, with the GPU-product requirement ANDed into every node-selector term.

    ``api.validation`` checks the user's part; a shape that got past it raises InvalidSpecError naming the
    field (reported like the checks' errors), never an AttributeError."""
    affinity = copy.deepcopy(dict(spec.affinity))
    if not products:
        return affinity
    requirement = {"key": labels.NODE_GPU_PRODUCT, "operator": "In", "values": products}
    node = _member(affinity, "nodeAffinity", dict, "spec.affinity")
    required = _member(node, "requiredDuringSchedulingIgnoredDuringExecution", dict, _NODE_AFFINITY)
    terms = _member(required, "nodeSelectorTerms", list, _REQUIRED) or [{}]
    for index, term in enumerate(terms):
        path = f"{_REQUIRED}.nodeSelectorTerms[{index}]"
        _member(_typed(term, dict, path), "matchExpressions", list, path).append(requirement)
    required["nodeSelectorTerms"] = terms
    if len(products) > 1:  # earlier products in the allow-list are preferred
        preferred = _member(node, "preferredDuringSchedulingIgnoredDuringExecution", list, _NODE_AFFINITY)
        preferred.extend(_product_preferences(products))
    return affinity


def _member(parent: dict[str, Any], key: str, kind: type[dict[str, Any]] | type[list[Any]], path: str) -> Any:
    """``parent[key]``, set to an empty ``kind`` when absent or null."""
    if parent.get(key) is None:
        parent[key] = kind()
    return _typed(parent[key], kind, f"{path}.{key}")


def _typed(value: Any, kind: type[dict[str, Any]] | type[list[Any]], path: str) -> Any:
    if isinstance(value, kind):
        return value
    shown = '"object"' if isinstance(value, dict) else '"array"' if isinstance(value, list) else json.dumps(
        value, default=str)
    expected = "object" if kind is dict else "array"
    raise InvalidSpecError(FieldError(path, f"Invalid value: {shown}: must be of type {expected}"))


def _product_preferences(products: list[str]) -> list[dict[str, Any]]:
    return [{"weight": max(1, 100 - 10 * rank),
             "preference": {"matchExpressions": [{"key": labels.NODE_GPU_PRODUCT, "operator": "In", "values": [p]}]}}
            for rank, p in enumerate(products)]


def _pod_spec(isvc: InferenceService, ctx: c.RenderContext, gpu_product: str | None,
              products: list[str]) -> dict[str, Any]:
    spec = isvc.spec
    pod: dict[str, Any] = {
        "containers": [render_engine_container(isvc, ctx), render_gateway_container(isvc, ctx, gpu_product)],
        "volumes": [*_volumes(spec), *_gateway_volumes(isvc, ctx), *metering_volumes(ctx)],
        "tolerations": [*(dict(t) for t in spec.tolerations), GPU_TOLERATION],
        "terminationGracePeriodSeconds": lifecycle.GRACE_PERIOD_SECONDS,  # the drain, then the stop
        "enableServiceLinks": False,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    affinity = _product_affinity(spec, products)
    if affinity:
        pod["affinity"] = affinity
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    return pod


def render_deployment(isvc: InferenceService, ctx: c.RenderContext, replicas: int,
                      variant: str = labels.DEFAULT_VARIANT, gpu_product: str | None = None,
                      products: tuple[str, ...] = ()) -> dict[str, Any]:
    """One serving Deployment.

    ``gpu_product`` pins it to nodes of that one product (triton: one Deployment per product, since an
    engine runs only on the GPU it was built for); otherwise ``products`` is the ordered allow-list.
    """
    allowed = [gpu_product] if gpu_product else list(products)
    extra = {labels.VARIANT_LABEL: variant}
    if gpu_product:
        extra[labels.GPU_PRODUCT_LABEL] = gpu_product
    pod_labels = {**labels.common(isvc.name, "inference"), **extra}
    template_meta: dict[str, Any] = {"labels": pod_labels}
    if isvc.spec.pod_annotations:
        template_meta["annotations"] = dict(isvc.spec.pod_annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": labels.metadata(deployment_name(isvc.name, variant), isvc.namespace, isvc.name, isvc.uid,
                                    "inference", extra),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels.variant_selector(isvc.name, variant)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": int(isvc.spec.warmup["timeoutSeconds"]) + 600,
            "template": {"metadata": template_meta, "spec": _pod_spec(isvc, ctx, gpu_product, allowed)},
        },
    }


def render_service(isvc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(isvc.name, isvc.namespace, isvc.name, isvc.uid, "inference"),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.selector(isvc.name),
            "ports": [{"name": "http", "port": c.SERVICE_PORT, "targetPort": "http",
                       "protocol": "TCP", "appProtocol": "http"}],
        },
    }


def render_pdb(isvc: InferenceService) -> dict[str, Any]:
    # maxUnavailable 1: a node drain takes at most one replica at a time and is never blocked forever.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": labels.metadata(isvc.name, isvc.namespace, isvc.name, isvc.uid, "inference"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels.selector(isvc.name)}},
    }


def service_url(isvc: InferenceService, ctx: c.RenderContext) -> str:
    return f"http://{isvc.name}.{isvc.namespace}.svc.{ctx.cluster_domain}"
