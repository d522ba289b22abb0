"""Hardening: limits, timeouts, long streams, disconnects, engine failures, drain, malformed input, hooks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import time
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from builders import inference_service, stored, triton_service
from engines.processes import free_port
from engines.standin import StandinEngine
from gateway_support import (
    RecordingSinkDouble,
    gateway_document,
    pod_gateway_files,
    running_gateway,
    serving,
    start_gateway_process,
    url,
    wait_ready,
    wait_until,
    write_document,
)
from integration.test_gateway_pipeline import CHAT, events_of, post
from tensorfleet import cli, telemetry
from tensorfleet.api.types import InferenceService
from tensorfleet.gateway import command as gateway_command
from tensorfleet.gateway.hooks import ProxyRequest, Stop, TokenCounter
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.gateway.upstream import EngineConnections
from tensorfleet.metering import records, units
from tensorfleet.metering import sink as metering_sink
from tensorfleet.reconcile import desired_objects
from tensorfleet.render.context import RenderContext
from tensorfleet.render.gateway import gateway_config

pytestmark = pytest.mark.integration

MALFORMED: list[tuple[str, bytes | str, int, str]] = [
    ("not json", b"{nope", 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("bad utf-8", b'{"model": "\xff"}', 400, "invalid_json"),
    ("empty", b"", 400, "invalid_json"),
    ("model missing", json.dumps({"prompt": "a"}), 400, "missing_model"),
    ("model wrong type", json.dumps({"model": 3, "prompt": "a"}), 400, "missing_model"),
    ("unknown model", json.dumps({"model": "gpt-9", "prompt": "a"}), 404, "model_not_found"),
    ("max_tokens string", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": "9"}), 400, "invalid_type"),
    ("max_tokens bool", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": True}), 400, "invalid_type"),
    ("max_tokens zero", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 0}), 400, "invalid_value"),
    ("n too big", json.dumps({"model": "tiny", "prompt": "a", "n": 1000}), 400, "invalid_value"),
    ("stream not bool", json.dumps({"model": "tiny", "prompt": "a", "stream": "yes"}), 400, "invalid_type"),
    ("temperature string", json.dumps({"model": "tiny", "prompt": "a", "temperature": "hot"}), 400, "invalid_type"),
    ("prompt missing", json.dumps({"model": "tiny"}), 400, "invalid_type"),
    ("prompt object", json.dumps({"model": "tiny", "prompt": {"a": 1}}), 400, "invalid_type"),
    ("prompt mixed list", json.dumps({"model": "tiny", "prompt": ["a", 1]}), 400, "invalid_type"),
    ("stream options not object", json.dumps({"model": "tiny", "prompt": "a", "stream": True,
                                              "stream_options": 1}), 400, "invalid_type"),
]
CHAT_MALFORMED = [
    ("messages missing", json.dumps({"model": "tiny"}), 400, "invalid_type"),
    ("messages empty", json.dumps({"model": "tiny", "messages": []}), 400, "invalid_type"),
    ("message without role", json.dumps({"model": "tiny", "messages": [{"content": "a"}]}), 400, "invalid_type"),
    ("message not object", json.dumps({"model": "tiny", "messages": ["hi"]}), 400, "invalid_type"),
]


async def test_malformed_requests_get_json_4xx(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream) as gw, \
            aiohttp.ClientSession() as session:
        cases = [(c, "/v1/completions") for c in MALFORMED] + [(c, "/v1/chat/completions") for c in CHAT_MALFORMED]
        for (name, body, status, code), path in cases:
            got, answer, headers = await post(session, url(gw, path), body)
            assert (got, answer["error"]["code"]) == (status, code), name
            assert headers["Content-Type"].startswith("application/json"), name
        async with session.get(url(gw, "/v1/completions")) as response:
            assert response.status == 405
            assert (await response.json())["error"]["code"] == "method_not_allowed"
        async with session.get(url(gw, "/v2/models/x/generate")) as response:
            assert response.status == 404
            assert "error" in await response.json()
    assert all(r.get("prompt") == "warm up" for r in engine.received)  # nothing malformed reached the engine


async def test_body_and_header_limits(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, max_body_bytes=2048, max_header_bytes=1024) as gw, \
            aiohttp.ClientSession() as session:
        big = json.dumps({"model": "tiny", "prompt": "a " * 2000})
        status, body, _ = await post(session, url(gw, "/v1/completions"), big)
        assert status == 413
        assert "2048 bytes" in body["error"]["message"]
        async with session.post(url(gw, "/v1/completions"), json={"model": "tiny", "prompt": "a"},
                                headers={"X-Big": "x" * 4000}) as response:
            assert response.status == 431  # refused while parsing, before any handler runs
            error = (await response.json())["error"]
            assert "'X-Big'" in error["message"]
            assert "limit of 1024 bytes (TENSORFLEET_GATEWAY_MAX_HEADER_BYTES)" in error["message"]
        async with session.post(url(gw, "/v1/completions"), json={"model": "tiny", "prompt": "a"},
                                headers={f"X-H{i}": "1" for i in range(80)}) as response:
            assert response.status == 431
            assert "limit of 64 header fields" in (await response.json())["error"]["message"]
        async with session.post(url(gw, "/v1/completions?" + "q" * 2000), json={"model": "tiny"}) as response:
            assert response.status == 414
            assert "1024 bytes" in (await response.json())["error"]["message"]


async def test_a_body_that_stops_arriving_is_408_naming_the_limit(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, body_read_timeout_seconds=0.3, idle_timeout_seconds=30) as gw:
        warmup = len(engine.received)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports["client"])
        body = b'{"model": "tiny", "prompt": "a"}'
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body) + 10, body))  # 10 bytes never come
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    error = json.loads(payload)["error"]
    assert error["code"] == "request_timeout"
    assert "0.3 s" in error["message"]
    assert len(engine.received) == warmup  # nothing reached the engine


def test_slow_headers_are_cut_off_by_the_idle_timeout(tmp_path: pathlib.Path) -> None:
    async def scenario() -> float:
        engine = StandinEngine()
        async with serving(engine.app()) as upstream, \
                running_gateway(tmp_path, upstream, idle_timeout_seconds=0.5) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports["client"])
            started = time.monotonic()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            for _ in range(40):  # a header byte every 0.1 s, never finishing: slowloris
                await asyncio.sleep(0.1)
                try:
                    writer.write(b"X")
                    await writer.drain()
                except ConnectionError:
                    break
                if reader.at_eof() or writer.is_closing():
                    break
            closed_after = time.monotonic() - started
            writer.close()
            return closed_after

    assert asyncio.run(scenario()) < 2.0


async def test_streams_longer_than_any_timeout_keep_going(tmp_path: pathlib.Path) -> None:
    """No total timeout: a stream outlives the upstream idle timeout many times over as long as tokens flow."""
    engine = StandinEngine(token_delay=0.1)
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, upstream_idle_timeout_seconds=0.4, idle_timeout_seconds=0.4) as gw, \
            aiohttp.ClientSession() as session:
        started = time.monotonic()
        body = {**CHAT, "max_tokens": 25, "stream": True}
        async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
            raw = await response.read()
        assert time.monotonic() - started > 2.0
    assert events_of(raw)[-1] == b"data: [DONE]"
    assert len(events_of(raw)) == 26


async def test_an_engine_that_stops_answering_is_504_and_its_request_aborted(tmp_path: pathlib.Path) -> None:
    """The upstream idle timeout bounds the wait for the engine's answer; the engine request is aborted."""
    engine = StandinEngine(token_delay=0.3)
    sink = RecordingSinkDouble()
    # Handlers cancelled when their connection drops, as vLLM aborts a request whose client went away.
    async with serving(engine.app(), handler_cancellation=True) as upstream, \
            running_gateway(tmp_path, upstream, sink=sink, upstream_idle_timeout_seconds=0.4) as gw, \
            aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url(gw, "/v1/chat/completions"), {**CHAT, "max_tokens": 10})
        assert status == 504
        assert body["error"]["code"] == "engine_timeout"
        assert "nothing for 0.4 s" in body["error"]["message"]
        await wait_until(lambda: engine.aborted == 1, 5, "the engine request aborted")
        await wait_until(lambda: len(sink.client_requests()) == 1, 5, "the event")
    assert sink.client_requests()[0].status == 504


