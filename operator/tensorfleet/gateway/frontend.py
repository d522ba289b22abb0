"""The gateway's HTTP/1.1 server: the client port and the admin port.

Why not aiohttp's server: on the proxy path it costs about 0.1-0.15 ms per request in Python (request
and response objects, a router with resources, middlewares, a payload stream, a writer with its own
buffering), a third of the gateway's latency budget, and about 15 % of its throughput on two cores
(``bench/gateway.py`` prices it; ``docs/gateway.md`` has the figures). Parsing is httptools (llhttp, the
parser of Node.js and uvicorn); this module keeps connections, enforces the limits and moves bytes. The
messages it carries (requests, answers, the router) are in ``messages``.

What it does for every connection:

* **Limits.** Request line and each header field at most ``max_header_bytes`` (414 / 431 beyond), at
  most ``max_headers`` fields (431), a body at most ``max_body_bytes`` (``BodyTooLarge`` from
  ``Request.read``, which the proxy answers with 413); errors are JSON and name the limit.
* **Timeouts.** A connection that has not sent a complete request header within ``idle_timeout``
  seconds (a new one, or an idle keep-alive one) is closed: this bounds slow header reads (slowloris)
  and idle connections. Body reads are timed by the caller; responses have no timeout, so long streams
  run on.
* **Keep-alive and pipelining.** HTTP/1.1 connections are kept unless the client or the server says
  ``Connection: close``; pipelined requests are answered in order, at most ``MAX_PIPELINED`` parsed ahead
  (reading pauses beyond). A response sent before its request's body was read ends the connection,
  after reading on (and discarding) for at most ``LINGER_SECONDS`` so the client sees the answer.
* **Client disconnects.** The running handler is cancelled, so the proxy aborts the engine request.
* **Back-pressure.** ``StreamResponse.write`` waits while the socket's send buffer is full.
* ``Expect: 100-continue`` is answered when the handler first reads the body.
* ``Upgrade`` is ignored: the request is answered, with its ``Content-Length`` body, then the connection
  closes (a chunked body offering an upgrade gets 400).
* Malformed requests get a 400 JSON error and the connection is closed; an unknown path 404, a wrong
  method 405 (with ``Allow``), a handler's unexpected exception 500 (logged), all JSON.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from tensorfleet.gateway.messages import Request, Response, Router, StreamResponse, error_json

__all__ = ["HTTPServer", "Limits"]

log = logging.getLogger(__name__)

MAX_PIPELINED = 16  # requests parsed ahead of the one being answered before reading pauses
LINGER_SECONDS = 2.0  # after an early answer, how long unread body bytes are read and discarded
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class Limits:
    __slots__ = ("idle_timeout", "max_body_bytes", "max_header_bytes", "max_headers")

    def __init__(self, max_body_bytes: int, max_header_bytes: int, max_headers: int, idle_timeout: float) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.idle_timeout = idle_timeout


class HTTPServer:
    """Serves ``router`` on one port; ``closing()`` true makes every answer end its connection (drain)."""

    def __init__(self, router: Router, limits: Limits, closing: Callable[[], bool] = lambda: False,
                 access_log: logging.Logger | None = None) -> None:
        self.router = router
        self.limits = limits
        self.closing = closing
        self.access_log = access_log
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._date = b""
        self._date_second = -1

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=backlog,
                                                reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close every connection (running handlers are cancelled)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the cancelled handlers run their cleanup

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    async def dispatch(self, request: Request) -> Response | StreamResponse:
        if request.refused is not None:  # the parser refused it before its handler started
            return request.refused
        resolved = self.router.resolve(request.path)
        if resolved is None:
            return error_json(404, f"no route {request.path}", "not_found")
        request.route, methods, request.match = resolved
        handler = methods.get(request.method)
        if handler is None:
            response = error_json(405, f"{request.method} is not allowed on {request.route}", "method_not_allowed")
            response.headers["Allow"] = ", ".join(sorted(methods))
            return response
        try:
            return await handler(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return error_json(500, "internal gateway error", "internal_error")


class _Reject(Exception):
    """A request the parser callbacks refuse (too long, too many headers)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Connection(asyncio.Protocol):
    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.remote: str | None = None
        self.closed = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request] = collections.deque()  # [0] is being answered
        self._parsing: Request | None = None
        self._url = b""
        self._header_count = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._refused = False  # the parser refused the stream: nothing more is parsed
        self._lingering = False  # answered early: the request's rest is read and dropped, then the connection closes
        self._upgrading: Request | None = None  # a request that offered an Upgrade, its body still arriving
        self._upgrade_left = 0  # bytes of that body still to come

    # ---- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._arm(self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        # A client's half-close (EOF) ends the connection too (asyncio's default): it is how clients hang up.
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the proxy aborts the engine request
        for request in self._queue:
            request._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drained(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()
        await self._drain

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._upgrading is not None:
                self._upgrade_body(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.status, cause.message, cause.code)
            else:
                log.error("HTTP parser callback failed", exc_info=cause)
                self._refuse(400, "malformed HTTP request", "bad_request")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}", "bad_request")

    def _upgrade(self, rest: bytes) -> None:
        """llhttp stops at the head of a request that offers an ``Upgrade`` and counts it complete, body or not.
        The offer is ignored: the request is answered as HTTP/1.1 with its ``Content-Length`` body (read here,
        from ``rest`` on), then the connection closes. A chunked body is not decoded here: 400."""
        request = self._queue[-1] if self._parsing is None and self._queue else None
        if request is None:
            self._refuse(400, "protocol upgrades are not supported", "bad_request")
            return
        self._refused = True  # nothing after this request is parsed
        request.keep_alive = False
        if "transfer-encoding" in request.headers:  # its handler has not started: it is answered this refusal
            request.refused = error_json(400, "protocol upgrades are not supported: a request offering one may "
                                              "only have a Content-Length body", "bad_request")
        elif request.content_length and not request.too_large:
            request.complete = False
            self._upgrading, self._upgrade_left = request, request.content_length
            self._upgrade_body(rest)

    def _upgrade_body(self, data: bytes) -> None:
        request = self._upgrading
        assert request is not None
        part = data[:self._upgrade_left]
        if part:
            self._upgrade_left -= len(part)
            request._size += len(part)
            request._body.append(part)
        if not self._upgrade_left:
            request.complete = True
            self._upgrading = None
        request._wake()

    # ---- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._lingering:  # the client sent a next request: the connection ends anyway
            self._close()
            raise _Reject(400, "connection closing", "bad_request")
        self._parsing = Request(self)
        self._url = b""
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_header_bytes:
            raise _Reject(414, f"the request target is longer than the limit of {self.limits.max_header_bytes} "
                               "bytes (TENSORFLEET_GATEWAY_MAX_HEADER_BYTES)", "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        self._header_count += 1
        if self._header_count > limits.max_headers:
            raise _Reject(431, f"the request has more than the limit of {limits.max_headers} header fields "
                               "(TENSORFLEET_GATEWAY_MAX_HEADERS)", "header_fields_too_large")
        if len(name) + len(value) + 2 > limits.max_header_bytes:
            raise _Reject(431, f"header field {name.decode('latin-1')[:64]!r} is longer than the limit of "
                               f"{limits.max_header_bytes} bytes (TENSORFLEET_GATEWAY_MAX_HEADER_BYTES)",
                          "header_fields_too_large")
        headers = self._parsing.headers  # type: ignore[union-attr]  # callbacks come between begin and complete
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self._parser
        request.method = parser.get_method().decode("ascii")
        request.version = parser.get_http_version()
        request.keep_alive = bool(parser.should_keep_alive())
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "the request target is not a valid URL", "bad_request") from None
        request.path = unquote(url.path.decode("latin-1")) if url.path else "/"
        request.query = url.query.decode("latin-1") if url.query else ""
        length = request.content_length
        if length is not None and length > self.limits.max_body_bytes:
            request.too_large = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.append(request)
        if self._task is None:
            self._start(request)
        elif len(self._queue) > MAX_PIPELINED:
            self._read_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        if request.too_large or self._lingering:
            return
        request._size += len(body)
        if request._size > self.limits.max_body_bytes:
            request.too_large = True
            request._body = []
        else:
            request._body.append(body)
        request._wake()

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._parsing = None
        request.complete = True
        request._wake()
        if self._lingering:
            self._close()

    # ---- serving ----------------------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        started = time.monotonic()
        status = 0
        try:
            answer = await self.server.dispatch(request)
            status = answer.status
            if isinstance(answer, Response):
                if not self.closed:
                    self.transport.write(self.head(request, answer.status, answer.headers, len(answer.body))
                                         + answer.body)
            elif not answer.finished:  # a stream left unfinished (an error mid-answer): no clean end to trust
                request.abort()
        except asyncio.CancelledError:  # the client went away (or the server closes)
            status = 499
        except ConnectionError:
            status = 499
            request.abort()
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            status = 500
            if (request._stream is None or not request._stream.started) and not self.closed:
                request.keep_alive = False
                answer = error_json(500, "internal gateway error", "internal_error")
                self.transport.write(self.head(request, 500, answer.headers, len(answer.body)) + answer.body)
            request.abort()
        finally:
            access = self.server.access_log
            if access is not None:
                access.info('%s "%s %s HTTP/%s" %d %.1fms', self.remote, request.method, request.path_qs,
                            request.version, status, 1000 * (time.monotonic() - started))
            self._finished(request)

    def head(self, request: Request, status: int, headers: Mapping[str, str], length: int | None) -> bytes:
        """Status line and headers; ``length`` None means chunked, -1 a body delimited by closing."""
        if self.server.closing() or request.refused is not None or not request.complete or request.too_large:
            request.keep_alive = False  # draining, refused, or answered before the whole body was read
        lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown")),
                 b"Date: " + self.server.date() + b"\r\n"]
        lines.extend(_header_lines(headers.items()))
        if length is None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif length >= 0:
            lines.append(b"Content-Length: %d\r\n" % length)
        if not request.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif request.version == "1.0":  # an HTTP/1.0 client keeps the connection only when told it may
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _finished(self, request: Request) -> None:
        self._task = None
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        if self.closed:
            return
        if not request.keep_alive:
            if request.complete or self._refused:
                self._close()
            else:  # answered early: read on until the request ends (or a while), so the client sees the answer
                self._queue.clear()
                self._lingering = True
                self._arm(LINGER_SECONDS)
            return
        if self._read_paused and len(self._queue) <= MAX_PIPELINED // 2:
            self._read_paused = False
            self.transport.resume_reading()
        if self._queue:
            self._start(self._queue[0])
        else:
            self._arm(self.limits.idle_timeout)

    def _refuse(self, status: int, message: str, code: str) -> None:
        """The parser refused the request being parsed: answered in turn with a JSON error, then close."""
        if self.closed or self._lingering:
            self._close()
            return
        self._refused = True
        request = self._parsing
        self._parsing = None
        if request is None or request not in self._queue:  # refused before its headers were complete
            request = Request(self)
            self._queue.append(request)
        request.refused = error_json(status, message, code)
        request.keep_alive = False
        request._wake()  # a handler reading this body gets BodyIncomplete
        if self._task is None:
            self._start(self._queue[0])

    def _close(self) -> None:
        if not self.closed:
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._task is None:
            self._close()


def _header_lines(items: Iterable[tuple[str, str]]) -> list[bytes]:
    lines = []
    for name, value in items:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return lines
