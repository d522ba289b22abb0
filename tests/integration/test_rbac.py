"""The chart's RBAC grants exactly what the operator uses, proven against the code.

The operator runs (with kopf peering, as the chart deploys it) through a representative scenario
against the API emulator, which records every request as the RBAC authorizer sees it. Then:
every request must be allowed by the rendered Role/ClusterRole rules, and every granted
(verb, group, resource) must have been used. kopf's own needs (CRD and namespace discovery, the
peering objects) are recorded the same way, since kopf talks to the same emulator. So are the checks of the
OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default): a write whose owner reference
sets blockOwnerDeletion needs ``update`` on the owner's ``finalizers`` subresource.

When code starts using a new resource or verb: add a step that exercises it to SCENARIO, and the
rule to charts/tensorfleet/templates/_rbac.tpl. The test fails until both agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import kmock
import pytest
from kopf.testing import KopfRunner

from builders import deep_merge, engine, engine_spec, inference_service, triton_service
from chart import NAMESPACE, of_kind, one, render
from cluster import ISVC, Cluster, registry_from_env, wait_for
from gateway_metrics import LoopbackGatewayMetrics, ready_status, serving_pod
from tensorfleet.sandbox.apiserver import APIRequest, EmulatorThread

pytestmark = pytest.mark.integration

PEERING = "tensorfleet"
H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"
KEDA = "keda.sh/v1alpha1"
OPERATOR_AGENTS = ("kopf/", "tensorfleet/")  # kopf's own requests and tensorfleet.kube's

# ---- the scenario: one step per behaviour that needs an API permission ---------------------------


def discover_gpus(cluster: Cluster) -> None:
    """GPU nodes labelled by GPU feature discovery: the operator keeps an inventory of products."""
    cluster.add_gpu_node("gpu-h100", H100, 9, 0)
    cluster.add_gpu_node("gpu-a100", A100, 8, 0)


def serve_a_model(cluster: Cluster) -> None:
    """Create -> children applied (created), status written, Ready event posted."""
    assert cluster.create(inference_service("llama")).status_code == 201
    wait_for(lambda: len(cluster.children("llama")) == 5, what="5 children")
    cluster.mark_deployments_ready("llama")
    wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", what="Ready=True")


def roll_out_a_new_model(cluster: Cluster) -> None:
    """A new model rolls the pods; once they are all of the new revision, the old revision's gateway
    ConfigMap is deleted."""
    def revision_maps() -> set[str]:
        return {c["metadata"]["name"] for c in cluster.children("llama")
                if c["kind"] == "ConfigMap" and c["metadata"]["name"] != "llama-gateway"}

    (old,) = revision_maps()
    cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"model": {"servedName": "llama-new"}}})
    wait_for(lambda: len(revision_maps()) == 2, what="the new revision's ConfigMap")
    wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["metadata"]["generation"] == 2, what="rolled")
    cluster.mark_deployments_ready("llama")
    wait_for(lambda: old not in revision_maps(), what="the old revision's ConfigMap pruned")


def build_engines_then_drop_a_gpu_product(cluster: Cluster) -> None:
    """Triton: one Engine per product, built by a Job whose pod's termination message the operator reads,
    then the finished Jobs deleted; dropping a product prunes its Deployment and releases its Engine."""
    assert cluster.create(triton_service("trt", gpu={"products": [H100, A100]})).status_code == 201
    wait_for(lambda: cluster.complete_engine_builds() >= 0 and len(_deployments(cluster, "trt")) == 2,
             what="engines built from their Jobs' reports, then one Deployment per product")
    wait_for(lambda: cluster.jobs() == [], what="finished build Jobs deleted")
    cluster.patch(ISVC, "InferenceService", "trt", {"spec": {"gpu": {"products": [H100]}}})
    wait_for(lambda: len(_deployments(cluster, "trt")) == 1, what="the A100 Deployment pruned")
    wait_for(lambda: len(cluster.engines()) == 1, what="the A100 Engine released")


def autoscale_on_queue_depth(cluster: Cluster) -> None:
    """mode tensorfleet: the operator finds the serving pods, scrapes their gateways and writes /scale, then
    records the decision (status.autoscaling, an Event); before acting it lists HPAs to avoid a fight."""
    body = inference_service("auto", autoscaling={"mode": "tensorfleet", "minReplicas": 1, "maxReplicas": 4,
                                                  "panicWindowSeconds": 1, "scaleDownStabilizationSeconds": 3})
    del body["spec"]["replicas"]
    assert cluster.create(body).status_code == 201
    wait_for(lambda: len(cluster.children("auto")) == 5, what="5 children")
    cluster.mark_deployments_ready("auto")
    gateway = LoopbackGatewayMetrics(queue_depth=12, in_flight=8, kv_cache_usage=0.95, gpu_utilization=1.0)
    try:
        assert cluster.create(serving_pod("auto-0", "auto", gateway.port)).status_code == 201
        assert cluster.patch("v1", "Pod", "auto-0", {"status": ready_status()}, sub="status").status_code == 200
        wait_for(lambda: (cluster.isvc("auto")["spec"].get("replicas") or 0) >= 2, what="scaled up through /scale")
        wait_for(lambda: (cluster.isvc("auto").get("status") or {}).get("autoscaling"), what="the decision recorded")
    finally:
        gateway.close()


def hand_over_to_hpa_and_keda(cluster: Cluster) -> None:
    """modes hpa and keda (only where the chart allows them): the operator renders an HPA and a ScaledObject,
    and prunes them when the mode changes."""
    for name, mode in (("by-hpa", "hpa"), ("by-keda", "keda")):
        body = inference_service(name, autoscaling={"mode": mode, "minReplicas": 1, "maxReplicas": 4})
        del body["spec"]["replicas"]
        assert cluster.create(body).status_code == 201
    wait_for(lambda: cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "by-hpa"), what="the HPA")
    wait_for(lambda: cluster.get(KEDA, "ScaledObject", "by-keda"), what="the ScaledObject")
    for name in ("by-hpa", "by-keda"):
        cluster.patch(ISVC, "InferenceService", name, {"spec": {"autoscaling": {"mode": "tensorfleet"}}})
    wait_for(lambda: cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "by-hpa") is None, what="HPA pruned")
    wait_for(lambda: cluster.get(KEDA, "ScaledObject", "by-keda") is None, what="ScaledObject pruned")


def remove_the_finalizers_of_an_older_release(cluster: Cluster) -> None:
    """Objects an older release put kopf's finalizer on: kopf patches it away, as no handler needs one now."""
    legacy = [inference_service("old"), engine(engine_spec(), name="old")]
    for obj in legacy:
        obj["metadata"]["finalizers"] = ["tensorfleet.io/finalizer"]
        assert cluster.create(obj).status_code == 201
    wait_for(lambda: not any(cluster.get(o["apiVersion"], o["kind"], "old")["metadata"].get("finalizers")
                             for o in legacy), what="the finalizers removed")
    cluster.delete(ISVC, "Engine", "old")
    wait_for(lambda: cluster.engine("old") is None, what="the Engine deleted")


