"""What the renderers need besides the InferenceService: images, ports and cluster conventions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tensorfleet import __version__

GATEWAY_PORT = 8000  # client traffic: the gateway is the only door to the engine
ADMIN_PORT = 9090  # gateway /metrics, /readyz, /livez (not exposed by the Service)
ENGINE_PORT = 8081  # engine HTTP on 127.0.0.1 inside the pod
ENGINE_METRICS_PORT = ENGINE_PORT + 2  # Triton's Prometheus port (vLLM serves /metrics on ENGINE_PORT)
SERVICE_PORT = 80

CONFIG_DIR = "/etc/tensorfleet"
GATEWAY_CONFIG_FILE = "gateway.json"  # the policy: reloaded while the gateway runs
GATEWAY_REVISION_FILE = "gateway-revision.json"  # this pod revision's engine facts: read once, at start
USAGE_DIR = "/var/lib/tensorfleet"
API_KEYS_DIR = "/var/run/secrets/tensorfleet/api-keys"  # the auth Secret: tenant -> sha256 of its API key
SHARED_RUN_DIR = "/run/tensorfleet"  # engine and gateway exchange facts (visible GPUs) here
MODEL_CACHE_DIR = "/models"
ENGINE_DIR = "/engines"
PVC_MODEL_DIR = "/mnt/model"


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """Cluster-wide rendering choices, taken from the operator's settings."""

    gateway_image: str = f"ghcr.io/tensorfleet/tensorfleet:{__version__}"
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    triton_image_template: str = "nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3"
    cluster_domain: str = "cluster.local"
    image_pull_policy: str = "IfNotPresent"
    # Metering (render/metering.py): where gateways export usage, the per-namespace Secret with the
    # signing key ("" mounts none), and resource-unit overrides {product: {precision: RU per GPU-ms}}.
    metering_sink_url: str | None = None
    metering_secret: str = "tensorfleet-metering"
    resource_units: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Engines (tensorfleet.engines): the default store and the init containers' limits.
    engine_store: str = ""  # pvc://CLAIM/PATH or s3://BUCKET/PREFIX; empty: every Engine needs spec.storeRef
    engine_store_endpoint: str = ""
    engine_store_region: str = ""
    engine_store_secret: str = ""
    engine_fetch_timeout_seconds: int = 1800
    model_fetch_timeout_seconds: int = 3600
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # KEDA's Prometheus triggers query it
    # Autoscaling modes the operator does not allow (its autoscale_hpa/autoscale_keda settings): a service
    # asking for one is refused with a field error instead of rendering an object the operator may not write.
    disabled_autoscaling_modes: tuple[str, ...] = ()
