"""The gateway's HTTP/1.1 server (gateway.frontend and gateway.messages), byte by byte over real loopback sockets.

Each test runs on asyncio's own loop and on uvloop (the gateway's), since transports differ between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from tensorfleet.gateway.frontend import HTTPServer, Limits
from tensorfleet.gateway.messages import (
    BodyIncomplete,
    BodyTooLarge,
    Request,
    Response,
    Router,
    StreamResponse,
    json_response,
)

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))


class App:
    """The routes the tests serve, recording what the handlers saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.echo_started = asyncio.Event()
        self.stream_writes = 0
        self.draining = False

    def router(self) -> Router:
        router = Router()
        router.add("POST", "/echo", self.echo)
        router.add("GET", "/echo", self.echo)
        router.add("POST", "/models/{model}/run", self.echo)
        router.add("POST", "/stream", self.stream)
        router.add("POST", "/early", self.early)
        router.add("POST", "/hang", self.hang)
        router.add("POST", "/boom", self.boom)
        router.add("POST", "/flood", self.flood)
        return router

    async def echo(self, request: Request) -> Response:
        self.echo_started.set()
        try:
            body = await request.read()
        except BodyTooLarge:
            return json_response({"error": "too large"}, 413)
        except BodyIncomplete as exc:
            return json_response({"error": str(exc)}, 400)
        self.seen.append({"method": request.method, "path": request.path, "query": request.query,
                          "match": request.match, "route": request.route, "headers": request.headers})
        return Response(200, body, "application/octet-stream", {"X-Route": request.route})

    async def stream(self, request: Request) -> StreamResponse:
        await request.read()
        response = request.stream(200, {"Content-Type": "text/event-stream"})
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await response.write(part)
        await response.write_eof()
        return response

    async def early(self, request: Request) -> Response:
        return json_response({"error": "no"}, 401)  # without reading the body

    async def hang(self, request: Request) -> Response:
        await request.read()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(200)

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("a bug")

    async def flood(self, request: Request) -> StreamResponse:
        response = request.stream(200, {"Content-Type": "application/octet-stream"})
        for _ in range(48):
            await response.write(b"x" * (1 << 20))
            self.stream_writes += 1
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def serving(app: App, **limits: Any) -> AsyncIterator[int]:
    values = {"max_body_bytes": 1024, "max_header_bytes": 512, "max_headers": 16, "idle_timeout": 5.0, **limits}
    server = HTTPServer(app.router(), Limits(**values), lambda: app.draining)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    status = int(line.split()[1])
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return status, headers, body


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 3) == b""
    except ConnectionError:
        return True


