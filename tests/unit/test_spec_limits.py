"""Specs the API server would accept but Kubernetes or the engine could not run are rejected naming the field
and the limit.

Four kinds: resource requests above their limits (a cross-field check in Python: the CEL library has no
quantities), autoscaling windows beyond what a HorizontalPodAutoscaler accepts in modes hpa and keda
(CEL rules in the CRD), token ceilings the model's context window cannot hold (the engine would refuse
every such request), and a node affinity of the wrong shape (the CRD keeps ``spec.affinity`` open, so
Python checks it). Every value that passes must render objects within the Kubernetes limits.
"""

from __future__ import annotations

import datetime
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import inference_service, stored, triton_service
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


def errors_of(**spec: Any) -> list[tuple[str, str]]:
    return [(e.path, e.message) for e in spec_errors(stored(inference_service(**spec)), RenderContext())]


@pytest.mark.parametrize(("spec", "field", "shown"), [
    ({"model": {"maxModelLen": 2048}}, "spec.tokenPolicy.maxOutputTokens",  # the default ceiling is 4096
     "Invalid value: 4096: must be less than the context window 2048 (spec.model.maxModelLen)"),
    ({"model": {"maxModelLen": 4096}}, "spec.tokenPolicy.maxOutputTokens", "the context window 4096"),
    ({"tokenPolicy": {"maxOutputTokens": 8192}}, "spec.tokenPolicy.maxOutputTokens", "the context window 8192"),
    ({"tokenPolicy": {"maxOutputTokens": 512}, "warmup": {"requests": [{"prompt": "hi", "maxTokens": 8192}]}},
     "spec.warmup.requests[0].maxTokens", "Invalid value: 8192: must be less than the context window 8192"),
    ({"model": {"maxModelLen": 2048}, "tokenPolicy": {"maxOutputTokens": 512},
      "warmup": {"requests": [{"prompt": "hi"}, {"prompt": "hello", "maxTokens": 4096}]}},
     "spec.warmup.requests[1].maxTokens", "the context window 2048 (spec.model.maxModelLen)"),
    # vLLM takes a --max-model-len in extraArgs (after the operator's) over spec.model.maxModelLen
    ({"model": {"maxModelLen": 8192}, "runtime": {"name": "vllm", "extraArgs": ["--max-model-len", "1k"]},
      "tokenPolicy": {"maxOutputTokens": 1000}}, "spec.tokenPolicy.maxOutputTokens",
     "Invalid value: 1000: must be less than the context window 1000 (spec.runtime.extraArgs[0])"),
], ids=["default ceiling over maxModelLen", "ceiling equal to maxModelLen", "ceiling equal to the window",
        "warm-up prompt max tokens equal to the window", "warm-up prompt max tokens over maxModelLen",
        "ceiling over the window of --max-model-len in extraArgs"])
def test_token_ceilings_the_context_window_cannot_hold_are_rejected(spec: dict[str, Any], field: str,
                                                                    shown: str) -> None:
    errors = errors_of(**spec)
    assert [path for path, _ in errors] == [field]
    assert shown in errors[0][1]


@pytest.mark.parametrize("spec", [
    {"model": {"maxModelLen": 2048}, "tokenPolicy": {"maxOutputTokens": 2047}},
    {"model": {"maxModelLen": 2048}, "tokenPolicy": {"maxOutputTokens": 512},
     "warmup": {"requests": [{"prompt": "hi", "maxTokens": 2047}, {"promptTokens": 1, "maxTokens": 2047}]}},
], ids=["ceiling one under maxModelLen", "warm-up one under the window"])
def test_token_ceilings_within_the_context_window_are_accepted(spec: dict[str, Any]) -> None:
    assert errors_of(**spec) == []


@pytest.mark.parametrize("extra_args", [["--max-model-len", "auto"], ["--max_model_len=-1"]])
def test_a_max_model_len_left_to_vllm_in_extra_args_leaves_it_the_ceilings(extra_args: list[str]) -> None:
    assert errors_of(model={"maxModelLen": 2048}, tokenPolicy={"maxOutputTokens": 4096},
                     runtime={"name": "vllm", "extraArgs": extra_args}) == []


def test_without_max_model_len_vllm_judges_the_ceilings_itself() -> None:
    body = inference_service(tokenPolicy={"maxOutputTokens": 65536},
                             warmup={"requests": [{"prompt": "hi", "maxTokens": 65536}]})
    del body["spec"]["model"]["maxModelLen"]  # vLLM derives the window from the model's config
    assert spec_errors(stored(body), RenderContext()) == []


def test_triton_ceilings_are_held_to_the_tighter_of_max_model_len_and_max_seq_len() -> None:
    body = stored(triton_service(model={"uri": "hf://a/b@v1", "maxModelLen": 2048},
                                 tokenPolicy={"maxOutputTokens": 4096}))
    errors = spec_errors(body, RenderContext())
    assert [e.path for e in errors] == ["spec.tokenPolicy.maxOutputTokens"]
    assert "4096: must be less than the context window 2048 (spec.model.maxModelLen)" in errors[0].message


PRODUCTS = ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"]
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"


def with_affinity(affinity: Any) -> dict[str, Any]:
    return stored(inference_service(gpu={"products": PRODUCTS}, affinity=affinity))


