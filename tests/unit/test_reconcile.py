from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from builders import inference_service, rolled_out, stored
from tensorfleet import diff
from tensorfleet import reconcile as reconcile_module
from tensorfleet.reconcile import Observed, child_key, reconcile
from tensorfleet.render.context import RenderContext
from tensorfleet.status import condition

CTX = RenderContext()
T0 = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def as_created(objects: tuple[dict[str, Any], ...], rv: int = 10) -> list[dict[str, Any]]:
    """Children as the API server stores them (server fields added)."""
    out = []
    for obj in objects:
        created = copy.deepcopy(obj)
        created["metadata"].update(uid=f"child-{rv}", resourceVersion=str(rv), generation=1)
        out.append(created)
    return out


def deployment_status(children: list[dict[str, Any]], ready: int) -> list[dict[str, Any]]:
    for child in children:
        if child["kind"] == "Deployment":
            want = child["spec"]["replicas"]
            child["status"] = {"observedGeneration": 1, "replicas": want, "updatedReplicas": want,
                               "readyReplicas": ready, "availableReplicas": ready}
    return children


def test_first_reconcile_creates_children_and_reports_progress() -> None:
    body = stored(inference_service(replicas=2))
    plan = reconcile(body, Observed(), CTX, T0)
    assert sorted(o["kind"] for o in plan.desired) == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget",
                                                       "Service"]
    assert plan.status["observedGeneration"] == 1
    assert condition(plan.status, "Ready")["status"] == "False"
    assert condition(plan.status, "Progressing")["status"] == "True"
    assert condition(plan.status, "Degraded")["status"] == "False"
    assert plan.status["url"] == "http://llama.default.svc.cluster.local"
    assert plan.status["selector"] == "tensorfleet.io/inferenceservice=llama"


