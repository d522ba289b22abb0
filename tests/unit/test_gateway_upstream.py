"""The gateway's engine-side HTTP/1.1 connections, against scripted servers on real loopback sockets.

Each test runs on asyncio's own loop and on uvloop (the gateway's), since transports differ between them.
The scripted servers answer byte for byte what each test needs, including what a well-behaved engine
never sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from tensorfleet.gateway import upstream
from tensorfleet.gateway.upstream import EngineBrokeOff, EngineConnections, EngineUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
HEADERS = {"Content-Type": "application/json", "X-Request-Id": "tf-1"}


def run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


@contextlib.asynccontextmanager
async def engine(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A scripted server; yields its URL and a list that gets one entry per connection it accepted."""
    accepted: list[int] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", accepted


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(request line, headers, body) of one request, or raises IncompleteReadError at the end."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].split(b"\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(b":") for f in fields)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body))


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its own request line and body."""
    while True:
        try:
            line, _, body = await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(answer(line + b" " + body))
        await writer.drain()


def connections(url: str, idle_timeout: float = 5.0) -> EngineConnections:
    return EngineConnections(url, connect_timeout=2.0, idle_timeout=idle_timeout)


async def post(pool: EngineConnections, body: bytes = b"{}", path: str = "/v1/completions") -> tuple[int, bytes]:
    exchange = await pool.post(path, body, HEADERS)
    try:
        return exchange.status, await exchange.read()
    finally:
        pool.release(exchange)


@LOOPS
def test_answers_are_read_whole_and_connections_kept_alive(loop: str) -> None:
    async def scenario() -> None:
        async with engine(echo_forever) as (url, accepted):
            pool = connections(url)
            for index in range(3):
                status, body = await post(pool, b'{"n": %d}' % index)
                assert status == 200
                assert body == b'POST /v1/completions HTTP/1.1 {"n": %d}' % index
            exchange = await pool.post("/v1/models", b"", HEADERS)
            assert exchange.content_type == "application/json"
            assert exchange.headers["content-length"] == str(len(await exchange.read()))
            pool.release(exchange)
            pool.close()
        assert len(accepted) == 1
        assert pool.opened == 1

    run(loop, scenario)


@LOOPS
def test_a_stream_is_passed_on_as_it_arrives(loop: str) -> None:
    """Events come out while the engine is still producing (nothing is held back), and what arrived in one
    read comes out as one piece (one write to the client, not one per event)."""
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n7\r\ndata: 1\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await echo_forever(reader, writer)

    async def scenario() -> None:
        async with engine(handler) as (url, accepted):
            pool = connections(url)
            exchange = await pool.post("/v1/completions", b"{}", HEADERS)
            assert exchange.headers["content-type"] == "text/event-stream"
            chunks = exchange.chunks()
            assert await anext(chunks) == b"data: first\n\ndata: 1"
            go_on.set()
            assert [chunk async for chunk in chunks] == [b"data: second\n\n"]
            pool.release(exchange)
            assert (await post(pool))[0] == 200  # the same connection, read to its end
        assert len(accepted) == 1

    run(loop, scenario)


@LOOPS
def test_a_kept_connection_the_engine_dropped_is_retried_once_on_a_new_one(loop: str) -> None:
    """uvicorn closes idle connections; a request that meets one is sent again, as nothing of it ran."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, body = await read_request(reader)
        writer.write(answer(body))
        await writer.drain()
        await read_request(reader)  # the second request on this connection: closed without an answer

    async def scenario() -> None:
        async with engine(handler) as (url, accepted):
            pool = connections(url)
            assert await post(pool, b"one") == (200, b"one")
            assert await post(pool, b"two") == (200, b"two")
        assert len(accepted) == 2

    run(loop, scenario)


