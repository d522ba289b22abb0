"""The warm-up gate against stand-in engines that misbehave: a call of a round dropped for a moment, a
concurrent batch larger than the gateway's own connection pool, a warm-up request the engine can never take."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engines.standin import StandinEngine
from gateway_support import gateway_document, running_gateway, serving, url, wait_until

pytestmark = pytest.mark.integration


def dropping(app: web.Application, paths: tuple[str, ...], times: int = 1) -> web.Application:
    """``app`` whose first ``times`` requests to ``paths`` lose their connection (an engine restart, a flap)."""
    left = {"n": times}

    @web.middleware
    async def drop(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in paths and left["n"] > 0:
            left["n"] -= 1
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable()
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(drop)
    return app


def triton_standin() -> web.Application:
    """Just what the warm-up gate asks of Triton: health, the repository index and generate."""
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    async def index(request: web.Request) -> web.Response:
        return web.json_response([{"name": "tiny", "state": "READY"}])

    async def generate(request: web.Request) -> web.Response:
        return web.json_response({"model_name": "tiny", "text_output": "w0 w1"})

    app = web.Application()
    app.router.add_get("/v2/health/ready", ok)
    app.router.add_get("/metrics", ok)
    app.router.add_post("/v2/repository/index", index)
    app.router.add_post("/v2/models/tiny/generate", generate)
    return app


async def outcome(gw: Any) -> tuple[bool, str | None, int]:
    await wait_until(lambda: gw.state.ready or gw.state.failed is not None, 20, "ready or failed")
    async with aiohttp.ClientSession() as session, session.get(url(gw, "/livez", admin=True)) as response:
        return gw.state.ready, gw.state.failed, response.status


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions"])
async def test_a_dropped_engine_call_fails_only_that_round(tmp_path: pathlib.Path, path: str) -> None:
    document = gateway_document(warmup={"timeoutSeconds": 30, "requests": [{"promptTokens": 8, "maxTokens": 2}]})
    async with serving(dropping(StandinEngine().app(), (path,))) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw:
        assert await outcome(gw) == (True, None, 200)


async def test_a_dropped_triton_repository_index_fails_only_that_round(tmp_path: pathlib.Path) -> None:
    document = gateway_document(runtime="triton", warmup={"timeoutSeconds": 30,
                                                          "requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with serving(dropping(triton_standin(), ("/v2/repository/index",))) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False, runtime="triton") as gw:
        assert await outcome(gw) == (True, None, 200)
        assert gw.engine.models == frozenset({"tiny"})


class PeakEngine(StandinEngine):
    """Counts the generations it runs at once, and the longest it took."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.now = self.peak = 0
        self.slowest = 0.0

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.now += 1
        self.peak = max(self.peak, self.now)
        started = time.monotonic()
        try:
            return await super().generate(request)
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.now -= 1


async def test_a_warmup_batch_larger_than_the_gateway_pool_reaches_the_engine_at_once(tmp_path: pathlib.Path) -> None:
    engine = PeakEngine(token_delay=0.1)  # 2 tokens: ~200 ms per request, however many run at once
    document = gateway_document(warmup={"timeoutSeconds": 10, "maxLatencyMs": 600, "requests": [
        {"prompt": "warm up", "maxTokens": 2, "concurrency": 400}]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw:
        ready, failed, _ = await outcome(gw)
    assert engine.peak == 400
    assert ready, failed


class WindowEngine(StandinEngine):
    """Refuses what vLLM refuses: prompt plus max_tokens over its window (1024, what /v1/models says)."""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        asked = self.count(body) + int(body.get("max_tokens", 16))
        if asked > 1024:
            self.received.append(body)
            return web.json_response({"object": "error", "message": "This model's maximum context length is 1024 "
                                      f"tokens. However, you requested {asked} tokens.", "code": 400}, status=400)
        return await super().generate(request)


async def warm_up_against(tmp_path: pathlib.Path, engine: StandinEngine, warmup: dict[str, Any]) -> str:
    document = gateway_document(warmup={"timeoutSeconds": 30, **warmup})
    document["model"]["maxModelLen"] = None  # vLLM takes the window from the model: only the engine knows it
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw:
        await wait_until(lambda: gw.state.failed is not None, 5, "failed at once")
        return gw.state.failed or ""


async def test_warmup_request_over_the_learned_window_fails_at_once_naming_the_field(tmp_path: pathlib.Path) -> None:
    engine = WindowEngine()
    failed = await warm_up_against(tmp_path, engine, {"requests": [{"promptTokens": 8, "maxTokens": 2},
                                                                   {"promptTokens": 2000, "maxTokens": 16}]})
    assert engine.received == []  # nothing sent that could not pass
    assert "spec.warmup.requests[1].promptTokens: Invalid value: 2000" in failed
    assert "context window 1024" in failed


async def test_warmup_request_the_engine_refuses_fails_at_once_with_its_message(tmp_path: pathlib.Path) -> None:
    engine = WindowEngine()
    long_text = " ".join(["word"] * 1020)  # a text prompt: its tokens are known to the engine only
    failed = await warm_up_against(tmp_path, engine, {"requests": [{"prompt": long_text, "maxTokens": 16}]})
    assert len(engine.received) == 1  # a refusal is not retried
    assert "spec.warmup.requests[0]: the engine refuses it" in failed
    assert "context window is 1024) with status 400" in failed
    assert "(This model's maximum context length is 1024 tokens." in failed


async def test_a_refused_default_warmup_request_is_named_as_such(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    engine.fail_status = 422
    failed = await warm_up_against(tmp_path, engine, {"requests": []})
    assert len(engine.received) == 1
    assert "the default warm-up request (a short prompt): the engine refuses it" in failed
    assert "with status 422 (engine failure)" in failed


async def test_an_engine_error_is_retried_until_it_passes(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    engine.fail_status = 503
    document = gateway_document(warmup={"timeoutSeconds": 30, "requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw:
        await wait_until(lambda: len(engine.received) >= 2, 5, "a second round")
        engine.fail_status = None
        assert await outcome(gw) == (True, None, 200)
