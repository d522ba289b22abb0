"""The operator's settings: one object, every field a flag and a TENSORFLEET_* environment variable."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from tensorfleet import __version__, config
from tensorfleet.config import MAX_PORT, MAX_WAIT_SECONDS, setting  # the chart's values.schema.json agrees
from tensorfleet.metering import units
from tensorfleet.render.context import RenderContext

ClusterMode = Literal["auto", "kubeconfig", "incluster", "emulator"]
MAX_ENGINE_RETRY_SECONDS = 7 * 86400


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    ENV_PREFIX: ClassVar[str] = "TENSORFLEET_"

    cluster: ClusterMode = setting(
        "auto", "Where the API server is: incluster only the pod's service account, kubeconfig only a kubeconfig; "
        "auto the service account in a pod, else a kubeconfig, and when none is named and ~/.kube/config does "
        "not exist the quickstart against an embedded Kubernetes API emulator (emulator: always that).")
    kubeconfig: str | None = setting(None, "Path to a kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
    context: str | None = setting(None, "kubeconfig context to use.")
    server: str | None = setting(None, "API server URL to use without credentials (an emulator in tests).")
    namespaces: tuple[str, ...] = setting((), "Namespaces to watch, comma-separated; empty watches all.")
    peering: str = setting("tensorfleet", "kopf peering object shared by the operator replicas.")
    priority: int | None = setting(
        None, "Peering priority. Unset: a random one per process, so of two replicas exactly one acts.")
    standalone: bool = setting(False, "Do not peer with other replicas (development and the quickstart).")
    resync_seconds: float = setting(60.0, "Reconcile every service at least this often, even with no events.")
    debounce_seconds: float = setting(0.2, "Coalesce bursts of events for one service over this long.")
    liveness_port: int = setting(8080, "Port of the liveness endpoint (/healthz); 0 disables it.")
    metrics_port: int = setting(9090, "Port of the Prometheus metrics endpoint (/metrics); 0 disables it.")
    log_format: Literal["json", "plain", "full"] = setting("json", "Log format.")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "Log level.")
    gateway_image: str = setting(f"ghcr.io/tensorfleet/tensorfleet:{__version__}",
                                 "Image of the gateway sidecar (normally the operator's own image).")
    vllm_image: str = setting("vllm/vllm-openai:v0.11.0", "Default vLLM image.")
    triton_image: str = setting("nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3",
                                "Default Triton (TensorRT-LLM backend) image.")
    cluster_domain: str = setting("cluster.local", "Cluster DNS domain used in service URLs.")
    engine_store: str = setting(
        "", "Default engine store for Engines without spec.storeRef: pvc://CLAIM/PATH or s3://BUCKET/PREFIX.")
    engine_store_endpoint: str | None = setting(None, "S3-compatible endpoint of the default engine store.")
    engine_store_region: str | None = setting(None, "S3 region of the default engine store.")
    engine_store_secret: str | None = setting(
        None, "Secret (in each Engine's namespace) with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the default store.")
    engine_builder_image: str = setting(
        "ghcr.io/tensorfleet/engine-builder:{trtllm_version}",
        "Builder image template for Engines without spec.builderImage ({trtllm_version} is substituted).")
    engine_build_retries: int = setting(2, "Pod retries of one build Job (its backoffLimit).")
    engine_build_cpu: str = setting("4", "CPU request of a build Job's pod (a Kubernetes quantity).")
    engine_build_memory: str = setting(
        "32Gi", "Memory request of a build Job's pod (converting a checkpoint holds the model in host memory).")
    engine_build_ephemeral_storage: str = setting(
        "100Gi", "Ephemeral-storage request of a build Job's pod (its work volume: checkpoint, engine).")
    engine_retry_base_seconds: float = setting(300.0, "Wait before re-running a failed build Job; doubles per attempt.")
    engine_retry_max_seconds: float = setting(3600.0, "Longest wait between build Jobs of a failing Engine.")
    engine_fetch_timeout_seconds: int = setting(1800, "How long serving pods retry fetching their engine.")
    model_fetch_timeout_seconds: int = setting(3600, "How long vLLM pods retry downloading pinned weights.")
    autoscale_interval_seconds: float = setting(
        2.0, "autoscaling.mode tensorfleet: how often each service's gateways are scraped and replicas decided.")
    autoscale_scrape_timeout_seconds: float = setting(
        1.0, "autoscaling.mode tensorfleet: how long one gateway /metrics scrape may take.")
    autoscale_hpa: bool = setting(
        True, "Allow autoscaling.mode hpa: the operator indexes, creates and prunes HorizontalPodAutoscalers. "
        "Off: it never watches them, and services asking for hpa report InvalidSpec.")
    autoscale_keda: bool = setting(
        True, "Allow autoscaling.mode keda: the operator indexes, creates and prunes KEDA ScaledObjects. "
        "Off: it never reads the KEDA API (even where KEDA is installed), and services asking for keda report "
        "InvalidSpec.")
    prometheus_url: str = setting(
        "http://prometheus-operated.monitoring.svc:9090",
        "autoscaling.mode keda: the Prometheus that KEDA's triggers query for the gateway metrics.")
    example: str | None = setting(None, "Quickstart only: the manifest applied to the embedded emulator (unset: "
                                        "examples/inferenceservice.yaml, shipped in the package).")
    demo_timeout_seconds: float = setting(60.0, "Quickstart only: how long to wait for convergence.")
    metering_sink_url: str | None = setting(
        None, "CloudEvents endpoint every gateway exports usage records to (e.g. OpenMeter's /api/v1/events).")
    metering_secret: str = setting(
        "tensorfleet-metering", "Secret, in each service's namespace, with the Ed25519 `signing-key` and optional "
        "`sink-token` that gateways mount (optional; empty mounts none). The operator never reads it.")
    metering_ru_table_file: str | None = setting(
        None, "YAML/JSON resource-unit overrides {product: {precision: RU per GPU-ms}} (the chart's "
        "metering.resourceUnits), passed to every gateway in its configuration.")

    def validate(self) -> list[str]:
        """Problems, each naming the variable and its limit; ``tensorfleet run`` refuses to start on any. The
        chart's values.schema.json is as strict or stricter (its ports cannot be 0, which turns an endpoint off);
        what it cannot compare, one port for metrics and liveness, its Deployment template refuses."""
        check = config.Checks(self)
        wait_limit = f"positive, at most {MAX_WAIT_SECONDS}"
        check("resync_seconds", 0 < self.resync_seconds <= MAX_WAIT_SECONDS, wait_limit)
        check("debounce_seconds", 0 <= self.debounce_seconds <= 60, "between 0 and 60")
        for port in ("liveness_port", "metrics_port"):
            check(port, 0 <= getattr(self, port) <= MAX_PORT, f"between 0 (off) and {MAX_PORT}")
        check("metrics_port", not self.metrics_port or self.metrics_port != self.liveness_port,
              f"different from TENSORFLEET_LIVENESS_PORT={self.liveness_port}: two endpoints cannot share a port")
        check("engine_build_retries", 0 <= self.engine_build_retries <= 20, "between 0 and 20")
        for request in ("engine_build_cpu", "engine_build_memory", "engine_build_ephemeral_storage"):
            check(request, config.positive_quantity(getattr(self, request)),
                  "a positive Kubernetes quantity such as 4, 500m, 32Gi")
        check("engine_retry_base_seconds", 0 < self.engine_retry_base_seconds <= MAX_WAIT_SECONDS, wait_limit)
        check("engine_retry_max_seconds", 0 < self.engine_retry_max_seconds <= MAX_ENGINE_RETRY_SECONDS,
              f"positive, at most {MAX_ENGINE_RETRY_SECONDS}")
        for timeout in ("engine_fetch_timeout_seconds", "model_fetch_timeout_seconds", "demo_timeout_seconds"):
            check(timeout, 0 < getattr(self, timeout) <= MAX_WAIT_SECONDS, wait_limit)
        check("autoscale_interval_seconds", 0 < self.autoscale_interval_seconds <= 300, "positive, at most 300")
        check("autoscale_scrape_timeout_seconds", 0 < self.autoscale_scrape_timeout_seconds <= 60,
              "positive, at most 60")
        return check.problems

    def render_context(self) -> RenderContext:
        """The renderers' context; ValueError names the setting and the field of a bad resource-unit file."""
        return RenderContext(
            metering_sink_url=self.metering_sink_url,
            metering_secret=self.metering_secret,
            resource_units=self._resource_units(),
            gateway_image=self.gateway_image,
            vllm_image=self.vllm_image,
            triton_image_template=self.triton_image,
            cluster_domain=self.cluster_domain,
            engine_store=self.engine_store,
            engine_store_endpoint=self.engine_store_endpoint or "",
            engine_store_region=self.engine_store_region or "",
            engine_store_secret=self.engine_store_secret or "",
            engine_fetch_timeout_seconds=self.engine_fetch_timeout_seconds,
            model_fetch_timeout_seconds=self.model_fetch_timeout_seconds,
            prometheus_url=self.prometheus_url,
            disabled_autoscaling_modes=self.disabled_autoscaling_modes,
        )

    def _resource_units(self) -> dict[str, Any]:
        """The overrides of ``metering_ru_table_file``, validated before any gateway sees them."""
        if not self.metering_ru_table_file:
            return {}
        try:
            data = units.read_override_file(self.metering_ru_table_file)
            units.parse_overrides(data, self.metering_ru_table_file)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{config.env_name(OperatorSettings, 'metering_ru_table_file')}: {exc}") from None
        return dict(data or {})

    @property
    def disabled_autoscaling_modes(self) -> tuple[str, ...]:
        """The autoscaling modes this installation does not allow (``autoscale_hpa``, ``autoscale_keda``)."""
        return tuple(mode for mode, allowed in (("hpa", self.autoscale_hpa), ("keda", self.autoscale_keda))
                     if not allowed)


def from_memo(memo: Any) -> OperatorSettings:
    """The settings ``runner.run_operator`` put in kopf's memo; from the environment when run otherwise
    (``kopf run``, or a test's ``KopfRunner`` without a memo)."""
    found = memo.get("settings") if hasattr(memo, "get") else None
    return found if isinstance(found, OperatorSettings) else config.from_env(OperatorSettings)
