"""Settings of the metering half of the gateway: every field a TENSORFLEET_METERING_* variable.

The operator renders the cluster-level ones into the gateway container (sink URL, the Secret with the
signing key and the sink token); the rest have defaults that suit a production pod.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from tensorfleet import telemetry
from tensorfleet.config import MAX_WAIT_SECONDS, Checks, http_url, setting

MAX_RETENTION_SECONDS = 365 * 86400  # a year in the pod's ledger; the sink is the long-term store
MAX_PREFILL_TOKEN_WEIGHT = 1000.0  # a prompt token's work in generated tokens (an infinite weight makes shares NaN)


@dataclasses.dataclass(frozen=True)
class MeteringSettings:
    ENV_PREFIX: ClassVar[str] = "TENSORFLEET_METERING_"

    sample_period_ms: float = setting(100.0, "NVML sampling period in milliseconds (10 to 10000).")
    signing_key_file: str | None = setting(
        None, "Ed25519 private key (PEM, PKCS#8) that signs records and checkpoints, mounted from a Secret. "
        "Unset: a key kept on the usage volume is generated, and verification cannot tie it to the cluster.")
    sink_url: str | None = setting(None, "HTTP(S) endpoint that takes CloudEvents batches (e.g. OpenMeter's "
                                         "/api/v1/events). Unset: records stay in the pod's ledger only.")
    sink_token_file: str | None = setting(None, "File with a bearer token for the sink, mounted from a Secret.")
    sink_timeout_seconds: float = setting(10.0, "Timeout of one export request.")
    export_batch_size: int = setting(500, "Records per CloudEvents batch (1 to 10000).")
    export_interval_seconds: float = setting(1.0, "How often the exporter looks for new records.")
    retry_initial_seconds: float = setting(1.0, "First retry delay after a failed export; doubles each time.")
    retry_max_seconds: float = setting(300.0, "Longest delay between export retries.")
    spool_max_records: int = setting(
        500_000, "Records not yet exported that the pod may hold (about 1.6 KB each on the usage volume); beyond "
        "it the spool is full (records are still never dropped) and tensorfleet_metering_spool_full is 1.")
    spool_alert_ratio: float = setting(0.5, "Fill ratio of the spool at which tensorfleet_metering_spool_alert is 1.")
    checkpoint_every_records: int = setting(1000, "Sign a checkpoint at least every this many records.")
    checkpoint_interval_seconds: float = setting(30.0, "Sign a checkpoint at least this often when records were added.")
    retention_seconds: float = setting(
        3600.0, "Keep exported records this long in the pod's ledger before pruning them (the sink keeps them); "
        "0 keeps all; at most 31536000 (365 days).")
    flush_interval_ms: float = setting(200.0, "How often events are journalled and settled records appended.")
    settle_after_seconds: float = setting(
        300.0, "Longest request life the attribution waits for before finalising an interval, unless the "
        "gateway reports admissions (then intervals are final as soon as no earlier request is in flight).")
    prefill_token_weight: float = setting(1.0, "Work of one uncached prompt token relative to a generated token.")
    prompt_placement: str = setting(
        "steps", "Where a prompt's work is placed in time: 'steps' (the engine steps that processed it, "
        "reconstructed from the tokens forwarded to all requests) or 'admission' (spread from the end of "
        "the step in progress at admission to the first token).")
    engine_step_tokens: int = setting(
        0, "Tokens one engine step may process (vLLM's --max-num-batched-tokens, TensorRT-LLM's max_num_tokens); "
        "0 learns it from the requests' first tokens. The operator sets it for vLLM services whose "
        "spec.runtime.extraArgs set --max-num-batched-tokens.")
    ru_table_file: str | None = setting(None, "YAML or JSON file of resource-unit factors that override the "
                                              "defaults: {product: {precision: RU per GPU-ms}}.")
    devices_wait_seconds: float = setting(
        60.0, "How long to wait for the engine to record its GPUs before falling back to timing-only metering.")
    max_queued_events: int = setting(100_000, "Events waiting to be journalled; beyond it new ones are dropped "
                                              "and counted in tensorfleet_metering_events_dropped_total.")
    max_tenant_labels: int = setting(100, "Distinct tenant label values of the per-tenant GPU-ms and RU metrics; "
                                          f"later tenants are counted as '{telemetry.OTHER_TENANT}' (the ledger "
                                          "keeps every tenant).")
    ledger_file: str = setting("usage.db", "File name of the ledger in the usage directory.")

    def validate(self) -> list[str]:
        """Problems, each naming the variable and its limit."""
        check = Checks(self)
        check("sample_period_ms", 10 <= self.sample_period_ms <= 10_000, "between 10 and 10000")
        check("export_batch_size", 1 <= self.export_batch_size <= 10_000, "between 1 and 10000")
        wait_limit = f"positive, at most {MAX_WAIT_SECONDS}"
        check("sink_timeout_seconds", 0 < self.sink_timeout_seconds <= MAX_WAIT_SECONDS, wait_limit)
        check("export_interval_seconds", 0 < self.export_interval_seconds <= MAX_WAIT_SECONDS, wait_limit)
        check("retry_initial_seconds", 0 < self.retry_initial_seconds <= MAX_WAIT_SECONDS, wait_limit)
        check("retry_max_seconds", self.retry_initial_seconds <= self.retry_max_seconds <= MAX_WAIT_SECONDS,
              f"at least TENSORFLEET_METERING_RETRY_INITIAL_SECONDS and at most {MAX_WAIT_SECONDS}")
        check("spool_max_records", self.spool_max_records >= 1, "at least 1")
        check("spool_alert_ratio", 0 < self.spool_alert_ratio <= 1, "in (0, 1]")
        check("checkpoint_every_records", self.checkpoint_every_records >= 1, "at least 1")
        check("checkpoint_interval_seconds", 0 < self.checkpoint_interval_seconds <= MAX_WAIT_SECONDS,
              f"positive, at most {MAX_WAIT_SECONDS}")
        check("retention_seconds", 0 <= self.retention_seconds <= MAX_RETENTION_SECONDS,
              f"between 0 (keep all) and {MAX_RETENTION_SECONDS} (365 days)")
        check("flush_interval_ms", 1 <= self.flush_interval_ms <= 60_000, "between 1 and 60000")
        check("settle_after_seconds", 0 <= self.settle_after_seconds <= MAX_WAIT_SECONDS,
              f"between 0 and {MAX_WAIT_SECONDS}")
        check("prefill_token_weight", 0 <= self.prefill_token_weight <= MAX_PREFILL_TOKEN_WEIGHT,
              f"between 0 and {MAX_PREFILL_TOKEN_WEIGHT:g}")
        check("prompt_placement", self.prompt_placement in ("steps", "admission"), "'steps' or 'admission'")
        check("engine_step_tokens", self.engine_step_tokens >= 0, "zero (learn it) or positive")
        check("max_queued_events", self.max_queued_events >= 1, "at least 1")
        check("max_tenant_labels", self.max_tenant_labels >= 0, "zero or positive")
        check("sink_url", self.sink_url is None or http_url(self.sink_url), "an http:// or https:// URL with a host")
        return check.problems
