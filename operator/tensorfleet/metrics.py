"""Prometheus metrics of the operator process.

Series about one InferenceService or Engine carry ``namespace`` (and ``inferenceservice``) labels of their own:
the chart's ServiceMonitor keeps them (``honorLabels``) instead of the operator pod's namespace. Only the
acting replica reconciles, so only it exports per-service series; the standby's are removed when its
daemons stop.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUILD_RESULTS = ("built", "cached", "failed")  # trtllm-build ran; the store had the engine; the attempt failed
_BUILD_BUCKETS = (60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800)


class OperatorMetrics:
    """Reconciles, API writes, services under management, their replicas, and engine builds."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "tensorfleet_reconcile_total", "Reconciles of InferenceServices by result.",
            ["result"], registry=self.registry)
        self.duration = Histogram(
            "tensorfleet_reconcile_duration_seconds", "Time one reconcile takes, API writes included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.errors = Counter(
            "tensorfleet_reconcile_errors_total", "Reconciles that failed, by reason.",
            ["reason"], registry=self.registry)
        self.writes = Counter(
            "tensorfleet_api_writes_total", "Writes to the API server, by kind and why.",
            ["kind", "why"], registry=self.registry)
        self.services = Gauge(
            "tensorfleet_inferenceservices", "InferenceServices this replica reconciles.",
            registry=self.registry)
        self.desired_replicas = Gauge(
            "tensorfleet_inferenceservice_desired_replicas",
            "Replicas the InferenceService asks for: spec.replicas, as its autoscaler (any mode) sets it.",
            ["namespace", "inferenceservice"], registry=self.registry)
        self.ready_replicas = Gauge(
            "tensorfleet_inferenceservice_ready_replicas", "Ready pods of the InferenceService's Deployments.",
            ["namespace", "inferenceservice"], registry=self.registry)
        self.engine_builds = Counter(
            "tensorfleet_engine_builds", "Engine Jobs whose outcome was recorded, by result: built (trtllm-build "
            "ran), cached (the store had the engine), failed.", ["namespace", "gpu_product", "result"],
            registry=self.registry)
        self.engine_build_duration = Histogram(
            "tensorfleet_engine_build_duration_seconds", "How long successful engine builds took (download, "
            "convert, trtllm-build, upload), as their Job reported.", ["gpu_product"], buckets=_BUILD_BUCKETS,
            registry=self.registry)

    def service_replicas(self, namespace: str, name: str, desired: int | None, ready: int) -> None:
        if desired is not None:
            self.desired_replicas.labels(namespace, name).set(desired)
        self.ready_replicas.labels(namespace, name).set(ready)

    def forget_service(self, namespace: str, name: str) -> None:
        """The service is gone, or this replica stopped reconciling it: its series go too."""
        for gauge in (self.desired_replicas, self.ready_replicas):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def watch_engine(self, namespace: str, gpu_product: str) -> None:
        """Export the Engine's build counters at 0 from the start, so the first failure shows in increase()."""
        for result in BUILD_RESULTS:
            self.engine_builds.labels(namespace, gpu_product, result)

    def engine_build(self, namespace: str, gpu_product: str, result: str, seconds: float | None) -> None:
        self.engine_builds.labels(namespace, gpu_product, result).inc()
        if result == "built" and seconds is not None:
            self.engine_build_duration.labels(gpu_product).observe(seconds)
