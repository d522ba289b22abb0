"""What a pod is (ready, warming, pending, unschedulable) and what its gateway's /metrics say."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from tensorfleet import telemetry
from tensorfleet.autoscale import signals
from tensorfleet.autoscale.signals import PodMetrics, PodTarget


def pod(name: str = "llama-0", *, ready: bool = False, phase: str = "Running", ip: str | None = "10.0.0.7",
        admin_port: int | None = 9090, scheduled: dict[str, Any] | None = None,
        deleting: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", **scheduled})
    ports = [{"name": "http", "containerPort": 8000}]
    if admin_port is not None:
        ports.append({"name": "admin", "containerPort": admin_port})
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "admin", "containerPort": 1}]},
                                {"name": "gateway", "ports": ports}]},
        "status": {"phase": phase, "conditions": conditions, **({"podIP": ip} if ip else {})},
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return body


@pytest.mark.parametrize(("body", "phase"), [
    (pod(ready=True), "ready"),
    (pod(), "warming"),
    (pod(phase="Pending", ip=None), "pending"),
    (pod(phase="Pending", ip=None, scheduled={"status": "False", "reason": "Unschedulable",
                                              "message": "0/3 nodes: insufficient nvidia.com/gpu"}), "unschedulable"),
    (pod(ready=True, deleting=True), "terminating"),
    (pod(phase="Failed"), "finished"),
])
def test_pods_are_classified_by_what_they_can_serve(body: dict[str, Any], phase: str) -> None:
    assert signals.classify_pod(body) == phase


def test_scrape_target_is_the_pod_ip_and_the_gateways_admin_port() -> None:
    assert signals.pod_target(pod(ready=True, admin_port=19090)).metrics_url == "http://10.0.0.7:19090/metrics"
    assert signals.pod_target(pod(ready=True, admin_port=None)).metrics_url == "http://10.0.0.7:9090/metrics"
    assert signals.pod_target(pod(ready=True, ip="fd00::7")).metrics_url == "http://[fd00::7]:9090/metrics"
    assert signals.pod_target(pod(phase="Pending", ip=None)).metrics_url is None
    unschedulable = pod(phase="Pending", ip=None, scheduled={"status": "False", "reason": "Unschedulable",
                                                             "message": "insufficient nvidia.com/gpu"})
    assert signals.pod_target(unschedulable).reason == "insufficient nvidia.com/gpu"


def exposition(**values: float | dict[str, float]) -> str:
    registry = CollectorRegistry()
    for name, value in values.items():
        if isinstance(value, dict):
            gauge = Gauge(name, "test", ["gpu"], registry=registry)
            for label, v in value.items():
                gauge.labels(label).set(v)
        else:
            Gauge(name, "test", registry=registry).set(value)
    Gauge("unrelated_metric", "ignored", registry=registry).set(42)
    return generate_latest(registry).decode()


def test_parse_the_gateway_metrics() -> None:
    text = exposition(**{telemetry.QUEUE_DEPTH: 3, telemetry.ENGINE_WAITING: 2, telemetry.IN_FLIGHT: 17,
                         telemetry.GPU_UTILIZATION: {"0": 1.0, "1": 0.5}, telemetry.KV_CACHE_USAGE: 0.75,
                         telemetry.READY: 1, telemetry.STARTUP_SECONDS: 95.5})
    assert signals.parse_metrics(text) == PodMetrics(gateway_queue=3, engine_waiting=2, in_flight=17,
                                                     gpu_utilization=0.75, kv_cache_usage=0.75, ready=True,
                                                     startup_seconds=95.5)


def test_missing_metrics_are_none_and_out_of_range_values_are_clamped() -> None:
    parsed = signals.parse_metrics(exposition(**{telemetry.IN_FLIGHT: -1, telemetry.KV_CACHE_USAGE: 1.7,
                                                 telemetry.READY: 0}))
    assert parsed == PodMetrics(in_flight=0.0, kv_cache_usage=1.0, ready=False)


def test_not_prometheus_text_is_an_error() -> None:
    with pytest.raises(signals.MetricsError, match="not Prometheus text"):
        signals.parse_metrics('tensorfleet_gateway_queue_depth{gpu="0" 3\n')


def test_observation_totals_over_ready_pods_and_extrapolates_unscraped_ones() -> None:
    targets = [PodTarget(n, "ready", f"http://{n}") for n in ("a", "b", "c", "d")]
    targets += [PodTarget("e", "warming"), PodTarget("f", "unschedulable", reason="no GPU")]
    metrics = {
        "a": PodMetrics(gateway_queue=2, engine_waiting=1, in_flight=10, gpu_utilization=1.0, kv_cache_usage=0.8,
                        ready=True, startup_seconds=100),
        "b": PodMetrics(gateway_queue=0, engine_waiting=1, in_flight=6, gpu_utilization=0.5, kv_cache_usage=0.4,
                        ready=True, startup_seconds=50),
        "c": PodMetrics(in_flight=0, ready=False),  # Ready to Kubernetes, not yet to its gateway
    }
    observation = signals.observe(7.0, 5, targets, metrics)
    assert (observation.ready, observation.warming, observation.unschedulable, observation.scraped) == (3, 2, 1, 2)
    assert observation.queue_depth == pytest.approx(4 * 1.5)  # 4 counted over 2 scraped of 3 ready
    assert observation.concurrency == pytest.approx(18 * 1.5)  # in flight plus the gateway queue
    assert (observation.gpu_utilization, observation.kv_cache_usage) == (pytest.approx(0.75), pytest.approx(0.6))
    assert observation.startup_seconds == 75
    assert observation.unschedulable_reason == "no GPU"


def test_observation_without_concurrency_reports_none() -> None:
    observation = signals.observe(0.0, 1, [PodTarget("a", "ready", "u")], {"a": PodMetrics(gateway_queue=1)})
    assert observation.concurrency is None
    assert observation.queue_depth == 1


@pytest.mark.parametrize("text", [
    f"{telemetry.QUEUE_DEPTH} +Inf\n{telemetry.ENGINE_WAITING} -Inf\n{telemetry.IN_FLIGHT} NaN\n",
    f"{telemetry.QUEUE_DEPTH} 1e308\n{telemetry.ENGINE_WAITING} 1e300\n{telemetry.IN_FLIGHT} -1e300\n",
    f'{telemetry.QUEUE_DEPTH}{{a="1"}} 1e308\n{telemetry.QUEUE_DEPTH}{{a="2"}} 1e308\n',  # a sum that overflows
    f'{telemetry.KV_CACHE_USAGE}{{gpu="0"}} +Inf\n{telemetry.KV_CACHE_USAGE}{{gpu="1"}} -Inf\n',
    f"{telemetry.READY} +Inf\n{telemetry.STARTUP_SECONDS} +Inf\n{telemetry.GPU_UTILIZATION} NaN\n",
])
def test_samples_that_are_no_finite_number_or_beyond_any_count_are_missing(text: str) -> None:
    assert signals.parse_metrics(text) == PodMetrics()


def test_garbage_samples_leave_the_pods_other_series_alone() -> None:
    text = (f'{telemetry.QUEUE_DEPTH} +Inf\n{telemetry.ENGINE_WAITING} 3\n{telemetry.KV_CACHE_USAGE}{{gpu="0"}} NaN\n'
            f'{telemetry.KV_CACHE_USAGE}{{gpu="1"}} 0.5\n{telemetry.STARTUP_SECONDS} 90\n')
    assert signals.parse_metrics(text) == PodMetrics(engine_waiting=3.0, kv_cache_usage=0.5, startup_seconds=90.0)


def test_a_repeated_series_counts_once_with_its_first_sample_as_in_prometheus() -> None:
    text = (f"{telemetry.QUEUE_DEPTH} 5\n{telemetry.QUEUE_DEPTH} 7\n"
            f'{telemetry.KV_CACHE_USAGE}{{gpu="0"}} 0.2\n{telemetry.KV_CACHE_USAGE}{{gpu="0"}} 1\n'
            f'{telemetry.KV_CACHE_USAGE}{{gpu="1"}} 0.4\n')
    assert signals.parse_metrics(text) == PodMetrics(gateway_queue=5.0, kv_cache_usage=pytest.approx(0.3))
