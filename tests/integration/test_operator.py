"""The operator in kopf.testing.KopfRunner against the embedded Kubernetes API emulator, over real sockets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner

from builders import inference_service
from cluster import ISVC, Cluster, registry_from_env, wait_for
from tensorfleet.gateway import config as gwconfig
from tensorfleet.render import labels
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.integration

RESYNC = 1.0  # short, so that "no writes while converged" covers several timer passes


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Iterator[Cluster]:
    client = Cluster(emulator)
    yield client
    client.close()


def operator(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch, resync: float = RESYNC,
             debounce: float = 0.05) -> KopfRunner:
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", str(resync))
    monkeypatch.setenv("TENSORFLEET_DEBOUNCE_SECONDS", str(debounce))
    return KopfRunner(["run", "--standalone", "--all-namespaces", "--verbose"],
                      registry=registry_from_env(), timeout=60)


def converge(cluster: Cluster, name: str, replicas: int = 1) -> None:
    wait_for(lambda: len(cluster.children(name)) == 5, what="5 children")
    wait_for(lambda: cluster.condition(name, "Progressing"), what="status conditions")
    cluster.mark_deployments_ready(name)
    wait_for(lambda: (cluster.condition(name, "Ready") or {}).get("status") == "True", what="Ready=True")


def writes_during(cluster: Cluster, seconds: float) -> list[tuple[str, str]]:
    before = len(cluster.writes())
    time.sleep(seconds)
    return cluster.writes()[before:]


def test_create_converges_then_makes_zero_writes(emulator: EmulatorThread, cluster: Cluster,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch) as runner:
        assert cluster.create(inference_service("llama", replicas=2)).status_code == 201
        converge(cluster, "llama", replicas=2)
        status = cluster.isvc("llama")["status"]
        assert status["observedGeneration"] == 1
        assert status["readyReplicas"] == 2
        assert status["url"] == "http://llama.default.svc.cluster.local"
        assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded"}
        assert all(c["observedGeneration"] == 1 for c in status["conditions"])
        time.sleep(2 * RESYNC)  # let the last status write echo back
        assert writes_during(cluster, 4 * RESYNC) == []  # several resyncs, no writes
    assert runner.exit_code == 0


def test_spec_update_rolls_children_and_observed_generation(emulator: EmulatorThread, cluster: Cluster,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"replicas": 3, "model": {"maxModelLen": 4096},
                                                                 "tokenPolicy": {"maxOutputTokens": 1024}}})
        deployment = wait_for(lambda: (d := cluster.get("apps/v1", "Deployment", "llama")) and
                              d["spec"]["replicas"] == 3 and d, what="3 replicas")
        assert "4096" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        wait_for(lambda: cluster.isvc("llama")["status"]["observedGeneration"] == 2, what="observedGeneration 2")
        assert cluster.condition("llama", "Progressing")["status"] == "True"


def test_gateway_revision_change_rolls_the_pods_and_a_policy_change_does_not(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy is one ConfigMap that every pod reloads in place; the model and engine facts are one
    ConfigMap per pod revision, named by their hash: changing them rolls the pods, and the old revision's
    ConfigMap stays until the rollout completed (an old pod may still restart or be rescheduled)."""
    def deployment() -> dict[str, Any]:
        return cluster.get("apps/v1", "Deployment", "llama") or {}

    def document(name: str, key: str) -> dict[str, Any]:
        return dict(json.loads((cluster.get("v1", "ConfigMap", name) or {})["data"][key]))

    def revision_map() -> str:
        (volume,) = [v for v in deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "gateway-config"]
        return str(volume["projected"]["sources"][1]["configMap"]["name"])

    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama", model={"servedName": "old"}))
        converge(cluster, "llama")
        old = revision_map()
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"tokenPolicy": {"maxOutputTokens": 64}}})
        wait_for(lambda: cluster.isvc("llama")["status"]["observedGeneration"] == 2, what="observedGeneration 2")
        assert document("llama-gateway", "gateway.json")["tokenPolicy"]["maxOutputTokens"] == 64
        assert deployment()["metadata"]["generation"] == 1  # no roll: the gateways reload the policy
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"model": {"servedName": "new"}}})
        wait_for(lambda: deployment()["metadata"]["generation"] == 2, what="the pods rolled")
        new = revision_map()
        revision = document(new, "gateway-revision.json")
        assert (revision["model"]["servedName"], new) == ("new", f"llama-gateway-{gwconfig.revision_hash(revision)}")
        assert "model" not in document("llama-gateway", "gateway.json")
        time.sleep(2 * RESYNC)
        assert document(old, "gateway-revision.json")["model"]["servedName"] == "old"  # the rollout is running
        cluster.mark_deployments_ready("llama")
        wait_for(lambda: cluster.get("v1", "ConfigMap", old) is None, what="the old revision's ConfigMap pruned")
        assert len(cluster.children("llama")) == 5


