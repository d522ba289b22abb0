"""Prometheus metrics of metering, in the default registry the gateway serves on /metrics.

No per-request labels; the per-tenant counters cap their tenant label at ``max_tenant_labels`` values (the rest
count as ``_other``, telemetry.OTHER_TENANT), as the gateway's do, so cardinality stays bounded. Suggested alerts
(docs/metering.md):
``tensorfleet_metering_spool_alert == 1`` for 15m, ``increase(tensorfleet_metering_events_dropped_total[5m]) > 0``,
``increase(tensorfleet_metering_events_rejected_total[1h]) > 0``,
``increase(tensorfleet_metering_events_quarantined_total[1h]) > 0``,
``time() - tensorfleet_metering_export_last_success_timestamp_seconds > 3600``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from tensorfleet import telemetry
from tensorfleet.metering import events

RECORDS = Counter("tensorfleet_metering_records", "Usage records appended to the ledger.", ["kind"])
GPU_MS = Counter("tensorfleet_metering_gpu_milliseconds", "Measured busy GPU time by where it went: "
                 "billed (to requests), excluded (warm-up and other non-billable work), unattributed "
                 "(busy while no request had work).", ["disposition"])
EVENTS_DROPPED = Counter("tensorfleet_metering_events_dropped", "Events dropped because the journal queue was full.")
EVENTS_REJECTED = Counter("tensorfleet_metering_events_rejected", "Events refused on entry because a field is out of "
                          "range (by field); never attributed, kept in the journal's quarantine table.", ["field"])
for _field in events.PROBLEM_FIELDS:
    EVENTS_REJECTED.labels(_field)  # exported as 0 from the start, so increase() sees a field's first refusal
EVENTS_QUARANTINED = Counter("tensorfleet_metering_events_quarantined", "Journalled events whose usage record could "
                             "not be made, moved to the journal's quarantine table with their GPU share.")
PENDING = Gauge("tensorfleet_metering_pending_requests", "Requests journalled and waiting for their GPU time.")
SPOOL = Gauge("tensorfleet_metering_spool_records", "Records in the ledger not yet exported.")
SPOOL_CAPACITY = Gauge("tensorfleet_metering_spool_capacity_records", "Records the spool may hold.")
SPOOL_ALERT = Gauge("tensorfleet_metering_spool_alert", "1 when the spool is above its alert threshold.")
SPOOL_FULL = Gauge("tensorfleet_metering_spool_full", "1 when the spool holds its capacity or more.")
EXPORTED = Counter("tensorfleet_metering_exported_records", "Records the sink accepted.")
EXPORT_FAILURES = Counter("tensorfleet_metering_export_failures", "Failed export attempts.")
EXPORT_LAST_SUCCESS = Gauge("tensorfleet_metering_export_last_success_timestamp_seconds",
                            "Wall-clock time of the last accepted batch.")
SAMPLER_UP = Gauge("tensorfleet_metering_sampler_up", "1 while NVML sampling runs; 0 in timing-only mode "
                   "(no GPU, or its GPUs could not be read: the gateway's log says why).")
GPU_MEMORY_USED = Gauge("tensorfleet_metering_gpu_memory_used_bytes", "Memory used on the engine's GPUs (NVML).")
SIGNING_KEY = Gauge("tensorfleet_metering_signing_key_configured",
                    "1 when records are signed with the cluster's key, 0 with a pod-local one.")
CAPPED_TENANTS = f"capped label set: the rest count as {telemetry.OTHER_TENANT}"
TENANT_GPU_MS = Counter("tensorfleet_metering_tenant_gpu_milliseconds",
                        f"GPU time billed to requests, by tenant ({CAPPED_TENANTS}) and billing tier.",
                        ["tenant", "tier"])
TENANT_RESOURCE_UNITS = Counter("tensorfleet_metering_tenant_resource_units",
                                f"Resource units billed to requests, by tenant ({CAPPED_TENANTS}) and billing tier.",
                                ["tenant", "tier"])
LEDGER_VERIFICATION_FAILURES = Counter(
    "tensorfleet_metering_ledger_verification_failures",
    "Ledger records that failed verification before export, by kind: edited (hash), bad-signature, malformed, "
    "broken-link (prevHash or seq).", ["kind"])
for _kind in ("edited", "bad-signature", "malformed", "broken-link"):
    LEDGER_VERIFICATION_FAILURES.labels(_kind)  # exported as 0 from the start, so increase() sees the first one

STEP_BUDGET = Gauge("tensorfleet_metering_step_budget_tokens",
                    "Tokens one engine step may process, as configured or learned (0 until known).")
STEP_IDLE = Gauge("tensorfleet_metering_step_idle_seconds", "GPU idle time between two engine steps, learned.")
PROMPT_PLACEMENTS = Counter("tensorfleet_metering_prompt_placements", "Prompts placed on engine steps, by how the "
                            "replay of the scheduler agreed with the first token: replayed, started-earlier, "
                            "started-later, over-budget, filled-back, not-streamed, unseen.", ["outcome"])

class TenantLabels:
    """The tenant label value: the tenant itself for the first ``limit`` distinct tenants, then
    ``telemetry.OTHER_TENANT`` (which no tenant name can be)."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, tenant: str | None) -> str:
        name = tenant or ""
        if name in self._seen:
            return name
        if len(self._seen) < self.limit:
            self._seen.add(name)
            return name
        return telemetry.OTHER_TENANT
