"""HorizontalPodAutoscaler (``mode: hpa``) and KEDA ScaledObject (``mode: keda``) for an InferenceService.

Both target the InferenceService's scale subresource, never its Deployments: the HPA (or KEDA's HPA)
then owns ``spec.replicas`` and tensorfleet's reconcile rolls the Deployments from it, exactly as
with ``mode: tensorfleet``. There is one owner of replicas in every mode.

They scale on the signals tensorfleet's own policy sizes with, as per-replica averages:

* queue depth: ``tensorfleet_gateway_queue_depth + tensorfleet_engine_waiting_requests``;
* concurrency, when ``targetInFlight`` is set: ``tensorfleet_gateway_in_flight_requests +
  tensorfleet_gateway_queue_depth``;
* KV-cache usage: ``tensorfleet_engine_kv_cache_usage_ratio``.

GPU utilization is deliberately left out: an HPA takes the largest of its metrics, and utilization
pins near 100% once an engine batches, so it would hold every service at maxReplicas. (tensorfleet's
own policy uses it as a gate, which an HPA cannot express.)

For ``hpa`` the cluster needs a custom-metrics adapter that serves the names in ``ADAPTER_METRICS``
as Pods metrics; ``prometheus_adapter_rules`` is the prometheus-adapter configuration that does so.
For ``keda`` it needs KEDA and a Prometheus that scrapes the gateways with the pod label
``tensorfleet.io/inferenceservice`` copied to the metric label ``inferenceservice``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from tensorfleet import API_GROUP, API_VERSION, telemetry
from tensorfleet.api.schema import FieldError
from tensorfleet.api.types import AutoscalingSpec, InferenceService
from tensorfleet.autoscale import policy
from tensorfleet.render import labels
from tensorfleet.render.context import RenderContext

QUEUE_METRIC = "tensorfleet_queue_depth"
CONCURRENCY_METRIC = "tensorfleet_concurrency"
KV_METRIC = telemetry.KV_CACHE_USAGE
ADAPTER_METRICS = (QUEUE_METRIC, CONCURRENCY_METRIC, KV_METRIC)
SERVICE_LABEL = "inferenceservice"  # metric label carrying the pod's tensorfleet.io/inferenceservice label
HPA_SYNC_SECONDS = 15  # the HPA controller's default --horizontal-pod-autoscaler-sync-period
KEDA_POLLING_SECONDS = 15


MODE_SETTINGS = {"hpa": ("autoscale_hpa", "autoscaling.hpa"), "keda": ("autoscale_keda", "autoscaling.keda")}


def mode_errors(body: Mapping[str, Any], ctx: RenderContext) -> list[FieldError]:
    """A mode this installation does not allow, named by its field (the operator could not write its objects)."""
    mode = ((body.get("spec") or {}).get("autoscaling") or {}).get("mode")
    if mode not in ctx.disabled_autoscaling_modes:
        return []
    setting, value = MODE_SETTINGS[str(mode)]
    return [FieldError("spec.autoscaling.mode", f"Unsupported value: {mode!r}: this tensorfleet installation does "
                       f"not allow mode {mode} (operator setting TENSORFLEET_{setting.upper()}, chart value "
                       f"{value}); use tensorfleet, none or an allowed mode")]


def autoscaler_objects(isvc: InferenceService, ctx: RenderContext) -> list[dict[str, Any]]:
    """The HPA or ScaledObject the service's autoscaling mode asks for (none for none and tensorfleet)."""
    mode = isvc.spec.autoscaling.mode
    if mode == "hpa":
        return [render_hpa(isvc)]
    if mode == "keda":
        return [render_scaled_object(isvc, ctx)]
    return []


def scale_target_ref(isvc: InferenceService) -> dict[str, str]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceService", "name": isvc.name}


def behavior(spec: AutoscalingSpec) -> dict[str, Any]:
    """HPA behavior from the same bounds tensorfleet's policy uses (windows at the default startup time).

    Within the HPA's limits for every spec the CRD accepts in modes hpa and keda: its rules cap
    scaleDownStabilizationSeconds at 3600 (stabilizationWindowSeconds) and panicWindowSeconds, which
    bounds the stable window and so the policy's periodSeconds, at 1800.
    """
    windows = policy.derive_windows(policy.PolicyConfig.from_spec(spec), None)
    scale_up: dict[str, Any] = {"stabilizationWindowSeconds": 0}
    if spec.max_scale_up_rate > 1:
        scale_up["selectPolicy"] = "Max"
        scale_up["policies"] = [{"type": "Percent", "value": (spec.max_scale_up_rate - 1) * 100,
                                 "periodSeconds": HPA_SYNC_SECONDS}]
    else:  # 1: only in objects stored before the CRD required at least 2; as then, no scale-up (until edited)
        scale_up["selectPolicy"] = "Disabled"
    return {
        "scaleUp": scale_up,
        "scaleDown": {
            "stabilizationWindowSeconds": math.ceil(windows.scale_down_seconds),
            "selectPolicy": "Max",
            # At most halve per stable window, as tensorfleet's policy does.
            "policies": [{"type": "Percent", "value": 50, "periodSeconds": math.ceil(windows.stable_seconds)}],
        },
    }


