"""The operator's settings: one object, every field a flag and a TENSORFLEET_* environment variable."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from tensorfleet import __version__
from tensorfleet.config import setting
from tensorfleet.render.context import RenderContext

ClusterMode = Literal["auto", "kubeconfig", "incluster", "emulator"]


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    ENV_PREFIX: ClassVar[str] = "TENSORFLEET_"

    cluster: ClusterMode = setting(
        "auto", "Where the API server is: auto uses the in-cluster account or a kubeconfig when there is one, "
        "and otherwise runs the quickstart against an embedded Kubernetes API emulator.")
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
    autoscale_interval_seconds: float = setting(
        2.0, "autoscaling.mode tensorfleet: how often each service's gateways are scraped and replicas decided.")
    autoscale_scrape_timeout_seconds: float = setting(
        1.0, "autoscaling.mode tensorfleet: how long one gateway /metrics scrape may take.")
    prometheus_url: str = setting(
        "http://prometheus-operated.monitoring.svc:9090",
        "autoscaling.mode keda: the Prometheus that KEDA's triggers query for the gateway metrics.")
    example: str = setting("examples/inferenceservice.yaml",
                           "Quickstart only: the manifest applied to the embedded emulator.")
    demo_timeout_seconds: float = setting(60.0, "Quickstart only: how long to wait for convergence.")

    def render_context(self) -> RenderContext:
        return RenderContext(
            gateway_image=self.gateway_image,
            vllm_image=self.vllm_image,
            triton_image_template=self.triton_image,
            cluster_domain=self.cluster_domain,
            prometheus_url=self.prometheus_url,
        )
