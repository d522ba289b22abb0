"""A synchronous test client for the embedded API emulator, and a polling helper."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import kopf

from tensorfleet import config
from tensorfleet.controller import operator_registry
from tensorfleet.kube import resource_for
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.settings import OperatorSettings

T = TypeVar("T")
ISVC = "tensorfleet.io/v1alpha1"


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}: last value {last!r}")


def registry_from_env() -> kopf.OperatorRegistry:
    """The handlers an operator started now would run: from the TENSORFLEET_* environment (set it first),
    as the operator reads its settings inside ``KopfRunner``."""
    return operator_registry(config.from_env(OperatorSettings))


class Cluster:
    """What a user does with kubectl, against the emulator."""

    def __init__(self, emulator: EmulatorThread, namespace: str = "default") -> None:
        self.emulator = emulator
        self.namespace = namespace
        self.http = httpx.Client(base_url=emulator.url, timeout=10)

    def close(self) -> None:
        self.http.close()

    def _path(self, api_version: str, kind: str, name: str | None = None, sub: str | None = None) -> str:
        return resource_for(api_version, kind).path(self.namespace, name, sub)

    def create(self, obj: dict[str, Any]) -> httpx.Response:
        obj["metadata"].setdefault("namespace", self.namespace)
        return self.http.post(self._path(obj["apiVersion"], obj["kind"]), json=obj)

    def get(self, api_version: str, kind: str, name: str) -> dict[str, Any] | None:
        response = self.http.get(self._path(api_version, kind, name))
        return response.json() if response.status_code == 200 else None

    def list(self, api_version: str, kind: str) -> list[dict[str, Any]]:
        return list(self.http.get(self._path(api_version, kind)).json()["items"])

    def patch(self, api_version: str, kind: str, name: str, patch: dict[str, Any], sub: str | None = None
              ) -> httpx.Response:
        return self.http.patch(self._path(api_version, kind, name, sub), json=patch,
                               headers={"Content-Type": "application/merge-patch+json"})

    def delete(self, api_version: str, kind: str, name: str) -> httpx.Response:
        return self.http.delete(self._path(api_version, kind, name))

    def isvc(self, name: str) -> dict[str, Any] | None:
        return self.get(ISVC, "InferenceService", name)

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        for cond in ((self.isvc(name) or {}).get("status") or {}).get("conditions") or ():
            if cond["type"] == kind:
                return dict(cond)
        return None

    def children(self, name: str) -> list[dict[str, Any]]:
        found = []
        for api_version, kind in (("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("v1", "Service"),
                                  ("policy/v1", "PodDisruptionBudget")):
            found += [o for o in self.list(api_version, kind)
                      if (o["metadata"].get("labels") or {}).get("tensorfleet.io/inferenceservice") == name]
        return found

    def mark_deployments_ready(self, name: str) -> None:
        """Play the Deployment controller and kubelets: every pod of the service is up and ready."""
        for deployment in self.list("apps/v1", "Deployment"):
            if (deployment["metadata"].get("labels") or {}).get("tensorfleet.io/inferenceservice") != name:
                continue
            replicas = deployment["spec"]["replicas"]
            status = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                      "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}
            self.patch("apps/v1", "Deployment", deployment["metadata"]["name"], {"status": status}, sub="status")

    def writes(self) -> list[tuple[str, str]]:
        return list(self.emulator.server.writes)

    # ---- engines ------------------------------------------------------------------------------------

    def add_gpu_node(self, name: str, product: str, major: int, minor: int, count: int = 8) -> None:
        from tensorfleet.sandbox.kubelet import GPUNode

        node = GPUNode(name, product, count, 81559, (major, minor)).manifest()
        response = self.http.post("/api/v1/nodes", json=node)
        assert response.status_code == 201, response.text

    def engines(self) -> list[dict[str, Any]]:
        return self.list(ISVC, "Engine")

    def engine(self, name: str) -> dict[str, Any] | None:
        return self.get(ISVC, "Engine", name)

    def engine_condition(self, name: str, kind: str) -> dict[str, Any] | None:
        for cond in ((self.engine(name) or {}).get("status") or {}).get("conditions") or ():
            if cond["type"] == kind:
                return dict(cond)
        return None

    def jobs(self, engine: str | None = None) -> list[dict[str, Any]]:
        return [j for j in self.list("batch/v1", "Job")
                if engine is None or (j["metadata"].get("labels") or {}).get("tensorfleet.io/engine") == engine]

    def simulate_job_pod(self, job: dict[str, Any], report: dict[str, Any], exit_code: int = 0,
                         finished_at: str | None = None, job_status: dict[str, Any] | None = None) -> None:
        """Play the Job controller and kubelet: one pod of ``job`` ran and terminated with ``report`` as
        its termination message; optionally the Job's final status."""
        import json as _json

        from tensorfleet.sandbox.kubelet import simulated_job_pod

        finished_at = finished_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pod, status = simulated_job_pod(job, "ensure", exit_code, _json.dumps(report), finished_at)
        assert self.create(pod).status_code == 201
        assert self.patch("v1", "Pod", pod["metadata"]["name"], {"status": status}, sub="status").status_code == 200
        if job_status is not None:
            patched = self.patch("batch/v1", "Job", job["metadata"]["name"], {"status": job_status}, sub="status")
            assert patched.status_code == 200, patched.text

    def complete_engine_builds(self) -> int:
        """Play the Job controller and kubelets for every engine Job without a pod yet: each finds its
        artifact in the store (a cache hit). Returns how many it completed."""
        pods = {p["metadata"]["name"].rsplit("-", 1)[0] for p in self.list("v1", "Pod")}
        done = 0
        for job in self.list("batch/v1", "Job"):
            engine_name = (job["metadata"].get("labels") or {}).get("tensorfleet.io/engine")
            engine = self.engine(engine_name) if engine_name else None
            fingerprint = ((engine or {}).get("status") or {}).get("fingerprint")
            if not fingerprint or job["metadata"]["name"] in pods:
                continue
            report = {"result": "cache", "fingerprint": fingerprint, "sha256": "ab" * 32, "sizeBytes": 4096,
                      "uri": f"s3://engines/{fingerprint}", "builtAt": "2026-11-20T10:00:00Z", "buildSeconds": 900.0}
            self.simulate_job_pod(job, report, job_status={"succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True"}]})
            done += 1
        return done

    def simulate_corrupt_fetch(self, deployment: dict[str, Any], sha256: str, message: str) -> None:
        """Play the kubelet: a serving pod's engine-fetch init container found the artifact corrupt."""
        import json as _json

        finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        template = deployment["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{deployment['metadata']['name']}-corrupt", "namespace": self.namespace,
                            "labels": template["metadata"]["labels"]},
               "spec": template["spec"]}
        assert self.create(pod).status_code == 201
        terminated = {"exitCode": 3, "reason": "Error", "finishedAt": finished_at,
                      "message": _json.dumps({"result": "corrupt", "sha256": sha256, "message": message})}
        status = {"phase": "Pending", "initContainerStatuses": [{"name": "engine-fetch",
                                                                 "state": {"terminated": terminated}}]}
        assert self.patch("v1", "Pod", pod["metadata"]["name"], {"status": status}, sub="status").status_code == 200