def render_hpa(isvc: InferenceService) -> dict[str, Any]:
    spec = isvc.spec.autoscaling
    metrics = [_pods_metric(QUEUE_METRIC, canonical_quantity(Decimal(spec.target_queue_depth)))]
    if spec.target_in_flight:
        metrics.append(_pods_metric(CONCURRENCY_METRIC, canonical_quantity(Decimal(spec.target_in_flight))))
    if spec.target_kv_cache_usage_percent:
        ratio = Decimal(spec.target_kv_cache_usage_percent) / 100
        metrics.append(_pods_metric(KV_METRIC, canonical_quantity(ratio)))
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": labels.metadata(isvc.name, isvc.namespace, isvc.name, isvc.uid, "autoscaler"),
        "spec": {
            "scaleTargetRef": scale_target_ref(isvc),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": metrics,
            "behavior": behavior(spec),
        },
    }


def render_scaled_object(isvc: InferenceService, ctx: RenderContext) -> dict[str, Any]:
    spec = isvc.spec.autoscaling
    where = f'namespace="{isvc.namespace}",{SERVICE_LABEL}="{isvc.name}"'

    def total(*names: str) -> str:
        return f'sum({{__name__=~"{"|".join(names)}",{where}}})'

    triggers = [_prometheus_trigger("queue-depth", ctx, total(telemetry.QUEUE_DEPTH, telemetry.ENGINE_WAITING),
                                    str(spec.target_queue_depth))]
    if spec.target_in_flight:
        triggers.append(_prometheus_trigger("concurrency", ctx, total(telemetry.IN_FLIGHT, telemetry.QUEUE_DEPTH),
                                            str(spec.target_in_flight)))
    if spec.target_kv_cache_usage_percent:
        triggers.append(_prometheus_trigger("kv-cache-usage", ctx, total(telemetry.KV_CACHE_USAGE),
                                            f"{spec.target_kv_cache_usage_percent / 100:g}"))
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": labels.metadata(isvc.name, isvc.namespace, isvc.name, isvc.uid, "autoscaler"),
        "spec": {
            "scaleTargetRef": scale_target_ref(isvc),
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(spec)}},
            "triggers": triggers,
        },
    }


def prometheus_adapter_rules() -> dict[str, Any]:
    """prometheus-adapter ``rules`` serving ``ADAPTER_METRICS`` as Pods metrics (for ``mode: hpa``)."""

    def rule(series: str, name: str, *summed: str) -> dict[str, Any]:
        query = f'sum({{__name__=~"{"|".join(summed)}",<<.LabelMatchers>>}}) by (<<.GroupBy>>)'
        resources = {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        return {"seriesQuery": f'{series}{{namespace!="",pod!=""}}', "resources": resources,
                "name": {"matches": f"^{series}$", "as": name}, "metricsQuery": query}

    return {"rules": [
        rule(telemetry.QUEUE_DEPTH, QUEUE_METRIC, telemetry.QUEUE_DEPTH, telemetry.ENGINE_WAITING),
        rule(telemetry.IN_FLIGHT, CONCURRENCY_METRIC, telemetry.IN_FLIGHT, telemetry.QUEUE_DEPTH),
        {**rule(telemetry.KV_CACHE_USAGE, KV_METRIC, telemetry.KV_CACHE_USAGE),
         "metricsQuery": f"avg({telemetry.KV_CACHE_USAGE}{{<<.LabelMatchers>>}}) by (<<.GroupBy>>)"},
    ]}


# Decimal SI suffixes, largest first, with the power of ten each stands for.
_SI_SUFFIXES = (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3), ("", 0), ("m", -3), ("u", -6),
                ("n", -9))


def canonical_quantity(value: Decimal) -> str:
    """``value`` as the API server stores a decimal quantity: a whole number with the largest SI suffix
    that keeps it whole (0.8 -> ``800m``, 1 -> ``1``, 1000 -> ``1k``, 1500 -> ``1500``), so that what is
    read back equals what was written."""
    if value == 0:
        return "0"
    for suffix, exponent in _SI_SUFFIXES:
        scaled = value.scaleb(-exponent)
        if scaled == scaled.to_integral_value():
            return f"{int(scaled)}{suffix}"
    raise ValueError(f"{value} is finer than a quantity can hold (1n)")


def _pods_metric(name: str, average: str) -> dict[str, Any]:
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": "AverageValue",
                                                                        "averageValue": average}}}


def _prometheus_trigger(name: str, ctx: RenderContext, query: str, threshold: str) -> dict[str, Any]:
    return {"type": "prometheus", "name": name, "metricType": "AverageValue",
            "metadata": {"serverAddress": ctx.prometheus_url, "query": query, "threshold": threshold}}
