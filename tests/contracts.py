"""Names the chart, dashboard and alerts use before the code that provides them has landed.

Each entry names the issue whose code must provide it (docs/notes/issue-7.md has the details). The
tests check that everything the chart uses is either provided by the code today or listed here, and
that nothing listed here is provided already: when an issue lands, move its names out of this file.
"""

from __future__ import annotations

import inspect

from tensorfleet import telemetry
from tensorfleet.metrics import OperatorMetrics

# Metric name -> (issue, type and labels). Series about a service carry namespace and inferenceservice.
PENDING_METRICS: dict[str, tuple[int, str]] = {
    "tensorfleet_gateway_prompt_tokens_total": (4, "counter{tenant}: prompt tokens of admitted requests"),
    "tensorfleet_gateway_completion_tokens_total": (4, "counter{tenant}: generated tokens forwarded"),
    "tensorfleet_gateway_requests_total": (4, "counter{tenant, code}: requests answered, by HTTP status"),
    "tensorfleet_metering_gpu_milliseconds_total": (5, "counter{tenant}: GPU busy time attributed to the tenant"),
    "tensorfleet_metering_resource_units_total": (5, "counter{tenant, tier}: resource units billed"),
    "tensorfleet_metering_export_backlog_events": (5, "gauge: usage events not yet accepted by the sink"),
    "tensorfleet_metering_ledger_verification_failures_total": (5, "counter: ledger records failing verification"),
    "tensorfleet_engine_builds_total": (3, "counter{gpu_product, result=succeeded|failed}: finished engine builds"),
    "tensorfleet_engine_build_duration_seconds_bucket": (3, "histogram{gpu_product}: engine build time"),
    "tensorfleet_autoscaler_desired_replicas": (6, "gauge{namespace, inferenceservice}: the autoscaler's decision"),
}

def exported_metrics() -> set[str]:
    """Every series name the code exports today: the operator's registry and the gateway's names."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {family.name + suffix for family in OperatorMetrics().registry.collect()
             for suffix in suffixes[family.type]}
    names.update(value for name, value in inspect.getmembers(telemetry)
                 if name.isupper() and isinstance(value, str) and value.startswith("tensorfleet_"))
    return names
