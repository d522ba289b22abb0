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

# Operator setting (environment variable) -> (issue, meaning). Values come from the chart.
PENDING_SETTINGS: dict[str, tuple[int, str]] = {
    "TENSORFLEET_ENGINE_JOB_IMAGE": (3, "image of the `tensorfleet engine ensure` Jobs"),
    "TENSORFLEET_ENGINE_BUILDER_IMAGE": (3, "trtllm-build image; empty derives it from spec.engine.trtllmVersion"),
    "TENSORFLEET_ENGINE_STORE_TYPE": (3, "none, pvc or s3: the cluster-wide engine store"),
    "TENSORFLEET_ENGINE_STORE_PVC_CLAIM": (3, "claim of the pvc store"),
    "TENSORFLEET_ENGINE_STORE_PVC_PATH": (3, "path inside that claim"),
    "TENSORFLEET_ENGINE_STORE_S3_BUCKET": (3, "bucket of the s3 store"),
    "TENSORFLEET_ENGINE_STORE_S3_PREFIX": (3, "key prefix in that bucket"),
    "TENSORFLEET_ENGINE_STORE_S3_ENDPOINT": (3, "S3-compatible endpoint URL"),
    "TENSORFLEET_ENGINE_STORE_S3_REGION": (3, "region of the bucket"),
    "TENSORFLEET_ENGINE_STORE_S3_CREDENTIALS_SECRET": (3, "Secret name referenced from engine pods"),
    "TENSORFLEET_AUTOSCALING_SCRAPE_INTERVAL_SECONDS": (6, "scrape interval of the gateways' metrics"),
    "TENSORFLEET_AUTOSCALING_HPA": (6, "true: HorizontalPodAutoscalers may be created"),
    "TENSORFLEET_AUTOSCALING_KEDA": (6, "true: KEDA ScaledObjects may be created"),
}


def exported_metrics() -> set[str]:
    """Every series name the code exports today: the operator's registry and the gateway's names."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {family.name + suffix for family in OperatorMetrics().registry.collect()
             for suffix in suffixes[family.type]}
    names.update(value for name, value in inspect.getmembers(telemetry)
                 if name.isupper() and isinstance(value, str) and value.startswith("tensorfleet_"))
    return names
