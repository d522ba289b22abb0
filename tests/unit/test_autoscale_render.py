"""Modes hpa and keda: the rendered autoscalers, their place in reconcile, status.autoscaling and the CRD rules."""

from __future__ import annotations

import copy
import datetime
import pathlib
from decimal import Decimal
from typing import Any

import pytest
import yaml
from kubernetes.utils import quantity

from builders import inference_service, stored
from tensorfleet import diff
from tensorfleet.api import crds
from tensorfleet.api.types import InferenceService
from tensorfleet.autoscale import policy, render
from tensorfleet.autoscale import status as records
from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.render.context import RenderContext

CTX = RenderContext(prometheus_url="http://prometheus.monitoring:9090")
NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)


def service(mode: str, **autoscaling: Any) -> dict[str, Any]:
    body = inference_service("llama", autoscaling={"mode": mode, "minReplicas": 2, "maxReplicas": 8, **autoscaling})
    del body["spec"]["replicas"]
    return stored(body)


def isvc(mode: str, **autoscaling: Any) -> InferenceService:
    return InferenceService.from_body(service(mode, **autoscaling))


def test_hpa_targets_the_scale_subresource_on_queue_and_kv_cache() -> None:
    hpa = render.render_hpa(isvc("hpa"))
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "InferenceService",
                                             "name": "llama"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert [(m["pods"]["metric"]["name"], m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]] == [
        ("tensorfleet_queue_depth", "4"), ("tensorfleet_engine_kv_cache_usage_ratio", "800m")]
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


@pytest.mark.parametrize(("autoscaling", "stored_as"), [
    ({"targetKVCacheUsagePercent": 100}, ["4", "1"]),
    ({"targetKVCacheUsagePercent": 5, "targetQueueDepth": 1000, "targetInFlight": 1500}, ["1k", "1500", "50m"]),
    ({"targetQueueDepth": 10000, "targetInFlight": 100000}, ["10k", "100k", "800m"]),
])
def test_hpa_targets_are_canonical_quantities_so_a_converged_hpa_is_not_rewritten(
        autoscaling: dict[str, Any], stored_as: list[str]) -> None:
    plan = reconcile(service("hpa", **autoscaling), Observed(), CTX, NOW)
    hpa = next(o for o in plan.desired if o["kind"] == "HorizontalPodAutoscaler")
    assert [m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]] == stored_as
    stored_hpa = copy.deepcopy(hpa)  # as the API server keeps it: each quantity in its canonical form
    for metric, canonical in zip(stored_hpa["spec"]["metrics"], stored_as, strict=True):
        metric["pods"]["target"]["averageValue"] = canonical
    assert diff.needs_apply(hpa, stored_hpa) is None


@pytest.mark.parametrize(("value", "text"), [
    (Decimal(0), "0"), (Decimal("0.8"), "800m"), (Decimal("0.0125"), "12500u"), (Decimal(1), "1"),
    (Decimal(1000), "1k"), (Decimal(1500), "1500"), (Decimal(2_000_000), "2M"),
])
def test_canonical_quantity_is_the_api_servers_form(value: Decimal, text: str) -> None:
    assert render.canonical_quantity(value) == text
    assert quantity.parse_quantity(text) == value


def test_hpa_never_scales_on_gpu_utilization() -> None:
    rendered = str(render.render_hpa(isvc("hpa", targetInFlight=24)))
    assert "gpu_utilization" not in rendered
    assert "tensorfleet_concurrency" in rendered


def test_hpa_behavior_follows_the_policy_bounds() -> None:
    behavior = render.render_hpa(isvc("hpa"))["spec"]["behavior"]
    windows = policy.derive_windows(policy.PolicyConfig(), None)
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == windows.scale_down_seconds == 120
    assert behavior["scaleUp"]["policies"] == [{"type": "Percent", "value": 100, "periodSeconds": 15}]
    slow = render.render_hpa(isvc("hpa", scaleDownStabilizationSeconds=600))["spec"]["behavior"]
    assert slow["scaleDown"]["stabilizationWindowSeconds"] == 600
    # maxScaleUpRate 1 is refused by the CRD now; an object stored before keeps what it rendered.
    stored_before = render.render_hpa(isvc("hpa", maxScaleUpRate=1))["spec"]["behavior"]
    assert stored_before["scaleUp"]["selectPolicy"] == "Disabled"


def test_scaled_object_queries_the_service_metrics_in_prometheus() -> None:
    scaled = render.render_scaled_object(isvc("keda", targetInFlight=24), CTX)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["kind"] == "InferenceService"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue-depth", "concurrency", "kv-cache-usage"}
    queue = triggers["queue-depth"]["metadata"]
    assert queue["serverAddress"] == "http://prometheus.monitoring:9090"
    assert queue["query"] == ('sum({__name__=~"tensorfleet_gateway_queue_depth|tensorfleet_engine_waiting_requests",'
                              'namespace="default",inferenceservice="llama"})')
    assert (queue["threshold"], triggers["kv-cache-usage"]["metadata"]["threshold"]) == ("4", "0.8")
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == render.behavior(isvc("keda").spec.autoscaling)


def test_adapter_rules_serve_every_metric_the_hpa_uses() -> None:
    served = {rule["name"]["as"] for rule in render.prometheus_adapter_rules()["rules"]}
    used = {m["pods"]["metric"]["name"] for m in render.render_hpa(isvc("hpa", targetInFlight=8))["spec"]["metrics"]}
    assert used <= served == set(render.ADAPTER_METRICS)


