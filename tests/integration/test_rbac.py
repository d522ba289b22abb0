"""The chart's RBAC grants exactly what the operator uses, proven against the code.

The operator runs (with kopf peering, as the chart deploys it) through a representative scenario
against the API emulator, which records every request as the RBAC authorizer sees it. Then:
every request must be allowed by the rendered Role/ClusterRole rules, and every granted
(verb, group, resource) must have been used. kopf's own needs (CRD and namespace discovery, the
peering objects) are recorded the same way, since kopf talks to the same emulator.

When code starts using a new resource or verb: add a step that exercises it to SCENARIO, and the
rule to charts/tensorfleet/templates/_rbac.tpl. The test fails until both agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner

from builders import inference_service, triton_service
from chart import NAMESPACE, of_kind, render
from cluster import ISVC, Cluster, registry_from_env, wait_for
from tensorfleet.sandbox.apiserver import APIRequest, EmulatorThread

pytestmark = pytest.mark.integration

PEERING = "tensorfleet"
H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"
OPERATOR_AGENTS = ("kopf/", "tensorfleet/")  # kopf's own requests and tensorfleet.kube's

# ---- the scenario: one step per behaviour that needs an API permission ---------------------------


def serve_a_model(cluster: Cluster) -> None:
    """Create -> children applied (created), status written, Ready event posted."""
    assert cluster.create(inference_service("llama")).status_code == 201
    wait_for(lambda: len(cluster.children("llama")) == 4, what="4 children")
    cluster.mark_deployments_ready("llama")
    wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", what="Ready=True")


def drop_a_gpu_product(cluster: Cluster) -> None:
    """A triton service per GPU product; dropping a product prunes its Deployment."""
    assert cluster.create(triton_service("trt", gpu={"products": [H100, A100]})).status_code == 201
    wait_for(lambda: len(_deployments(cluster, "trt")) == 2, what="one Deployment per product")
    cluster.patch(ISVC, "InferenceService", "trt", {"spec": {"gpu": {"products": [H100]}}})
    wait_for(lambda: len(_deployments(cluster, "trt")) == 1, what="the A100 Deployment pruned")


def delete_the_services(cluster: Cluster) -> None:
    """Deletion: the daemon stops and kopf removes its finalizer."""
    for name in ("llama", "trt"):
        cluster.delete(ISVC, "InferenceService", name)
    wait_for(lambda: cluster.list(ISVC, "InferenceService") == [], what="finalizers released")


SCENARIO: list[Callable[[Cluster], None]] = [serve_a_model, drop_a_gpu_product, delete_the_services]

# Grants the chart adds behind a value whose code has not landed yet: (values, issue, grants).
PENDING_GRANTS: list[tuple[dict[str, Any], int, set[tuple[str, str, str]]]] = [
    ({"autoscaling": {"hpa": True}}, 6, {(verb, "autoscaling", "horizontalpodautoscalers")
                                         for verb in ("list", "watch", "create", "patch", "delete")}),
    ({"autoscaling": {"keda": True}}, 6, {(verb, "keda.sh", "scaledobjects")
                                          for verb in ("list", "watch", "create", "patch", "delete")}),
]


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


def run_scenario(emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                 namespaces: tuple[str, ...] = ()) -> list[APIRequest]:
    """Run SCENARIO with the operator peered as in the chart; the operator's requests, in order."""
    _create_peering(cluster, namespaces)
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_PEERING", PEERING)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", "1")
    monkeypatch.setenv("TENSORFLEET_DEBOUNCE_SECONDS", "0.05")
    where = [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    before = len(emulator.server.requests)
    with KopfRunner(["run", *where, f"--peering={PEERING}", "--verbose"],
                    registry=registry_from_env(), timeout=60) as runner:
        for step in SCENARIO:
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


def test_clusterwide_chart_grants_exactly_what_the_operator_uses(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = run_scenario(emulator, cluster, monkeypatch)
    cluster_roles = _bound_to_operator(render({"operator": {"peering": {"name": PEERING}}}), "ClusterRoleBinding")
    assert len(cluster_roles) == 1
    granted = grants(cluster_roles[0]["rules"])
    assert_exact(requests, lambda _: granted, granted)


def test_namespaced_chart_grants_exactly_what_the_operator_uses(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    namespaces = ("default", "team-b")
    requests = run_scenario(emulator, cluster, monkeypatch, namespaces)
    docs = render({"operator": {"watchNamespaces": list(namespaces), "peering": {"name": PEERING}}})
    by_namespace = {role["metadata"]["namespace"]: grants(role["rules"])
                    for role in _bound_to_operator(docs, "RoleBinding")}
    assert sorted(by_namespace) == sorted(namespaces)
    cluster_wide = set().union(*(grants(r["rules"]) for r in _bound_to_operator(docs, "ClusterRoleBinding")))
    assert {g.verb for g in cluster_wide} == {"list", "watch"}  # nothing cluster-wide is written

    def granted_by(request: APIRequest) -> set[Grant]:
        return by_namespace.get(request.namespace, set()) if request.namespace else cluster_wide

    assert_exact(requests, granted_by, cluster_wide | set().union(*by_namespace.values()))


@pytest.mark.parametrize(("values", "issue", "pending"), PENDING_GRANTS)
def test_grants_behind_pending_values_are_exactly_the_listed_ones(
        values: dict[str, Any], issue: int, pending: set[tuple[str, str, str]]) -> None:
    def operator_grants(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        role = _bound_to_operator(docs, "ClusterRoleBinding")[0]
        return {(g.verb, g.group, g.resource) for g in grants(role["rules"])}

    added = operator_grants(render(values)) - operator_grants(render())
    assert added == pending, f"issue {issue}: move these into SCENARIO once its code uses them"