def delete_the_services(cluster: Cluster) -> None:
    """Deletion: the daemons stop (Engines go with their owner)."""
    for service in cluster.list(ISVC, "InferenceService"):
        cluster.delete(ISVC, "InferenceService", service["metadata"]["name"])
    wait_for(lambda: cluster.list(ISVC, "InferenceService") == [], what="services deleted")
    wait_for(lambda: cluster.engines() == [], what="Engines released")


SCENARIO: list[Callable[[Cluster], None]] = [discover_gpus, serve_a_model, roll_out_a_new_model,
                                             build_engines_then_drop_a_gpu_product, autoscale_on_queue_depth,
                                             remove_the_finalizers_of_an_older_release, delete_the_services]
# The chart's optional modes: the operator runs with their settings on, and this step exercises them.
WITH_HPA_AND_KEDA: dict[str, Any] = {"autoscaling": {"hpa": True, "keda": True}}
SCENARIO_WITH_HPA_AND_KEDA = [*SCENARIO[:-1], hand_over_to_hpa_and_keda, SCENARIO[-1]]


def _deployments(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [d for d in cluster.list("apps/v1", "Deployment")
            if (d["metadata"].get("labels") or {}).get("tensorfleet.io/inferenceservice") == name]


# ---- RBAC semantics ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grant:
    verb: str
    group: str
    resource: str  # with /subresource
    names: tuple[str, ...]  # resourceNames; empty allows any name


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    return {Grant(verb, group, resource, tuple(rule.get("resourceNames") or ()))
            for rule in rules for verb in rule["verbs"] for group in rule["apiGroups"]
            for resource in rule["resources"]}


def allows(grant: Grant, request: APIRequest) -> bool:
    resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
    return (grant.verb, grant.group, grant.resource) == (request.verb, request.group, resource) and (
        not grant.names or request.name in grant.names)


def assert_exact(requests: list[APIRequest], granted_by: Callable[[APIRequest], set[Grant]],
                 all_grants: set[Grant]) -> None:
    denied = sorted({_describe(r) for r in requests if not any(allows(g, r) for g in granted_by(r))})
    assert denied == [], f"the operator needs these, the chart does not grant them: {denied}"
    unused = sorted(f"{g.verb} {g.group}/{g.resource} {list(g.names) or ''}" for g in all_grants
                    if not any(allows(g, r) for r in requests))
    assert unused == [], f"the chart grants these, the operator never used them: {unused}"


def _describe(request: APIRequest) -> str:
    sub = f"/{request.subresource}" if request.subresource else ""
    where = f" in {request.namespace}" if request.namespace else " cluster-wide"
    return f"{request.verb} {request.group or 'core'}/{request.resource}{sub}{where} by {request.user_agent}"


# ---- running the operator as the chart deploys it -----------------------------------------------


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Iterator[Cluster]:
    client = Cluster(emulator)
    yield client
    client.close()


# The chart's values for every run: fast resyncs for the test, and a default engine store (without one,
# Engines would only report InvalidSpec and never start a Job).
BASE_VALUES: dict[str, Any] = {
    "operator": {"peering": {"name": PEERING}, "resyncSeconds": 1, "debounceSeconds": 0.05},
    "engines": {"store": {"type": "s3", "s3": {"bucket": "engines"}}},
    "autoscaling": {"intervalSeconds": 0.5},
}


def chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return render(deep_merge(BASE_VALUES, values or {}))


def run_scenario(emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                 docs: list[dict[str, Any]], steps: list[Callable[[Cluster], None]],
                 namespaces: tuple[str, ...] = ()) -> list[APIRequest]:
    """Run ``steps`` with the operator configured and peered as the chart ``docs`` deploy it; its requests."""
    _create_peering(cluster, namespaces)
    container = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    for variable in container["env"]:
        if variable["name"].startswith("TENSORFLEET_") and "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])  # the operator's settings, from the chart
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)  # the emulator instead of the in-cluster account
    where = [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    before = len(emulator.server.requests)
    with KopfRunner(["run", *where, f"--peering={PEERING}", "--verbose"],
                    registry=registry_from_env(), timeout=60) as runner:
        for step in steps:
            step(cluster)
    assert runner.exit_code == 0, runner.output
    requests = [r for r in emulator.server.requests[before:] if r.user_agent.startswith(OPERATOR_AGENTS)]
    assert {r.user_agent.split("/")[0] for r in requests} == {"kopf", "tensorfleet"}
    return requests


def _create_peering(cluster: Cluster, namespaces: tuple[str, ...]) -> None:
    if not namespaces:
        body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
        assert cluster.http.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=body).status_code == 201
    for namespace in namespaces:
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        assert cluster.http.post("/api/v1/namespaces", json=ns).status_code == 201
        body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                "metadata": {"name": PEERING, "namespace": namespace}}
        path = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings"
        assert cluster.http.post(path, json=body).status_code == 201


