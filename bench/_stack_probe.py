"""Minimal pass-through proxies on several HTTP stacks, to measure what the stack itself costs (no policy).

    python bench/_stack_probe.py aiohttp UPSTREAM PORT     # aiohttp server + aiohttp client on uvloop
    python bench/_stack_probe.py aiohttp-lean UPSTREAM PORT  # aiohttp server + the gateway's engine client
    python bench/_stack_probe.py lean UPSTREAM PORT        # the gateway's own server and engine client
    python bench/_stack_probe.py uvicorn UPSTREAM PORT     # uvicorn + httptools, raw ASGI, aiohttp client
    python bench/_stack_probe.py granian UPSTREAM PORT     # granian (Rust HTTP), the same raw ASGI app

Both forward the body, stream the response chunk by chunk and reuse upstream connections, which is
all the gateway's proxy core needs from a stack. uvicorn runs from .venv-vllm, which has it.
"""

from __future__ import annotations

import os
import sys
import typing
from typing import Any

import aiohttp

if typing.TYPE_CHECKING:  # uvicorn and granian run this file from .venv-vllm, which has no tensorfleet
    from tensorfleet.gateway.upstream import EngineConnections, Exchange


def run_aiohttp(upstream: str, port: int) -> None:
    from aiohttp import web

    session: dict[str, aiohttp.ClientSession] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session["s"].post(upstream + request.path, data=body,
                                     headers={"Content-Type": "application/json"}) as up:
            response = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def start(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    serve_aiohttp(handle, port, start)


def run_aiohttp_lean(upstream: str, port: int) -> None:
    """The same proxy with the gateway's own engine connections (tensorfleet.gateway.upstream) as the client."""
    from aiohttp import web

    from tensorfleet.gateway.upstream import EngineConnections

    connections = EngineConnections(upstream, connect_timeout=5, idle_timeout=600)

    async def handle(request: web.Request) -> web.StreamResponse:
        async def start(up: Exchange) -> web.StreamResponse:
            response = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await response.prepare(request)
            return response

        return typing.cast(web.StreamResponse, await relay(connections, request.path, await request.read(), start))

    serve_aiohttp(handle, port)


async def relay(connections: EngineConnections, path: str, body: bytes, start: Any) -> Any:
    """Forward one request with the gateway's engine client; ``start(exchange)`` gives the client's response."""
    up = await connections.post(path, body, {"Content-Type": "application/json"})
    try:
        response = await start(up)
        async for chunk in up.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        connections.release(up)


def run_lean(upstream: str, port: int) -> None:
    """The gateway's own HTTP stack with no policy: tensorfleet.gateway.frontend + tensorfleet.gateway.upstream."""
    import asyncio

    import uvloop

    from tensorfleet.gateway.frontend import HTTPServer, Limits
    from tensorfleet.gateway.messages import Request, Router, StreamResponse
    from tensorfleet.gateway.upstream import EngineConnections

    connections = EngineConnections(upstream, connect_timeout=5, idle_timeout=600)

    async def handle(request: Request) -> StreamResponse:
        async def start(up: Exchange) -> StreamResponse:
            return request.stream(up.status, {"Content-Type": up.content_type})

        return typing.cast(StreamResponse, await relay(connections, request.path, await request.read(), start))

    async def main() -> None:
        router = Router()
        for path in ("/v1/completions", "/v1/chat/completions"):
            router.add("POST", path, handle)
        server = HTTPServer(router, Limits(4 << 20, 8190, 64, 75.0))
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_aiohttp(handle: Any, port: int, on_startup: Any = None) -> None:
    """Serve ``handle`` for every POST on uvloop, as both aiohttp probes do."""
    import uvloop
    from aiohttp import web

    app = web.Application()
    if on_startup is not None:
        app.on_startup.append(on_startup)
    app.router.add_post("/{tail:.*}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


_state: dict[str, Any] = {}


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI pass-through proxy (upstream from TF_PROBE_UPSTREAM)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if "s" not in _state:
        _state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    upstream = os.environ["TF_PROBE_UPSTREAM"]
    async with _state["s"].post(upstream + scope["path"], data=body,
                                headers={"Content-Type": "application/json"}) as up:
        await send({"type": "http.response.start", "status": up.status,
                    "headers": [(b"content-type", up.content_type.encode())]})
        async for chunk in up.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def run_uvicorn(upstream: str, port: int) -> None:
    import uvicorn

    os.environ["TF_PROBE_UPSTREAM"] = upstream
    uvicorn.run(asgi_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="off")


def run_granian(upstream: str, port: int) -> None:
    from granian import Granian

    os.environ["TF_PROBE_UPSTREAM"] = upstream
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    Granian("_stack_probe:asgi_app", address="127.0.0.1", port=port, interface="asgi", loop="uvloop",
            workers=1, log_enabled=False).serve()


if __name__ == "__main__":
    stack, target, listen = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runners = {"aiohttp": run_aiohttp, "aiohttp-lean": run_aiohttp_lean, "lean": run_lean, "uvicorn": run_uvicorn,
               "granian": run_granian}
    runners[stack](target.rstrip("/"), listen)
