"""The Engine reconcile, its Job and the termination message; the InferenceService's engine-gated serving."""

from __future__ import annotations

import copy
import datetime
import json
from typing import Any

from builders import engine, engine_spec, inference_service, stored, triton_service
from tensorfleet import diff
from tensorfleet.api.types import InferenceService
from tensorfleet.engines import jobs, serving
from tensorfleet.engines.reconcile import (
    BuildOutcome,
    CorruptionReport,
    EngineContext,
    EngineObserved,
    reconcile_engine,
)
from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.render.context import RenderContext
from tensorfleet.status import condition
from unit.test_reconcile import as_created, deployment_status

T0 = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
CTX = EngineContext(retry_base_seconds=60, retry_max_seconds=600)
H100 = "NVIDIA-H100-80GB-HBM3"


def stored_engine(**spec: Any) -> dict[str, Any]:
    body = engine(engine_spec(**spec))
    body["metadata"].update(uid="engine-uid", generation=1, resourceVersion="1")
    return body


def with_status(body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["status"] = {k: v for k, v in status.items() if v is not None}
    return out


def pod(job: str, container: str = jobs.CONTAINER, exit_code: int = 0, message: Any = None,
        finished: str = "2026-11-21T12:01:00Z", engine_name: str | None = None) -> dict[str, Any]:
    labels = {"job-name": job} if job else {}
    if engine_name:
        labels["tensorfleet.io/engine"] = engine_name
    text = json.dumps(message) if isinstance(message, dict) else (message or "")
    terminated = {"exitCode": exit_code, "finishedAt": finished, "message": text,
                  "reason": "Completed" if exit_code == 0 else "Error"}
    key = "containerStatuses" if container == jobs.CONTAINER else "initContainerStatuses"
    return {"metadata": {"name": f"{job or 'serving'}-pod", "labels": labels},
            "status": {key: [{"name": container, "state": {"terminated": terminated}}]}}


def cache_report(body: dict[str, Any], sha: str = "sha256:" + "ab" * 32) -> dict[str, Any]:
    from tensorfleet.engines.fingerprint import key_of_body

    return {"result": "cache", "fingerprint": key_of_body(body).sha256, "sha256": sha, "sizeBytes": 1234,
            "uri": "s3://engines/engines/x", "builtAt": "2026-11-20T00:00:00Z", "buildSeconds": 812.5}


def test_a_new_engine_starts_one_build_job_on_its_gpu_product() -> None:
    body = stored_engine()
    plan = reconcile_engine(body, EngineObserved(), CTX, T0)
    assert plan.create is not None
    job = plan.create
    name = body["metadata"]["name"]
    assert job["metadata"]["name"] == f"{name}-1"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine", "name": name, "uid": "engine-uid",
        "controller": True, "blockOwnerDeletion": True}
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    assert pod_spec["automountServiceAccountToken"] is False  # no API rights needed
    container = pod_spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "ghcr.io/tensorfleet/engine-builder:0.21.0"
    assert container["args"][:2] == ["engine", "ensure"]
    assert json.loads(container["args"][container["args"].index("--spec") + 1])["precision"] == "fp16"
    assert container["args"][container["args"].index("--store") + 1] == "s3://engines/engines"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 7200 * 3 + 900
    assert plan.status["attempts"] == 1
    assert plan.status["job"] == f"{name}-1"
    assert condition(plan.status, "Building")["status"] == "True"
    assert condition(plan.status, "Ready")["status"] == "False"


