"""Specs the API server would accept but Kubernetes could not run are rejected naming the field and the limit.

Two kinds: resource requests above their limits (a cross-field check in Python: the CEL library has no
quantities), and autoscaling windows beyond what a HorizontalPodAutoscaler accepts in modes hpa and keda
(CEL rules in the CRD). Every value that passes must render objects within the Kubernetes limits.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import inference_service, stored
from tensorfleet.api.types import InferenceService
from tensorfleet.api.validation import validate_body
from tensorfleet.autoscale import render
from tensorfleet.reconcile import Observed, reconcile, spec_errors
from tensorfleet.render.context import RenderContext

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HPA_MAX_STABILIZATION_SECONDS = 3600  # autoscaling/v2 validation: MaxStabilizationWindowSeconds
HPA_MAX_PERIOD_SECONDS = 1800  # autoscaling/v2 validation: MaxPeriodSeconds


def with_resources(**resources: Any) -> dict[str, Any]:
    return stored(inference_service(resources=resources))


@pytest.mark.parametrize(("requests", "limits", "field", "shown"), [
    ({"cpu": "4"}, {"cpu": "2"}, "spec.resources.requests.cpu", '"4": must be less than or equal to '
                                                                 'spec.resources.limits.cpu "2"'),
    ({"cpu": "2001m"}, {"cpu": 2}, "spec.resources.requests.cpu", 'spec.resources.limits.cpu "2"'),
    ({"memory": "1Gi", "cpu": 1}, {"memory": "1000Mi", "cpu": 1}, "spec.resources.requests.memory",
     'spec.resources.limits.memory "1000Mi"'),
])
def test_a_request_above_its_limit_is_rejected_naming_the_field_and_the_limit(
        requests: dict[str, Any], limits: dict[str, Any], field: str, shown: str) -> None:
    errors = spec_errors(with_resources(requests=requests, limits=limits), RenderContext())
    assert [e.path for e in errors] == [field]
    assert shown in errors[0].message


@pytest.mark.parametrize(("requests", "limits"), [
    ({"cpu": "2"}, {"cpu": "2000m"}),  # equal, in other units
    ({"memory": "1Gi"}, {"memory": "1024Mi"}),
    ({"cpu": "4"}, {"memory": "1Gi"}),  # no limit for cpu: no bound
    ({"cpu": "500m", "memory": "8Gi"}, {"cpu": 1, "memory": "16Gi"}),
])
def test_requests_within_their_limits_are_accepted(requests: dict[str, Any], limits: dict[str, Any]) -> None:
    assert spec_errors(with_resources(requests=requests, limits=limits), RenderContext()) == []


def test_reconcile_reports_the_request_above_its_limit_and_renders_nothing() -> None:
    plan = reconcile(with_resources(requests={"cpu": "4"}, limits={"cpu": "2"}), Observed(), RenderContext(), NOW)
    assert [e.path for e in plan.errors] == ["spec.resources.requests.cpu"]
    assert not [o for o in plan.desired if o["kind"] == "Deployment"]


def autoscaled(mode: str, **autoscaling: Any) -> dict[str, Any]:
    body = inference_service("llama", autoscaling={"mode": mode, "minReplicas": 2, "maxReplicas": 8, **autoscaling})
    del body["spec"]["replicas"]
    return stored(body)


@pytest.mark.parametrize("mode", ["hpa", "keda"])
@pytest.mark.parametrize(("setting", "value", "limit"), [
    ("scaleDownStabilizationSeconds", 7200, "at most 3600"),
    ("panicWindowSeconds", 3600, "at most 1800"),
])
def test_windows_an_hpa_cannot_take_are_rejected_in_modes_hpa_and_keda(
        mode: str, setting: str, value: int, limit: str) -> None:
    errors = validate_body(autoscaled(mode, **{setting: value}))
    assert [e.path for e in errors] == [f"spec.autoscaling.{setting}"]
    assert limit in errors[0].message


def test_the_tensorfleet_policy_keeps_its_longer_windows() -> None:
    assert validate_body(autoscaled("tensorfleet", scaleDownStabilizationSeconds=86400, panicWindowSeconds=3600)) == []


def behavior_of(body: dict[str, Any], mode: str) -> dict[str, Any]:
    plan = reconcile(body, Observed(), RenderContext(prometheus_url="http://prometheus:9090"), NOW)
    assert plan.errors == ()
    obj = next(o for o in plan.desired if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"))
    spec = obj["spec"]
    return dict(spec["behavior"] if mode == "hpa" else spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(["hpa", "keda"]),
       down=st.none() | st.integers(0, 86400), panic=st.none() | st.integers(1, 3600))
def test_every_accepted_window_renders_a_behavior_the_api_server_accepts(
        mode: str, down: int | None, panic: int | None) -> None:
    windows = {k: v for k, v in (("scaleDownStabilizationSeconds", down), ("panicWindowSeconds", panic))
               if v is not None}
    body = autoscaled(mode, **windows)
    if validate_body(body):
        return  # rejected naming the field (above)
    for direction, rules in behavior_of(body, mode).items():
        assert 0 <= rules["stabilizationWindowSeconds"] <= HPA_MAX_STABILIZATION_SECONDS, (direction, rules)
        for policy in rules.get("policies", ()):
            assert 0 < policy["periodSeconds"] <= HPA_MAX_PERIOD_SECONDS, (direction, policy)


def test_the_largest_accepted_windows_render_at_the_hpa_limits() -> None:
    spec = InferenceService.from_body(autoscaled("hpa", scaleDownStabilizationSeconds=3600,
                                                 panicWindowSeconds=1800)).spec.autoscaling
    scale_down = render.behavior(spec)["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == HPA_MAX_STABILIZATION_SECONDS
    assert scale_down["policies"][0]["periodSeconds"] == HPA_MAX_PERIOD_SECONDS
