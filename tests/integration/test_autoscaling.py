"""The autoscaler in the operator (KopfRunner) against the emulator, scraping real metrics endpoints on loopback."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

import kmock
import pytest
from kopf.testing import KopfRunner

from builders import inference_service
from cluster import ISVC, Cluster, registry_from_env, wait_for
from gateway_metrics import LoopbackGatewayMetrics, ready_status, serving_pod
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.integration

INTERVAL = 0.3
BUSY = {"queue_depth": 12, "in_flight": 8, "kv_cache_usage": 0.95, "gpu_utilization": 1.0}
QUIET = {"queue_depth": 0, "in_flight": 1, "kv_cache_usage": 0.1, "gpu_utilization": 0.4}
FAST_WINDOWS = {"scaleDownStabilizationSeconds": 3, "panicWindowSeconds": 1}


@pytest.fixture
def cluster(emulator: EmulatorThread) -> Iterator[Cluster]:
    client = Cluster(emulator)
    yield client
    client.close()


@pytest.fixture
def gateways() -> Iterator[list[LoopbackGatewayMetrics]]:
    started: list[LoopbackGatewayMetrics] = []
    yield started
    for gateway in started:
        gateway.close()


def operator(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch, *args: str) -> KopfRunner:
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", "1")
    monkeypatch.setenv("TENSORFLEET_DEBOUNCE_SECONDS", "0.05")
    monkeypatch.setenv("TENSORFLEET_AUTOSCALE_INTERVAL_SECONDS", str(INTERVAL))
    monkeypatch.setenv("TENSORFLEET_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS", "1")
    return KopfRunner(["run", "--all-namespaces", "--verbose", *(args or ("--standalone",))],
                      registry=registry_from_env(), timeout=60)


def autoscaled(name: str = "llama", mode: str = "tensorfleet", **autoscaling: Any) -> dict[str, Any]:
    body = inference_service(name, autoscaling={"mode": mode, "minReplicas": 1, "maxReplicas": 4, **autoscaling})
    del body["spec"]["replicas"]  # the autoscaler's to set
    return body


def add_pod(cluster: Cluster, gateways: list[LoopbackGatewayMetrics], name: str, **load: float) -> None:
    gateway = LoopbackGatewayMetrics(**load)
    gateways.append(gateway)
    assert cluster.create(serving_pod(name, "llama", gateway.port)).status_code == 201
    assert cluster.patch("v1", "Pod", name, {"status": ready_status()}, sub="status").status_code == 200


def converge(cluster: Cluster, name: str = "llama") -> None:
    wait_for(lambda: len(cluster.children(name)) == 5, what="5 children")
    cluster.mark_deployments_ready(name)
    wait_for(lambda: (cluster.condition(name, "Ready") or {}).get("status") == "True", what="Ready=True")


def spec_replicas(cluster: Cluster, name: str = "llama") -> int | None:
    return ((cluster.isvc(name) or {}).get("spec") or {}).get("replicas")


def scale_writes(cluster: Cluster) -> list[tuple[str, str]]:
    return [w for w in cluster.writes() if w[1].endswith("/scale")]


def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.list("v1", "Event") if e["reason"] == reason]


def test_scales_up_under_a_queue_and_down_after_the_window(emulator: EmulatorThread, cluster: Cluster,
                                                         gateways: list[LoopbackGatewayMetrics],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch) as runner:
        cluster.create(autoscaled(**FAST_WINDOWS))
        converge(cluster)
        add_pod(cluster, gateways, "llama-0", **BUSY)
        wait_for(lambda: spec_replicas(cluster) == 2, what="scaled up to 2 (at most 2x the one ready)")
        assert scale_writes(cluster)  # through the scale subresource
        record = wait_for(lambda: (cluster.isvc("llama").get("status") or {}).get("autoscaling"), what="a record")
        assert (record["reason"], record["desiredReplicas"]) == ("ScaledUp", 2)
        assert "queueDepth asks for 3.0 replicas" in record["message"]
        assert record["windows"] == {"panicSeconds": 1, "stableSeconds": 3, "scaleDownSeconds": 3}
        scaled_up = wait_for(lambda: events(cluster, "ScaledUp"), what="a ScaledUp event")
        assert scaled_up[0]["involvedObject"]["name"] == "llama"
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["replicas"] == 2,
                 what="the Deployment rolled to 2 by reconcile")

        add_pod(cluster, gateways, "llama-1", **QUIET)
        gateways[0].set(**QUIET)
        wait_for(lambda: spec_replicas(cluster) == 1, timeout=30, what="scaled down after the window")
        wait_for(lambda: cluster.isvc("llama")["status"]["autoscaling"]["reason"] == "ScaledDown",
                 what="the decision recorded")  # written right after the /scale write
        wait_for(lambda: events(cluster, "ScaledDown"), what="a ScaledDown event")
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["replicas"] == 1, what="rolled to 1")
    assert runner.exit_code == 0


def test_a_steady_autoscaled_service_makes_zero_writes(emulator: EmulatorThread, cluster: Cluster,
                                                      gateways: list[LoopbackGatewayMetrics],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(minReplicas=2, scaleDownStabilizationSeconds=2, panicWindowSeconds=1))
        converge(cluster)
        steady = {"queue_depth": 0, "in_flight": 6, "kv_cache_usage": 0.6, "gpu_utilization": 1.0}
        add_pod(cluster, gateways, "llama-0", **steady)
        add_pod(cluster, gateways, "llama-1", **steady)
        time.sleep(3.0)  # several decisions and resyncs
        before = len(cluster.writes())
        time.sleep(4.0)
        assert cluster.writes()[before:] == []
        assert spec_replicas(cluster) is None  # never touched: 2 replicas, as minReplicas says


def test_unreachable_gateways_are_reported_not_fatal(emulator: EmulatorThread, cluster: Cluster,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(**FAST_WINDOWS))
        converge(cluster)
        silent = LoopbackGatewayMetrics(**BUSY)
        silent.close()  # a port where nothing answers any more
        assert cluster.create(serving_pod("llama-0", "llama", silent.port)).status_code == 201
        cluster.patch("v1", "Pod", "llama-0", {"status": ready_status()}, sub="status")
        record = wait_for(lambda: ((cluster.isvc("llama").get("status") or {}).get("autoscaling") or {}),
                          what="NoMetrics recorded")
        assert record["reason"] == "NoMetrics"
        assert wait_for(lambda: events(cluster, "NoMetrics"), what="an event")[0]["type"] == "Warning"
        assert scale_writes(cluster) == []


def test_a_paused_operator_does_not_scale(emulator: EmulatorThread, cluster: Cluster,
                                          gateways: list[LoopbackGatewayMetrics],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the leader acts: with a higher-priority peer alive, kopf pauses this operator and its daemons."""
    lastseen = datetime.datetime.now(datetime.UTC).isoformat()
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "autoscaling-test"},
               "status": {"the-leader": {"priority": 100, "lifetime": 600, "lastseen": lastseen}}}
    assert cluster.http.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering).status_code == 201
    cluster.create(inference_service("llama", replicas=1,
                                     autoscaling={"mode": "tensorfleet", "minReplicas": 1, "maxReplicas": 4}))
    add_pod(cluster, gateways, "llama-0", **BUSY)
    with operator(emulator, monkeypatch, "--peering", "autoscaling-test", "--priority", "1"):
        time.sleep(10 * INTERVAL + 2)
        assert scale_writes(cluster) == []
        assert spec_replicas(cluster) == 1
        cluster.http.patch("/apis/kopf.dev/v1/clusterkopfpeerings/autoscaling-test",
                           json={"status": {"the-leader": None}},
                           headers={"Content-Type": "application/merge-patch+json"})
        wait_for(lambda: spec_replicas(cluster) == 2, timeout=30, what="scaling once this operator leads")


