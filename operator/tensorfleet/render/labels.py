"""Names, labels, selectors and owner references shared by every child object."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from tensorfleet import API_GROUP, API_VERSION

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tensorfleet"
ISVC_LABEL = f"{API_GROUP}/inferenceservice"
COMPONENT_LABEL = "app.kubernetes.io/component"
VARIANT_LABEL = f"{API_GROUP}/variant"
GPU_PRODUCT_LABEL = f"{API_GROUP}/gpu-product"
NODE_GPU_PRODUCT = "nvidia.com/gpu.product"
# Component label of the ConfigMaps of a pod revision's gateway configuration (render/gateway.py).
GATEWAY_REVISION_COMPONENT = "gateway-revision"
DEFAULT_VARIANT = "default"


def product_slug(product: str) -> str:
    """A short DNS-safe suffix for a GPU product, stable across runs (NVIDIA-H100-80GB-HBM3 -> h100-80gb-hbm3-1a2b)."""
    base = re.sub(r"[^a-z0-9]+", "-", product.lower().removeprefix("nvidia-")).strip("-")[:11].strip("-")
    digest = hashlib.sha256(product.encode()).hexdigest()[:4]
    return f"{base}-{digest}" if base else digest


def selector(isvc_name: str) -> dict[str, str]:
    """Selects every serving pod of the service, whatever its variant."""
    return {ISVC_LABEL: isvc_name}


def selector_string(isvc_name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(isvc_name).items())


def variant_selector(isvc_name: str, variant: str) -> dict[str, str]:
    """Selects the pods of one Deployment (one per GPU product for triton, one 'default' for vllm)."""
    return {ISVC_LABEL: isvc_name, VARIANT_LABEL: variant}


def common(isvc_name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tensorfleet-inference",
        "app.kubernetes.io/instance": isvc_name,
        COMPONENT_LABEL: component,
        MANAGED_BY: MANAGER,
        ISVC_LABEL: isvc_name,
    }


def owner_reference(name: str, uid: str, kind: str = "InferenceService") -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, namespace: str, owner_name: str, owner_uid: str, component: str,
             extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**common(owner_name, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner_name, owner_uid)],
    }
