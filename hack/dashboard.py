"""tensorfleet's Grafana dashboard, as data: `make generate` writes it to the chart (CI checks drift).

Panels name metrics from ``tensorfleet.metrics`` (the operator), ``tensorfleet.telemetry`` (the
gateway) and the metric contract for parts still being built (docs/notes/issue-7.md);
tests/e2e/test_chart.py parses every query and checks every metric name against those.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Series from serving pods carry namespace and inferenceservice labels (the chart's PodMonitor adds
# inferenceservice from the pod label); these matchers follow the dashboard's variables.
SVC = 'namespace=~"$namespace", inferenceservice=~"$inferenceservice"'
BY_SVC = "namespace, inferenceservice"
RATE = "$__rate_interval"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or stat, bargauge
    stack: bool = False


def _rows() -> list[tuple[str, list[Panel]]]:
    return [
        ("Tenants", [
            Panel("Tokens/s by tenant", "Prompt and generated tokens the gateways forwarded, per tenant.", (
                Query(f"sum by (tenant) (rate(tensorfleet_gateway_prompt_tokens_total{{{SVC}}}[{RATE}]))",
                      "{{tenant}} prompt"),
                Query(f"sum by (tenant) (rate(tensorfleet_gateway_completion_tokens_total{{{SVC}}}[{RATE}]))",
                      "{{tenant}} generated"),
            ), unit="short", stack=True),
            Panel("GPU-ms/s by tenant", "GPU busy time attributed to each tenant (1000 = one GPU fully busy).", (
                Query(f"sum by (tenant) (rate(tensorfleet_metering_gpu_milliseconds_total{{{SVC}}}[{RATE}]))",
                      "{{tenant}}"),
            ), stack=True),
            Panel("Resource units by tenant", "Resource units billed in the time range, per tenant and tier.", (
                Query(f"sum by (tenant, tier) (increase(tensorfleet_metering_resource_units_total{{{SVC}}}[$__range]))",
                      "{{tenant}} ({{tier}})"),
            ), kind="bargauge"),
            Panel("Requests/s by tenant and status", "Requests answered by the gateways.", (
                Query(f"sum by (tenant, code) (rate(tensorfleet_gateway_requests_total{{{SVC}}}[{RATE}]))",
                      "{{tenant}} {{code}}"),
            ), unit="reqps"),
        ]),
        ("Capacity", [
            Panel("Queue depth", "Requests waiting in the gateways for admission, and in the engines.", (
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_queue_depth{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} gateway"),
                Query(f"sum by ({BY_SVC}) (tensorfleet_engine_waiting_requests{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} engine"),
            )),
            Panel("Replicas: ready and desired", "Warm, serving pods against the autoscaler's decision.", (
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_ready{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} ready"),
                Query(f"max by ({BY_SVC}) (tensorfleet_autoscaler_desired_replicas{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} desired"),
            )),
            Panel("GPU utilization", "NVML utilization of the GPUs of each service, by GPU product.", (
                Query(f"avg by ({BY_SVC}, gpu_product) (tensorfleet_gpu_utilization_ratio{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} {{gpu_product}}"),
            ), unit="percentunit"),
            Panel("KV-cache usage and in-flight requests", "Engine KV-cache usage (left) and admitted requests.", (
                Query(f"max by ({BY_SVC}) (tensorfleet_engine_kv_cache_usage_ratio{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} kv-cache"),
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_in_flight_requests{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} in flight"),
            )),
        ]),
        ("Cold starts and engines", [
            Panel("Cold starts in the last hour", "Serving pods started (and still running) within the hour.", (
                Query(f"count by ({BY_SVC}) (tensorfleet_gateway_startup_seconds{{{SVC}}} "
                      f"unless tensorfleet_gateway_startup_seconds{{{SVC}}} offset 1h)",
                      "{{namespace}}/{{inferenceservice}}"),
            )),
            Panel("Cold start duration", "Container start to warm and ready, per pod (never billed).", (
                Query(f"max by ({BY_SVC}, pod) (tensorfleet_gateway_startup_seconds{{{SVC}}})",
                      "{{inferenceservice}} {{pod}}"),
            ), unit="s"),
            Panel("Engine builds", "TensorRT-LLM engine builds finished, by GPU product and result.", (
                Query(f"sum by (gpu_product, result) (increase(tensorfleet_engine_builds_total[{RATE}]))",
                      "{{gpu_product}} {{result}}"),
            ), stack=True),
            Panel("Engine build duration (p90)", "90th percentile of engine build time, by GPU product.", (
                Query("histogram_quantile(0.9, sum by (gpu_product, le) "
                      f"(rate(tensorfleet_engine_build_duration_seconds_bucket[{RATE}])))", "{{gpu_product}}"),
            ), unit="s"),
        ]),
        ("Operator and billing pipeline", [
            Panel("Reconciles/s", "Reconciles of InferenceServices by result.", (
                Query(f"sum by (result) (rate(tensorfleet_reconcile_total[{RATE}]))", "{{result}}"),
                Query(f"sum by (reason) (rate(tensorfleet_reconcile_errors_total[{RATE}]))", "error {{reason}}"),
            )),
            Panel("Reconcile duration (p99)", "99th percentile of one reconcile, API writes included.", (
                Query("histogram_quantile(0.99, sum by (le) "
                      f"(rate(tensorfleet_reconcile_duration_seconds_bucket[{RATE}])))", "p99"),
            ), unit="s"),
            Panel("API writes/s", "Writes to the API server by kind and reason (zero when converged).", (
                Query(f"sum by (kind, why) (rate(tensorfleet_api_writes_total[{RATE}]))", "{{kind}} {{why}}"),
            ), stack=True),
            Panel("Usage export backlog", "Usage events waiting for the billing sink.", (
                Query("sum(tensorfleet_metering_export_backlog_events)", "backlog"),
            ), kind="stat"),
            Panel("Ledger verification failures (24h)", "Usage ledger records whose hash chain or signature failed.", (
                Query("sum(increase(tensorfleet_metering_ledger_verification_failures_total[24h]))", "failures"),
            ), kind="stat"),
        ]),
    ]


def _target(query: Query, ref: int) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": query.expr,
            "legendFormat": query.legend, "refId": chr(ord("A") + ref)}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    custom: dict[str, Any] = {}
    if panel.kind == "timeseries":
        custom = {"fillOpacity": 10, "stacking": {"mode": "normal" if panel.stack else "none"}}
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 6 if panel.kind == "stat" else 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}} if panel.kind == "timeseries" else {},
        "targets": [_target(q, i) for i, q in enumerate(panel.queries)],
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row_title, row_panels in _rows():
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row_panels:
            built = _panel(panel, next_id, x, y)
            width = built["gridPos"]["w"]
            if x + width > 24:
                x, y = 0, y + 8
                built["gridPos"].update(x=x, y=y)
            panels.append(built)
            next_id, x = next_id + 1, x + width
        y += 8
    return {
        "uid": "tensorfleet-overview",
        "title": "tensorfleet: GPU inference",
        "description": "Tokens, GPU time and resource units per tenant; queue depth, replicas, cold starts, "
                       "engine builds and the operator. Generated by hack/dashboard.py.",
        "tags": ["tensorfleet", "llm", "gpu"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("namespace", "Namespace", "label_values(tensorfleet_gateway_ready, namespace)"),
            _variable("inferenceservice", "InferenceService",
                      'label_values(tensorfleet_gateway_ready{namespace=~"$namespace"}, inferenceservice)'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"