def test_ready_once_every_replica_is_ready() -> None:
    body = stored(inference_service(replicas=2))
    children = deployment_status(as_created(reconcile(body, Observed(), CTX, T0).desired), ready=2)
    plan = reconcile(body, Observed(tuple(children)), CTX, T1)
    ready = condition(plan.status, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("True", "Available", "2/2 replicas ready")
    assert condition(plan.status, "Progressing")["reason"] == "RolloutComplete"
    assert plan.status["readyReplicas"] == 2
    assert [e.reason for e in plan.events] == ["Ready"]


def test_converged_service_needs_no_write() -> None:
    body = stored(inference_service(replicas=1))
    children = deployment_status(as_created(reconcile(body, Observed(), CTX, T0).desired), ready=1)
    first = reconcile(body, Observed(tuple(children)), CTX, T0)
    body["status"] = first.status
    again = reconcile(body, Observed(tuple(children)), CTX, T1)
    current = {child_key(c): c for c in children}
    assert [diff.needs_apply(o, current[child_key(o)]) for o in again.desired] == [None] * 5
    assert again.status == body["status"]  # byte-identical: lastTransitionTime kept
    assert again.events == ()


def test_spec_change_is_an_update_and_hand_edits_are_drift() -> None:
    body = stored(inference_service(replicas=1))
    children = as_created(reconcile(body, Observed(), CTX, T0).desired)
    changed = stored(inference_service(replicas=3), generation=2)
    plan = reconcile(changed, Observed(tuple(children)), CTX, T1)
    current = {child_key(c): c for c in children}
    reasons = {o["kind"]: diff.needs_apply(o, current[child_key(o)]) for o in plan.desired}
    assert reasons["Deployment"] == "update"
    assert reasons["Service"] is None
    deployment = next(c for c in children if c["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    plan = reconcile(body, Observed(tuple(children)), CTX, T1)
    wanted = next(o for o in plan.desired if o["kind"] == "Deployment")
    assert diff.needs_apply(wanted, deployment) == "drift"


def test_invalid_spec_degrades_with_field_path_and_renders_nothing() -> None:
    body = stored(inference_service(tokenPolicy={"maxInputTokens": 9000}))  # maxModelLen is 8192
    plan = reconcile(body, Observed(), CTX, T0)
    assert plan.desired == ()
    degraded = condition(plan.status, "Degraded")
    assert degraded["status"] == "True"
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.tokenPolicy.maxInputTokens" in degraded["message"]
    assert [e.reason for e in plan.events] == ["InvalidSpec"]


def test_schema_invalid_body_does_not_crash_reconcile() -> None:
    body = stored(inference_service(gpu={"count": "many"}, bogus=1))
    plan = reconcile(body, Observed(), CTX, T0)
    assert condition(plan.status, "Degraded")["reason"] == "InvalidSpec"
    assert "spec.gpu.count" in condition(plan.status, "Degraded")["message"]


def test_a_spec_the_renderer_cannot_use_degrades_like_an_invalid_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a wrong shape get past the checks, rendering names it and reconcile reports it: never a crash."""
    monkeypatch.setattr(reconcile_module, "spec_errors", lambda body, ctx: [])  # a gap in the checks
    body = stored(inference_service(affinity={"nodeAffinity": []}, gpu={"products": ["NVIDIA-L4"]}))
    plan = reconcile(body, Observed(gpu_products=("NVIDIA-L4",)), CTX, T0)
    assert plan.desired == ()
    assert plan.prune == ()
    assert [e.path for e in plan.errors] == ["spec.affinity.nodeAffinity"]
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "spec.affinity.nodeAffinity: Invalid value" in degraded["message"]


def test_children_of_other_owners_are_never_pruned() -> None:
    body = stored(inference_service())
    stray = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "old", "namespace": "default", "ownerReferences": [{"uid": "someone-else",
                                                                                      "controller": True}]}}
    ours = copy.deepcopy(stray)
    ours["metadata"]["name"] = "llama-leftover"
    ours["metadata"]["ownerReferences"][0]["uid"] = "uid-1"
    plan = reconcile(body, Observed((stray, ours)), CTX, T0)
    assert [p["metadata"]["name"] for p in plan.prune] == ["llama-leftover"]


def test_an_old_revisions_gateway_config_map_is_pruned_only_once_no_pod_of_it_can_start() -> None:
    """A new model rolls the pods; the old revision's ConfigMap (its engine facts) stays while the observed
    Deployment still mounts it and while the rollout runs, since an old pod may restart or be rescheduled."""
    def revision_maps(objects: Any) -> list[str]:
        return [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] != "llama-gateway"]

    old = stored(inference_service(model={"servedName": "old"}))
    new = stored(inference_service(model={"servedName": "new"}), generation=2)
    running = deployment_status(as_created(reconcile(old, Observed(), CTX, T0).desired), ready=1)
    (old_map,) = revision_maps(running)
    assert reconcile(new, Observed(tuple(running)), CTX, T1).prune == ()  # the Deployment still mounts it
    rolling = as_created(reconcile(new, Observed(tuple(running)), CTX, T1).desired, rv=11)
    for child in rolling:
        child["metadata"]["generation"] = 2
    observed = [c for c in running if c["kind"] == "ConfigMap" and c["metadata"]["name"] == old_map] + rolling
    assert reconcile(new, Observed(tuple(deployment_status(observed, ready=1))), CTX, T1).prune == ()
    for child in observed:  # the controller saw generation 2 and every pod is of the new revision
        if child["kind"] == "Deployment":
            child["status"]["observedGeneration"] = 2
    assert revision_maps(reconcile(new, Observed(tuple(observed)), CTX, T1).prune) == [old_map]


def test_rollout_failure_is_degraded() -> None:
    body = stored(inference_service())
    children = as_created(reconcile(body, Observed(), CTX, T0).desired)
    for child in children:
        if child["kind"] == "Deployment":
            child["status"] = {"observedGeneration": 1, "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet has timed out progressing."}]}
    plan = reconcile(body, Observed(tuple(children)), CTX, T0)
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolloutFailed")


def ready_service(replicas: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A service whose ``replicas`` are all ready, with the status the operator wrote; and its children."""
    body = stored(inference_service(replicas=replicas))
    children = rolled_out(as_created(reconcile(body, Observed(), CTX, T0).desired), ready=replicas)
    body["status"] = reconcile(body, Observed(tuple(children)), CTX, T0).status
    return body, children


def conditions_of(plan: reconcile_module.Plan) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in plan.status["conditions"]}


def test_replicas_lost_after_a_complete_rollout_are_degraded_not_progressing() -> None:
    body, children = ready_service(2)
    plan = reconcile(body, Observed(tuple(rolled_out(children, ready=0))), CTX, T1)
    conditions = conditions_of(plan)
    assert conditions["Ready"] == ("False", "ReplicasNotReady", "0/2 replicas ready")
    assert conditions["Progressing"][:2] == ("False", "RolloutComplete")
    assert conditions["Degraded"] == ("True", "ReplicasUnavailable", "Deployment llama: 0/2 available: "
                                      "Deployment does not have minimum availability.")
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "NotReady"), ("Warning", "ReplicasUnavailable")]