def test_the_pod_termination_message_makes_the_engine_ready_then_the_job_is_cleaned_up() -> None:
    body = stored_engine()
    first = reconcile_engine(body, EngineObserved(), CTX, T0)
    job = first.create
    assert job is not None
    body = with_status(body, first.status)
    done = pod(job["metadata"]["name"], message=cache_report(body))
    plan = reconcile_engine(body, EngineObserved(jobs=(job,), pods=(done,)), CTX, T0)
    assert plan.create is None
    assert plan.status["artifact"] == {"uri": "s3://engines/engines/x", "sha256": "sha256:" + "ab" * 32,
                                       "sizeBytes": 1234, "builtAt": "2026-11-20T00:00:00Z", "buildSeconds": 812.5,
                                       "source": "cache"}
    assert condition(plan.status, "Ready")["status"] == "True"
    assert condition(plan.status, "Building")["status"] == "False"
    assert plan.delete == (job["metadata"]["name"],)
    assert [e.reason for e in plan.events] == ["EngineReady"]
    assert plan.finished == (BuildOutcome("cached", 812.5),)  # what tensorfleet_engine_builds_total counts
    converged = with_status(body, plan.status)
    again = reconcile_engine(converged, EngineObserved(), CTX, T0 + datetime.timedelta(hours=1))
    assert {k: v for k, v in again.status.items() if v is not None} == converged["status"]  # nothing to write
    assert (again.create, again.delete, again.events, again.finished) == (None, (), (), ())
    built = reconcile_engine(body, EngineObserved(jobs=(job,), pods=(pod(job["metadata"]["name"], message={
        **cache_report(body), "result": "build"}),)), CTX, T0)
    assert built.finished == (BuildOutcome("built", 812.5),)


