"""A build attempt's life: pods that cannot start, Jobs that vanish, where and with what a build Job runs."""

from __future__ import annotations

import datetime
from typing import Any

from tensorfleet.engines import serving
from tensorfleet.engines.reconcile import EngineObserved, reconcile_engine
from tensorfleet.status import condition
from unit.test_engine_reconcile import CTX, T0, pod, stored_engine, with_status

IMAGE = "registry.example.com/does-not-exist:0.21.0"


def started(**spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An Engine whose first build Job was just created (at T0), and that Job."""
    body = stored_engine(**spec)
    first = reconcile_engine(body, EngineObserved(), CTX, T0)
    assert first.create is not None
    return with_status(body, first.status), first.create


def waiting_pod(job: str, reason: str, message: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{job}-abcde", "labels": {"job-name": job}},
            "status": {"phase": "Pending", "startTime": "2026-11-21T12:00:00Z", "containerStatuses": [
                {"name": "ensure", "state": {"waiting": {"reason": reason, "message": message}}}]}}


def unschedulable_pod(job: str, message: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{job}-abcde", "labels": {"job-name": job}},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                "lastTransitionTime": "2026-11-21T12:00:00Z"}]}}


def at(minutes: float) -> datetime.datetime:
    return T0 + datetime.timedelta(minutes=minutes)


# ---- a build pod that cannot start --------------------------------------------------------------------------


def test_a_build_pod_that_cannot_pull_its_image_says_so_then_fails_the_attempt() -> None:
    body, job = started(builderImage=IMAGE)
    name = job["metadata"]["name"]
    pulling = EngineObserved(jobs=(job,), pods=(waiting_pod(name, "ImagePullBackOff",
                                                            f'Back-off pulling image "{IMAGE}"'),))
    plan = reconcile_engine(body, pulling, CTX, at(2))
    building, ready = condition(plan.status, "Building"), condition(plan.status, "Ready")
    assert (building["status"], building["reason"]) == ("True", "ImagePullBackOff")
    assert IMAGE in building["message"]
    assert "2026-11-21T12:10:00Z" in building["message"]
    assert (ready["reason"], plan.delete) == ("ImagePullBackOff", ())
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "ImagePullBackOff")]
    # the service's status.engines and conditions show it (engine_views: the Engine's Ready reason and message)
    shown = serving.engine_views(["P"], {"P": body}, {body["metadata"]["name"]: with_status(body, plan.status)})[0]
    assert shown.reason == "ImagePullBackOff"
    assert IMAGE in shown.message
    # past the grace period the attempt fails (its Job is deleted), and the next one waits for its backoff
    failed = reconcile_engine(with_status(body, plan.status), pulling, CTX, at(11))
    assert failed.delete == (name,)
    assert (failed.status["failure"]["reason"], failed.status["failure"]["retryAt"]) == (
        "ImagePullBackOff", "2026-11-21T12:12:00Z")
    assert IMAGE in failed.status["failure"]["message"]
    assert condition(failed.status, "Building")["reason"] == "BackingOff"
    gone = with_status(body, failed.status)
    assert reconcile_engine(gone, EngineObserved(), CTX, at(11.5)).create is None
    retry = reconcile_engine(gone, EngineObserved(), CTX, at(12))
    assert retry.create is not None
    assert retry.create["metadata"]["name"].endswith("-2")


def test_an_unschedulable_build_pod_shows_the_schedulers_message_and_waits_for_a_node() -> None:
    body, job = started()
    message = "0/12 nodes are available: 4 Insufficient nvidia.com/gpu, 8 node(s) didn't match Pod's node affinity."
    observed = EngineObserved(jobs=(job,), pods=(unschedulable_pod(job["metadata"]["name"], message),))
    plan = reconcile_engine(body, observed, CTX, at(180))
    building = condition(plan.status, "Building")
    assert (building["reason"], plan.delete, plan.create) == ("Unschedulable", (), None)
    assert message in building["message"]
    assert condition(plan.status, "Ready")["reason"] == "Unschedulable"


# ---- a Job that is gone -----------------------------------------------------------------------------------


def test_a_failed_attempt_waits_for_retry_at_after_its_job_is_gone_and_retries_as_a_new_attempt() -> None:
    """ttlSecondsAfterFinished (24 h) may remove a failed Job before a long backoff ends (or a user deletes it)."""
    body, job = started()
    name = job["metadata"]["name"]
    failed_job = {**job, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                    "reason": "BackoffLimitExceeded", "message": "x"}]}}
    failed_pod = pod(name, exit_code=1, message={"result": "failed", "reason": "BuildFailed", "message": "OOM"})
    recorded = reconcile_engine(body, EngineObserved(jobs=(failed_job,), pods=(failed_pod,)), CTX, at(1.5))
    assert recorded.status["failure"]["retryAt"] == "2026-11-21T12:02:00Z"
    body = with_status(body, recorded.status)
    waiting = reconcile_engine(body, EngineObserved(), CTX, at(1.75))
    assert waiting.create is None
    assert condition(waiting.status, "Building")["reason"] == "BackingOff"
    assert waiting.finished == ()
    retry = reconcile_engine(body, EngineObserved(), CTX, at(2))
    assert retry.create is not None
    assert retry.create["metadata"]["name"].endswith("-2")
    assert retry.status["attempts"] == 2


# ---- where a build Job runs, and with what --------------------------------------------------------------


def test_the_build_job_runs_where_the_service_that_created_its_engine_may_run() -> None:
    """On a dedicated GPU pool (tainted, labelled) the service's pods schedule; so must its Engine's build."""
    from builders import stored, triton_service
    from tensorfleet.engines.fingerprint import key_of_body
    from tensorfleet.reconcile import Observed, reconcile
    from unit.test_engine_reconcile import H100, RCTX, isvc_engine

    dedicated = {"key": "dedicated", "operator": "Equal", "value": "llm-inference", "effect": "NoSchedule"}
    body = stored(triton_service(model={"uri": "hf://a/b@v1"}, nodeSelector={"pool": "llm"}, tolerations=[dedicated]))
    plan = reconcile(body, Observed(gpu_products=(H100,), compute_capabilities={H100: "9.0"}, engines=()), RCTX, T0)
    created = plan.engine_writes[0].body
    assert created is not None
    assert key_of_body(created) == key_of_body(isvc_engine(stored(triton_service(model={"uri": "hf://a/b@v1"}))))
    engine = {**created, "metadata": {**created["metadata"], "uid": "e", "generation": 1},
              "spec": {**created["spec"], "storeRef": {"s3": {"bucket": "engines"}}}}
    job = reconcile_engine(engine, EngineObserved(), CTX, T0).create
    assert job is not None
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"pool": "llm", "nvidia.com/gpu.product": H100}
    assert pod_spec["tolerations"] == [dedicated, {"key": "nvidia.com/gpu", "operator": "Exists",
                                                   "effect": "NoSchedule"}]


def test_the_build_pod_requests_cpu_memory_and_ephemeral_storage_from_the_operators_settings() -> None:
    """Without requests it is BestEffort (evicted first while a conversion holds the model in host memory), and
    a namespace whose ResourceQuota covers requests.cpu/requests.memory refuses every pod of the Job."""
    from tensorfleet.engines.controller import engine_context
    from tensorfleet.settings import OperatorSettings

    _, job = started()
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"}}
    settings = OperatorSettings(engine_store="s3://engines/x", engine_build_cpu="16", engine_build_memory="256Gi",
                                engine_build_ephemeral_storage="800Gi")
    assert settings.validate() == []
    plan = reconcile_engine(stored_engine(tensorParallelSize=4), EngineObserved(), engine_context(settings), T0)
    assert plan.create is not None
    assert plan.create["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "16", "memory": "256Gi", "ephemeral-storage": "800Gi", "nvidia.com/gpu": "4"}


def test_a_complete_job_whose_pod_is_gone_runs_again_instead_of_building_until_its_ttl() -> None:
    """The pod went before its report was read (its node scaled away while the operator restarted, PodGC)."""
    body, job = started()
    complete = {**job, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    plan = reconcile_engine(body, EngineObserved(jobs=(complete,)), CTX, at(60))
    assert plan.create is not None
    assert plan.create["metadata"]["name"].endswith("-2")
    assert plan.delete == (job["metadata"]["name"],)
    assert condition(plan.status, "Building")["reason"] == "JobStarted"
    assert "ReportLost" in [e.reason for e in plan.events]
    # a pod the index still shows as running (its update not seen yet) is waited for
    running = {"metadata": {"name": "p", "labels": {"job-name": job["metadata"]["name"]}}, "status": {}}
    assert reconcile_engine(body, EngineObserved(jobs=(complete,), pods=(running,)), CTX, at(60)).create is None