def test_a_scale_up_keeps_the_service_ready_and_shows_in_progressing() -> None:
    body, _ = ready_service(2)
    body["spec"]["replicas"] = 3  # through /scale, as an autoscaler does
    scaled = rolled_out(as_created(reconcile(body, Observed(), CTX, T0).desired), ready=2)
    plan = reconcile(body, Observed(tuple(scaled)), CTX, T1)
    conditions = conditions_of(plan)
    assert conditions["Ready"] == ("True", "Available", "2/3 replicas ready")
    assert conditions["Progressing"] == ("True", "Scaling", "2/3 replicas ready")
    assert conditions["Degraded"][0] == "False"
    assert plan.events == ()
    body["status"] = plan.status
    lost = reconcile(body, Observed(tuple(rolled_out(scaled, ready=1))), CTX, T1)  # one that served is lost
    assert conditions_of(lost)["Ready"] == ("False", "ReplicasNotReady", "1/3 replicas ready")
    assert conditions_of(lost)["Degraded"][:2] == ("True", "ReplicasUnavailable")


def test_transition_time_moves_only_when_status_flips() -> None:
    body = stored(inference_service())
    first = reconcile(body, Observed(), CTX, T0)
    body["status"] = first.status
    children = deployment_status(as_created(first.desired), ready=1)
    second = reconcile(body, Observed(tuple(children)), CTX, T1)
    assert condition(second.status, "Ready")["lastTransitionTime"] == "2026-11-21T12:05:00Z"
    assert condition(second.status, "Degraded")["lastTransitionTime"] == "2026-11-21T12:00:00Z"


def test_a_vllm_service_with_a_tensorrt_precision_keeps_reconciling_and_is_warned_once() -> None:
    # An earlier version accepted spec.engine.precision on vLLM (which is never told it); after an upgrade such a
    # service was InvalidSpec and frozen: a replicas change was never applied. Now it is a warning, not an error.
    body = stored(inference_service(engine={"precision": "int4-awq"}, runtime={"name": "vllm"}, replicas=1))
    children = rolled_out(as_created(reconcile(body, Observed(), CTX, T0).desired), ready=1)
    body["status"] = {k: v for k, v in reconcile(body, Observed(tuple(children)), CTX, T0).status.items()
                      if k != "warnings"}  # the status an earlier version wrote
    body["spec"]["replicas"] = 3
    plan = reconcile(body, Observed(tuple(children)), CTX, T1)
    deployment = next(o for o in plan.desired if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert condition(plan.status, "Degraded")["status"] == "False"
    note = ("'int4-awq' is not passed to vLLM (TensorRT-LLM only): vLLM runs, and records are priced at, 'fp16' "
            "from spec.runtime.extraArgs (--quantization, --dtype)")
    assert plan.status["warnings"] == [{"field": "spec.engine.precision", "message": note}]
    assert [(e.type, e.reason, e.message) for e in plan.events] == [
        ("Warning", "SpecWarning", f"spec.engine.precision: {note}")]
    body["status"] = plan.status
    assert reconcile(body, Observed(tuple(children)), CTX, T1).events == ()  # once, not on every pass
    body["spec"]["engine"]["precision"] = "fp16"
    fixed = reconcile(body, Observed(tuple(children)), CTX, T1)
    assert fixed.status["warnings"] is None  # a merge patch removes it
    body["status"] = {k: v for k, v in fixed.status.items() if v is not None}
    assert "warnings" not in reconcile(body, Observed(tuple(children)), CTX, T1).status