async def test_an_engine_that_breaks_off_a_stream_is_502_or_a_truncated_stream(tmp_path: pathlib.Path) -> None:
    """Before the first event the client gets a clean 502; after it, a stream without its end (never a clean end)."""
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    body = {**CHAT, "max_tokens": 10, "stream": True}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        engine.break_after = 0
        status, answer, _ = await post(session, url(gw, "/v1/chat/completions"), body)
        assert status == 502
        assert answer["error"]["code"] == "engine_disconnected"
        engine.break_after = 2
        async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        await wait_until(lambda: len(sink.client_requests()) == 2, 5, "the events")
    assert [(e.status, e.error) for e in sink.client_requests()] == [(502, "engine_disconnected")] * 2
    assert [e.completion_tokens for e in sink.client_requests()] == [0, 2]  # only what was produced


async def test_client_disconnect_aborts_the_engine_request(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.05)
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink) as gw:
        async with aiohttp.ClientSession() as session:
            body = {**CHAT, "max_tokens": 60, "stream": True}
            async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
                await response.content.readline()
                response.close()
        await wait_until(lambda: engine.aborted == 1, 5, "the engine request aborted")
        await wait_until(lambda: len(sink.client_requests()) == 1, 5, "the event")
    (event,) = sink.client_requests()
    assert event.status == 499
    assert event.error == "client_disconnected"
    assert 0 < event.completion_tokens < 60  # only what was produced


