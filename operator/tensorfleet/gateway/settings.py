"""The gateway's settings: one object, every field a flag and a TENSORFLEET_GATEWAY_* environment variable."""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import ClassVar, Literal

from tensorfleet import telemetry
from tensorfleet.config import MAX_PORT, MAX_WAIT_SECONDS, Checks, http_url, setting

DEFAULT_MAX_BATCH_PROMPTS = 1024  # vLLM's own bound, VLLM_MAX_COMPLETION_PROMPTS, defaults to the same
MAX_TRITON_PORT = MAX_PORT - 2  # Triton's metrics are read from the upstream port + 2
_PORTS = ("port", "admin_port")
_SIZES = ("max_body_bytes", "max_header_bytes", "max_headers", "max_batch_prompts")  # 0 would refuse everything
_OPTIONAL_COUNTS = ("max_in_flight", "max_queue", "max_tenant_labels")  # 0: no limit, no queue, no tenant labels
_PERIODS = ("idle_timeout_seconds", "body_read_timeout_seconds", "upstream_connect_timeout_seconds",
            "upstream_idle_timeout_seconds", "health_interval_seconds", "engine_poll_seconds", "reload_seconds")
_DRAIN_WAITS = ("drain_delay_seconds", "drain_timeout_seconds")  # 0: do not wait

RuntimeName = Literal["vllm", "triton"]


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    ENV_PREFIX: ClassVar[str] = "TENSORFLEET_GATEWAY_"

    config: str = setting("/etc/tensorfleet/gateway.json",
                          "Path of gateway.json (the service's model, warm-up, token policy, auth and billing).")
    revision_config: str | None = setting(
        None, "Path of the revision-bound part of the configuration (service, model, runtime, GPUs, engine, "
        "warm-up), read once at start; when set, it takes precedence over those sections of CONFIG, which then "
        "needs only the policy (token policy, auth, billing, metering).")
    upstream: str = setting("http://127.0.0.1:8081", "Base URL of the engine.")
    runtime: RuntimeName = setting("vllm", "Engine runtime: vllm (OpenAI API) or triton (generate endpoints).")
    host: str = setting("0.0.0.0", "Address to listen on for clients and the admin endpoints.")
    port: int = setting(8000, "Client port (the OpenAI-compatible API).")
    admin_port: int = setting(9090, "Admin port: /metrics, /readyz, /livez.")
    usage_dir: str = setting("/var/lib/tensorfleet", "Where the metering sink keeps its ledger.")
    devices_file: str | None = setting(None, "File naming the GPUs the engine was given (NVIDIA_VISIBLE_DEVICES).")
    gpu_product: str | None = setting(None, "GPU product of this node (nvidia.com/gpu.product).")
    api_keys_dir: str | None = setting(
        None, "Folder of the mounted API-key Secret: one file per tenant holding the sha256 of its key.")
    engine_metrics_url: str | None = setting(
        None, "Engine Prometheus endpoint. Default: UPSTREAM/metrics for vllm, port+2 of UPSTREAM for triton.")
    triton_tokenizer_model: str = setting(
        "preprocessing", "Triton model that tokenizes (TensorRT-LLM's preprocessing model) for input counting.")
    max_body_bytes: int = setting(4 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_header_bytes: int = setting(8190, "Longest request line and header field accepted (400 beyond).")
    max_headers: int = setting(64, "Most header fields in one request.")
    idle_timeout_seconds: float = setting(
        75.0, "Close a client connection that has not sent a complete request header for this long "
        "(a new connection or an idle keep-alive one): bounds both header reads and idle connections.")
    body_read_timeout_seconds: float = setting(30.0, "Most time a client may take to send a request body (408).")
    upstream_connect_timeout_seconds: float = setting(5.0, "Connect timeout to the engine.")
    upstream_idle_timeout_seconds: float = setting(
        600.0, "Most time between two reads from the engine. There is no total timeout: long streams run on.")
    max_batch_prompts: int = setting(
        DEFAULT_MAX_BATCH_PROMPTS, "Most prompts in one completions request (an array of texts or of token-id "
        "arrays); 400 beyond. vLLM's own bound, VLLM_MAX_COMPLETION_PROMPTS, defaults to 1024 too.")
    max_in_flight: int = setting(0, "Requests sent to the engine at once; 0 leaves queueing to the engine.")
    max_queue: int = setting(1024, "Requests waiting in the gateway beyond max_in_flight before 503.")
    drain_delay_seconds: float = setting(
        5.0, "On SIGTERM, keep accepting this long after turning not-ready, while endpoints update.")
    drain_timeout_seconds: float = setting(
        110.0, "On SIGTERM, wait at most this long for in-flight requests (keep below the pod's grace period).")
    health_interval_seconds: float = setting(0.5, "How often the engine's health is polled before it is up.")
    engine_poll_seconds: float = setting(2.0, "How often engine health and metrics are read once up.")
    reload_seconds: float = setting(10.0, "How often the configuration file and the API keys are checked for changes.")
    max_tenant_labels: int = setting(100, "Distinct tenant label values in metrics; others are counted as "
                                          f"'{telemetry.OTHER_TENANT}'.")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "Log level.")
    access_log: bool = setting(False, "Log one line per request.")

    def validate(self) -> list[str]:
        """Problems, each naming the variable and its limit; the command refuses to start on any."""
        check = Checks(self)
        for name in _PORTS:
            check(name, 0 <= getattr(self, name) <= MAX_PORT, f"between 0 and {MAX_PORT}")
        check("admin_port", not self.admin_port or self.admin_port != self.port,
              f"different from TENSORFLEET_GATEWAY_PORT={self.port}: the admin and client servers cannot share a port")
        for name in _SIZES:
            check(name, getattr(self, name) >= 1, "at least 1")
        for name in _OPTIONAL_COUNTS:
            check(name, getattr(self, name) >= 0, "zero or positive")
        for name in _PERIODS:
            check(name, 0 < getattr(self, name) <= MAX_WAIT_SECONDS, f"positive, at most {MAX_WAIT_SECONDS}")
        for name in _DRAIN_WAITS:
            check(name, 0 <= getattr(self, name) <= MAX_WAIT_SECONDS, f"between 0 and {MAX_WAIT_SECONDS}")
        check("engine_metrics_url", self.engine_metrics_url is None or http_url(self.engine_metrics_url),
              "an http:// or https:// URL with a host")
        if not http_url(self.upstream, ("http",)):
            check("upstream", False, "an http://HOST[:PORT] URL (the engine, in the pod)")
        elif self.runtime == "triton" and not self.engine_metrics_url:
            port = urllib.parse.urlsplit(self.upstream).port
            check("upstream", port is not None and port <= MAX_TRITON_PORT,
                  f"http://HOST:PORT with a port of at most {MAX_TRITON_PORT} for triton, whose metrics are read "
                  "from PORT+2 (or set TENSORFLEET_GATEWAY_ENGINE_METRICS_URL)")
        return check.problems

    @property
    def metrics_url(self) -> str:
        """The engine's Prometheus endpoint: for triton, port+2 of the upstream (``validate()`` requires the port;
        without it, 80 as for the engine's connections)."""
        if self.engine_metrics_url:
            return self.engine_metrics_url
        if self.runtime == "vllm":
            return self.upstream.rstrip("/") + "/metrics"
        parts = urllib.parse.urlsplit(self.upstream)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return f"{parts.scheme}://{host}:{(parts.port or 80) + 2}/metrics"