def test_hand_edited_child_is_restored(emulator: EmulatorThread, cluster: Cluster,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
        deployment = cluster.get("apps/v1", "Deployment", "llama")
        containers = deployment["spec"]["template"]["spec"]["containers"]
        containers[0]["image"] = "attacker/vllm:latest"
        cluster.patch("apps/v1", "Deployment", "llama", {"spec": {"template": {"spec": {"containers": containers}}}})
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["template"]["spec"]["containers"][0]
                 ["image"] == "vllm/vllm-openai:v0.11.0", what="the image restored")
        wait_for(lambda: [e for e in cluster.list("v1", "Event") if e["reason"] == "DriftRestored"],
                 what="a DriftRestored event")
        cluster.delete("v1", "Service", "llama")
        wait_for(lambda: cluster.get("v1", "Service", "llama"), what="the deleted Service recreated")


def test_delete_cascades_to_children(emulator: EmulatorThread, cluster: Cluster,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
        assert all(c["metadata"]["ownerReferences"][0]["uid"] == cluster.isvc("llama")["metadata"]["uid"]
                   for c in cluster.children("llama"))
        assert not cluster.isvc("llama")["metadata"].get("finalizers")
        cluster.delete(ISVC, "InferenceService", "llama")
        wait_for(lambda: cluster.isvc("llama") is None, what="the service deleted")
        wait_for(lambda: cluster.children("llama") == [], what="children garbage-collected")
        # its daemons ended with it: a resync of a daemon left behind would write the children again
        assert writes_during(cluster, 3 * RESYNC) == []


def test_a_deletion_the_watch_missed_ends_the_daemon(emulator: EmulatorThread, cluster: Cluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch that relists after "410 Gone" reports no deletion: the daemon ran on with its last body and
    wrote the deleted service's children again (owned by a uid that no longer exists), for ever."""
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
        emulator.delete_unwatched(ISVC, "inferenceservices", "default", "llama")
        assert cluster.isvc("llama") is None
        time.sleep(2 * RESYNC)  # the children collected (each pokes the daemon), and resyncs
        children = cluster.children("llama")
        assert children == [], f"written again: {sorted(c['kind'] + '/' + c['metadata']['name'] for c in children)}"
        assert writes_during(cluster, 3 * RESYNC) == []


def test_a_replaced_service_is_poked_at_once(emulator: EmulatorThread, cluster: Cluster,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """kubectl replace --force (delete, then create the same name) while the old daemon is debouncing a poke:
    the old daemon, ending, took the name's trigger away from the new one, which then heard nothing (here:
    its Deployments becoming ready) until its next resync."""
    resync = 30.0
    with operator(emulator, monkeypatch, resync=resync, debounce=1.0):
        cluster.create(inference_service("llama"))
        wait_for(lambda: len(cluster.children("llama")) == 5, what="5 children")
        wait_for(lambda: cluster.condition("llama", "Progressing"), what="status")
        time.sleep(3)  # converged and idle
        cluster.patch(ISVC, "InferenceService", "llama", {"metadata": {"labels": {"touch": "1"}}})  # a poke
        time.sleep(0.2)
        assert cluster.delete(ISVC, "InferenceService", "llama").status_code == 200
        assert cluster.create(inference_service("llama")).status_code == 201
        uid = cluster.isvc("llama")["metadata"]["uid"]
        wait_for(lambda: [c for c in cluster.children("llama") if c["kind"] == "Deployment"
                          and c["metadata"]["ownerReferences"][0]["uid"] == uid], what="the new Deployment")
        time.sleep(2)  # the old daemon has ended
        cluster.mark_deployments_ready("llama")  # the index pokes the service
        started = time.monotonic()
        wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", timeout=resync + 10,
                 what="Ready=True")
        assert time.monotonic() - started < 10, f"Ready only at the next resync ({resync:g} s)"


def test_delete_completes_once_the_operator_is_gone(emulator: EmulatorThread, cluster: Cluster,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
    cluster.delete(ISVC, "InferenceService", "llama")  # after helm uninstall, or with the operator crash-looping
    wait_for(lambda: cluster.isvc("llama") is None, what="the service deleted without an operator")
    wait_for(lambda: cluster.children("llama") == [], what="children garbage-collected")


def test_the_finalizer_of_older_versions_is_removed(emulator: EmulatorThread, cluster: Cluster,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = inference_service("llama")
    legacy["metadata"]["finalizers"] = ["tensorfleet.io/finalizer"]
    assert cluster.create(legacy).status_code == 201
    with operator(emulator, monkeypatch):
        converge(cluster, "llama")
        wait_for(lambda: not cluster.isvc("llama")["metadata"].get("finalizers"), what="the finalizer removed")


def test_an_existing_object_with_a_childs_name_is_left_alone(emulator: EmulatorThread, cluster: Cluster,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "llama", "labels": {"app": "legacy"}},
              "spec": {"selector": {"app": "legacy"}, "ports": [{"name": "redis", "port": 6379}]}}
    labelled = {"apiVersion": "v1", "kind": "ConfigMap",  # labelled like a child, but no controller reference
                "metadata": {"name": "llama-gateway", "labels": labels.common("llama", "gateway")},
                "data": {"nginx.conf": "user data"}}
    for obj in (theirs, labelled):
        assert cluster.create(json.loads(json.dumps(obj))).status_code == 201
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        degraded = wait_for(lambda: (c := cluster.condition("llama", "Degraded")) and c["reason"] == "NameConflict"
                            and c, what="Degraded=True NameConflict")
        assert degraded["status"] == "True"
        assert "Service llama" in degraded["message"]
        assert "ConfigMap llama-gateway" in degraded["message"]
        wait_for(lambda: cluster.get("policy/v1", "PodDisruptionBudget", "llama"), what="the other children")
        cluster.mark_deployments_ready("llama")
        wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", what="Ready=True")
        time.sleep(2 * RESYNC)
        assert writes_during(cluster, 3 * RESYNC) == []  # the conflict is reported once, not fought over
        service, config_map = cluster.get("v1", "Service", "llama"), cluster.get("v1", "ConfigMap", "llama-gateway")
        assert (service["spec"], config_map["data"]) == (theirs["spec"], labelled["data"])
        assert "ownerReferences" not in service["metadata"]
        assert "ownerReferences" not in config_map["metadata"]
        cluster.delete(ISVC, "InferenceService", "llama")
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama") is None, what="its own children collected")
    assert cluster.get("v1", "Service", "llama")
    assert cluster.get("v1", "ConfigMap", "llama-gateway")


def test_restarted_operator_converges_without_duplicates(emulator: EmulatorThread, cluster: Cluster,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
    uids = sorted(c["metadata"]["uid"] for c in cluster.children("llama"))
    before = len(cluster.writes())
    with operator(emulator, monkeypatch):
        time.sleep(4 * RESYNC)
    after_restart = cluster.writes()[before:]
    assert not [w for w in after_restart if w[0] == "POST" and "/events" not in w[1]], after_restart
    assert sorted(c["metadata"]["uid"] for c in cluster.children("llama")) == uids
    assert [w for w in after_restart if "/events" not in w[1]] == []


def test_conflicts_and_server_errors_are_retried(emulator: EmulatorThread, cluster: Cluster,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.server.inject_fault("PATCH", r"/deployments/llama$", 500, times=2)
    emulator.server.inject_fault("PATCH", r"/services/llama$", 503, times=1)
    emulator.server.inject_fault("PATCH", r"/inferenceservices/llama/status$", 409, times=2)
    with operator(emulator, monkeypatch) as runner:
        cluster.create(inference_service("llama"))
        converge(cluster, "llama")
    assert all(f.remaining == 0 for f in emulator.server.faults)
    assert runner.exit_code == 0


def test_persistent_failure_is_reported_as_degraded(emulator: EmulatorThread, cluster: Cluster,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.server.inject_fault("PATCH", r"/deployments/llama$", 500, times=100)
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        degraded = wait_for(lambda: (c := cluster.condition("llama", "Degraded")) and c["status"] == "True" and c,
                            what="Degraded=True")
        assert degraded["reason"] == "ApplyFailed"
        assert "500" in degraded["message"]
        emulator.server.faults.clear()
        wait_for(lambda: (cluster.condition("llama", "Degraded") or {}).get("status") == "False",
                 timeout=60, what="recovery after the fault clears")


def test_a_rejected_child_stops_none_of_the_others(emulator: EmulatorThread, cluster: Cluster,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.server.inject_fault("PATCH", r"/deployments/llama$", 422, times=1000)  # an admission webhook, say
    emulator.server.inject_fault("PATCH", r"/poddisruptionbudgets/llama$", 403, times=1000)
    with operator(emulator, monkeypatch):
        cluster.create(inference_service("llama"))
        wait_for(lambda: {c["kind"] for c in cluster.children("llama")} == {"ConfigMap", "Service"},
                 what="the children after the refused ones written")
        degraded = wait_for(lambda: (c := cluster.condition("llama", "Degraded")) and c["status"] == "True" and
                            "PodDisruptionBudget" in c["message"] and c, what="Degraded naming both")
    assert degraded["reason"] == "ApplyFailed"
    assert degraded["message"].startswith("writing child objects failed: Deployment llama: 422 ")
    assert "; PodDisruptionBudget llama: 403 " in degraded["message"]


def test_cross_field_error_sets_invalid_spec_with_the_field(emulator: EmulatorThread, cluster: Cluster,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        body = inference_service("llama", tokenPolicy={"maxInputTokens": 9000})  # the context window is 8192
        assert cluster.create(body).status_code == 201  # the schema cannot see this; the operator can
        degraded = wait_for(lambda: cluster.condition("llama", "Degraded"), what="Degraded")
        assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
        assert "spec.tokenPolicy.maxInputTokens" in degraded["message"]
        assert cluster.children("llama") == []
        events = [e for e in cluster.list("v1", "Event") if e["reason"] == "InvalidSpec"]
        assert events
        assert events[0]["involvedObject"]["name"] == "llama"


def test_api_server_rejects_schema_errors_before_the_operator(cluster: Cluster) -> None:
    response = cluster.create(inference_service("llama", gpu={"count": 0}))
    assert response.status_code == 422
    assert "spec.gpu.count" in response.json()["message"]