async def test_engine_down_is_503_and_engine_errors_are_502(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    # No health polls while the test runs: the proxied request alone finds the engine gone (a poll would too,
    # and take the pod out of service with 503 not_ready until the engine is back and warmed up).
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, engine_poll_seconds=3600) as gw, \
            aiohttp.ClientSession() as session:
        engine.fail_status = 500
        status, body, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
        assert status == 502
        assert body["error"]["code"] == "engine_error"
        engine.fail_status = None
        nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        gw.services.client.base_url = nowhere
        gw.services.client.connections = EngineConnections(nowhere, connect_timeout=1, idle_timeout=5)
        status, body, headers = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
        assert status == 503
        assert body["error"]["code"] == "engine_unavailable"
        assert headers["Retry-After"] == "1"
        assert not gw.state.ready  # marked down: the readiness probe takes the pod out


async def test_drain_turns_not_ready_first_then_lets_in_flight_finish(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.05)
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, sink=sink, drain_delay_seconds=0.5) as gw, \
            aiohttp.ClientSession() as session:
        body = {**CHAT, "max_tokens": 20, "stream": True}
        request = asyncio.create_task(post(session, url(gw, "/v1/chat/completions"), body))
        await wait_until(lambda: engine.active == 1, 5, "the request in flight")
        drain = asyncio.create_task(gw.drain())
        await asyncio.sleep(0.05)
        async with session.get(url(gw, "/readyz", admin=True)) as response:
            assert response.status == 503
            assert (await response.json())["phase"] == "draining"
        # Still in the Service's endpoints for DRAIN_DELAY_SECONDS: a request that arrives now is served.
        late, _, _ = await post(session, url(gw, "/v1/chat/completions"), {**CHAT, "max_tokens": 2})
        assert not drain.done()
        status, raw, _ = await request
        assert await drain is True
    assert (status, late) == (200, 200)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sink.client_requests()
    assert sorted(e.completion_tokens for e in events) == [2, 20]
    assert all(e.billable for e in events)  # the engine served them: a drain gives nothing away


def test_sigterm_drains_a_real_process(tmp_path: pathlib.Path) -> None:
    """The `serve` loop in its own process: SIGTERM -> not ready -> in-flight stream completes -> exit 0."""
    process, port, admin = start_gateway_process(tmp_path)
    try:
        asyncio.run(_drain_scenario(process, port, admin))
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "sink closed" in output


