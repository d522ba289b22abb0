"""The product's promise end to end: a pod's gateway process meters real requests into its signed ledger.

`tensorfleet gateway` (the real command, with the real metering sink) runs in front of the stand-in
engine; two tenants send requests; the gateway is stopped with SIGTERM as the kubelet would; then
`tensorfleet usage verify` checks the ledger and `tensorfleet usage report` sums it. Warm-up and cold
start must not be billed, and every client request must be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engines.processes import free_port
from gateway_support import gateway_document, stream_chunks
from tensorfleet.metering.ledger import read_ledger

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]


def wait_ready(url: str, process: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {seconds} s")


def tensorfleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensorfleet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@dataclasses.dataclass
class MeteredPod:
    """A serving pod's processes: the stand-in engine and `tensorfleet gateway` with its real metering sink."""

    url: str
    usage: pathlib.Path


@contextlib.contextmanager
def metered_pod(tmp_path: pathlib.Path, document: dict[str, Any], *engine_args: str) -> Iterator[MeteredPod]:
    """Start both, wait for readiness, yield; on exit stop the gateway with SIGTERM as the kubelet would
    (it must exit 0, its ledger flushed), and never leave a process behind."""
    engine_port, port, admin = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps(document))
    usage = tmp_path / "usage"
    usage.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORFLEET_")}
    env.update(TENSORFLEET_GATEWAY_CONFIG=str(config), TENSORFLEET_GATEWAY_UPSTREAM=f"http://127.0.0.1:{engine_port}",
               TENSORFLEET_GATEWAY_PORT=str(port), TENSORFLEET_GATEWAY_ADMIN_PORT=str(admin),
               TENSORFLEET_GATEWAY_HOST="127.0.0.1", TENSORFLEET_GATEWAY_USAGE_DIR=str(usage),
               TENSORFLEET_GATEWAY_DEVICES_FILE=str(tmp_path / "no-gpu"), TENSORFLEET_GATEWAY_DRAIN_DELAY_SECONDS="0",
               TENSORFLEET_METERING_DEVICES_WAIT_SECONDS="0", TENSORFLEET_METERING_SETTLE_AFTER_SECONDS="1")
    engine = subprocess.Popen([sys.executable, "-m", "tests.engines.standin", "--port", str(engine_port),
                               *engine_args], cwd=ROOT)
    gateway = subprocess.Popen([sys.executable, "-m", "tensorfleet", "gateway"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{admin}/readyz", gateway)
        yield MeteredPod(f"http://127.0.0.1:{port}", usage)
        gateway.send_signal(signal.SIGTERM)
        output, _ = gateway.communicate(timeout=60)
        assert gateway.returncode == 0, output
    finally:
        for process in (gateway, engine):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_gateway_meters_two_tenants_into_a_verifiable_ledger(tmp_path: pathlib.Path) -> None:
    document = gateway_document(auth={"trustedTenantHeader": "X-Tenant", "trustedProxies": ["127.0.0.1/32"]},
                                billing={"tier": "standard", "currency": "USD", "pricePerResourceUnit": "0.001",
                                         "pricePerMillionInputTokens": "1", "pricePerMillionOutputTokens": "2"})
    with metered_pod(tmp_path, document) as pod, httpx.Client(base_url=pod.url, timeout=30) as client:
        for tenant, count in (("team-a", 3), ("team-b", 2)):
            for index in range(count):
                body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 5, "stream": index % 2 == 1}
                response = client.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
                assert response.status_code == 200, response.text
    ledger = pod.usage / "usage.db"
    verified = tensorfleet("usage", "verify", "--ledger", str(ledger), "--trust-embedded-key", "-o", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = tensorfleet("usage", "report", "--ledger", str(ledger), "--by", "tenant", "-o", "json")
    assert report.returncode == 0, report.stderr
    rows = {row["tenant"]: row for row in json.loads(report.stdout)}
    assert set(rows) == {"team-a", "team-b"}  # warm-up and the cold start are not billed to anyone
    assert rows["team-a"]["requests"] == 3
    assert rows["team-b"]["requests"] == 2
    assert rows["team-a"]["outputTokens"] == 15  # the stand-in generates exactly max_tokens
    assert rows["team-b"]["inputTokens"] == 8
    assert float(rows["team-a"]["cost"]) > 0
    # No GPU here: the records are timing-only and say so; no reading is made up.
    assert all(row["estimatedRequests"] == row["requests"] for row in rows.values())


def test_runaway_stops_and_truncations_reach_the_signed_ledger(tmp_path: pathlib.Path) -> None:
    """A stand-in engine that loops, the real `tensorfleet gateway` with its real metering sink: the client
    sees a well-formed stream that ends early, and the ledger records the stop and a truncation."""
    document = gateway_document(tokenPolicy={"maxOutputTokens": 400, "maxInputTokens": 40,
                                             "contextStrategy": "truncate-oldest", "runaway": {"enabled": True}})
    history = [{"role": "system", "content": "be brief"}]
    for turn in range(4):
        history += [{"role": "user", "content": f"question {turn} about the budget"},
                    {"role": "assistant", "content": f"answer {turn} about the budget"}]
    history.append({"role": "user", "content": "and now?"})
    with metered_pod(tmp_path, document, "--token-delay", "0.001", "--loop", "I am sorry .") as pod, \
            httpx.Client(base_url=pod.url, timeout=30) as client:
        looping = {"model": "tiny", "messages": [{"role": "user", "content": "sorry?"}], "max_tokens": 400,
                   "stream": True, "stream_options": {"include_usage": True}}
        streamed = client.post("/v1/chat/completions", json=looping)
        truncated = client.post("/v1/chat/completions", json={"model": "tiny", "messages": history, "max_tokens": 3})
    usage = pod.usage
    assert streamed.status_code == 200
    chunks = stream_chunks(streamed.content)
    produced = chunks[-1]["usage"]["completion_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert produced < 200
    assert truncated.status_code == 200, truncated.text
    assert int(truncated.headers["X-TensorFleet-Truncated-Turns"]) > 0
    verified = tensorfleet("usage", "verify", "--ledger", str(usage / "usage.db"), "--trust-embedded-key", "-o", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    _, rows, _ = read_ledger(usage / "usage.db")
    records = {body["requestId"]: body for body in (json.loads(row[1]) for row in rows) if body["kind"] == "request"}
    stopped = records[streamed.headers["X-Request-Id"]]
    assert stopped["runawayStopped"] is True
    assert stopped["outputTokens"] == produced  # billed for what was produced, not for max_tokens
    assert stopped["truncated"] is False
    cut = records[truncated.headers["X-Request-Id"]]
    assert cut["truncated"] is True
    assert cut["truncatedTokens"] == int(truncated.headers["X-TensorFleet-Truncated-Tokens"]) > 0
    assert cut["inputTokens"] == truncated.json()["usage"]["prompt_tokens"] <= 40
    report = tensorfleet("usage", "report", "--ledger", str(usage / "usage.db"), "--by", "model", "-o", "json")
    (row,) = json.loads(report.stdout)
    assert (row["runawayStopped"], row["truncatedRequests"]) == (1, 1)
    assert row["truncatedTokens"] == cut["truncatedTokens"]
