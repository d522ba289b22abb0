"""Helpers for the gateway's tests: a recording metering sink (a test double), config builders, servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from builders import deep_merge
from engines.processes import free_port
from tensorfleet.gateway.server import Gateway
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.metering.events import ColdStartEvent, RequestEvent


class RecordingSinkDouble:
    """Test double of the metering sink: keeps every event in memory."""

    def __init__(self) -> None:
        self.events: list[RequestEvent | ColdStartEvent] = []
        self.admissions: dict[str, float] = {}
        self.configs: list[Mapping[str, Any]] = []

    def submit(self, event: RequestEvent | ColdStartEvent) -> None:
        self.events.append(event)

    def admitted(self, request_id: str, at: float) -> None:
        self.admissions[request_id] = at

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        self.configs.append(config)

    @property
    def requests(self) -> list[RequestEvent]:
        return [e for e in self.events if isinstance(e, RequestEvent)]

    @property
    def cold_starts(self) -> list[ColdStartEvent]:
        return [e for e in self.events if isinstance(e, ColdStartEvent)]

    def client_requests(self) -> list[RequestEvent]:
        return [e for e in self.requests if e.tenant != "tensorfleet:warmup"]


def gateway_document(model: str = "tiny", **sections: Any) -> dict[str, Any]:
    """gateway.json as the operator renders it; keyword arguments deep-merge into it."""
    base: dict[str, Any] = {
        "service": {"namespace": "default", "name": "svc"},
        "model": {"servedName": model, "uri": "hf://org/tiny@main", "digest": None, "maxModelLen": 1024},
        "runtime": "vllm",
        "gpusPerReplica": 1,
        "engine": {"precision": "fp16", "maxInputLen": None, "maxBatchSize": None},
        "warmup": {"enabled": True, "timeoutSeconds": 120, "requests": [{"prompt": "warm up", "maxTokens": 2,
                                                                        "concurrency": 2}]},
        "tokenPolicy": {"maxOutputTokens": 64, "contextStrategy": "reject", "runaway": {"enabled": False},
                        "responseCache": {"enabled": False, "ttlSeconds": 300, "maxEntries": 100,
                                          "maxBytes": 1048576}},
        "auth": {},
        "billing": {"tier": "standard", "currency": "USD"},
    }
    return deep_merge(base, sections)


def write_document(folder: pathlib.Path, document: dict[str, Any]) -> str:
    path = folder / "gateway.json"
    path.write_text(json.dumps(document))
    return str(path)


def pod_gateway_files(deployment: Mapping[str, Any], config_maps: Mapping[str, Mapping[str, Any]],
                      folder: pathlib.Path) -> dict[str, str]:
    """What the gateway of a pod of ``deployment`` reads when it starts now, with the cluster's ConfigMaps
    ``config_maps`` (by name): the files of its gateway-config volume, written into ``folder`` as the
    kubelet mounts them, and the gateway settings (``config``, ``revision_config``) its env points at."""
    pod = deployment["spec"]["template"]["spec"]
    (gateway,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    (mount,) = [m["mountPath"] for m in gateway["volumeMounts"] if m["name"] == "gateway-config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "gateway-config"]
    sources = [s["configMap"] for s in volume["projected"]["sources"]] if "projected" in volume \
        else [volume["configMap"]]
    for source in sources:
        for key, text in config_maps[source["name"]]["data"].items():
            (folder / key).write_text(text)
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    return {setting: str(folder / pathlib.PurePosixPath(env[name]).relative_to(mount))
            for setting, name in (("config", "TENSORFLEET_GATEWAY_CONFIG"),
                                  ("revision_config", "TENSORFLEET_GATEWAY_REVISION_CONFIG")) if name in env}


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int = 0, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a loopback port (a free one unless given; ``options`` go to aiohttp's AppRunner);
    yields its base URL. It queues 2048 connections to be accepted, as uvicorn (vLLM's server) does: with
    aiohttp's 128, a burst of connections beyond it waits a second for the kernel's SYN retransmit."""
    runner = web.AppRunner(app, access_log=None, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=2048)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_gateway(folder: pathlib.Path, upstream: str, document: dict[str, Any] | None = None,
                          sink: RecordingSinkDouble | None = None, wait_ready: bool = True,
                          hooks: dict[str, Any] | None = None, **settings: Any) -> AsyncIterator[Gateway]:
    config = write_document(folder, document or gateway_document())
    options: dict[str, Any] = {"config": config, "upstream": upstream, "host": "127.0.0.1", "port": 0,
                               "admin_port": 0, "drain_delay_seconds": 0.0, "health_interval_seconds": 0.05,
                               "engine_poll_seconds": 0.2, **settings}
    gateway = Gateway(GatewaySettings(**options), sink or RecordingSinkDouble(), **(hooks or {}))
    await gateway.start()
    try:
        if wait_ready:
            await wait_until(lambda: gateway.state.ready, 60, "gateway ready")
        yield gateway
    finally:
        await gateway.close()


async def wait_until(predicate: Any, seconds: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


def url(gateway: Gateway, path: str, admin: bool = False) -> str:
    return f"http://127.0.0.1:{gateway.ports['admin' if admin else 'client']}{path}"


def stream_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of an OpenAI event stream, after checking it is well formed: only ``data:`` events,
    each one JSON, ``[DONE]`` once and last, and every choice that appears finished exactly once."""
    events = [e for e in raw.split(b"\n\n") if e]
    assert events, raw
    assert events[-1] == b"data: [DONE]", events[-3:]
    assert raw.endswith(b"\n\n")
    assert raw.count(b"data: [DONE]") == 1
    chunks = []
    for event in events[:-1]:
        assert event.startswith(b"data: {"), event[:80]
        chunks.append(json.loads(event[6:]))
    finished: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason") is not None:
                finished[choice["index"]] = finished.get(choice["index"], 0) + 1
    seen = {c["index"] for chunk in chunks for c in chunk.get("choices") or ()}
    assert finished == dict.fromkeys(seen, 1), (finished, seen)
    return chunks


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                   for chunk in chunks for c in chunk.get("choices") or ())


def start_gateway_process(folder: pathlib.Path) -> tuple[subprocess.Popen[str], int, int]:
    """The gateway's `serve` loop in its own process, before a stand-in engine (0.05 s a token); it prints
    "sink closed" as it exits. The process, its client port and its admin port."""
    port, admin = free_port(), free_port()
    script = textwrap.dedent(f"""
        import asyncio, pathlib, sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        from engines.standin import StandinEngine
        from gateway_support import gateway_document, serving, write_document
        from tensorfleet.gateway import server
        from tensorfleet.gateway.settings import GatewaySettings

        class SinkDouble:  # test double of the metering sink
            def submit(self, event): pass
            def admitted(self, request_id, at): pass
            def reconfigure(self, config): pass
            async def start(self): pass
            async def close(self): print("sink closed", flush=True)
            def gpu_utilization(self): return None

        async def main():
            async with serving(StandinEngine(token_delay=0.05).app()) as upstream:
                config = write_document(pathlib.Path({str(folder)!r}), gateway_document())
                settings = GatewaySettings(config=config, upstream=upstream, host="127.0.0.1", port={port},
                                           admin_port={admin}, drain_delay_seconds=0.2, health_interval_seconds=0.05)
                return await server.serve(settings, SinkDouble())
        sys.exit(asyncio.run(main()))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    return process, port, admin


async def wait_ready(session: aiohttp.ClientSession, admin: int, seconds: float = 30) -> None:
    """Until a gateway process's /readyz on its admin port answers 200."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the gateway did not become ready"
        await asyncio.sleep(0.1)