def test_a_failed_job_reports_its_reason_and_log_tail_and_retries_after_backoff() -> None:
    body = stored_engine()
    job = reconcile_engine(body, EngineObserved(), CTX, T0).create
    assert job is not None
    body = with_status(body, reconcile_engine(body, EngineObserved(), CTX, T0).status)
    report = {"result": "failed", "fingerprint": "x", "reason": "BuildFailed",
              "message": "trtllm-build exited with status 1", "logTail": "[TRT] CUDA out of memory"}
    failed_job = {**job, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                    "reason": "BackoffLimitExceeded", "message": "3 pods failed"}]}}
    observed = EngineObserved(jobs=(failed_job,), pods=(pod(job["metadata"]["name"], exit_code=1, message=report),))
    plan = reconcile_engine(body, observed, CTX, T0 + datetime.timedelta(seconds=90))
    failed = condition(plan.status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BuildFailed")
    assert plan.status["failure"]["logTail"] == "[TRT] CUDA out of memory"
    assert plan.status["failure"]["retryAt"] == "2026-11-21T12:02:00Z"  # finished 12:01 + 60 s
    assert plan.create is None
    assert condition(plan.status, "Building")["reason"] == "BackingOff"
    assert "BuildFailed" in [e.reason for e in plan.events]
    assert plan.finished == (BuildOutcome("failed"),)
    body = with_status(body, plan.status)
    assert reconcile_engine(body, observed, CTX, T0 + datetime.timedelta(seconds=100)).finished == ()  # once
    later = reconcile_engine(body, observed, CTX, T0 + datetime.timedelta(minutes=3))
    assert later.create is not None
    assert later.create["metadata"]["name"].endswith("-2")
    assert later.delete == (job["metadata"]["name"],)  # one Job per fingerprint at a time


def test_a_crash_without_report_uses_the_kubelets_reason_and_the_log() -> None:
    result = jobs.pod_result(pod("j-1", exit_code=137, message="...\nKilled"))
    assert result is not None
    assert result.report["result"] == "failed"
    assert result.report["reason"] == "ContainerError"
    assert "Killed" in result.report["logTail"]


def test_a_corrupt_artifact_reported_by_a_serving_pod_triggers_one_rebuild() -> None:
    body = stored_engine()
    sha = "sha256:" + "ab" * 32
    ready = with_status(body, {"attempts": 1, "artifact": {"sha256": sha, "source": "build"},
                               "conditions": [], "fingerprint": "f"})
    report = CorruptionReport(pod="llama-xyz", finished_at="2026-11-21T12:05:00Z", sha256=sha,
                              message="rank0.engine: expected sha256 ..., found ...")
    plan = reconcile_engine(ready, EngineObserved(corruption=(report,)), CTX, T0)
    assert plan.status["artifact"]["sha256"] == sha  # running pods keep serving their verified copy
    assert plan.status["corruption"]["pod"] == "llama-xyz"
    assert plan.status["corruption"]["resolved"] is False
    assert plan.create is not None
    assert plan.create["metadata"]["name"].endswith("-2")
    assert condition(plan.status, "Ready")["status"] == "False"
    assert "ArtifactCorrupt" in [e.reason for e in plan.events]
    rebuilding = with_status(ready, plan.status)
    job = plan.create
    again = reconcile_engine(rebuilding, EngineObserved(jobs=(job,), corruption=(report,)), CTX, T0)
    assert again.create is None  # the same report is handled once
    assert condition(again.status, "Building")["status"] == "True"
    new_sha = "sha256:" + "ef" * 32
    done = pod(job["metadata"]["name"], message=cache_report(rebuilding, sha=new_sha) | {"result": "build"})
    resolved = reconcile_engine(rebuilding, EngineObserved(jobs=(job,), pods=(done,), corruption=(report,)), CTX, T0)
    assert resolved.status["artifact"]["sha256"] == new_sha
    assert resolved.status["corruption"]["resolved"] is True
    assert condition(resolved.status, "Ready")["status"] == "True"


def test_further_reports_of_the_artifact_being_rebuilt_never_restart_its_rebuild() -> None:
    body = stored_engine()
    sha = "sha256:" + "ab" * 32
    ready = with_status(body, {"attempts": 1, "artifact": {"sha256": sha, "source": "build"},
                               "conditions": [], "fingerprint": "f"})
    first = CorruptionReport(pod="llama-a", finished_at="2026-11-21T12:05:00Z", sha256=sha, message="bad")
    plan = reconcile_engine(ready, EngineObserved(corruption=(first,)), CTX, T0)
    assert plan.create is not None
    job = plan.create
    status = plan.status
    # another replica, then the first pod's init container after each CrashLoopBackOff restart (a new
    # finishedAt each time), report the same artifact while its rebuild Job runs
    later = [CorruptionReport(pod="llama-b", finished_at="2026-11-21T12:06:00Z", sha256=sha, message="bad"),
             CorruptionReport(pod="llama-a", finished_at="2026-11-21T12:07:00Z", sha256=sha, message="bad"),
             CorruptionReport(pod="llama-a", finished_at="2026-11-21T12:09:00Z", sha256=sha, message="bad")]
    for seen in range(1, len(later) + 1):
        again = reconcile_engine(with_status(ready, status), EngineObserved(jobs=(job,), corruption=(
            first, *later[:seen])), CTX, T0 + datetime.timedelta(minutes=seen))
        assert again.create is None
        assert again.delete == ()
        assert again.status["attempts"] == 2
        assert condition(again.status, "Building")["reason"] == "JobRunning"
        assert "ArtifactCorrupt" not in [e.reason for e in again.events]
        status = again.status
    assert status["corruption"]["pod"] == "llama-a"
    assert status["corruption"]["sha256"] == sha
    assert status["corruption"]["lastReportAt"] == "2026-11-21T12:09:00Z"
    # the re-verification finds the stored copy sound (same sha256): the reports it answered start nothing
    done = pod(job["metadata"]["name"], message=cache_report(ready, sha=sha))
    resolved_at = T0 + datetime.timedelta(minutes=10)
    resolved = reconcile_engine(with_status(ready, status), EngineObserved(jobs=(job,), pods=(done,), corruption=(
        first, *later)), CTX, resolved_at)
    assert resolved.status["corruption"]["resolved"] is True
    settled = with_status(ready, resolved.status)
    stale = CorruptionReport(pod="llama-c", finished_at="2026-11-21T12:09:30Z", sha256=sha, message="bad")
    quiet = reconcile_engine(settled, EngineObserved(corruption=(first, *later, stale)), CTX, resolved_at)
    assert quiet.create is None
    # a report that ended after the re-verification is new evidence: one new attempt
    new = CorruptionReport(pod="llama-a", finished_at="2026-11-21T12:15:00Z", sha256=sha, message="bad")
    fresh = reconcile_engine(settled, EngineObserved(corruption=(first, *later, new)), CTX, resolved_at)
    assert fresh.create is not None
    assert fresh.create["metadata"]["name"].endswith("-3")


def test_an_engine_whose_name_is_not_its_fingerprint_is_refused_with_the_right_name() -> None:
    body = stored_engine()
    right = body["metadata"]["name"]
    body["metadata"]["name"] = "my-engine"
    plan = reconcile_engine(body, EngineObserved(), CTX, T0)
    assert plan.create is None
    failed = condition(plan.status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert right in failed["message"]
    assert "metadata.name" in failed["message"]


def test_an_engine_without_any_store_says_which_field_to_set() -> None:
    body = stored_engine()
    del body["spec"]["storeRef"]
    body["metadata"]["name"] = engine(dict(body["spec"].items()))["metadata"]["name"]
    plan = reconcile_engine(body, EngineObserved(), CTX, T0)
    assert "spec.storeRef" in condition(plan.status, "Failed")["message"]


# ---- the InferenceService side ----------------------------------------------------------------------------

RCTX = RenderContext(gateway_image="tf:1", engine_store="s3://engines/prod", engine_store_secret="store-creds")


def triton_body(**spec: Any) -> dict[str, Any]:
    return stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=3, **spec))


