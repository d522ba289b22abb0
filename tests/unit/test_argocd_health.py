"""The chart's Argo CD health check (Lua), run in a real Lua 5.1 interpreter (Argo CD's gopher-lua is 5.1).

Statuses come from the real reconcile where the operator produces them (InferenceService), and from
the Engine status contract otherwise (issue 3: the same Ready/Progressing/Degraded conditions).
"""

from __future__ import annotations

import copy
import datetime
import pathlib
from typing import Any

import lupa.lua51
import pytest
import yaml

from builders import inference_service, stored
from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.render.context import RenderContext

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


ENGINE = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine",
          "metadata": {"name": "llama3-8b-h100-80gb-hbm3-1a2b", "namespace": "default", "generation": 1}}


def _engine(*conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    status = {"observedGeneration": 1, "conditions": [
        {"type": t, "status": s, "reason": r, "message": m, "observedGeneration": 1,
         "lastTransitionTime": "2026-11-21T12:00:00Z"} for t, s, r, m in conditions]}
    return {**ENGINE, "status": status}


@pytest.mark.parametrize(("engine", "expected"), [
    (_engine(("Ready", "False", "Building", "build Job running on NVIDIA-H100-80GB-HBM3"),
             ("Progressing", "True", "Building", "build Job running"),
             ("Degraded", "False", "AsExpected", "")), "Progressing"),
    (_engine(("Ready", "True", "Stored", "engine in the store"),
             ("Progressing", "False", "Stored", ""), ("Degraded", "False", "AsExpected", "")), "Healthy"),
    (_engine(("Ready", "False", "BuildFailed", "trtllm-build exited 1"),
             ("Progressing", "False", "BuildFailed", ""),
             ("Degraded", "True", "BuildFailed", "trtllm-build exited 1: out of memory")), "Degraded"),
])
def test_engine_health_follows_the_same_conditions(engine: dict[str, Any], expected: str) -> None:
    assert health(engine)["status"] == expected


def test_argocd_config_example_carries_the_script_for_both_kinds() -> None:
    config = yaml.safe_load((ROOT / "examples" / "gitops" / "argocd-cm-health.yaml").read_text())
    script = SCRIPT.read_text()
    for kind in ("InferenceService", "Engine"):
        assert config["data"][f"resource.customizations.health.tensorfleet.io_{kind}"] == script
    assert health(reconciled(ready=2), config["data"]["resource.customizations.health.tensorfleet.io_Engine"]) \
        ["status"] == "Healthy"
