"""GPU discovery from the node labels NVIDIA GPU Feature Discovery (GFD) sets.

GFD labels each GPU node with ``nvidia.com/gpu.product`` (e.g. NVIDIA-H100-80GB-HBM3), ``.count``,
``.memory`` (MiB) and ``.compute.major`` / ``.compute.minor``. The operator keeps one entry per node
(a kopf index over Node objects) and folds them into an inventory of the products present.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

PRODUCT = "nvidia.com/gpu.product"
COUNT = "nvidia.com/gpu.count"
MEMORY = "nvidia.com/gpu.memory"
COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
RESOURCE = "nvidia.com/gpu"  # the device plugin's resource: whole GPUs


@dataclasses.dataclass(frozen=True)
class NodeGPUs:
    """The GPUs of one node, as GFD labelled them."""

    node: str
    product: str
    count: int
    memory_mib: int | None
    compute_capability: str | None
    schedulable: bool = True
    allocatable: int | None = None  # status.allocatable["nvidia.com/gpu"]: 0 with every GPU split by MIG (mixed)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def fits(self, gpus: int, node_selector: Mapping[str, str]) -> bool:
        """Whether one pod asking ``gpus`` whole GPUs, with ``node_selector``, could ever be placed here."""
        whole = self.allocatable if self.allocatable is not None else self.count
        return whole >= gpus and all(self.labels.get(k) == v for k, v in node_selector.items())


@dataclasses.dataclass(frozen=True)
class ProductInfo:
    """One GPU product present in the cluster, summed over its nodes."""

    product: str
    nodes: int
    gpus: int
    memory_mib: int | None
    compute_capability: str | None
    cordoned: bool = False  # every node of the product is cordoned (spec.unschedulable)


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def node_gpus(node: Mapping[str, Any]) -> NodeGPUs | None:
    """What GFD says about a Node, or None when it has no GPU product label."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    product = labels.get(PRODUCT)
    if not product:
        return None
    major, minor = _int(labels.get(COMPUTE_MAJOR)), _int(labels.get(COMPUTE_MINOR))
    capability = f"{major}.{minor}" if major is not None and minor is not None else None
    unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
    allocatable = ((node.get("status") or {}).get("allocatable") or {}).get(RESOURCE)
    return NodeGPUs(node=str(meta.get("name", "")), product=str(product), count=_int(labels.get(COUNT)) or 0,
                    memory_mib=_int(labels.get(MEMORY)), compute_capability=capability,
                    schedulable=not unschedulable, allocatable=_int(allocatable) if allocatable is not None else None,
                    labels={str(k): str(v) for k, v in labels.items()})


@dataclasses.dataclass(frozen=True)
class Inventory:
    """The GPU products present, in a stable order (most GPUs first, then by name).

    Cordoned nodes count: a cordon stops new pods, not the ones running there, so a product whose nodes are
    all cordoned is still present, marked ``cordoned`` (see ``cordoned_products``)."""

    products: tuple[ProductInfo, ...]

    @classmethod
    def from_nodes(cls, nodes: Iterable[NodeGPUs]) -> Inventory:
        grouped: dict[str, list[NodeGPUs]] = {}
        for node in nodes:
            grouped.setdefault(node.product, []).append(node)
        infos = []
        for product, members in grouped.items():
            memories = [n.memory_mib for n in members if n.memory_mib is not None]
            capabilities = sorted({n.compute_capability for n in members if n.compute_capability})
            infos.append(ProductInfo(
                product=product, nodes=len(members), gpus=sum(n.count for n in members),
                memory_mib=min(memories) if memories else None,
                # Nodes of one product report one capability; if they disagree, the lowest is the safe one.
                compute_capability=capabilities[0] if capabilities else None,
                cordoned=not any(n.schedulable for n in members),
            ))
        infos.sort(key=lambda i: (-i.gpus, i.product))
        return cls(tuple(infos))

    @property
    def names(self) -> tuple[str, ...] | None:
        """The product names, or None when no node carries GFD labels (discovery unknown)."""
        return tuple(i.product for i in self.products) or None

    def cordoned_products(self) -> tuple[str, ...]:
        """The products none of whose nodes takes new pods: not offered to new Deployments or Engines."""
        return tuple(i.product for i in self.products if i.cordoned)

    def compute_capabilities(self) -> dict[str, str]:
        return {i.product: i.compute_capability for i in self.products if i.compute_capability}