def _bound_to_operator(docs: list[dict[str, Any]], binding_kind: str) -> list[dict[str, Any]]:
    """Roles (or ClusterRoles) bound to the operator's ServiceAccount."""
    role_kind = "Role" if binding_kind == "RoleBinding" else "ClusterRole"
    roles = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in of_kind(docs, role_kind)}
    bound = []
    for binding in of_kind(docs, binding_kind):
        if {"kind": "ServiceAccount", "name": "tf-tensorfleet", "namespace": NAMESPACE} in binding["subjects"]:
            bound.append(roles[(binding["metadata"].get("namespace"), binding["roleRef"]["name"])])
    return bound


def _clusterwide_grants(docs: list[dict[str, Any]]) -> set[Grant]:
    cluster_roles = _bound_to_operator(docs, "ClusterRoleBinding")
    assert len(cluster_roles) == 1
    return grants(cluster_roles[0]["rules"])


def test_clusterwide_chart_grants_exactly_what_the_operator_uses(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = chart()
    requests = run_scenario(emulator, cluster, monkeypatch, docs, SCENARIO)
    granted = _clusterwide_grants(docs)
    assert_exact(requests, lambda _: granted, granted)


def test_hpa_and_keda_values_grant_exactly_what_those_modes_use(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.server.resources[f"{KEDA}/scaledobjects"] = kmock.ResourceInfo(  # a cluster with KEDA
        kind="ScaledObject", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})
    docs = chart(WITH_HPA_AND_KEDA)
    requests = run_scenario(emulator, cluster, monkeypatch, docs, SCENARIO_WITH_HPA_AND_KEDA)
    granted = _clusterwide_grants(docs)
    assert_exact(requests, lambda _: granted, granted)
    added = {(g.verb, g.group, g.resource) for g in granted - _clusterwide_grants(chart())}
    assert {resource for _, _, resource in added} == {"horizontalpodautoscalers", "scaledobjects"}


def test_namespaced_chart_grants_exactly_what_the_operator_uses(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    namespaces = ("default", "team-b")
    docs = chart({"operator": {"watchNamespaces": list(namespaces)}})
    requests = run_scenario(emulator, cluster, monkeypatch, docs, SCENARIO, namespaces)
    by_namespace = {role["metadata"]["namespace"]: grants(role["rules"])
                    for role in _bound_to_operator(docs, "RoleBinding")}
    assert sorted(by_namespace) == sorted(namespaces)
    cluster_wide = set().union(*(grants(r["rules"]) for r in _bound_to_operator(docs, "ClusterRoleBinding")))
    assert {g.verb for g in cluster_wide} == {"list", "watch"}  # nothing cluster-wide is written

    def granted_by(request: APIRequest) -> set[Grant]:
        return by_namespace.get(request.namespace, set()) if request.namespace else cluster_wide

    assert_exact(requests, granted_by, cluster_wide | set().union(*by_namespace.values()))