def isvc_engine(body: dict[str, Any], product: str = H100, capability: str = "9.0") -> dict[str, Any]:
    from tensorfleet.engines.fingerprint import engine_manifest, engine_spec

    return engine_manifest(engine_spec(InferenceService.from_body(body), product, capability), "default")


def ready_engine(manifest: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    out["metadata"].update(uid="e1", resourceVersion="7", labels={"app.kubernetes.io/managed-by": "tensorfleet"},
                           ownerReferences=[{"uid": "uid-1"}])
    out["status"] = {"fingerprint": "f" * 64, "artifact": {"sha256": "sha256:" + "cd" * 32},
                     "conditions": [{"type": "Ready", "status": "True"}]}
    return out


def test_triton_waits_for_its_engine_and_creates_it() -> None:
    body = triton_body()
    plan = reconcile(body, Observed(gpu_products=(H100,), compute_capabilities={H100: "9.0"}, engines=()), RCTX, T0)
    assert [o["kind"] for o in plan.desired if o["kind"] == "Deployment"] == []
    assert [w.action for w in plan.engine_writes] == ["create"]
    created = plan.engine_writes[0].body
    assert created is not None
    assert created["metadata"]["ownerReferences"][0]["controller"] is False
    assert condition(plan.status, "EngineReady")["status"] == "False"
    assert condition(plan.status, "Ready")["reason"] == "EngineNotReady"
    assert plan.status["engines"] == [{"gpuProduct": H100, "ready": False, "reason": "Creating",
                                       "engine": created["metadata"]["name"],
                                       "message": f"Engine {created['metadata']['name']} is being created"}]


def test_each_product_with_a_ready_engine_gets_a_pinned_deployment_that_verifies_first() -> None:
    a100 = "NVIDIA-A100-SXM4-80GB"
    body = triton_body(gpu={"products": [H100, a100]})
    h100_engine = ready_engine(isvc_engine(body))
    observed = Observed(gpu_products=(H100, a100), compute_capabilities={H100: "9.0", a100: "8.0"},
                        engines=(h100_engine,))
    plan = reconcile(body, observed, RCTX, T0)
    deployments = [o for o in plan.desired if o["kind"] == "Deployment"]
    assert len(deployments) == 1
    assert deployments[0]["spec"]["replicas"] == 3
    pod_spec = deployments[0]["spec"]["template"]["spec"]
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][-1]["values"] == [H100]
    init = pod_spec["initContainers"][0]
    assert init["name"] == "engine-fetch"
    assert init["args"][init["args"].index("--sha256") + 1] == "sha256:" + "cd" * 32
    assert init["args"][init["args"].index("--fingerprint") + 1] == "f" * 64
    assert {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "store-creds",
                                                                        "key": "AWS_ACCESS_KEY_ID"}}} in init["env"]
    assert deployments[0]["spec"]["template"]["metadata"]["labels"]["tensorfleet.io/engine"] == \
        h100_engine["metadata"]["name"]
    engines = {e["gpuProduct"]: e for e in plan.status["engines"]}
    assert engines[H100]["ready"] is True
    assert engines[a100]["ready"] is False
    assert condition(plan.status, "EngineReady")["status"] == "False"
    assert [w.action for w in plan.engine_writes] == ["create"]  # the A100 engine