def test_hpa_mode_renders_an_hpa_and_leaves_replicas_to_it(emulator: EmulatorThread, cluster: Cluster,
                                                          gateways: list[LoopbackGatewayMetrics],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(mode="hpa"))
        converge(cluster)
        hpa = wait_for(lambda: cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "llama"), what="the HPA")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": ISVC, "kind": "InferenceService", "name": "llama"}
        assert wait_for(lambda: (cluster.isvc("llama").get("status") or {}).get("autoscaling"))["mode"] == "hpa"
        add_pod(cluster, gateways, "llama-0", **BUSY)
        time.sleep(10 * INTERVAL)
        assert scale_writes(cluster) == []  # tensorfleet does not touch replicas in hpa mode
        cluster.http.patch(f"/apis/{ISVC}/namespaces/default/inferenceservices/llama/scale",
                           json={"spec": {"replicas": 3}}, headers={"Content-Type": "application/merge-patch+json"})
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["replicas"] == 3,
                 what="reconcile rolls what the HPA set")
        time.sleep(10 * INTERVAL)
        assert spec_replicas(cluster) == 3


def with_keda(emulator: EmulatorThread) -> None:
    """Make the emulated cluster one with KEDA: it serves ScaledObjects."""
    emulator.server.resources["keda.sh/v1alpha1/scaledobjects"] = kmock.ResourceInfo(
        kind="ScaledObject", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})


