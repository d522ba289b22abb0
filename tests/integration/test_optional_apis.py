"""Optional APIs (HorizontalPodAutoscalers, KEDA ScaledObjects): the operator never touches what its settings
leave off, even where the cluster serves it and RBAC forbids it.

kopf retries a forbidden list of an indexed resource for about a minute, holding every handler back,
and then stops the operator (tensorfleet.handlers). With ``autoscale_hpa``/``autoscale_keda`` off the
indices are not registered at all, so an operator installed by the chart with ``autoscaling.keda: false``
on a cluster that runs KEDA neither stalls, nor crashes, nor logs errors.
"""

from __future__ import annotations

from collections.abc import Iterator

import kmock
import pytest
from kopf.testing import KopfRunner

from builders import inference_service
from cluster import Cluster, registry_from_env, wait_for
from tensorfleet import handlers
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.settings import OperatorSettings

pytestmark = pytest.mark.integration

OPTIONAL = {"horizontalpodautoscalers", "scaledobjects"}


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Iterator[Cluster]:
    client = Cluster(emulator)
    yield client
    client.close()


def serve_keda_without_rbac(emulator: EmulatorThread) -> None:
    """A cluster where KEDA is installed, and the operator's RBAC has no rule for ScaledObjects or HPAs."""
    emulator.server.resources["keda.sh/v1alpha1/scaledobjects"] = kmock.ResourceInfo(
        kind="ScaledObject", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})
    for plural in OPTIONAL:
        for method in ("GET", "POST", "PATCH", "DELETE"):
            emulator.server.inject_fault(method, rf"/{plural}", 403, times=10**6)


def test_modes_off_register_no_index_on_their_apis() -> None:
    def indexed(settings: OperatorSettings) -> set[str]:
        return {d.args[2] for d in handlers.declared() if d.decorator.__name__ == "index" and d.wanted(settings)}

    import tensorfleet.controller  # noqa: F401  (declares every handler)

    assert indexed(OperatorSettings()) >= OPTIONAL
    assert indexed(OperatorSettings(autoscale_hpa=False, autoscale_keda=False)).isdisjoint(OPTIONAL)
    assert "scaledobjects" not in indexed(OperatorSettings(autoscale_keda=False))
    assert "horizontalpodautoscalers" in indexed(OperatorSettings(autoscale_keda=False))


def test_served_but_forbidden_apis_are_never_touched_when_their_modes_are_off(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_keda_without_rbac(emulator)
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", "1")
    monkeypatch.setenv("TENSORFLEET_AUTOSCALE_HPA", "false")
    monkeypatch.setenv("TENSORFLEET_AUTOSCALE_KEDA", "false")
    with KopfRunner(["run", "--standalone", "--all-namespaces", "--verbose"], registry=registry_from_env(),
                    timeout=60) as runner:
        cluster.create(inference_service("llama"))
        scaled = inference_service("scaled", autoscaling={"mode": "keda", "maxReplicas": 4})
        del scaled["spec"]["replicas"]  # the autoscaler's to set
        assert cluster.create(scaled).status_code == 201
        # Not held back: a stalled operator would take over a minute (kopf's retries) to write anything.
        wait_for(lambda: len(cluster.children("llama")) == 5, timeout=10, what="children, without a stall")
        degraded = wait_for(lambda: cluster.condition("scaled", "Degraded"), timeout=10, what="the refusal")
    assert runner.exit_code == 0, runner.output
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "spec.autoscaling.mode" in degraded["message"]
    assert "autoscaling.keda" in degraded["message"]
    touched = {r.resource for r in emulator.server.requests if r.user_agent.startswith(("kopf/", "tensorfleet/"))}
    assert touched.isdisjoint(OPTIONAL), "the operator touched an API its settings leave off"
    errors = [line for line in runner.output.splitlines() if "[ERROR" in line or "Traceback" in line]
    assert errors == []
