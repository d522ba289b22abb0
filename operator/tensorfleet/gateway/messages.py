"""The gateway's HTTP messages: requests, whole and streamed answers, JSON errors and the router.

The wire side (parsing, limits, keep-alive, pipelining, back-pressure) is ``frontend``'s connection; a
``Request`` and a ``StreamResponse`` hold their connection and write to its transport directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorfleet.gateway.frontend import _Connection

__all__ = ["BodyIncomplete", "BodyTooLarge", "Handler", "Request", "Response", "Router", "StreamResponse",
           "error_body", "error_json", "error_type", "json_response"]

class BodyTooLarge(Exception):
    """The request body is larger than ``max_body_bytes``."""


class BodyIncomplete(ConnectionError):
    """The client closed the connection, or broke HTTP framing, before its body was complete."""


class Response:
    """A whole answer: status, body and headers (``Content-Length`` is added when written)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").partition(";")[0]


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json", headers)


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, code: str, param: str | None = None, type_: str | None = None,
               details: Mapping[str, Any] | None = None) -> bytes:
    """The gateway's error answers, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": type_ or error_type(status), "param": param, "code": code, **(details or {})}
    return json.dumps({"error": error}).encode()


def error_json(status: int, message: str, code: str) -> Response:
    return Response(status, error_body(status, message, code), "application/json")


class StreamResponse:
    """An answer written as it is produced; from :meth:`Request.stream`.

    Chunked transfer encoding; to an HTTP/1.0 client the body runs until the connection closes. The status
    line and headers go out with the first data (one write, one packet), so until then ``started`` is
    false and the handler may still answer something else.
    """

    __slots__ = ("_chunked", "_connection", "_head", "finished", "status")

    def __init__(self, connection: _Connection, status: int, head: bytes, chunked: bool) -> None:
        self._connection = connection
        self._head: bytes | None = head
        self._chunked = chunked
        self.status = status
        self.finished = False

    @property
    def started(self) -> bool:
        return self._head is None

    def _frame(self, data: bytes) -> bytes:
        framed = (b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data) if data else b""
        if self._head is not None:
            framed, self._head = self._head + framed, None
        return framed

    async def write(self, data: bytes) -> None:
        """Send ``data`` at once; waits while the client reads slower than it is written to.

        Raises ``ConnectionResetError`` once the client has gone.
        """
        if not data:
            return
        connection = self._connection
        if connection.closed:
            raise ConnectionResetError("the client closed the connection")
        connection.transport.write(self._frame(data))
        if connection.write_paused:
            await connection.drained()

    async def write_eof(self, data: bytes = b"") -> None:
        """Send ``data`` (if any) and the end of the answer, in one write."""
        if self.finished:
            return
        self.finished = True
        connection = self._connection
        if connection.closed:
            raise ConnectionResetError("the client closed the connection")
        connection.transport.write(self._frame(data) + (b"0\r\n\r\n" if self._chunked else b""))


class Request:
    """One request: method, path, headers (lower-case names), the peer, the matched route; the body by ``read``."""

    __slots__ = ("_body", "_connection", "_size", "_stream", "_waiter", "complete", "continue_sent", "headers",
                 "keep_alive", "match", "method", "path", "query", "refused", "remote", "route", "too_large",
                 "version")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.method = ""
        self.path = "/"
        self.query = ""
        self.version = "1.1"
        self.headers: dict[str, str] = {}
        self.remote: str | None = connection.remote
        self.keep_alive = True
        self.route = ""
        self.match: dict[str, str] = {}
        self.complete = False  # the whole request, body included, has arrived
        self.too_large = False
        self.continue_sent = False
        self.refused: Response | None = None  # the parser's refusal: answered instead, then the connection closes
        self._body: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._stream: StreamResponse | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def abort(self) -> None:
        """Close the connection now (an answer that cannot be finished cleanly)."""
        self.keep_alive = False
        if not self._connection.closed:
            self._connection.transport.close()

    async def read(self) -> bytes:
        """The whole body; ``BodyTooLarge`` beyond the limit, ``BodyIncomplete`` if it cannot arrive."""
        while not self.complete and not self.too_large:
            if self.refused is not None or self._connection.closed:
                raise BodyIncomplete("the request body is incomplete or malformed")
            if not self.continue_sent and self.headers.get("expect", "").lower() == "100-continue":
                self.continue_sent = True
                self._connection.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.too_large:
            raise BodyTooLarge
        if len(self._body) != 1:
            self._body = [b"".join(self._body)]
        return self._body[0]

    def stream(self, status: int, headers: Mapping[str, str]) -> StreamResponse:
        """A streamed answer; write to it, then ``write_eof`` (the head goes out with the first data)."""
        connection = self._connection
        if connection.closed:
            raise ConnectionResetError("the client closed the connection")
        chunked = self.version != "1.0"
        if not chunked:
            self.keep_alive = False  # an HTTP/1.0 client reads the stream to the connection's end
        self._stream = StreamResponse(connection, status, connection.head(self, status, headers, None if chunked
                                                                         else -1), chunked)
        return self._stream

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class Router:
    """Exact paths and ``{name}`` segments (one non-empty path segment each); methods per path."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" not in path:
            self._exact.setdefault(path, {})[method] = handler
            return
        segments = tuple(path.split("/"))
        for known, _route, methods in self._patterns:
            if known == segments:
                methods[method] = handler
                return
        self._patterns.append((segments, path, {method: handler}))

    def resolve(self, path: str) -> tuple[str, dict[str, Handler], dict[str, str]] | None:
        """(route, handlers by method, path parameters) for ``path`` (decoded), or None."""
        methods = self._exact.get(path)
        if methods is not None:
            return path, methods, {}
        parts = path.split("/")
        for segments, route, methods in self._patterns:
            if len(segments) != len(parts):
                continue
            match: dict[str, str] = {}
            for pattern, part in zip(segments, parts, strict=True):
                if pattern.startswith("{"):
                    if not part:
                        break
                    match[pattern[1:-1]] = part
                elif pattern != part:
                    break
            else:
                return route, methods, match
        return None