def test_reconcile_renders_the_autoscaler_of_the_mode() -> None:
    kinds = {mode: sorted(o["kind"] for o in reconcile(service(mode), Observed(), CTX, NOW).desired)
             for mode in ("none", "tensorfleet", "hpa", "keda")}
    base = ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    assert kinds == {"none": base, "tensorfleet": base, "hpa": sorted([*base, "HorizontalPodAutoscaler"]),
                     "keda": sorted([*base, "ScaledObject"])}


def test_replicas_follow_spec_replicas_whoever_set_them() -> None:
    body = service("hpa")
    body["spec"]["replicas"] = 5  # written by the HPA through /scale
    deployment = next(o for o in reconcile(body, Observed(), CTX, NOW).desired if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 5


def test_leaving_hpa_mode_prunes_the_hpa() -> None:
    hpa_body = service("hpa")
    created = [dict(copy.deepcopy(o), metadata={**o["metadata"], "uid": "child"})
               for o in reconcile(hpa_body, Observed(), CTX, NOW).desired]
    plan = reconcile(service("tensorfleet"), Observed(tuple(created)), CTX, NOW)
    assert [o["kind"] for o in plan.prune] == ["HorizontalPodAutoscaler"]


def test_status_names_the_autoscaler_in_hpa_mode_and_clears_the_daemons_record() -> None:
    body = service("hpa")
    body["status"] = {"autoscaling": {"mode": "tensorfleet", "desiredReplicas": 3, "reason": "ScaledUp"}}
    status = reconcile(body, Observed(), CTX, NOW).status["autoscaling"]
    assert status["mode"] == "hpa"
    assert status["autoscaler"] == "HorizontalPodAutoscaler/llama"
    assert status["desiredReplicas"] is None
    assert status["reason"] is None
    body["status"] = {"autoscaling": {k: v for k, v in status.items() if v is not None}}
    assert reconcile(body, Observed(), CTX, NOW).status["autoscaling"] == body["status"]["autoscaling"]  # no write


def test_status_autoscaling_is_left_to_the_daemon_in_tensorfleet_mode_and_removed_in_none() -> None:
    owned = service("tensorfleet")
    owned["status"] = {"autoscaling": {"mode": "tensorfleet", "desiredReplicas": 3}}
    assert "autoscaling" not in reconcile(owned, Observed(), CTX, NOW).status
    off = service("none")
    assert "autoscaling" not in reconcile(off, Observed(), CTX, NOW).status
    off["status"] = {"autoscaling": {"mode": "tensorfleet"}}
    assert reconcile(off, Observed(), CTX, NOW).status["autoscaling"] is None


def test_decision_record_holds_no_live_values() -> None:
    config = policy.PolicyConfig(min_replicas=1, max_replicas=8, target_kv_cache_usage=0.8)
    observation = policy.Observation(time=5.0, spec_replicas=2, ready=2, scraped=2, kv_cache_usage=1.0,
                                     queue_depth=0.0, gpu_utilization=0.97, startup_seconds=95.0)
    decision = policy.decide(config, policy.History(), observation)
    record = records.decision_status(decision, None, NOW)
    assert record["desiredReplicas"] == 3
    assert record["reason"] == "ScaledUp"
    assert record["lastScaleTime"] == "2026-11-21T12:00:00Z"
    assert record["windows"] == {"panicSeconds": 10, "stableSeconds": 60, "scaleDownSeconds": 120}
    assert record["startupSeconds"] == 95
    assert record["startupMeasured"] is True
    held = policy.decide(config, decision.history, observation.__class__(**{**observation.__dict__, "time": 7.0,
                                                                            "spec_replicas": 3}))
    assert records.decision_status(held, record, NOW)["lastScaleTime"] == record["lastScaleTime"]


def test_merge_patch_removes_what_is_gone() -> None:
    assert records.merge_patch({"a": 1, "b": 2}, {"a": 3}) == {"a": 3, "b": None}
    assert records.merge_patch({"a": 1}, None) is None


def test_min_replicas_zero_is_rejected_naming_the_field_and_why() -> None:
    errors = crds.validate(inference_service(autoscaling={"mode": "tensorfleet", "minReplicas": 0}, replicas=1))
    assert [e.path for e in errors] == ["spec.autoscaling.minReplicas"]
    assert "scale to zero is not supported" in errors[0].message


def test_kv_cache_target_defaults_to_80_percent() -> None:
    assert isvc("tensorfleet").spec.autoscaling.target_kv_cache_usage_percent == 80


def test_the_documented_adapter_rules_are_the_rendered_ones() -> None:
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "autoscaling.md").read_text()
    block = doc.split("<!-- prometheus-adapter-rules -->", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == render.prometheus_adapter_rules()


def test_a_mode_the_installation_does_not_allow_is_refused_by_its_field() -> None:
    """The chart's autoscaling.hpa/keda off: no object the operator may not write, a condition that says why."""
    ctx = RenderContext(disabled_autoscaling_modes=("hpa", "keda"))
    for mode, value in (("hpa", "autoscaling.hpa"), ("keda", "autoscaling.keda")):
        plan = reconcile(service(mode), Observed(), ctx, NOW)
        assert plan.desired == ()
        assert plan.prune == ()
        (error,) = plan.errors
        assert error.path == "spec.autoscaling.mode"
        assert f"'{mode}'" in error.message
        assert value in error.message
        degraded = next(c for c in plan.status["conditions"] if c["type"] == "Degraded")
        assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    allowed = reconcile(service("tensorfleet"), Observed(), ctx, NOW)
    assert allowed.errors == ()
    assert allowed.desired
    assert reconcile(service("keda"), Observed(), RenderContext(disabled_autoscaling_modes=("hpa",)), NOW).errors == ()