@LOOPS
def test_a_new_connection_closed_before_an_answer_is_an_error_not_a_retry(loop: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def scenario() -> None:
        async with engine(handler) as (url, accepted):
            with pytest.raises(EngineBrokeOff, match="closed the connection before answering"):
                await post(connections(url))
        assert len(accepted) == 1

    run(loop, scenario)


@LOOPS
@pytest.mark.parametrize("ending", ["connection-close", "close-delimited"])
def test_answers_that_end_the_connection_are_read_and_not_kept(loop: str, ending: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if ending == "connection-close":
            writer.write(answer(b"whole", extra=b"Connection: close\r\n"))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\nuntil the end")
        await writer.drain()

    async def scenario() -> None:
        async with engine(handler) as (url, accepted):
            pool = connections(url)
            for _ in range(2):
                assert (await post(pool))[1] == (b"whole" if ending == "connection-close" else b"until the end")
        assert len(accepted) == 2

    run(loop, scenario)


@LOOPS
@pytest.mark.parametrize(("sent", "message"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "closed the connection mid-answer"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "closed the connection mid-answer"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not valid HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (upstream.MAX_HEADER_BYTES + 1) + b"\r\n\r\n", "not valid HTTP/1.1"),
])
def test_broken_answers_are_engine_errors(loop: str, sent: bytes, message: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)
        await writer.drain()

    async def scenario() -> None:
        async with engine(handler) as (url, _):
            with pytest.raises(EngineBrokeOff, match=message):
                await post(connections(url))

    run(loop, scenario)


@LOOPS
def test_an_engine_that_stops_sending_times_out_and_loses_its_connection(loop: str) -> None:
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # until the gateway closes its end
        eof.set()

    async def scenario() -> None:
        async with engine(handler) as (url, _):
            pool = connections(url, idle_timeout=0.3)
            exchange = await pool.post("/v1/completions", b"{}", HEADERS)
            chunks = exchange.chunks()
            assert await anext(chunks) == b"abc"
            with pytest.raises(TimeoutError):
                await anext(chunks)
            pool.release(exchange)
            await asyncio.wait_for(eof.wait(), 5)

    run(loop, scenario)


@LOOPS
@pytest.mark.parametrize("when", ["waiting-for-headers", "mid-body"])
def test_leaving_an_answer_early_closes_the_connection_so_the_engine_aborts(loop: str, when: str) -> None:
    """What aborts a vLLM request when its client goes away: the connection drops."""
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if when == "mid-body":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
        await reader.read()
        eof.set()

    async def scenario() -> None:
        async with engine(handler) as (url, _):
            pool = connections(url)
            if when == "waiting-for-headers":
                request = asyncio.create_task(pool.post("/v1/completions", b"{}", HEADERS))
                await asyncio.sleep(0.1)
                request.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await request
            else:
                exchange = await pool.post("/v1/completions", b"{}", HEADERS)
                assert await anext(exchange.chunks()) == b"abc"
                pool.release(exchange)
            await asyncio.wait_for(eof.wait(), 5)
            assert not pool._idle

    run(loop, scenario)


@LOOPS
def test_a_slow_reader_stops_the_socket_being_read_and_loses_nothing(loop: str) -> None:
    size = 4 * upstream.PAUSE_BYTES

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(bytes(range(256)) * (size // 256)))
        await writer.drain()
        await echo_forever(reader, writer)

    async def scenario() -> None:
        async with engine(handler) as (url, _):
            pool = connections(url)
            exchange = await pool.post("/v1/completions", b"{}", HEADERS)
            for _ in range(50):
                if exchange._paused:
                    break
                await asyncio.sleep(0.02)
            assert exchange._paused
            assert exchange._buffered <= upstream.PAUSE_BYTES + 256 * 1024  # at most one socket read more
            body = await exchange.read()
            assert body == bytes(range(256)) * (size // 256)
            assert not exchange._paused
            pool.release(exchange)
            assert (await post(pool))[0] == 200

    run(loop, scenario)


@LOOPS
def test_no_engine_is_unreachable_naming_where(loop: str) -> None:
    async def scenario() -> None:
        async with engine(echo_forever) as (url, _):
            pass  # closed: nothing listens there any more
        with pytest.raises(EngineUnreachable, match=f"cannot connect to the engine at {url[7:]}"):
            await post(connections(url))

    run(loop, scenario)


@LOOPS
def test_the_caller_hears_when_a_request_is_on_its_way_and_only_then(loop: str) -> None:
    """What a request is billed once its client left depends on it: nothing unless the engine had it."""
    async def scenario() -> None:
        sent: list[str] = []
        async with engine(echo_forever) as (url, _):
            pool = connections(url)
            pool.release(await pool.post("/v1/completions", b"{}", HEADERS, lambda: sent.append("reached")))
            pool.close()
        with pytest.raises(EngineUnreachable):
            await connections(url).post("/v1/completions", b"{}", HEADERS, lambda: sent.append("unreachable"))
        assert sent == ["reached"]

    run(loop, scenario)


@LOOPS
def test_paths_are_percent_encoded_and_header_values_cannot_break_lines(loop: str) -> None:
    async def scenario() -> None:
        async with engine(echo_forever) as (url, _):
            pool = connections(url + "/engine/")
            assert (await post(pool, path="/v2/models/my model/generate"))[1] \
                == b"POST /engine/v2/models/my%20model/generate HTTP/1.1 {}"
            with pytest.raises(ValueError, match="X-Request-Id"):
                await pool.post("/v1/completions", b"{}", {"X-Request-Id": "a\r\nX-Tenant: b"})

    run(loop, scenario)


def test_only_plain_http_engine_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        EngineConnections("https://127.0.0.1:8000", 1, 1)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        EngineConnections("127.0.0.1:8000", 1, 1)
