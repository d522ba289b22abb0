"""Which GPU products a service runs on, from the nodes GPU discovery sees: cordoned nodes, node sizes."""

from __future__ import annotations

from typing import Any

from builders import stored, triton_service
from tensorfleet.engines import controller, discovery
from tensorfleet.reconcile import Observed, reconcile
from unit.test_engine_keys_and_commands import node
from unit.test_engine_reconcile import H100, RCTX, T0, isvc_engine, ready_engine
from unit.test_reconcile import as_created, deployment_status

A100 = "NVIDIA-A100-SXM4-80GB"
CAPABILITIES = {H100: (9, 0), A100: (8, 0)}


def gpu_node(name: str, product: str, cordoned: bool = False, **kwargs: Any) -> dict[str, Any]:
    major, minor = CAPABILITIES.get(product, (8, 9))
    return node(name, product, major=major, minor=minor, unschedulable=cordoned, **kwargs)


def observed(nodes: list[dict[str, Any]], engines: list[dict[str, Any]],
             children: tuple[dict[str, Any], ...] = ()) -> Observed:
    indices = {"gpu_nodes_idx": {"gpus": [g for n in nodes if (g := discovery.node_gpus(n))]},
               "engines_idx": {"default": engines}}
    return Observed(children, **controller.observed_for_service(indices, "default"))


def serving(products: list[str], nodes: list[dict[str, Any]], built: list[str], replicas: int = 4,
            **spec: Any) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A triton service rolled out on ``nodes``, with a Ready Engine for each product in ``built``."""
    body = stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=replicas, gpu={"products": products},
                                 **spec))
    engines = [ready_engine(isvc_engine(body, p, "{}.{}".format(*CAPABILITIES[p]))) for p in built]
    plan = reconcile(body, observed(nodes, engines), RCTX, T0)
    return body, engines, deployment_status(as_created(plan.desired), ready=2)


def deployments(objects: Any) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Deployment")


# ---- cordoned nodes ---------------------------------------------------------------------------------------


def test_cordoning_a_serving_products_nodes_keeps_its_deployment_and_engine() -> None:
    """kubectl cordon (a drain or a node-pool upgrade cordons first) stops new pods, not running ones: the
    product's Deployment keeps its replicas and its Engine until the nodes are gone (evictions honour the PDB)."""
    body, engines, children = serving([H100, A100], [gpu_node("h1", H100), gpu_node("a1", A100)], [H100, A100])
    assert len(deployments(children)) == 2
    cordoned = observed([gpu_node("h1", H100), gpu_node("a1", A100, cordoned=True)], engines, tuple(children))
    plan = reconcile(body, cordoned, RCTX, T0)
    assert deployments(plan.prune) == []
    assert [w.action for w in plan.engine_writes] == []
    assert deployments(plan.desired) == deployments(children)
    assert [d["spec"]["replicas"] for d in plan.desired if d["kind"] == "Deployment"] == [2, 2]


def test_cordoning_every_gpu_node_keeps_the_only_deployment_serving() -> None:
    body, engines, children = serving([], [gpu_node("h1", H100)], [H100])
    plan = reconcile(body, observed([gpu_node("h1", H100, cordoned=True)], engines, tuple(children)), RCTX, T0)
    assert deployments(plan.prune) == []
    assert deployments(plan.desired) == deployments(children)
    assert [w.action for w in plan.engine_writes] == []


def test_a_product_only_on_cordoned_nodes_is_not_newly_eligible_and_goes_with_its_nodes() -> None:
    body, engines, children = serving([], [gpu_node("h1", H100), gpu_node("a1", A100, cordoned=True)], [H100])
    assert len(deployments(children)) == 1  # no A100 Engine nor Deployment for a product that takes no new pods
    plan = reconcile(body, observed([gpu_node("h1", H100), gpu_node("a1", A100, cordoned=True)], engines,
                                    tuple(children)), RCTX, T0)
    assert [w.action for w in plan.engine_writes] == []
    both = [H100, A100]
    body, engines, children = serving(both, [gpu_node("h1", H100), gpu_node("a1", A100)], both)
    plan = reconcile(body, observed([gpu_node("h1", H100)], engines, tuple(children)), RCTX, T0)  # a1 removed
    assert len(deployments(plan.prune)) == 1
    assert [w.action for w in plan.engine_writes] == ["delete"]


# ---- nodes too small for one replica -----------------------------------------------------------------------

L4 = "NVIDIA-L4"


def sized(name: str, product: str, allocatable: int, **labels: str) -> dict[str, Any]:
    out = gpu_node(name, product, count=8 if product != L4 else 1)
    out["metadata"]["labels"].update(labels)
    out["status"] = {"allocatable": {"nvidia.com/gpu": str(allocatable), "cpu": "96"}}
    return out


def created(nodes: list[dict[str, Any]], **spec: Any) -> list[str]:
    body = stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=2, **spec))
    plan = reconcile(body, observed(nodes, []), RCTX, T0)
    return [w.body["spec"]["gpu"]["product"] for w in plan.engine_writes if w.body and w.action == "create"]


def test_a_product_no_node_of_which_can_hold_one_replica_is_not_eligible() -> None:
    # spec.gpu.count 4 on 1-GPU L4 nodes; an A100 node whose GPUs are all MIG slices (mig.strategy mixed)
    nodes = [sized("h1", H100, 8), sized("l4-a", L4, 1), sized("l4-b", L4, 1)]
    assert created(nodes, gpu={"count": 4, "products": []}) == [H100]
    assert created([sized("h1", H100, 8), sized("a1", A100, 0)], gpu={"count": 1, "products": []}) == [H100]
    # spec.nodeSelector: L4s only in another pool
    pools = [sized("h1", H100, 8, pool="llm"), sized("l4-a", L4, 1, pool="dev")]
    assert created(pools, gpu={"count": 1, "products": []}, nodeSelector={"pool": "llm"}) == [H100]


def test_an_allowed_product_that_no_node_can_hold_is_named_in_the_status() -> None:
    from tensorfleet.status import condition

    body = stored(triton_service(model={"uri": "hf://a/b@v1"}, gpu={"count": 4, "products": [L4]}))
    plan = reconcile(body, observed([sized("l4-a", L4, 1)], []), RCTX, T0)
    assert [w.action for w in plan.engine_writes] == []
    degraded = condition(plan.status, "Degraded")
    assert degraded["reason"] == "NoGPUProducts"
    assert f"no node of {L4} has 4 allocatable nvidia.com/gpu and matches spec.nodeSelector" in degraded["message"]