def test_shared_engines_gain_and_lose_owners_and_user_engines_are_never_touched() -> None:
    body = triton_body()
    isvc = InferenceService.from_body(body)
    manifest = isvc_engine(body)
    other_owner = ready_engine(manifest)
    other_owner["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    writes = serving.engine_writes(isvc, [manifest], {manifest["metadata"]["name"]: other_owner})
    assert [w.action for w in writes] == ["patch"]
    refs = writes[0].body["metadata"]["ownerReferences"]  # type: ignore[index]
    assert [r["uid"] for r in refs] == ["someone-else", "uid-1"]
    assert writes[0].body["metadata"]["resourceVersion"] == "7"  # type: ignore[index]
    ours_only = ready_engine(manifest)
    assert [w.action for w in serving.engine_writes(isvc, [], {"old": ours_only})] == ["delete"]
    user_applied = ready_engine(manifest)
    user_applied["metadata"]["labels"] = {}
    user_applied["metadata"]["ownerReferences"] = []
    assert serving.engine_writes(isvc, [manifest], {manifest["metadata"]["name"]: user_applied}) == []


def building_engine(manifest: dict[str, Any], failed: str | None = None) -> dict[str, Any]:
    """``manifest`` as the operator created it for service uid-1, its first build running (or failed)."""
    out = ready_engine(manifest)
    out["status"] = {"fingerprint": "f" * 64, "conditions": [
        {"type": "Ready", "status": "False", "reason": "Building", "message": "build attempt 1 running"}]}
    if failed:
        out["status"]["conditions"].append({"type": "Failed", "status": "True", "reason": "BuildFailed",
                                            "message": failed})
    return out


def engine_change(**engine: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """A triton service serving 3 ready replicas from its Engine, then a change of its engine settings:
    (the changed body, the children as stored, the serving Engine, the new Engine's manifest)."""
    old = ready_engine(isvc_engine(triton_body()))
    plan = reconcile(triton_body(), Observed(gpu_products=(H100,), compute_capabilities={H100: "9.0"},
                                             engines=(old,)), RCTX, T0)
    children = deployment_status(as_created(plan.desired), ready=3)
    changed = stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=3, engine=engine), generation=2,
                     **plan.status)
    return changed, children, old, isvc_engine(changed)


def on_h100(children: list[dict[str, Any]], *engines: dict[str, Any]) -> Observed:
    return Observed(tuple(children), gpu_products=(H100,), compute_capabilities={H100: "9.0"}, engines=engines)


