"""The gateway's HTTP/1.1 connections to the engine for the requests it proxies.

Every admitted request goes to the engine through here; everything else the gateway asks the engine
(health, warm-up, ``/tokenize``, model lists, metrics) still goes through aiohttp's client. Why two:
on this path aiohttp's client costs about 0.25 ms per request in Python (request and response objects,
timeouts, a stream reader, a connector with per-host bookkeeping), which is half of the gateway's whole
latency budget, while the engine is one trusted HTTP/1.1 server on localhost that needs none of it
(``bench/gateway.py`` prices both, ``docs/gateway.md`` has the figures). Parsing is httptools
(llhttp, the parser of Node.js and uvicorn); this module only keeps connections and moves bytes.

What a caller gets from :meth:`EngineConnections.post` once the engine's status line and headers are
in: ``status``, ``headers`` (lower-case names), ``content_type``, then the body with :meth:`read` or
:meth:`Exchange.chunks` (as it arrives, with back-pressure: the socket stops being read while more
than 256 KiB wait), and finally :meth:`Exchange.release`, which keeps the connection for the next
request when the answer was read to its end, and closes it otherwise. Closing is how an engine request
is aborted: vLLM and Triton cancel a request whose connection drops.

Errors: :class:`EngineUnreachable` (no connection: the engine is down), :class:`EngineBrokeOff` (the
connection dropped or the engine sent something that is not HTTP), ``TimeoutError`` (nothing from the
engine for ``idle_timeout`` seconds). There is no total timeout; long streams run on.

A kept connection the engine closed while idle (uvicorn, which vLLM runs on, drops them after 5 s)
fails before any byte of an answer; that request is sent again once on a new connection, as Go's
``net/http`` does, since the engine cannot have started on it.
"""

from __future__ import annotations

import asyncio
import collections
import time
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import quote, urlsplit

import httptools

MAX_HEADER_BYTES = 64 * 1024  # an engine's status line and headers beyond this are not an answer
PAUSE_BYTES = 256 * 1024  # stop reading the socket while this much body waits for the caller
KEEP_IDLE_SECONDS = 60.0  # a connection idle longer than this is closed rather than reused
MAX_IDLE = 256  # kept connections beyond this are closed (the engine's own concurrency is far lower)
_PATH_SAFE = "/:@!$&'()*+,;="


class EngineUnreachable(ConnectionError):
    """No connection to the engine could be made."""


class EngineBrokeOff(ConnectionError):
    """The connection dropped mid-answer, or the engine's bytes were not an HTTP/1.1 answer."""


class _ClosedBeforeAnswer(EngineBrokeOff):
    """The connection closed before any byte of an answer came back."""


class Exchange(asyncio.Protocol):
    """One connection to the engine; it carries one request and answer at a time."""

    status: int
    headers: dict[str, str]

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.idle_timeout = idle_timeout
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers = {}
        self._header_bytes = 0
        self._headers_in = False
        self._complete = False
        self._received = False
        self._error: BaseException | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineBrokeOff(f"the engine's answer is not valid HTTP/1.1: {exc}"))
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(EngineBrokeOff("the engine switched protocols"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._complete or self._error is not None:
            return
        if self._headers_in and "content-length" not in self.headers \
                and "chunked" not in self.headers.get("transfer-encoding", "").lower():
            self._complete = True  # a body delimited by the end of the connection: it ended
            self._wake()
            return
        detail = f": {exc}" if exc else ""
        if not self._received:
            self._fail(_ClosedBeforeAnswer(f"the engine closed the connection before answering{detail}"))
        else:
            self._fail(EngineBrokeOff(f"the engine closed the connection mid-answer{detail}"))

    def pause_writing(self) -> None:  # a request body larger than the socket buffer: the OS drains it
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks -----------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError(f"headers longer than {MAX_HEADER_BYTES} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._headers_in = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        if not self._parser.should_keep_alive():
            self.closed = True  # read to the end, then closed by release()
        self._wake()

    # ---- waiting -----------------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the parser has something new, or ``idle_timeout`` seconds pass without a byte."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self.idle_timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    # ---- the caller's side -------------------------------------------------------------------------------

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream").partition(";")[0].strip().lower()

    async def _answer(self) -> None:
        while not self._headers_in:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, everything already in at once; raises EngineBrokeOff if it ends early."""
        body = self._body
        while True:
            if body:
                chunk = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                self._buffered = 0
                if self._paused and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                yield chunk
                continue
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def at_end(self) -> bool:
        """Whether the whole answer has arrived and been taken (the chunk just yielded was the last)."""
        return self._complete and not self._body

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            self._fail(_ClosedBeforeAnswer("the connection to the engine is closed"))
        else:
            self._transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class EngineConnections:
    """Kept-alive HTTP/1.1 connections to one engine (``http://host:port``), most recently used first."""

    def __init__(self, base_url: str, connect_timeout: float, idle_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the engine URL must be http://HOST:PORT on the pod, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        host_header = parts.netloc.rpartition("@")[2]
        self._head = f"Host: {host_header}\r\n".encode("latin-1")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[Exchange] = []
        self.opened = 0  # connections made (tests read it)

    async def post(self, path: str, body: bytes, headers: Mapping[str, str],
                   sent: Callable[[], None] | None = None) -> Exchange:
        """Send one request; returns once the engine's status line and headers are in. ``sent`` is called once
        the request is on its way over a connection (from then on the engine may have started on it)."""
        lines = [f"POST {quote(self.prefix + path, safe=_PATH_SAFE)} HTTP/1.1\r\n".encode("latin-1"), self._head]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} has a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        request = b"".join(lines)
        while True:
            exchange, reused = self._take()
            if exchange is None:
                exchange = await self._connect()
            exchange._reset()
            exchange.send(request)
            if sent is not None:
                sent()
            try:
                await exchange._answer()
            except _ClosedBeforeAnswer:
                exchange.close()
                if reused:
                    continue
                raise
            except BaseException:
                exchange.close()  # cancelled (the client left) or timed out: abort the engine request
                raise
            return exchange

    def release(self, exchange: Exchange) -> None:
        """Done with this answer: keep the connection if the answer was read to its end, else close it."""
        if exchange._complete and not exchange.closed and exchange._error is None and not exchange._body:
            exchange.idle_since = time.monotonic()
            self._idle.append(exchange)
            if len(self._idle) > MAX_IDLE:
                self._idle.pop(0).close()
        else:
            exchange.close()

    def _take(self) -> tuple[Exchange | None, bool]:
        idle = self._idle
        while idle:
            exchange = idle.pop()
            if not exchange.closed and time.monotonic() - exchange.idle_since < KEEP_IDLE_SECONDS:
                return exchange, True
            exchange.close()
        return None, False

    async def _connect(self) -> Exchange:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, exchange = await loop.create_connection(lambda: Exchange(loop, self.idle_timeout),
                                                           self.host, self.port)
        except TimeoutError:
            raise EngineUnreachable(f"no connection to the engine at {self.host}:{self.port} "
                                    f"within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise EngineUnreachable(f"cannot connect to the engine at {self.host}:{self.port}: "
                                    f"{exc.strerror or exc}") from None
        self.opened += 1
        return exchange

    def close(self) -> None:
        """Close the kept connections (answers in progress close when released)."""
        while self._idle:
            self._idle.pop().close()