async def _drain_scenario(process: subprocess.Popen[str], port: int, admin: int) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, admin)
        body = {**CHAT, "max_tokens": 30, "stream": True}
        request = asyncio.create_task(post(session, f"http://127.0.0.1:{port}/v1/chat/completions", body))
        await asyncio.sleep(0.3)
        os.kill(process.pid, signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
            assert response.status == 503
        status, raw, _ = await request
        assert status == 200
        assert raw.endswith(b"data: [DONE]\n\n")


class _RewriteHook:
    async def before_upstream(self, request: ProxyRequest, tokens: TokenCounter) -> None:
        counts = await tokens.count_prompt(request.endpoint, request.body)
        request.replace_body({**request.body, "messages": request.body["messages"][-1:]})
        request.flags.update(truncated=True, truncated_tokens=counts[0])
        request.response_headers["X-Test-Dropped"] = "1"


class _StopAfter:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.seen = 0

    def open(self, request: ProxyRequest) -> _StopAfter:
        return _StopAfter(self.tokens)

    def on_event(self, payload: bytes) -> Stop | None:
        self.seen += 1
        return Stop("runaway") if self.seen >= self.tokens else None

    def on_body(self, body: Any) -> Stop | None:
        return None


async def test_hooks_rewrite_requests_and_stop_streams_cleanly(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.01)
    sink = RecordingSinkDouble()
    hooks = {"request_hooks": [_RewriteHook()], "response_hooks": [_StopAfter(3)]}
    body = {"model": "tiny", "stream": True, "max_tokens": 50, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "old turn"}, {"role": "user", "content": "new turn"}]}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink, hooks=hooks) as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
            raw, headers = await response.read(), response.headers
        await wait_until(lambda: engine.aborted == 1, 5, "the engine request aborted")
    assert engine.received[-1]["messages"] == [{"role": "user", "content": "new turn"}]
    assert headers["X-Test-Dropped"] == "1"
    events = events_of(raw)
    assert events[-1] == b"data: [DONE]"
    final, usage = json.loads(events[-3][6:]), json.loads(events[-2][6:])
    assert final["choices"] == [{"index": 0, "finish_reason": "length", "delta": {}}]
    assert usage["usage"]["completion_tokens"] == 3
    (event,) = sink.client_requests()
    assert event.runaway_stopped
    assert event.truncated
    assert event.completion_tokens == 3
    assert event.prompt_tokens == usage["usage"]["prompt_tokens"] == 5  # the last turn only, from the engine


async def test_metrics_export_the_autoscaler_names_with_bounded_labels(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    engine.waiting_metric, engine.kv_metric = 3.0, 0.25
    document = gateway_document(auth={"trustedTenantHeader": "X-Tenant", "trustedProxies": ["127.0.0.0/8"]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, max_tenant_labels=2) as gw, \
            aiohttp.ClientSession() as session:
        for tenant in ("a", "b", "c", "d"):
            await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "x y", "max_tokens": 2},
                       headers={"X-Tenant": tenant})
        await asyncio.sleep(0.5)  # one engine poll
        async with session.get(url(gw, "/metrics", admin=True)) as response:
            text = await response.text()
    names = [telemetry.QUEUE_DEPTH, telemetry.ENGINE_WAITING, telemetry.IN_FLIGHT, telemetry.KV_CACHE_USAGE,
             telemetry.READY, telemetry.STARTUP_SECONDS]
    assert all(f"\n{name} " in text for name in names)
    assert f"{telemetry.ENGINE_WAITING} 3.0" in text
    assert f"{telemetry.KV_CACHE_USAGE} 0.25" in text
    assert telemetry.GPU_UTILIZATION not in text  # no GPU, no sample
    assert 'tensorfleet_gateway_tokens_total{kind="output",model="tiny",tier="standard"} 8.0' in text
    tenants = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("tensorfleet_gateway_tenant_tokens_total{")}
    assert tenants == {"a", "b", telemetry.OTHER_TENANT}
    assert "tensorfleet_gateway_time_to_first_token_seconds_bucket" in text