def test_an_engine_change_keeps_the_deployment_serving_until_the_new_engine_can_serve_then_rolls() -> None:
    changed, children, old, manifest = engine_change(maxBatchSize=64)
    serving_now = next(c for c in children if c["kind"] == "Deployment")
    for new_engine in ((), (building_engine(manifest),)):
        plan = reconcile(changed, on_h100(children, old, *new_engine), RCTX, T0)
        assert plan.prune == ()
        assert "Deployment" not in [o["kind"] for o in plan.desired]  # left exactly as it runs
        assert [w.action for w in plan.engine_writes] == ([] if new_engine else ["create"])  # the old one stays
        assert condition(plan.status, "Ready")["status"] == "True"
        progressing = condition(plan.status, "Progressing")
        assert (progressing["status"], progressing["reason"]) == ("True", "BuildingEngines")
        assert (f"Deployment {serving_now['metadata']['name']} keeps serving Engine {old['metadata']['name']} "
                f"until Engine {manifest['metadata']['name']} can serve") in progressing["message"]
    again = reconcile({**changed, "status": plan.status}, on_h100(children, old, building_engine(manifest)), RCTX, T0)
    assert again.status == plan.status  # steady while the new engine builds: no status write either
    plan = reconcile(changed, on_h100(children, old, ready_engine(manifest)), RCTX, T0)
    rolled = next(o for o in plan.desired if o["kind"] == "Deployment")
    assert rolled["metadata"]["name"] == serving_now["metadata"]["name"]
    assert diff.needs_apply(rolled, serving_now) == "update"  # rolls: maxSurge 1, maxUnavailable 0
    assert rolled["spec"]["template"]["metadata"]["labels"]["tensorfleet.io/engine"] == manifest["metadata"]["name"]
    assert [(w.action, w.name) for w in plan.engine_writes] == [("delete", old["metadata"]["name"])]


def test_a_failed_build_of_the_new_engine_leaves_the_old_deployment_serving_and_degrades() -> None:
    changed, children, old, manifest = engine_change(precision="bf16")
    failed = building_engine(manifest, failed="trtllm-build exited with status 1")
    plan = reconcile(changed, on_h100(children, old, failed), RCTX, T0)
    assert plan.prune == ()
    assert plan.engine_writes == ()
    assert condition(plan.status, "Ready")["status"] == "True"
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "EngineBuildFailed")
    assert f"keeps serving Engine {old['metadata']['name']}" in degraded["message"]
    assert "trtllm-build exited with status 1" in degraded["message"]
    assert condition(plan.status, "Progressing")["reason"] == "EngineBuildFailed"


def test_scaling_to_zero_while_the_new_engine_builds_retires_the_old_deployment() -> None:
    changed, children, old, manifest = engine_change(maxBatchSize=64)
    changed["spec"]["replicas"] = 0
    plan = reconcile(changed, on_h100(children, old, building_engine(manifest)), RCTX, T0)
    assert [p["kind"] for p in plan.prune] == ["Deployment"]
    assert [(w.action, w.name) for w in plan.engine_writes] == [("delete", old["metadata"]["name"])]


def test_switching_to_vllm_releases_the_engines_and_removes_status_engines() -> None:
    building = building_engine(isvc_engine(triton_body()))
    first = reconcile(triton_body(), on_h100([], building), RCTX, T0)
    assert first.status["engines"]
    switched = stored(triton_service(model={"uri": "hf://a/b@v1"}, replicas=3, runtime={"name": "vllm"}),
                      generation=2, **first.status)
    plan = reconcile(switched, on_h100([], building), RCTX, T0)
    assert [(w.action, w.name) for w in plan.engine_writes] == [("delete", building["metadata"]["name"])]
    assert plan.status["engines"] is None  # a merge-patch null removes it
    assert condition(plan.status, "EngineReady") is None
    switched["status"] = {k: v for k, v in plan.status.items() if v is not None}
    released = reconcile(switched, on_h100([]), RCTX, T0)
    assert released.engine_writes == ()
    assert "engines" not in released.status