def test_keda_mode_renders_a_scaled_object_and_switching_mode_prunes_it(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with_keda(emulator)
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(mode="keda"))
        converge(cluster)
        scaled = wait_for(lambda: cluster.get("keda.sh/v1alpha1", "ScaledObject", "llama"), what="the ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["kind"] == "InferenceService"
        assert {t["name"] for t in scaled["spec"]["triggers"]} == {"queue-depth", "kv-cache-usage"}
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"autoscaling": {"mode": "tensorfleet"}}})
        wait_for(lambda: cluster.get("keda.sh/v1alpha1", "ScaledObject", "llama") is None, what="pruned")


def test_stale_children_are_pruned_unless_their_replacement_was_refused(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with_keda(emulator)
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(mode="hpa"))
        converge(cluster)
        emulator.server.inject_fault("PATCH", r"/deployments/llama$", 422, times=1000)
        emulator.server.inject_fault("PATCH", r"/scaledobjects/llama$", 422, times=1000)
        cluster.patch(ISVC, "InferenceService", "llama",
                      {"spec": {"autoscaling": {"mode": "keda"}, "model": {"maxModelLen": 16384}}})
        wait_for(lambda: "ScaledObject llama: 422" in (cluster.condition("llama", "Degraded") or {}).get("message", ""),
                 what="the refused ScaledObject reported")
        time.sleep(1)
        assert cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "llama"), "the HPA it replaces is kept"
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"autoscaling": {"mode": "tensorfleet"}}})
        wait_for(lambda: cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "llama") is None,
                 what="the HPA pruned while the Deployment is still refused")
        assert "Deployment llama: 422" in cluster.condition("llama", "Degraded")["message"]


def test_refuses_to_fight_another_hpa(emulator: EmulatorThread, cluster: Cluster,
                                     gateways: list[LoopbackGatewayMetrics], monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "by-hand"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
                        "minReplicas": 1, "maxReplicas": 9}}
    with operator(emulator, monkeypatch):
        cluster.create(autoscaled(**FAST_WINDOWS))
        converge(cluster)
        assert cluster.create(foreign).status_code == 201
        add_pod(cluster, gateways, "llama-0", **BUSY)
        record = wait_for(lambda: (cluster.isvc("llama").get("status") or {}).get("autoscaling"), what="blocked")
        assert record["reason"] == "ConflictingAutoscaler"
        assert "HorizontalPodAutoscaler by-hand scales Deployment llama" in record["message"]
        assert wait_for(lambda: events(cluster, "ConflictingAutoscaler"), what="an event")[0]["type"] == "Warning"
        assert scale_writes(cluster) == []
        cluster.delete("autoscaling/v2", "HorizontalPodAutoscaler", "by-hand")
        wait_for(lambda: spec_replicas(cluster) == 2, what="scaling once the other autoscaler is gone")
