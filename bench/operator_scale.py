"""Operator at scale: 300 InferenceServices created at once against the embedded API emulator.

Reports the time until every service has its five children and a status (and until all are Ready,
with simulated kubelets), API requests per object, API writes per minute once converged (must be 0),
and the operator's resident memory. The operator runs as a separate process (`tensorfleet run`), so
its memory and its requests are its own. Times are for this machine; the ratio to the time the API
server needed just to accept the 300 creates puts them in proportion.

    .venv/bin/python -m bench.operator_scale [--services 300] [--quiet-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import httpx

from tensorfleet import kube
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.sandbox.kubelet import SimulatedDeploymentController

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The gateway policy ConfigMap, the pod revision's ConfigMap, the Deployment, the Service, the PodDisruptionBudget.
CHILDREN = 5


def service(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "tensorfleet.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": f"svc-{index:04d}", "namespace": f"team-{index % 10}"},
        "spec": {"model": {"uri": f"hf://org/model-{index % 7}@main", "maxModelLen": 8192},
                 "gpu": {"count": 1 + index % 2}, "replicas": 1 + index % 3},
    }


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def progress(http: httpx.Client, count: int) -> tuple[int, int, int]:
    """(services with status, services with all ``CHILDREN`` children, services Ready)."""
    items = http.get("/apis/tensorfleet.io/v1alpha1/inferenceservices").json()["items"]
    with_status = sum(1 for i in items if (i.get("status") or {}).get("conditions"))
    ready = sum(1 for i in items for c in (i.get("status") or {}).get("conditions", ())
                if c["type"] == "Ready" and c["status"] == "True")
    owners: dict[str, int] = {}
    for path in ("/api/v1/configmaps", "/apis/apps/v1/deployments", "/api/v1/services",
                 "/apis/policy/v1/poddisruptionbudgets"):
        for obj in http.get(path).json()["items"]:
            owner = (obj["metadata"].get("labels") or {}).get("tensorfleet.io/inferenceservice")
            if owner:
                key = f"{obj['metadata']['namespace']}/{owner}"
                owners[key] = owners.get(key, 0) + 1
    children = sum(1 for n in owners.values() if n == CHILDREN)
    return with_status, children, ready


def run(count: int, quiet_seconds: float, resync: float) -> dict[str, Any]:
    with EmulatorThread(ports=2) as emulator:
        operator_url, client_url = emulator.urls
        operator_port = int(operator_url.rsplit(":", 1)[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORFLEET_")}
        env.update(TENSORFLEET_SERVER=operator_url, TENSORFLEET_STANDALONE="true", TENSORFLEET_LOG_LEVEL="warning",
                   TENSORFLEET_LIVENESS_PORT="0", TENSORFLEET_METRICS_PORT="0",
                   TENSORFLEET_RESYNC_SECONDS=str(resync))
        operator = subprocess.Popen([sys.executable, "-m", "tensorfleet", "run"], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop = asyncio.Event()
        simulated = SimulatedDeploymentController(kube.KubeClient(kube.Connection(server=client_url)),
                                                  startup_seconds=2.0, period=1.0)
        http = httpx.Client(base_url=client_url, timeout=60)
        try:
            time.sleep(3)  # operator start-up
            idle_rss = rss_kib(operator.pid)
            start = time.monotonic()
            for index in range(count):
                body = service(index)
                namespace = body["metadata"]["namespace"]
                http.post(f"/apis/tensorfleet.io/v1alpha1/namespaces/{namespace}/inferenceservices",
                          json=body).raise_for_status()
            accepted = time.monotonic() - start
            emulator.call(lambda: _start(simulated, stop))
            first_status = all_children = all_ready = None
            while time.monotonic() - start < 900:
                with_status, children, ready = progress(http, count)
                now = time.monotonic() - start
                print(f"  t+{now:6.1f}s  status {with_status}/{count}  children {children}/{count}  "
                      f"ready {ready}/{count}", file=sys.stderr, flush=True)
                if all_children is None and with_status == count and children == count:
                    all_children = now
                if ready == count:
                    all_ready = now
                    break
                if first_status is None and with_status:
                    first_status = now
                time.sleep(2.0)
            time.sleep(2 * resync)  # let transitions settle (Ready events, last status writes)
            writes_before = len(emulator.server.writes)
            requests_at_convergence = emulator.server.requests_by_port[operator_port]
            operator_writes_before = sum(1 for p in emulator.server.write_ports if p == operator_port)
            time.sleep(quiet_seconds)
            quiet = [(w, p) for w, p in zip(emulator.server.writes[writes_before:],
                                            emulator.server.write_ports[writes_before:], strict=True)
                     if p == operator_port]
            rss, peak = rss_kib(operator.pid), rss_kib(operator.pid, "VmHWM")
        finally:
            emulator.call(lambda: _set(stop))
            operator.terminate()
            operator.wait(timeout=60)
            http.close()
    return {
        "services": count,
        "create_seconds": round(accepted, 2),
        "children_and_status_seconds": round(all_children or float("nan"), 2),
        "all_ready_seconds": round(all_ready or float("nan"), 2),
        "children_time_over_create_time": round((all_children or 0) / accepted, 2),
        "operator_requests_per_service": round(requests_at_convergence / count, 2),
        "operator_writes_per_service": round(operator_writes_before / count, 2),
        "quiet_window_seconds": quiet_seconds,
        "resync_seconds": resync,
        "writes_per_minute_converged": round(len(quiet) * 60 / quiet_seconds, 2),
        "operator_rss_mib_idle": round(idle_rss / 1024, 1),
        "operator_rss_mib_converged": round(rss / 1024, 1),
        "operator_rss_mib_peak": round(peak / 1024, 1),
    }


async def _start(controller: SimulatedDeploymentController, stop: asyncio.Event) -> None:
    asyncio.get_running_loop().create_task(controller.run(stop))


async def _set(event: asyncio.Event) -> None:
    event.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--quiet-seconds", type=float, default=60.0)
    parser.add_argument("--resync-seconds", type=float, default=20.0)
    args = parser.parse_args()
    result = run(args.services, args.quiet_seconds, args.resync_seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "operator_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
