"""Who serves while what takes over cannot serve yet: a runtime switch (vllm <-> triton) keeps the old runtime's
Deployments serving until the new one's Deployments completed their rollouts; and what a triton service that
waits for its Engines reports when a write failed. (The engine change's swap: test_engine_reconcile.py.)"""

from __future__ import annotations

from typing import Any

from builders import stored, triton_service
from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.status import condition
from unit.test_engine_reconcile import (
    H100,
    RCTX,
    T0,
    building_engine,
    isvc_engine,
    on_h100,
    ready_engine,
    triton_body,
)
from unit.test_reconcile import as_created, deployment_status


def vllm_body(**spec: Any) -> dict[str, Any]:
    return stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=3, runtime={"name": "vllm"}, **spec))


def switched(body: dict[str, Any], status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """``body`` as the next generation of a service whose status is ``status``."""
    out = {**body, "metadata": {**body["metadata"], "generation": 2}, "status": status}
    out["spec"] = {**body["spec"], **spec}
    return out


def deployments(objects: Any) -> list[str]:
    return [o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"]


def serving_triton() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """A triton service serving 3 ready replicas from its Engine: (its children as stored, its status, the Engine)."""
    engine = ready_engine(isvc_engine(triton_body()))
    plan = reconcile(triton_body(), on_h100([], engine), RCTX, T0)
    return deployment_status(as_created(plan.desired), ready=3), plan.status, engine


def serving_vllm() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = reconcile(vllm_body(), on_h100([]), RCTX, T0)
    return deployment_status(as_created(plan.desired), ready=3), plan.status


def test_triton_to_vllm_keeps_the_triton_deployments_and_engines_until_vllm_has_rolled_out() -> None:
    children, status, engine = serving_triton()
    [old] = deployments(children)
    body = switched(vllm_body(), status)
    plan = reconcile(body, on_h100(children, engine), RCTX, T0)
    assert deployments(plan.desired) == ["llama-trt"]
    assert deployments(plan.prune) == []  # left exactly as it runs
    assert plan.engine_writes == ()  # its Engine stays owned
    assert condition(plan.status, "Ready")["status"] == "True"
    progressing = condition(plan.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    assert (f"{H100}: Deployment {old} keeps serving Engine {engine['metadata']['name']} until runtime vllm "
            "can serve; Deployment llama-trt is being created") == progressing["message"]
    rolling = children + as_created(tuple(o for o in plan.desired if o["kind"] == "Deployment"))
    assert deployments(reconcile(body, on_h100(rolling, engine), RCTX, T0).prune) == []  # 0/3 available
    done = reconcile(body, on_h100(deployment_status(rolling, ready=3), engine), RCTX, T0)
    assert deployments(done.prune) == [old]
    assert [(w.action, w.name) for w in done.engine_writes] == [("delete", engine["metadata"]["name"])]
    assert condition(done.status, "Progressing")["reason"] == "RolloutComplete"


def test_vllm_to_triton_keeps_vllm_serving_while_the_engine_builds_then_until_triton_has_rolled_out() -> None:
    children, status = serving_vllm()
    body = switched(triton_body(), status)
    manifest = isvc_engine(body)
    for engines in ((), (building_engine(manifest),)):
        plan = reconcile(body, on_h100(children, *engines), RCTX, T0)
        assert deployments(plan.prune) == []
        assert deployments(plan.desired) == []
        assert condition(plan.status, "Ready")["status"] == "True"
        progressing = condition(plan.status, "Progressing")
        assert (progressing["status"], progressing["reason"]) == ("True", "BuildingEngines")
        assert progressing["message"].startswith(
            f"Deployment llama-trt keeps serving with runtime vllm until runtime triton can serve ({H100}: Engine "
            f"{manifest['metadata']['name']}")
    again = reconcile({**body, "status": plan.status}, on_h100(children, building_engine(manifest)), RCTX, T0)
    assert again.status == plan.status  # steady while the engine builds: no status write either
    ready = ready_engine(manifest)
    plan = reconcile(body, on_h100(children, ready), RCTX, T0)
    [triton] = deployments(plan.desired)
    assert deployments(plan.prune) == []
    assert condition(plan.status, "Progressing")["reason"] == "RollingOut"
    rolling = children + as_created(tuple(o for o in plan.desired if o["kind"] == "Deployment"))
    assert deployments(reconcile(body, on_h100(rolling, ready), RCTX, T0).prune) == []  # 0/3 available
    done = reconcile(body, on_h100(deployment_status(rolling, ready=3), ready), RCTX, T0)
    assert deployments(done.prune) == ["llama-trt"]
    assert deployments(done.desired) == [triton]
    assert condition(done.status, "Progressing")["reason"] == "RolloutComplete"


def test_a_failed_engine_build_after_a_switch_to_triton_leaves_vllm_serving_and_degrades() -> None:
    children, status = serving_vllm()
    body = switched(triton_body(), status)
    failed = building_engine(isvc_engine(body), failed="trtllm-build exited with status 1")
    plan = reconcile(body, on_h100(children, failed), RCTX, T0)
    assert deployments(plan.prune) == []
    assert condition(plan.status, "Ready")["status"] == "True"
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "EngineBuildFailed")
    assert "Deployment llama-trt keeps serving with runtime vllm" in degraded["message"]
    assert "trtllm-build exited with status 1" in degraded["message"]
    assert condition(plan.status, "Progressing")["reason"] == "EngineBuildFailed"


def test_a_switch_to_triton_with_no_gpu_product_to_build_for_leaves_vllm_serving() -> None:
    children, status = serving_vllm()
    plan = reconcile(switched(triton_body(), status), Observed(tuple(children), gpu_products=(), engines=()),
                     RCTX, T0)
    assert deployments(plan.prune) == []
    assert condition(plan.status, "Ready")["status"] == "True"
    degraded = condition(plan.status, "Degraded")
    assert (degraded["reason"], degraded["message"]) == ("NoGPUProducts", "Deployment llama-trt keeps serving with "
                                                         "runtime vllm until runtime triton can serve (no GPU product "
                                                         "is eligible)")


def test_scaling_to_zero_during_a_runtime_switch_retires_the_old_runtime_at_once() -> None:
    children, status, engine = serving_triton()
    to_vllm = reconcile(switched(vllm_body(), status, replicas=0), on_h100(children, engine), RCTX, T0)
    assert deployments(to_vllm.prune) == deployments(children)
    assert [w.action for w in to_vllm.engine_writes] == ["delete"]
    children, status = serving_vllm()
    to_triton = reconcile(switched(triton_body(), status, replicas=0), on_h100(children), RCTX, T0)
    assert deployments(to_triton.prune) == ["llama-trt"]


def test_a_name_conflict_or_failed_write_is_reported_while_the_engines_build() -> None:
    waiting = {"gpu_products": (H100,), "compute_capabilities": {H100: "9.0"}, "engines": ()}
    conflict = reconcile(triton_body(), Observed(conflicts=("Service llama-trt",), **waiting), RCTX, T0)
    degraded = condition(conflict.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NameConflict")
    assert "Service llama-trt" in degraded["message"]
    assert condition(conflict.status, "Progressing")["reason"] == "BuildingEngines"
    error = "writing child objects failed: Engines: 403 Forbidden: engines.tensorfleet.io is forbidden"
    refused = reconcile(triton_body(), Observed(apply_error=error, **waiting), RCTX, T0)
    degraded = condition(refused.status, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "ApplyFailed", error)



A100 = "NVIDIA-A100-SXM4-80GB"
TWO_PRODUCTS = {"gpu_products": (H100, A100), "compute_capabilities": {H100: "9.0", A100: "8.0"}}


def two_product_switch(replicas: int) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """A vLLM service on H100 and A100 serving ``replicas``, switched to triton with both Engines ready: (the
    switched body with its status, the vLLM children, the plan of the switch's first pass)."""
    gpu = {"count": 1, "products": [H100, A100]}
    vllm = vllm_body(gpu=gpu)
    vllm["spec"]["replicas"] = replicas
    first = reconcile(vllm, Observed(**TWO_PRODUCTS), RCTX, T0)
    children = deployment_status(as_created(first.desired), ready=replicas)
    body = switched(triton_body(gpu=gpu), first.status, replicas=replicas)
    plan = reconcile(body, two_products(body, children), RCTX, T0)
    return {**body, "status": plan.status}, children, plan


def two_products(body: dict[str, Any], children: list[dict[str, Any]]) -> Observed:
    engines = (ready_engine(isvc_engine(body, H100, "9.0")), ready_engine(isvc_engine(body, A100, "8.0")))
    return Observed(tuple(children), engines=engines, **TWO_PRODUCTS)


def started(plan: Any, available: dict[str, int]) -> list[dict[str, Any]]:
    """The plan's Deployments as the API server created them, all updated, with ``available`` replicas by GPU
    product (0 for a product not named)."""
    out = as_created(tuple(o for o in plan.desired if o["kind"] == "Deployment"))
    for d in out:
        deployment_status([d], ready=available.get(d["metadata"]["labels"]["tensorfleet.io/gpu-product"], 0))
    return out


def test_vllm_stays_until_every_triton_product_given_replicas_has_rolled_out() -> None:
    """A product given 0 replicas is complete at once, and one product done first carries only its share:
    neither retires vLLM while the replicas asked for are not served. Once both are, vLLM goes."""
    for replicas, partly in ((1, {}), (3, {H100: 2})):
        body, vllm, plan = two_product_switch(replicas)
        shares = {d["metadata"]["labels"]["tensorfleet.io/gpu-product"]: d["spec"]["replicas"]
                  for d in plan.desired if d["kind"] == "Deployment"}
        assert sorted(shares.values()) == ([0, 1] if replicas == 1 else [1, 2])
        step = reconcile(body, two_products(body, vllm + started(plan, partly)), RCTX, T0)
        assert deployments(step.prune) == [], (replicas, partly)
        assert condition(step.status, "Ready")["status"] == "True"
        done = reconcile(body, two_products(body, vllm + started(plan, shares)), RCTX, T0)
        assert deployments(done.prune) == deployments(vllm)


def test_switching_back_to_triton_before_vllm_ever_served_keeps_triton_ready() -> None:
    """triton -> vllm -> triton with a changed engine, before a vLLM pod was available: the triton Deployment
    still serves from the old Engine and is the service's Ready; the vLLM Deployment never served, so it holds
    no GPUs for a handover it cannot make."""
    children, status, old_engine = serving_triton()
    to_vllm = reconcile(switched(vllm_body(), status), on_h100(children, old_engine), RCTX, T0)
    # created, its pods Pending: none available
    pending_vllm = deployment_status(as_created(tuple(o for o in to_vllm.desired if o["kind"] == "Deployment")),
                                     ready=0)
    back = switched(triton_body(engine={"maxBatchSize": 64}), {k: v for k, v in to_vllm.status.items() if v})
    back["metadata"]["generation"] = 3
    new_engine = building_engine(isvc_engine(back))
    plan = reconcile(back, on_h100(children + pending_vllm, old_engine, new_engine), RCTX, T0)
    assert condition(plan.status, "Ready")["status"] == "True", condition(plan.status, "Ready")
    assert deployments(plan.prune) == deployments(pending_vllm)
