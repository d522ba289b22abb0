"""Pod termination as the kubelet runs it: the engine's rendered preStop hook against a real gateway process.

On pod deletion the kubelet runs the engine's preStop hook as it sends the gateway SIGTERM, and sends the
engine SIGTERM only when the hook returns (or the grace period runs out)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from builders import inference_service
from engines.processes import free_port
from gateway_support import start_gateway_process, wait_ready
from integration.test_gateway_pipeline import CHAT, post
from tensorfleet.api.types import InferenceService
from tensorfleet.render import context as c
from tensorfleet.render.context import RenderContext
from tensorfleet.render.workload import render_deployment

pytestmark = pytest.mark.integration


def engine_pre_stop(admin_port: int, seconds: int | None = None) -> list[str]:
    """The engine's rendered preStop command, run by this Python, watching ``admin_port``."""
    body = inference_service()
    body["metadata"]["uid"] = "uid-1"
    deployment = render_deployment(InferenceService.from_body(body), RenderContext(), 1)
    (engine,) = [x for x in deployment["spec"]["template"]["spec"]["containers"] if x["name"] == "engine"]
    python, flag, script, port, limit = engine["lifecycle"]["preStop"]["exec"]["command"]
    assert (python, port) == ("python3", str(c.ADMIN_PORT))
    return [sys.executable, flag, script, str(admin_port), str(seconds) if seconds is not None else limit]


def test_the_engine_keeps_serving_until_the_gateway_has_drained(tmp_path: pathlib.Path) -> None:
    process, port, admin = start_gateway_process(tmp_path)
    try:
        held, finished = asyncio.run(_terminate_pod(process, port, admin, engine_pre_stop(admin)))
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert held, "the hook returned while the gateway was still draining a stream in flight"
    assert finished == 0
    assert process.returncode == 0


async def _terminate_pod(process: subprocess.Popen[str], port: int, admin: int,
                         hook: list[str]) -> tuple[bool, int]:
    """Whether the hook still held the engine while a stream was in flight; its exit status."""
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, admin)
        body = {**CHAT, "max_tokens": 30, "stream": True}  # 1.5 s at 0.05 s a token
        request = asyncio.create_task(post(session, f"http://127.0.0.1:{port}/v1/chat/completions", body))
        await asyncio.sleep(0.3)
        os.kill(process.pid, signal.SIGTERM)
        pre_stop = await asyncio.create_subprocess_exec(*hook)
        await asyncio.sleep(0.8)
        held = pre_stop.returncode is None and not request.done()
        status, raw, _ = await request
        assert (status, raw.endswith(b"data: [DONE]\n\n")) == (200, True)
        return held, await asyncio.wait_for(pre_stop.wait(), 10)  # ends with the gateway, not at its limit


def test_the_hook_gives_up_on_a_gateway_that_does_not_exit() -> None:
    """Bounded by the drain's length, so the engine still gets its SIGTERM within the grace period."""
    with socket.create_server(("127.0.0.1", free_port())) as gateway:
        started = time.monotonic()
        subprocess.run(engine_pre_stop(gateway.getsockname()[1], seconds=2), check=True, timeout=20)
    assert 2 <= time.monotonic() - started < 6


def test_the_hook_returns_at_once_when_no_gateway_listens() -> None:
    started = time.monotonic()
    subprocess.run(engine_pre_stop(free_port()), check=True, timeout=20)
    assert time.monotonic() - started < 3