async def test_configuration_reload_applies_and_a_broken_file_is_ignored(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        path = pathlib.Path(gw.settings.config)
        _write(path, json.dumps(gateway_document(tokenPolicy={"maxOutputTokens": 5})))
        assert gw.reload()
        await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
        _write(path, '{"model": {}}')
        assert not gw.reload()
        await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
    assert [r["max_tokens"] for r in engine.received[-2:]] == [5, 5]
    # metering saw the one good change (new prices apply from then on), not the broken file
    assert [c["tokenPolicy"]["maxOutputTokens"] for c in sink.configs] == [5]


async def test_reload_keeps_the_model_the_pod_started_with(tmp_path: pathlib.Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """One ConfigMap serves every revision of a service's pods. While a rollout replaces the pods serving
    "old" with pods serving "new", the old pods (Ready, still given traffic) reload the ConfigMap that says
    "new": their gateways must go on serving the engine beside them, and take the new token policy."""
    engine = StandinEngine(model="old")
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, gateway_document("old"), sink) as gw, \
            aiohttp.ClientSession() as session:
        path = pathlib.Path(gw.settings.config)
        with caplog.at_level(logging.INFO, logger="tensorfleet.gateway.server"):
            _write(path, json.dumps(gateway_document("new", tokenPolicy={"maxOutputTokens": 5})))
            assert gw.reload()
            old, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "old", "prompt": "a"})
            new, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "new", "prompt": "a"})
            _write(path, json.dumps(gateway_document("new", tokenPolicy={"maxOutputTokens": 6})))
            assert gw.reload()
            await post(session, url(gw, "/v1/completions"), {"model": "old", "prompt": "a"})
    assert (old, new) == (200, 404)  # "new" is served by the pods of the new revision
    assert [r["max_tokens"] for r in engine.received[-2:]] == [5, 6]  # the policy applies at once
    assert [c["model"]["servedName"] for c in sink.configs] == ["old", "old"]
    deferred = [(r.levelno, r.getMessage().split(";")[0]) for r in caplog.records
                if "pods of the new revision" in r.getMessage()]
    assert deferred == [(logging.INFO, "gateway.json: model changed")]  # once, and not as an error
    reloads = gw.metrics.registry.get_sample_value
    assert (reloads("tensorfleet_gateway_config_reloads_total", {"result": "ok"}),
            reloads("tensorfleet_gateway_config_reloads_total", {"result": "error"})) == (2.0, None)


async def test_reload_keeps_the_engine_that_metering_prices_and_signs_by(tmp_path: pathlib.Path) -> None:
    """A triton fp16 pod reloading its service's fp8 configuration still runs the fp16 engine: its records
    keep fp16's resource-unit factor and fingerprint (new prices, a policy section, do apply)."""
    fp16 = gateway_document(engine={"precision": "fp16", "fingerprint": "sha256:fp16"})
    fp8 = gateway_document(engine={"precision": "fp8", "fingerprint": "sha256:fp8"},
                           billing={"pricePerResourceUnit": "0.5"})
    sink = RecordingSinkDouble()
    async with serving(StandinEngine().app()) as upstream, running_gateway(tmp_path, upstream, fp16, sink) as gw:
        _write(pathlib.Path(gw.settings.config), json.dumps(fp8))
        assert gw.reload()
    table = units.load_table()
    (reloaded,) = (records.context_from_config(c, "pod", "NVIDIA-H100-80GB-HBM3", table) for c in sink.configs)
    started = records.context_from_config(fp16, "pod", "NVIDIA-H100-80GB-HBM3", table)
    assert (reloaded.precision, reloaded.ru_per_gpu_ms, reloaded.engine_fingerprint) == \
        ("fp16", started.ru_per_gpu_ms, "sha256:fp16")
    assert reloaded.prices["pricePerResourceUnit"] == "0.5"