@pytest.mark.parametrize(("affinity", "field", "shown"), [
    ({"nodeAffinity": []}, "spec.affinity.nodeAffinity", 'Invalid value: "array": must be of type object'),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": ["x"]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0]", 'Invalid value: "x": must be of type object'),
    ({"nodeAffinity": {PREFERRED: {"weight": 1}}}, f"spec.affinity.nodeAffinity.{PREFERRED}",
     'Invalid value: "object": must be of type array'),
    ({"nodeAffinity": {REQUIRED: {}}}, f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms", "Required value"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": []}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms", "Required value: must have at least 1 item"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": {"key": "zone"}}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions", "must be of type array"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions[0].operator",
     'Unsupported value: "Near": supported values: "In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"'),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions[0]",
     "values must be non-empty when operator is In or NotIn"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "zone", "operator": "Exists", "values": ["a"]}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions[0]",
     "values must be empty when operator is Exists or DoesNotExist"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "cores", "operator": "Gt", "values": ["4", "8"]}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions[0]",
     "values must have exactly one item when operator is Gt or Lt"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "not a key!", "operator": "Exists"}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchExpressions[0].key", "should match"),
    ({"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.labels", "operator": "In", "values": ["a"]}]}]}}},
     f"spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms[0].matchFields[0].key",
     'Unsupported value: "metadata.labels": supported values: "metadata.name"'),
    ({"nodeAffinity": {PREFERRED: [{"weight": 0, "preference": {}}]}},
     f"spec.affinity.nodeAffinity.{PREFERRED}[0].weight", "Invalid value: 0: must be greater than or equal to 1"),
    ({"nodeAffinity": {PREFERRED: [{"weight": 10}]}}, f"spec.affinity.nodeAffinity.{PREFERRED}[0].preference",
     "Required value"),
    ({"nodeAffinity": {"requiredDuringSchedulingRequiredDuringExecution": {}}},
     "spec.affinity.nodeAffinity.requiredDuringSchedulingRequiredDuringExecution", "unknown field"),
    ({"nodeAfinity": {}}, "spec.affinity.nodeAfinity", 'unknown field "spec.affinity.nodeAfinity"'),
    ({"nodeAffinity": {"nodeSelectorTerms": None}}, "spec.affinity.nodeAffinity.nodeSelectorTerms", "unknown field"),
    ({"podAntiAffinity": []}, "spec.affinity.podAntiAffinity", "must be of type object"),
], ids=["node affinity a list", "term a string", "preferred an object", "terms missing", "terms empty",
        "expressions an object", "operator unknown", "In without values", "Exists with values", "Gt with two values",
        "key not a label key", "field other than metadata.name", "weight zero", "preference missing",
        "unknown node affinity field", "unknown affinity field", "unknown null field", "pod anti-affinity a list"])
def test_a_node_affinity_of_the_wrong_shape_is_rejected_naming_the_field(affinity: Any, field: str,
                                                                         shown: str) -> None:
    errors = spec_errors(with_affinity(affinity), RenderContext())
    assert [e.path for e in errors] == [field]
    assert shown in errors[0].message


def test_reconcile_reports_a_wrongly_shaped_affinity_instead_of_crashing() -> None:
    plan = reconcile(with_affinity({"nodeAffinity": []}), Observed(gpu_products=tuple(PRODUCTS)), RenderContext(),
                     NOW)
    assert [e.path for e in plan.errors] == ["spec.affinity.nodeAffinity"]
    assert plan.desired == ()


@pytest.mark.parametrize("affinity", [
    {}, {"nodeAffinity": None}, {"nodeAffinity": {}}, {"nodeAffinity": {REQUIRED: None, PREFERRED: None}},
    {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{}]}, PREFERRED: []}},
    {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "spot", "operator": "DoesNotExist", "values": None}], "matchFields": None}]}}},
    {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["a"]},
                              {"key": "cores", "operator": "Gt", "values": ["4"]},
                              {"key": "spot", "operator": "DoesNotExist"}],
         "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-1"]}]}]}}},
    {"podAntiAffinity": {PREFERRED: [{"weight": 50, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "llama"}}}}]}},
], ids=["empty", "null node affinity", "empty node affinity", "null parts", "empty term", "null values",
        "every operator",
        "pod anti-affinity"])
def test_well_formed_node_affinities_are_accepted_and_get_the_product_requirement(affinity: Any) -> None:
    plan = reconcile(with_affinity(affinity), Observed(gpu_products=tuple(PRODUCTS)), RenderContext(), NOW)
    assert plan.errors == ()
    deployment = next(o for o in plan.desired if o["kind"] == "Deployment")
    kubernetes_validate.validate(deployment, "1.33", strict=True)  # Kubernetes' own schema takes it
    for term in deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]:
        assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": PRODUCTS} in term["matchExpressions"]


NODE_AFFINITY_WORDS = st.sampled_from([REQUIRED, PREFERRED, "nodeSelectorTerms", "matchExpressions", "matchFields",
                                       "key", "operator", "values", "weight", "preference"])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 200) | st.sampled_from(["In", "Exists", "zone", "x"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NODE_AFFINITY_WORDS, inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(node_affinity=JSON)
def test_no_node_affinity_crashes_reconcile(node_affinity: Any) -> None:
    """Whatever the API server lets into the open ``spec.affinity``: InvalidSpec naming it, or a Deployment that
    Kubernetes' own schema takes."""
    plan = reconcile(with_affinity({"nodeAffinity": node_affinity}), Observed(gpu_products=tuple(PRODUCTS)),
                     RenderContext(), NOW)
    assert all(e.path.startswith("spec.affinity.nodeAffinity") for e in plan.errors), plan.errors
    for deployment in (o for o in plan.desired if o["kind"] == "Deployment"):
        kubernetes_validate.validate(deployment, "1.33", strict=True)
    assert bool(plan.errors) != any(o["kind"] == "Deployment" for o in plan.desired)
