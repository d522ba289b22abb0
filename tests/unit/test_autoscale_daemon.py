"""The daemon's decision path without sockets: a recording stand-in for the API client and for the scraper."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from builders import inference_service, stored
from tensorfleet.autoscale import daemon
from tensorfleet.autoscale.signals import PodMetrics, PodTarget

BUSY = PodMetrics(gateway_queue=12, in_flight=8, kv_cache_usage=0.95, gpu_utilization=1.0, ready=True)
QUIET = PodMetrics(gateway_queue=0, in_flight=4, kv_cache_usage=0.5, gpu_utilization=1.0, ready=True)
PODS = [PodTarget("llama-0", "ready", "http://10.0.0.1:9090/metrics")]


class RecordingKubeClient:
    """Test double for tensorfleet.kube.KubeClient: records writes, answers lists from a dict."""

    def __init__(self, listed: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.listed = listed or {}
        self.patches: list[tuple[str, dict[str, Any], str | None]] = []
        self.events: list[tuple[str, str]] = []

    def acting_for(self, owner: Any) -> Any:
        return self  # the owner exists: nothing is deleted here

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        self.patches.append((name, patch, subresource))
        return {}

    async def post_event(self, involved: Any, type_: str, reason: str, message: str, now: Any) -> None:
        self.events.append((type_, reason))

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        return self.listed.get(kind, [])


class FixedScraper:
    """Test double for the scraper: every ready pod reports ``metrics``."""

    def __init__(self, metrics: PodMetrics) -> None:
        self.metrics = metrics

    async def scrape(self, targets: Sequence[PodTarget]) -> dict[str, PodMetrics]:
        return {t.name: self.metrics for t in targets if t.phase == "ready"}


def service(generation: int = 1, **status: Any) -> dict[str, Any]:
    body = inference_service("llama", replicas=1, autoscaling={"mode": "tensorfleet", "maxReplicas": 4})
    return stored(body, generation=generation, **status)


def autoscaler(client: RecordingKubeClient, metrics: PodMetrics) -> daemon.ServiceAutoscaler:
    clock = iter(range(0, 10_000, 2))
    return daemon.ServiceAutoscaler(client, FixedScraper(metrics), "default", "llama",  # type: ignore[arg-type]  (doubles)
                                    clock=lambda: float(next(clock)))


async def test_a_decision_writes_scale_then_status_then_an_event() -> None:
    client = RecordingKubeClient()
    await autoscaler(client, BUSY).tick(service(), PODS, lambda: False)
    (scale, status) = client.patches
    assert scale == ("llama", {"spec": {"replicas": 2}}, "scale")
    assert status[2] == "status"
    assert status[1]["status"]["autoscaling"]["reason"] == "ScaledUp"
    assert client.events == [("Normal", "ScaledUp")]


async def test_replicas_above_a_lowered_max_are_scaled_into_the_bounds() -> None:
    """maxReplicas was lowered under the replicas the autoscaler had set: the next decision writes the bound."""
    body = service()
    body["spec"]["replicas"] = 8  # set through /scale while maxReplicas was 10; the user's update lowered it to 4
    client = RecordingKubeClient()
    await autoscaler(client, QUIET).tick(body, PODS, lambda: False)
    scale, status = client.patches
    assert scale == ("llama", {"spec": {"replicas": 4}}, "scale")
    assert status[1]["status"]["autoscaling"]["reason"] == "AboveMaximum"


async def test_steady_load_writes_nothing() -> None:
    client = RecordingKubeClient()
    scaler = autoscaler(client, QUIET)
    for _ in range(20):
        await scaler.tick(service(), PODS, lambda: False)
    assert client.patches == []


async def test_paused_while_scraping_acts_on_nothing() -> None:
    client = RecordingKubeClient()
    await autoscaler(client, BUSY).tick(service(), PODS, lambda: True)
    assert client.patches == []


async def test_no_second_decision_before_the_write_comes_back() -> None:
    client = RecordingKubeClient()
    scaler = autoscaler(client, BUSY)
    await scaler.tick(service(generation=1), PODS, lambda: False)
    await scaler.tick(service(generation=1), PODS, lambda: False)  # the watch has not shown replicas 2 yet
    assert [p for p in client.patches if p[2] == "scale"] == [("llama", {"spec": {"replicas": 2}}, "scale")]


async def test_an_hpa_on_the_deployments_blocks_scaling() -> None:
    hpa = {"metadata": {"name": "by-hand"}, "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "llama"}}}
    client = RecordingKubeClient({"HorizontalPodAutoscaler": [hpa], "Deployment": [{"metadata": {"name": "llama"}}]})
    await autoscaler(client, BUSY).tick(service(), PODS, lambda: False)
    assert [p[2] for p in client.patches] == ["status"]
    assert client.patches[0][1]["status"]["autoscaling"]["reason"] == "ConflictingAutoscaler"
    assert client.events == [("Warning", "ConflictingAutoscaler")]


async def test_an_hpa_on_another_services_deployment_is_no_conflict() -> None:
    hpa = {"metadata": {"name": "other"}, "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "llama-2"}}}
    client = RecordingKubeClient({"HorizontalPodAutoscaler": [hpa], "Deployment": [{"metadata": {"name": "llama"}}]})
    await autoscaler(client, BUSY).tick(service(), PODS, lambda: False)
    assert client.patches[0][2] == "scale"


async def test_an_invalid_spec_is_left_to_reconcile() -> None:
    client = RecordingKubeClient()
    body = service()
    body["spec"]["tokenPolicy"] = {"maxInputTokens": 9000}  # longer than the model's 8192-token window
    await autoscaler(client, BUSY).tick(body, PODS, lambda: False)
    assert client.patches == []


@pytest.mark.parametrize(("message", "kept"), [
    ("Unresolved resources cannot be served (try creating their CRDs): "
     "Selector(group='keda.sh', version='v1alpha1', any_name='scaledobjects')", False),
    ("Unresolved resources cannot be served (try creating their CRDs): "
     "Selector(group='keda.sh', version='v1alpha1', any_name='scaledobjects'), "
     "Selector(group='tensorfleet.io', version='v1alpha1', any_name='inferenceservices')", True),
    ("something else", True),
])
def test_kopf_warns_about_keda_only_when_something_else_is_missing(message: str, kept: bool) -> None:
    record = logging.LogRecord("kopf", logging.WARNING, __file__, 1, message, None, None)
    assert daemon.OptionalKedaFilter().filter(record) is kept
