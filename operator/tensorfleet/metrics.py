"""Prometheus metrics of the operator process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """Reconcile count, duration and errors, API writes by reason, and services under management."""

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
