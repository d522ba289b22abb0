"""Test double for a gateway's admin endpoint: the real metric names, real Prometheus exposition, a real socket.

``LoopbackGatewayMetrics`` serves ``/metrics`` on 127.0.0.1 with ``prometheus_client``, exporting exactly
the names in ``tensorfleet.telemetry`` that the gateway (issue 4) exports, with values the test sets.
The operator scrapes it as it scrapes a gateway: by the pod's IP and the port its gateway container
declares as ``admin``. To run these tests against the real gateway instead, start gateways with a
stub engine and hand their admin ports to ``serving_pod``; nothing else changes.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tensorfleet import telemetry

_GAUGES = {
    "queue_depth": (telemetry.QUEUE_DEPTH, "requests waiting in the gateway for admission"),
    "engine_waiting": (telemetry.ENGINE_WAITING, "the engine's own waiting requests"),
    "in_flight": (telemetry.IN_FLIGHT, "requests admitted and not finished"),
    "gpu_utilization": (telemetry.GPU_UTILIZATION, "GPU utilization 0..1"),
    "kv_cache_usage": (telemetry.KV_CACHE_USAGE, "KV-cache usage 0..1"),
    "ready": (telemetry.READY, "1 when warm and serving"),
    "startup_seconds": (telemetry.STARTUP_SECONDS, "cold start of this pod"),
}


class LoopbackGatewayMetrics:
    """A gateway's /metrics on an ephemeral loopback port. Not a gateway: it only reports what it is told."""

    def __init__(self, **values: float) -> None:
        self.registry = CollectorRegistry()
        self._gauges = {key: Gauge(name, doc, registry=self.registry) for key, (name, doc) in _GAUGES.items()}
        self.set(ready=1, startup_seconds=2, **values)
        self._server, self._thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port = int(self._server.server_port)

    def set(self, **values: float) -> None:
        for key, value in values.items():
            self._gauges[key].set(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serving_pod(name: str, service: str, admin_port: int, namespace: str = "default") -> dict[str, Any]:
    """A serving pod of ``service`` as its Deployment would create it (labels, gateway admin port)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {
            "app.kubernetes.io/managed-by": "tensorfleet", "app.kubernetes.io/component": "inference",
            "tensorfleet.io/inferenceservice": service}},
        "spec": {"containers": [
            {"name": "engine", "image": "vllm/vllm-openai:v0.11.0"},
            {"name": "gateway", "image": "ghcr.io/tensorfleet/tensorfleet:test",
             "ports": [{"name": "http", "containerPort": 8000}, {"name": "admin", "containerPort": admin_port}]},
        ]},
    }


def ready_status(ip: str = "127.0.0.1") -> dict[str, Any]:
    return {"phase": "Running", "podIP": ip, "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}