def _rollout_under_way(old: dict[str, Any], new: dict[str, Any], folder: pathlib.Path) -> dict[str, str]:
    """The gateway settings of a pod of ``old``'s revision that starts once ``new`` is applied (its gateway
    restarted, or it was rescheduled on another node): the files it reads, from the ConfigMaps as they are
    now. The old revision's own ConfigMap is still there, since its pods still run."""
    def render(body: dict[str, Any]) -> list[dict[str, Any]]:
        return desired_objects(InferenceService.from_body(stored(body)), RenderContext())

    cluster = {o["metadata"]["name"]: o for o in [*render(old), *render(new)] if o["kind"] == "ConfigMap"}
    (deployment, *_) = [o for o in render(old) if o["kind"] == "Deployment"]
    folder.mkdir()
    return pod_gateway_files(deployment, cluster, folder)


async def test_an_old_revision_gateway_started_during_the_rollout_serves_its_own_model(
        tmp_path: pathlib.Path) -> None:
    """The rollout from "old" to "new" is under way and the old pods still get traffic: an old pod whose
    gateway starts now, in front of the engine serving "old", must serve "old" with the new token policy."""
    files = _rollout_under_way(inference_service(model={"servedName": "old"}),
                               inference_service(model={"servedName": "new"}, tokenPolicy={"maxOutputTokens": 5}),
                               tmp_path / "pod")
    engine = StandinEngine(model="old")
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink, **files) as gw, \
            aiohttp.ClientSession() as session:
        old, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "old", "prompt": "a"})
        new, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "new", "prompt": "a"})
        _write(pathlib.Path(files["config"]), json.dumps({"tokenPolicy": {"maxOutputTokens": 6}}))
        assert gw.reload()
        await post(session, url(gw, "/v1/completions"), {"model": "old", "prompt": "a"})
    assert (old, new) == (200, 404)
    assert [r["max_tokens"] for r in engine.received[-2:]] == [5, 6]
    assert [c["model"]["servedName"] for c in sink.configs] == ["old"]


def test_an_old_revision_gateway_started_during_the_rollout_prices_and_signs_as_its_engine(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton fp16 -> fp8 is rolling out: an fp16 pod that starts now opens its metering sink with fp16's
    resource-unit factor and the fp16 engine's fingerprint (and the new prices, a policy section)."""
    old = triton_service("llama", engine={"precision": "fp16"})
    new = triton_service("llama", engine={"precision": "fp8"}, billing={"pricePerResourceUnit": "0.5"})
    files = _rollout_under_way(old, new, tmp_path / "pod")
    opened: list[Any] = []
    monkeypatch.setattr(metering_sink, "open_sink", lambda document, *args: opened.append(document))
    gateway_command._open_sink(GatewaySettings(**files))
    table = units.load_table()
    (started,) = (records.context_from_config(d, "pod", "NVIDIA-H100-80GB-HBM3", table) for d in opened)
    fp16 = gateway_config(InferenceService.from_body(stored(old)), RenderContext())
    expected = records.context_from_config(fp16, "pod", "NVIDIA-H100-80GB-HBM3", table)
    assert (started.precision, started.ru_per_gpu_ms, started.engine_fingerprint) == \
        ("fp16", expected.ru_per_gpu_ms, fp16["engine"]["fingerprint"])
    assert started.prices["pricePerResourceUnit"] == "0.5"


@pytest.mark.parametrize("flag", ["--port", "--admin-port"])
def test_the_command_names_a_busy_port(tmp_path: pathlib.Path, flag: str) -> None:
    """A port another process listens on was an OSError traceback out of the running server."""
    config = write_document(tmp_path, gateway_document())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--admin-port" if flag == "--port" else "--port"
        result = CliRunner().invoke(cli.main, ["gateway", "--config", config, "--usage-dir", str(tmp_path),
                                               "--host", "127.0.0.1", flag, str(port), other, "0"])
    assert isinstance(result.exception, SystemExit), result.exception  # anything else would be a traceback
    assert (result.exit_code, result.output.strip()) == (
        1, f"Error: {flag}={port}: cannot listen on it: Address already in use; choose a free port or 0 for any")


def _write(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
