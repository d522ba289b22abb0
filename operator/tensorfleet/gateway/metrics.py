"""The gateway's Prometheus metrics (admin port /metrics). Names the autoscaler reads are in telemetry.py.

/metrics serves this registry and prometheus_client's default one, where the metering sink (metering/metrics.py:
GPU-ms and RU per tenant, the export spool, ledger verification) and the process collector live.

Cardinality stays bounded: labels are the served model, the billing tier, the endpoint, a status class
and a tenant label capped at ``max_tenant_labels`` distinct values (the rest count as ``_other``,
telemetry.OTHER_TENANT, which no tenant name can be).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tensorfleet import telemetry
from tensorfleet.metering import metrics as _metering  # its families, in the default registry, are served

WARMUP_STATES = ["waiting_for_engine", "warming_up", "ready", "failed", "draining"]
COLD_START_STAGES = ("engine_healthy", "warmed_up", "ready")  # warmup.WarmupGate reports these, once per start
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_COLD_START_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600)


class _GPUUtilization(Collector):
    """tensorfleet_gpu_utilization_ratio from the metering sink's latest NVML reading; absent without a GPU."""

    def __init__(self, read: Callable[[], float | None]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            value = self.read()
        except Exception:  # a broken sampler must not break /metrics
            value = None
        if value is not None:
            yield GaugeMetricFamily(telemetry.GPU_UTILIZATION, "GPU utilization 0..1 of the engine's GPUs (NVML).",
                                    value=float(value))


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_tenant_labels: int = 100) -> None:
        self.registry = registry or CollectorRegistry()
        self.tenant_label = _metering.TenantLabels(max_tenant_labels)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.queue_depth = Gauge(telemetry.QUEUE_DEPTH, "Requests waiting in the gateway for admission.", registry=r)
        self.engine_waiting = Gauge(telemetry.ENGINE_WAITING, "Requests waiting in the engine (its own count).",
                                    registry=r)
        self.in_flight = Gauge(telemetry.IN_FLIGHT, "Requests admitted to the engine and not finished.", registry=r)
        self.kv_cache = Gauge(telemetry.KV_CACHE_USAGE, "Engine KV-cache usage 0..1.", registry=r)
        self.ready = Gauge(telemetry.READY, "1 when the pod is warm and serving.", registry=r)
        self.startup_seconds = Gauge(telemetry.STARTUP_SECONDS, "This pod's cold start, container start to ready.",
                                     registry=r)
        self.start_began = Gauge("tensorfleet_gateway_engine_start_timestamp_seconds",
                                 "Wall-clock time the engine start in progress began (the container's start, or the "
                                 "previous engine process seen gone); 0 once it is warm and ready.", registry=r)
        self.warmup_state = Enum("tensorfleet_gateway_warmup_state", "Where the gateway is in its start-up.",
                                 states=WARMUP_STATES, registry=r)
        self.cold_start = Histogram("tensorfleet_gateway_cold_start_seconds",
                                    "Cold start stages (engine_healthy, warmed_up, ready) in seconds.", ["stage"],
                                    buckets=_COLD_START_BUCKETS, registry=r)
        for stage in COLD_START_STAGES:  # at 0 from the start: increase() over _count{stage="ready"} counts starts
            self.cold_start.labels(stage)
        self.tokens = Counter("tensorfleet_gateway_tokens_total", "Tokens served, by model, tier and kind.",
                              ["model", "tier", "kind"], registry=r)
        self.tenant_tokens = Counter("tensorfleet_gateway_tenant_tokens_total",
                                     f"Tokens by tenant ({_metering.CAPPED_TENANTS}) and kind.", ["tenant", "kind"],
                                     registry=r)
        self.requests = Counter("tensorfleet_gateway_requests_total", "Requests by model, endpoint and status class.",
                                ["model", "endpoint", "code"], registry=r)
        self.ttft = Histogram("tensorfleet_gateway_time_to_first_token_seconds",
                              "Time from receipt to the first generated token forwarded.", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("tensorfleet_gateway_request_duration_seconds", "Time from receipt to the end.",
                                 ["model", "endpoint", "streaming"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rate_limited = Counter("tensorfleet_gateway_rate_limited_total",
                                    f"Requests refused with 429, by tenant ({_metering.CAPPED_TENANTS}).",
                                    ["tenant"], registry=r)
        self.cache_lookups = Counter("tensorfleet_gateway_response_cache_total", "Response cache lookups by result.",
                                     ["result"], registry=r)
        self.cache_entries = Gauge("tensorfleet_gateway_response_cache_entries", "Responses in the cache.", registry=r)
        self.tokenize_seconds = Histogram("tensorfleet_gateway_tokenize_seconds",
                                          "Time spent counting input tokens with the engine's tokenizer.",
                                          buckets=_TTFT_BUCKETS, registry=r)
        self.runaway_stops = Counter("tensorfleet_gateway_runaway_stops_total",
                                     "Generations stopped by runaway-output control, by model and signal "
                                     "(repetition, punctuation).", ["model", "signal"], registry=r)
        self.context_truncations = Counter("tensorfleet_gateway_context_truncations_total",
                                           "Chat requests whose oldest turns were dropped to fit the context.",
                                           ["model"], registry=r)
        self.context_truncated_tokens = Counter("tensorfleet_gateway_context_truncated_tokens_total",
                                                "Prompt tokens dropped by truncate-oldest.", ["model"], registry=r)
        self.context_rejections = Counter("tensorfleet_gateway_context_rejections_total",
                                          "Chat requests refused because the prompt does not fit (400).",
                                          ["model"], registry=r)
        self.client_disconnects = Counter("tensorfleet_gateway_client_disconnects_total",
                                          "Requests the client abandoned (the engine request was aborted).",
                                          registry=r)
        self.config_reloads = Counter("tensorfleet_gateway_config_reloads_total", "Configuration reloads by result.",
                                      ["result"], registry=r)
        self.dropped_events = Counter("tensorfleet_gateway_metering_submit_errors_total",
                                      "Metering events the sink refused (it must not; counted, never raised).",
                                      registry=r)

    def exposition(self) -> bytes:
        """What /metrics serves: the gateway's own metrics, then metering's and the process's (default registry)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client's lookup costs microseconds per call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch_gpu(self, read: Callable[[], float | None]) -> None:
        self.registry.register(_GPUUtilization(read))
