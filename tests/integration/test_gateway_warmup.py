"""The warm-up gate against stand-in engines that misbehave: a call of a round dropped for a moment, a
concurrent batch larger than the gateway's own connection pool, a warm-up request the engine can never take."""

from __future__ import annotations

import pathlib
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


async def test_an_engine_error_is_retried_until_it_passes(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    engine.fail_status = 503
    document = gateway_document(warmup={"timeoutSeconds": 30, "requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw:
        await wait_until(lambda: len(engine.received) >= 2, 5, "a second round")
        engine.fail_status = None
        assert await outcome(gw) == (True, None, 200)
