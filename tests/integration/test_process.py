"""The operator process as deployed: `tensorfleet run` with metrics, liveness and structured logs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import httpx
import pytest

from builders import inference_service
from cluster import Cluster, wait_for
from engines.processes import free_port
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.integration
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_metrics_liveness_and_json_logs(emulator: EmulatorThread, tmp_path: pathlib.Path) -> None:
    metrics_port, liveness_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORFLEET_")}
    env.update(TENSORFLEET_SERVER=emulator.url, TENSORFLEET_STANDALONE="true", TENSORFLEET_LOG_FORMAT="json",
               TENSORFLEET_METRICS_PORT=str(metrics_port), TENSORFLEET_LIVENESS_PORT=str(liveness_port),
               TENSORFLEET_RESYNC_SECONDS="1")
    log = (tmp_path / "operator.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "tensorfleet", "run"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    cluster = Cluster(emulator)
    try:
        cluster.create(inference_service("llama"))
        wait_for(lambda: cluster.condition("llama", "Progressing"), what="status")
        health = wait_for(lambda: _get(f"http://127.0.0.1:{liveness_port}/healthz"), what="liveness endpoint")
        assert health.status_code == 200
        metrics = wait_for(lambda: (m := _get(f"http://127.0.0.1:{metrics_port}/metrics")) and
                           'tensorfleet_reconcile_total{result="ok"}' in m.text and m, what="reconcile metrics")
        for name in ("tensorfleet_reconcile_duration_seconds_bucket", "tensorfleet_api_writes_total",
                     "tensorfleet_inferenceservices 1.0", "tensorfleet_reconcile_errors_total",
                     # the dashboard's replicas panel: what the service asks for, and what is ready
                     'tensorfleet_inferenceservice_desired_replicas{inferenceservice="llama",namespace="default"} 1.0',
                     'tensorfleet_inferenceservice_ready_replicas{inferenceservice="llama",namespace="default"} 0.0'):
            assert name in metrics.text
        cluster.delete("tensorfleet.io/v1alpha1", "InferenceService", "llama")
        wait_for(lambda: (m := _get(f"http://127.0.0.1:{metrics_port}/metrics")) and
                 "tensorfleet_inferenceservice_desired_replicas{" not in m.text, what="its series removed")
    finally:
        process.terminate()
        process.wait(timeout=60)
        cluster.close()
    log.seek(0)
    lines = [line for line in log.read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r.get("message", "").startswith("Activity 'startup' succeeded") for r in records)
    assert all("level" in r or "severity" in r for r in records)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
