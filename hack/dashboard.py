"""tensorfleet's Grafana dashboard, as data: `make generate` writes it to the chart (CI checks drift).

Every query reads a metric the code exports: the operator's (``tensorfleet.metrics``, through the chart's
ServiceMonitor) and the gateways' (``tensorfleet.gateway.metrics``, with metering's ``tensorfleet.metering.metrics``
and the process collector on the same /metrics, through the PodMonitor). tests/e2e/test_chart.py parses every
query and checks each metric name and label against those registries.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tensorfleet import telemetry

# Gateway series get namespace and pod from the PodMonitor's target, inferenceservice from the pod's labels and
# gpu_product from its node's; the operator's per-service series carry namespace and inferenceservice themselves.
SVC = 'namespace=~"$namespace", inferenceservice=~"$inferenceservice"'
NS = 'namespace=~"$namespace"'
BY_SVC = "namespace, inferenceservice"
RATE = "$__rate_interval"
CAPPED = (f" Tenants past the label cap (max-tenant-labels, default 100) are summed as {telemetry.OTHER_TENANT}, "
          "which no tenant name can be.")


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
            Panel("Tokens/s by tenant", "Prompt (input) and generated (output) tokens the gateways served, per tenant."
                  + CAPPED,
                  (Query(f"sum by (tenant, kind) (rate(tensorfleet_gateway_tenant_tokens_total{{{SVC}}}[{RATE}]))",
                         "{{tenant}} {{kind}}"),), unit="short", stack=True),
            Panel("GPU-ms/s by tenant", "GPU busy time billed to each tenant's requests (1000 = one GPU fully busy)."
                  + CAPPED, (
                Query(f"sum by (tenant) (rate(tensorfleet_metering_tenant_gpu_milliseconds_total{{{SVC}}}[{RATE}]))",
                      "{{tenant}}"),
            ), stack=True),
            Panel("Resource units by tenant", "Resource units billed in the time range, per tenant and tier "
                  "(the signed ledger and its export are the bill; this is its live view)." + CAPPED, (
                Query("sum by (tenant, tier) "
                      f"(increase(tensorfleet_metering_tenant_resource_units_total{{{SVC}}}[$__range]))",
                      "{{tenant}} ({{tier}})"),
            ), kind="bargauge"),
            Panel("Requests/s by model and status", "Requests the gateways answered, by HTTP status class.", (
                Query(f"sum by (model, code) (rate(tensorfleet_gateway_requests_total{{{SVC}}}[{RATE}]))",
                      "{{model}} {{code}}"),
            ), unit="reqps"),
        ]),
        ("Capacity", [
            Panel("Queue depth", "Requests waiting in the gateways for admission, and in the engines.", (
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_queue_depth{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} gateway"),
                Query(f"sum by ({BY_SVC}) (tensorfleet_engine_waiting_requests{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} engine"),
            )),
            Panel("Replicas: ready and desired", "What each service asks for (spec.replicas, as its autoscaler sets "
                  "it), the ready pods of its Deployments, and the warm gateways among them.", (
                Query(f"max by ({BY_SVC}) (tensorfleet_inferenceservice_desired_replicas{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} desired"),
                Query(f"max by ({BY_SVC}) (tensorfleet_inferenceservice_ready_replicas{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} ready"),
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_ready{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} warm"),
            )),
            Panel("GPU utilization", "NVML utilization of the GPUs of each service, by GPU product.", (
                Query(f"avg by ({BY_SVC}, gpu_product) (tensorfleet_gpu_utilization_ratio{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} {{gpu_product}}"),
            ), unit="percentunit"),
            Panel("KV-cache usage and in-flight requests", "Engine KV-cache usage (0..1) and admitted requests.", (
                Query(f"max by ({BY_SVC}) (tensorfleet_engine_kv_cache_usage_ratio{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} kv-cache"),
                Query(f"sum by ({BY_SVC}) (tensorfleet_gateway_in_flight_requests{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} in flight"),
            )),
            Panel("Time to first token (p90)", "90th percentile from receipt to the first generated token.", (
                Query(f"histogram_quantile(0.9, sum by ({BY_SVC}, le) "
                      f"(rate(tensorfleet_gateway_time_to_first_token_seconds_bucket{{{SVC}}}[{RATE}])))",
                      "{{namespace}}/{{inferenceservice}}"),
            ), unit="s"),
        ]),
        ("Token policy", [
            Panel("Runaway stops by model", "Generations the gateways stopped as degenerate loops "
                  "(tokenPolicy.runaway), by model and signal: repetition or punctuation. Billed only for the "
                  "tokens produced; a rising rate after a model change is worth a look, a steady trickle on "
                  "tables or data may be false positives (docs/token-policy.md).", (
                Query(f"sum by (model, signal) (increase(tensorfleet_gateway_runaway_stops_total{{{SVC}}}[{RATE}]))",
                      "{{model}} {{signal}}"),
            ), stack=True),
            Panel("Context truncations and rejections by model", "Chat requests whose oldest turns were dropped to "
                  "fit the context (tokenPolicy.contextStrategy truncate-oldest), and those refused with 400 "
                  "because they do not fit.", (
                Query(f"sum by (model) (increase(tensorfleet_gateway_context_truncations_total{{{SVC}}}[{RATE}]))",
                      "{{model}} truncated"),
                Query(f"sum by (model) (increase(tensorfleet_gateway_context_rejections_total{{{SVC}}}[{RATE}]))",
                      "{{model}} rejected"),
            )),
            Panel("Prompt tokens dropped by truncation", "Prompt tokens truncate-oldest removed, by model.", (
                Query("sum by (model) "
                      f"(increase(tensorfleet_gateway_context_truncated_tokens_total{{{SVC}}}[{RATE}]))", "{{model}}"),
            )),
        ]),
        ("Cold starts and engines", [
            Panel("Cold starts in the last hour", "Serving pods (or restarted gateway containers) that became warm "
                  "and ready within the hour.", (
                Query(f"sum by ({BY_SVC}) "
                      f"(increase(tensorfleet_gateway_cold_start_seconds_count{{{SVC}, stage=\"ready\"}}[1h]))",
                      "{{namespace}}/{{inferenceservice}}"),
            )),
            Panel("Cold start duration", "Container start to warm and ready, per pod (never billed).", (
                Query(f"max by ({BY_SVC}, pod) (tensorfleet_gateway_startup_seconds{{{SVC}}} > 0)",
                      "{{inferenceservice}} {{pod}}"),
            ), unit="s"),
            Panel("Engine builds", "Engine Jobs finished, by GPU product and result: built (trtllm-build ran), "
                  "cached (found in the engine store), failed.", (
                Query(f"sum by (gpu_product, result) (increase(tensorfleet_engine_builds_total{{{NS}}}[{RATE}]))",
                      "{{gpu_product}} {{result}}"),
            ), stack=True),
            Panel("Engine build time (p90)", "90th percentile of successful builds in the time range, by product.", (
                Query("histogram_quantile(0.9, sum by (gpu_product, le) "
                      "(increase(tensorfleet_engine_build_duration_seconds_bucket[$__range])))", "{{gpu_product}}"),
            ), unit="s", kind="bargauge"),
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
            Panel("Usage export backlog", "Usage records in the gateways' ledgers the billing sink has not accepted.", (
                Query(f"sum(tensorfleet_metering_spool_records{{{SVC}}})", "records"),
            ), kind="stat"),
            Panel("Since the last usage export", "Time since the oldest of the gateways' last accepted batch.", (
                Query(f"time() - min(tensorfleet_metering_export_last_success_timestamp_seconds{{{SVC}}} > 0)",
                      "since"),
            ), unit="s", kind="stat"),
            Panel("Ledger verification failures (24h)", "Usage ledger records whose hash, signature or chain link "
                  "failed the check before export.", (
                Query(f"sum(increase(tensorfleet_metering_ledger_verification_failures_total{{{SVC}}}[24h]))",
                      "failures"),
            ), kind="stat"),
            Panel("Prompt placements/s by outcome", "How the metering's replay of the engine scheduler agreed with "
                  "each prompt's first token (docs/metering.md): a growing share other than replayed means the "
                  "engine does not schedule as the replay assumes, and per-request shares are less exact.", (
                Query("sum by (outcome) "
                      f"(rate(tensorfleet_metering_prompt_placements_total{{{SVC}}}[{RATE}]))", "{{outcome}}"),
            ), stack=True),
            Panel("Engine step budget (metering)", "Tokens per engine step the metering uses to place prompts, "
                  "configured or learned per gateway (0 until learned); it should match the engine's "
                  "--max-num-batched-tokens.", (
                Query(f"max by ({BY_SVC}) (tensorfleet_metering_step_budget_tokens{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} max"),
                Query(f"min by ({BY_SVC}) (tensorfleet_metering_step_budget_tokens{{{SVC}}})",
                      "{{namespace}}/{{inferenceservice}} min"),
            )),
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
