"""Simulated controllers for the emulator: what kube-controller-manager and the kubelets would report.

The emulator stores objects but runs nothing. To let the quickstart show a service converging to
Ready, this loop plays the Deployment controller and the kubelets: pods "start" ``startup_seconds``
after a Deployment's generation changes, then count as ready. It also registers GPU nodes with the
labels NVIDIA GPU Feature Discovery sets. It only ever talks to the embedded emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from tensorfleet import kube

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GPUNode:
    name: str
    product: str
    count: int
    memory_mib: int
    compute: tuple[int, int]

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": self.product,
                    "nvidia.com/gpu.count": str(self.count),
                    "nvidia.com/gpu.memory": str(self.memory_mib),
                    "nvidia.com/gpu.compute.major": str(self.compute[0]),
                    "nvidia.com/gpu.compute.minor": str(self.compute[1]),
                },
            },
            "status": {"capacity": {"nvidia.com/gpu": str(self.count)},
                       "allocatable": {"nvidia.com/gpu": str(self.count)}},
        }


DEMO_NODES = (
    GPUNode("gpu-h100-0", "NVIDIA-H100-80GB-HBM3", 8, 81559, (9, 0)),
    GPUNode("gpu-a100-0", "NVIDIA-A100-SXM4-80GB", 8, 81920, (8, 0)),
)


class SimulatedDeploymentController:
    """Marks Deployment pods ready ``startup_seconds`` after each new generation."""

    def __init__(self, client: kube.KubeClient, startup_seconds: float = 2.0, period: float = 0.1) -> None:
        self.client = client
        self.startup_seconds = startup_seconds
        self.period = period
        self._rollouts: dict[tuple[str, str, int], float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for deployment in await self.client.list("apps/v1", "Deployment"):
                    await self._step(deployment)
            except kube.APIError as exc:
                logger.debug("simulated deployment controller: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.period)

    async def _step(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        generation = int(meta.get("generation") or 1)
        key = (meta["namespace"], meta["name"], generation)
        started = self._rollouts.setdefault(key, time.monotonic())
        replicas = int(spec.get("replicas") or 0)
        ready = replicas if time.monotonic() - started >= self.startup_seconds else 0
        status = {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": [
                {"type": "Available", "status": "True" if ready >= replicas else "False",
                 "reason": "MinimumReplicasAvailable" if ready >= replicas else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "True",
                 "reason": "NewReplicaSetAvailable" if ready >= replicas else "ReplicaSetUpdated"},
            ],
        }
        if (deployment.get("status") or {}) != status:
            await self.client.patch("apps/v1", "Deployment", meta["namespace"], meta["name"],
                                    {"status": status}, subresource="status")


async def seed_nodes(client: kube.KubeClient, nodes: tuple[GPUNode, ...] = DEMO_NODES) -> None:
    for node in nodes:
        await client.create(node.manifest())


def simulated_job_pod(job: dict[str, Any], container: str, exit_code: int, message: str,
                      finished_at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Simulation of the Job controller and kubelet for one finished attempt of ``job``: the Pod they would
    create (labels, owner) and the status the kubelet would report (the container's terminated state with
    its termination message). Returns (pod manifest, status to patch through /status)."""
    meta = job["metadata"]
    labels = {**(job["spec"]["template"]["metadata"].get("labels") or {}), "job-name": meta["name"],
              "controller-uid": meta.get("uid", "")}
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{meta['name']}-{abs(hash((meta.get('uid'), finished_at))) % 100000:05d}",
                     "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                          "uid": meta.get("uid", ""), "controller": True}]},
        "spec": job["spec"]["template"]["spec"],
    }
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message, "finishedAt": finished_at}
    status = {"phase": "Succeeded" if exit_code == 0 else "Failed",
              "containerStatuses": [{"name": container, "state": {"terminated": terminated}}]}
    return pod, status


def simulated_job_status(succeeded: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    """Simulation of the Job controller's final status for a Job (Complete, or Failed with a reason)."""
    if succeeded:
        return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason or "BackoffLimitExceeded",
                                         "message": message or "Job has reached the specified backoff limit"}]}
