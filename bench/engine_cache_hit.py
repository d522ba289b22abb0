"""Cache-hit time: from an Engine's creation to Ready, with the real operator on the API emulator.

    python -m bench.engine_cache_hit [--engines 10]

The operator runs with its default settings (debounce 0.2 s, resync 60 s). A simulated kubelet plays the
build Job's pod: as soon as a Job appears it reports ``cache`` through the pod's termination message,
as ``tensorfleet engine ensure`` does when the store already holds a verified artifact (the store
side of a cache hit is measured by bench.engine_fetch). Baseline, in the same run: the time from the
Engine's creation to the operator's first status write (its reaction time). Writes
``bench/results/engine_cache_hit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import statistics
import threading
import time
from typing import Any

import httpx

from tensorfleet import kube
from tensorfleet.engines.fingerprint import engine_manifest, key_of
from tensorfleet.metrics import OperatorMetrics
from tensorfleet.runner import run_operator
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.sandbox.kubelet import simulated_job_pod, simulated_job_status
from tensorfleet.settings import OperatorSettings

ENGINE_API = "tensorfleet.io/v1alpha1"


class SimulatedCacheHitKubelet:
    """Simulation: every build Job's pod finishes at once and reports a cache hit (fixed test digest)."""

    def __init__(self, client: kube.KubeClient) -> None:
        self.client = client
        self.seen: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for job in await self.client.list("batch/v1", "Job", "default"):
                name = job["metadata"]["name"]
                if name in self.seen:
                    continue
                self.seen[name] = time.perf_counter()
                args = job["spec"]["template"]["spec"]["containers"][0]["args"]
                spec = json.loads(args[args.index("--spec") + 1])
                fingerprint = key_of(spec).sha256
                report = {"result": "cache", "fingerprint": fingerprint, "sha256": "sha256:" + "0" * 64,
                          "sizeBytes": 1, "uri": f"s3://bench/engines/{fingerprint}", "builtAt": "2026-01-01T00:00:00Z",
                          "buildSeconds": 1.0}
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                pod, status = simulated_job_pod(job, "ensure", 0, json.dumps(report), stamp)
                await self.client.create(pod)
                await self.client.patch("v1", "Pod", "default", pod["metadata"]["name"], {"status": status},
                                        subresource="status")
                await self.client.patch("batch/v1", "Job", "default", name, {"status": simulated_job_status(True)},
                                        subresource="status")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.01)


def _engine(index: int) -> dict[str, Any]:
    spec = {"model": {"uri": "hf://bench/model@v1"}, "gpu": {"product": "NVIDIA-H100-80GB-HBM3",
                                                             "computeCapability": "9.0"},
            "maxBatchSize": 8 + index, "storeRef": {"s3": {"bucket": "bench"}}}
    return engine_manifest(spec, "default")


def _status(http: httpx.Client, name: str) -> dict[str, Any]:
    response = http.get(f"/apis/tensorfleet.io/v1alpha1/namespaces/default/engines/{name}")
    return dict(response.json().get("status") or {}) if response.status_code == 200 else {}


def _ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or ())


def measure_one(http: httpx.Client, index: int) -> tuple[float, float]:
    body = _engine(index)
    name = body["metadata"]["name"]
    started = time.perf_counter()
    assert http.post("/apis/tensorfleet.io/v1alpha1/namespaces/default/engines", json=body).status_code == 201
    reacted = None
    while time.perf_counter() - started < 60:
        status = _status(http, name)
        if reacted is None and status.get("fingerprint"):
            reacted = time.perf_counter() - started
        if _ready(status):
            return reacted or 0.0, time.perf_counter() - started
        time.sleep(0.005)
    jobs = [j["metadata"]["name"] for j in http.get("/apis/batch/v1/namespaces/default/jobs").json()["items"]]
    pods = [(p["metadata"]["name"], p["metadata"].get("labels"), p.get("status"))
            for p in http.get("/api/v1/namespaces/default/pods").json()["items"] if name in p["metadata"]["name"]]
    raise RuntimeError(f"Engine {name} not Ready within 60 s: status {_status(http, name)}, jobs {jobs}, pods {pods}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=10)
    args = parser.parse_args()
    with EmulatorThread() as emulator:
        stop = asyncio.Event()

        async def start_kubelet() -> None:
            client = kube.KubeClient(kube.Connection(server=emulator.url))
            asyncio.get_running_loop().create_task(SimulatedCacheHitKubelet(client).run(stop))

        emulator.call(start_kubelet)
        settings = dataclasses.replace(OperatorSettings(), server=emulator.url, standalone=True, liveness_port=0,
                                       metrics_port=0, log_level="error", log_format="plain")
        halt, ready = threading.Event(), threading.Event()
        operator = threading.Thread(target=run_operator, args=(settings, halt, ready, OperatorMetrics()), daemon=True)
        operator.start()
        assert ready.wait(60), "operator did not start"
        reactions, totals = [], []
        with httpx.Client(base_url=emulator.url, timeout=10) as http:
            for index in range(args.engines):
                reaction, total = measure_one(http, index)
                reactions.append(reaction)
                totals.append(total)

        async def stop_kubelet() -> None:
            stop.set()

        emulator.call(stop_kubelet)
        halt.set()
        operator.join(timeout=30)
    result = {
        "engines": args.engines,
        "median_creation_to_ready_seconds": round(statistics.median(totals), 3),
        "p90_creation_to_ready_seconds": round(sorted(totals)[int(0.9 * (len(totals) - 1))], 3),
        "median_creation_to_first_status_seconds": round(statistics.median(reactions), 3),
        "ratio_ready_to_first_status": round(statistics.median(totals) / statistics.median(reactions), 2),
    }
    out = pathlib.Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "engine_cache_hit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
