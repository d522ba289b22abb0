"""The chart's Argo CD health check (Lua), run in a real Lua 5.1 interpreter (Argo CD's gopher-lua is 5.1).

Statuses come from the real reconciles: the InferenceService's (Ready, Progressing, Degraded) and the Engine's
(Ready, Building, Failed), driven through building, ready, a failed attempt, its retry and an invalid spec.
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
from typing import Any

import lupa.lua51
import pytest
import yaml

from builders import engine, engine_spec, inference_service, rolled_out, stored
from tensorfleet.engines.reconcile import EngineContext, EngineObserved, reconcile_engine
from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.render.context import RenderContext
from tensorfleet.sandbox.kubelet import simulated_job_pod, simulated_job_status

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "charts" / "tensorfleet" / "files" / "argocd" / "health.lua"
CTX = RenderContext()
T0 = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)


def health(obj: dict[str, Any], script: str | None = None) -> dict[str, str]:
    """Run the script as Argo CD does: `obj` is a global table, the chunk returns the health table."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script or SCRIPT.read_text())
    return {key: result[key] for key in ("status", "message") if result[key] is not None}


def _children(body: dict[str, Any], ready: int, desired: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    children = []
    for obj in copy.deepcopy(desired):
        obj["metadata"].update(uid="child", resourceVersion="10", generation=1)
        if obj["kind"] == "Deployment":
            want = obj["spec"]["replicas"]
            obj["status"] = {"observedGeneration": 1, "replicas": want, "updatedReplicas": ready,
                             "readyReplicas": ready, "availableReplicas": ready}
        children.append(obj)
    return tuple(children)


def reconciled(ready: int, replicas: int = 2, apply_error: str | None = None, **spec: Any) -> dict[str, Any]:
    """An InferenceService carrying the status the operator writes with ``ready`` replicas ready."""
    body = stored(inference_service(replicas=replicas, **spec))
    desired = reconcile(body, Observed(), CTX, T0).desired
    plan = reconcile(body, Observed(_children(body, ready, desired), apply_error=apply_error), CTX, T0)
    body["status"] = plan.status
    return body


def test_new_service_without_status_is_progressing() -> None:
    assert health(stored(inference_service()))["status"] == "Progressing"


def test_rolling_out_is_progressing_with_the_operator_message() -> None:
    result = health(reconciled(ready=1))
    assert result == {"status": "Progressing", "message": "ReplicasNotReady: 1/2 replicas ready"}


def test_all_replicas_ready_is_healthy() -> None:
    assert health(reconciled(ready=2)) == {"status": "Healthy", "message": "Available: 2/2 replicas ready"}


def test_failed_apply_is_degraded() -> None:
    result = health(reconciled(ready=2, apply_error="writing child objects failed: 403 Forbidden"))
    assert result["status"] == "Degraded"
    assert result["message"].startswith("ApplyFailed: writing child objects failed: 403")


def test_invalid_spec_is_degraded_naming_the_field() -> None:
    result = health(reconciled(ready=0, tokenPolicy={"maxInputTokens": 9000}))
    assert result["status"] == "Degraded"
    assert "spec.tokenPolicy.maxInputTokens" in result["message"]


def test_scaled_to_zero_is_suspended() -> None:
    assert health(reconciled(ready=0, replicas=0))["status"] == "Suspended"


def after_rollout(ready: int, replicas: int) -> dict[str, Any]:
    """A service that was Ready with 2 replicas, now asking for ``replicas``, of which ``ready`` are."""
    body = reconciled(ready=2)
    body["spec"]["replicas"] = replicas
    children = rolled_out(list(_children(body, 0, reconcile(body, Observed(), CTX, T0).desired)), ready)
    body["status"] = reconcile(body, Observed(tuple(children)), CTX, T0).status
    return body


def test_replicas_lost_after_a_rollout_are_degraded() -> None:
    assert health(after_rollout(ready=0, replicas=2)) == {
        "status": "Degraded",
        "message": "ReplicasUnavailable: Deployment llama: 0/2 available: Deployment does not have minimum "
                   "availability."}


def test_a_scale_up_is_progressing_like_a_deployments() -> None:
    assert health(after_rollout(ready=2, replicas=3)) == {"status": "Progressing",
                                                          "message": "Scaling: 2/3 replicas ready"}


def test_spec_change_not_yet_observed_is_progressing_even_if_ready() -> None:
    body = reconciled(ready=2)
    body["metadata"]["generation"] = 2
    assert health(body) == {"status": "Progressing",
                            "message": "Waiting for the tensorfleet operator to observe generation 2"}


def test_health_is_stable_across_reconciles() -> None:
    """No field changes on a converged resync, so neither Argo CD's diff nor its health moves."""
    body = reconciled(ready=2)
    desired = reconcile(body, Observed(), CTX, T0).desired
    later = reconcile(body, Observed(_children(body, 2, desired)), CTX, T0 + datetime.timedelta(hours=3))
    assert later.status == body["status"]
    assert health({**body, "status": later.status}) == health(body)


ENGINE_CTX = EngineContext(retry_base_seconds=60, retry_max_seconds=600)


def _engine_status(body: dict[str, Any], observed: EngineObserved, now: datetime.datetime) -> dict[str, Any]:
    """``body`` with the status the Engine reconcile writes for what is ``observed``."""
    plan = reconcile_engine(body, observed, ENGINE_CTX, now)
    return {**body, "status": {k: v for k, v in plan.status.items() if v is not None}}


def _finished_pod(job: dict[str, Any], report: dict[str, Any], exit_code: int = 0) -> dict[str, Any]:
    pod, status = simulated_job_pod(job, "ensure", exit_code, json.dumps(report), "2026-11-21T12:01:00Z")
    return {**pod, "status": status}


def _engines() -> dict[str, dict[str, Any]]:
    body = stored(engine(engine_spec()))
    building = _engine_status(body, EngineObserved(), T0)
    job = reconcile_engine(body, EngineObserved(), ENGINE_CTX, T0).create
    assert job is not None
    fingerprint = building["status"]["fingerprint"]
    ok = {"result": "cache", "fingerprint": fingerprint, "sha256": "sha256:" + "ab" * 32, "sizeBytes": 1,
          "uri": "s3://engines/engines/x", "builtAt": "2026-11-20T00:00:00Z", "buildSeconds": 1.0}
    ready = _engine_status(building, EngineObserved(jobs=(job,), pods=(_finished_pod(job, ok),)), T0)
    failed_job = {**job, "status": simulated_job_status(False)}
    report = {"result": "failed", "fingerprint": fingerprint, "reason": "BuildFailed",
              "message": "trtllm-build exited with status 1", "logTail": "CUDA out of memory"}
    failing = EngineObserved(jobs=(failed_job,), pods=(_finished_pod(job, report, exit_code=1),))
    backing_off = _engine_status(building, failing, T0 + datetime.timedelta(seconds=90))
    retrying = _engine_status(backing_off, failing, T0 + datetime.timedelta(minutes=5))
    invalid = _engine_status({**body, "metadata": {**body["metadata"], "name": "engine-wrong"}}, EngineObserved(), T0)
    return {"building": building, "ready": ready, "backing-off": backing_off, "retrying": retrying,
            "invalid": invalid}


@pytest.mark.parametrize(("state", "expected", "says"), [
    ("building", "Progressing", "JobStarted"),
    ("ready", "Healthy", "Available"),
    ("backing-off", "Degraded", "BuildFailed: trtllm-build exited with status 1"),
    ("retrying", "Progressing", "retrying after: BuildFailed"),
    ("invalid", "Degraded", "InvalidSpec: metadata.name"),
])
def test_engine_health_follows_the_engines_own_conditions(state: str, expected: str, says: str) -> None:
    result = health(_engines()[state])
    assert result["status"] == expected
    assert says in result["message"]


def test_a_ready_engine_stays_healthy_across_resyncs() -> None:
    ready = _engines()["ready"]
    later = _engine_status(ready, EngineObserved(), T0 + datetime.timedelta(hours=3))
    assert later["status"] == ready["status"]
    assert health(later) == health(ready)


def test_argocd_config_example_carries_the_script_for_both_kinds() -> None:
    config = yaml.safe_load((ROOT / "examples" / "gitops" / "argocd-cm-health.yaml").read_text())
    script = SCRIPT.read_text()
    for kind in ("InferenceService", "Engine"):
        assert config["data"][f"resource.customizations.health.tensorfleet.io_{kind}"] == script
    assert health(reconciled(ready=2), config["data"]["resource.customizations.health.tensorfleet.io_Engine"]) \
        ["status"] == "Healthy"