@LOOPS
def test_keep_alive_and_pipelined_requests_are_answered_in_order(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/echo?a=1", b"one") + post("/echo", b"two"))  # pipelined
            first, second = await read_response(reader), await read_response(reader)
            writer.write(post("/echo", b"three"))
            third = await read_response(reader)
            writer.close()
        assert [r[2] for r in (first, second, third)] == [b"one", b"two", b"three"]
        assert first[0] == 200
        assert "date" in first[1]
        assert "connection" not in first[1]
        assert app.seen[0]["query"] == "a=1"

    run(loop, scenario)


@LOOPS
def test_routes_match_parameters_decode_paths_and_headers_fold_case(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/models/a%20b/run", b"{}", "X-Tenant: t", "x-multi: 1", "X-Multi: 2"))
            status, headers, _ = await read_response(reader)
            writer.write(b"GET /models/a/run HTTP/1.1\r\nHost: x\r\n\r\n")
            wrong = await read_response(reader)
            writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            missing = await read_response(reader)
            writer.close()
        assert status == 200
        assert headers["x-route"] == "/models/{model}/run"
        assert app.seen[0]["match"] == {"model": "a b"}
        assert app.seen[0]["headers"]["x-tenant"] == "t"
        assert app.seen[0]["headers"]["x-multi"] == "1, 2"
        assert wrong[0] == 405
        assert wrong[1]["allow"] == "POST"
        assert json.loads(wrong[2])["error"]["code"] == "method_not_allowed"
        assert missing[0] == 404
        assert json.loads(missing[2])["error"]["code"] == "not_found"

    run(loop, scenario)


@LOOPS
def test_chunked_bodies_are_decoded_and_bounded(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            small = await read_response(reader)
            writer.write(head + b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n")
            big = await read_response(reader)
            writer.close()
        assert small[:1] == (200,)
        assert small[2] == b"abcde"
        assert big[0] == 413

    run(loop, scenario)


@LOOPS
def test_an_early_answer_reaches_the_client_and_ends_the_connection(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/early", b"x" * 600)[:-300])  # the body's end never comes
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (401, "close")
            writer.write(b"x" * 300)  # the rest of the body is read and dropped, then the connection closes
            assert await closed(reader)
            writer.close()
            reader, writer = await connect(port)  # over the limit by Content-Length: refused before reading it
            writer.write(post("/echo", b"y" * 2000)[:-1500])
            status, headers, _ = await read_response(reader)
            writer.close()
        assert (status, headers["connection"]) == (413, "close")

    run(loop, scenario)


@LOOPS
def test_expect_100_continue_is_answered_when_the_body_is_read(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/echo", b"hello", "Expect: 100-continue")[:-5])
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"hello")
            status, _, body = await read_response(reader)
            writer.close()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert (status, body) == (200, b"hello")

    run(loop, scenario)


@LOOPS
@pytest.mark.parametrize(("request_bytes", "status", "words"), [
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request"),
    (b"GET /echo HTTP/1.1\r\nX-Long: " + b"a" * 600 + b"\r\n\r\n", 431, "'X-Long' is longer than the limit of 512"),
    (b"GET /echo HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n", 431,
     "limit of 16 header fields"),
    (b"GET /echo?" + b"q" * 600 + b" HTTP/1.1\r\n\r\n", 414, "limit of 512 bytes"),
])
def test_requests_the_parser_refuses_get_json_errors_naming_the_limit(loop: str, request_bytes: bytes, status: int,
                                                                      words: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(request_bytes)
            got, headers, body = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert got == status
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert words in json.loads(body)["error"]["message"]

    run(loop, scenario)


@LOOPS
def test_upgrades_are_ignored_and_the_connection_closed_after_the_answer(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(b"GET /echo HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            status, headers, _ = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert (status, headers["connection"]) == (200, "close")

    run(loop, scenario)


@LOOPS
def test_a_post_offering_an_upgrade_is_answered_with_its_body(loop: str) -> None:
    # An h2c upgrade offer, as some clients send on http:// URLs: llhttp stops at the head; the body must not be lost.
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            request = post("/echo", b'{"a": "body"}', "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                           "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
            writer.write(request[:-6])
            await app.echo_started.wait()  # the head is parsed: the rest of the body comes in a later read
            writer.write(request[-6:] + b"GET /echo HTTP/1.1\r\n\r\n")  # not parsed: the connection ends
            status, headers, body = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert (status, headers["connection"], body) == (200, "close", b'{"a": "body"}')

    run(loop, scenario)


@LOOPS
def test_a_chunked_post_offering_an_upgrade_is_refused_naming_it(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(b"POST /echo HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert (status, headers["connection"]) == (400, "close")
        assert "protocol upgrades are not supported" in json.loads(body)["error"]["message"]

    run(loop, scenario)


@LOOPS
def test_a_malformed_request_after_a_good_one_is_answered_in_turn(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(post("/echo", b"ok") + b"\x00\x01garbage\r\n\r\n")
            first, second = await read_response(reader), await read_response(reader)
            writer.close()
        assert (first[0], first[2]) == (200, b"ok")
        assert second[0] == 400

    run(loop, scenario)


@LOOPS
def test_a_handler_bug_is_a_json_500_and_the_server_goes_on(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(post("/boom", b""))
            status, _, body = await read_response(reader)
            writer.close()
            reader, writer = await connect(port)
            writer.write(post("/echo", b"still here"))
            after = await read_response(reader)
            writer.close()
        assert status == 500
        assert json.loads(body)["error"]["code"] == "internal_error"
        assert after[2] == b"still here"

    run(loop, scenario)


@LOOPS
def test_a_client_that_hangs_up_cancels_its_handler(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            _, writer = await connect(port)
            writer.write(post("/hang", b"{}"))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.wait_for(app.cancelled.wait(), 5)

    run(loop, scenario)


@LOOPS
def test_streams_are_chunked_for_http11_and_close_delimited_for_http10(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App()) as port:
            reader, writer = await connect(port)
            writer.write(post("/stream", b""))
            status, headers, body = await read_response(reader)
            writer.write(post("/echo", b"after"))  # the connection is still usable
            after = await read_response(reader)
            writer.close()
            reader, writer = await connect(port)
            writer.write(post("/stream", b"", version="1.0"))
            old = await read_response(reader)
            writer.close()
        assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"data: 1\n\ndata: 2\n\n")
        assert after[2] == b"after"
        assert "transfer-encoding" not in old[1]
        assert old[1]["connection"] == "close"
        assert old[2] == b"data: 1\n\ndata: 2\n\n"

    run(loop, scenario)


@LOOPS
def test_a_stream_waits_for_a_slow_reader(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/flood", b""))
            await asyncio.sleep(0.5)
            stalled = app.stream_writes
            _, _, body = await read_response(reader)
            writer.close()
        assert stalled < 24  # 48 MiB were on offer: the handler waited on the socket
        assert len(body) == 48 << 20

    run(loop, scenario)


@LOOPS
def test_idle_and_slow_header_connections_are_closed(loop: str) -> None:
    async def scenario() -> None:
        async with serving(App(), idle_timeout=0.3) as port:
            reader, writer = await connect(port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            assert await closed(reader)
            writer.close()
            reader, writer = await connect(port)
            writer.write(post("/echo", b"1"))
            await read_response(reader)
            assert await closed(reader)  # idle after its answer
            writer.close()

    run(loop, scenario)


@LOOPS
def test_draining_and_http10_answers_close_their_connection(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/echo", b"1", version="1.0"))
            _, old, _ = await read_response(reader)
            assert await closed(reader)
            writer.close()
            app.draining = True
            reader, writer = await connect(port)
            writer.write(post("/echo", b"1"))
            _, drained, _ = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert old["connection"] == drained["connection"] == "close"

    run(loop, scenario)


@LOOPS
def test_an_http10_client_that_asks_for_keep_alive_is_told_it_has_it(loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with serving(app) as port:
            reader, writer = await connect(port)
            writer.write(post("/echo", b"1", "Connection: keep-alive", version="1.0"))
            first = await read_response(reader)
            writer.write(post("/echo", b"2", "Connection: keep-alive", version="1.0"))
            second = await read_response(reader)
            writer.write(post("/echo", b"3", version="1.0"))  # without asking: answered, then closed
            third = await read_response(reader)
            assert await closed(reader)
            writer.close()
        assert [r[2] for r in (first, second, third)] == [b"1", b"2", b"3"]
        assert first[1]["connection"] == second[1]["connection"] == "keep-alive"
        assert third[1]["connection"] == "close"

    run(loop, scenario)


def test_header_values_with_line_breaks_are_never_written() -> None:
    async def scenario() -> None:
        async def inject(request: Request) -> Response:
            return Response(200, b"", headers={"X-Evil": "a\r\nSet-Cookie: x"})

        router = Router()
        router.add("GET", "/", inject)
        server = HTTPServer(router, Limits(1024, 1024, 16, 5))
        port = await server.start("127.0.0.1", 0)
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        writer.close()
        await server.close()
        assert status == 500
        assert "set-cookie" not in headers

    run("uvloop", scenario)