def test_vllm_with_a_pinned_digest_fetches_and_verifies_the_weights_first() -> None:
    digest = "sha256:" + "9" * 64
    body = stored(inference_service(model={"digest": digest}))
    plan = reconcile(body, Observed(), RCTX, T0)
    deployment = next(o for o in plan.desired if o["kind"] == "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    init = pod_spec["initContainers"][0]
    assert init["name"] == "model-fetch"
    assert init["args"][init["args"].index("--digest") + 1] == digest
    local = init["args"][init["args"].index("--dest") + 1]
    engine_args = pod_spec["containers"][0]["args"]
    assert engine_args[:3] == ["vllm", "serve", local]
    assert "--revision" not in engine_args
    unpinned = reconcile(stored(inference_service()), Observed(), RCTX, T0)
    assert "initContainers" not in next(o for o in unpinned.desired if o["kind"] == "Deployment")["spec"][
        "template"]["spec"]


def test_unusable_build_options_degrade_the_service_naming_its_field() -> None:
    body = triton_body(engine={"buildOptions": {"max_seq_len": "99999"}})
    plan = reconcile(body, Observed(gpu_products=(H100,), compute_capabilities={H100: "9.0"}, engines=()), RCTX, T0)
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "spec.engine.buildOptions.max_seq_len" in degraded["message"]
    assert plan.engine_writes == ()
    assert plan.desired == ()


class RecordingEngineClient:
    """Test double for tensorfleet.kube.KubeClient, as the Engine daemon uses it: records every write, and bumps
    the resourceVersion of ``live`` on a status write, as the watch stream would deliver it."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []
        self.live: dict[str, Any] = {}

    def acting_for(self, owner: Any) -> Any:
        return self  # the owner exists: nothing is deleted here

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                    subresource: str | None = None, **_: Any) -> dict[str, Any]:
        self.writes.append(("patch", f"{kind}/{subresource}"))
        if self.live:
            self.live["metadata"]["resourceVersion"] = str(int(self.live["metadata"]["resourceVersion"]) + 1)
        return {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("create", obj["kind"]))
        return obj

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.writes.append(("delete", kind))

    async def post_event(self, involved: Any, type_: str, reason: str, message: str, now: Any) -> None:
        self.writes.append(("event", reason))


async def test_engine_build_metrics_count_each_recorded_outcome_once() -> None:
    """tensorfleet_engine_builds_total: exported at 0 for the Engine's product, +1 with the status write that
    records an outcome, never again for the same one; build time observed for real builds."""
    from types import SimpleNamespace

    from tensorfleet.engines import controller
    from tensorfleet.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    client = RecordingEngineClient()
    runtime = SimpleNamespace(client=client, metrics=metrics)
    engines = controller.EngineRuntime(CTX)

    def count(result: str) -> float | None:
        return metrics.registry.get_sample_value("tensorfleet_engine_builds_total", {
            "namespace": "default", "gpu_product": H100, "result": result})

    metrics.watch_engine("default", H100)  # what the Engine daemon does when it starts
    assert [count(r) for r in ("built", "cached", "failed")] == [0.0, 0.0, 0.0]
    body = stored_engine()
    first = reconcile_engine(body, EngineObserved(), CTX, T0)
    assert first.create is not None
    body = with_status(body, first.status)
    name = first.create["metadata"]["name"]
    report = {**cache_report(body), "result": "build"}
    observed = EngineObserved(jobs=(first.create,), pods=(pod(name, message=report),))
    client.live = body
    assert await controller.reconcile_engine_once(runtime, engines, body, lambda: observed)
    assert count("built") == 1.0
    assert metrics.registry.get_sample_value("tensorfleet_engine_build_duration_seconds_sum",
                                             {"gpu_product": H100}) == 812.5
    recorded = with_status(body, reconcile_engine(body, observed, CTX, T0).status)
    client.live = recorded
    assert await controller.reconcile_engine_once(runtime, engines, recorded, lambda: observed)
    assert count("built") == 1.0  # the outcome is already in status: not counted again
