"""What a triton service that waits for its Engines reports when a write failed (its name conflicts, a refused
Engine create). (The engine change's swap: test_engine_reconcile.py.)"""

from __future__ import annotations

from tensorfleet.reconcile import Observed, reconcile
from tensorfleet.status import condition
from unit.test_engine_reconcile import H100, RCTX, T0, triton_body


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
