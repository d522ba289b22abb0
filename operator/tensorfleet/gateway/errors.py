"""Errors the gateway answers with: always JSON in the OpenAI error shape, always a 4xx or 503/502/504."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tensorfleet.gateway.messages import Response, error_body, error_type


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; becomes a JSON response with ``status``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None, type_: str | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.type = type_ or error_type(status)
        self.details = dict(details or {})  # extra machine-readable fields of the error object (e.g. limit, count)

    def response(self, request_id: str | None = None) -> Response:
        return error_response(self.status, self.message, self.code, self.param, self.headers, self.type, request_id,
                              self.details)


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: Mapping[str, str] | None = None, type_: str | None = None,
                   request_id: str | None = None, details: Mapping[str, Any] | None = None) -> Response:
    extra = dict(headers or {})
    if request_id:
        extra["X-Request-Id"] = request_id
    return Response(status, error_body(status, message, code, param, type_, details), "application/json", extra)


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code, param)


def engine_unavailable(detail: str) -> GatewayError:
    return GatewayError(503, f"the engine is unavailable: {detail}", "engine_unavailable",
                        headers={"Retry-After": "1"})


def engine_error_message(body: Any) -> str | None:
    """The message of an engine's error answer: vLLM's ``error.message``, Triton's ``error`` string; None when it
    carries none."""
    error = body.get("error") if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else error
    return str(message) if message else None


def not_ready(phase: str) -> GatewayError:
    """A client request on a pod whose warm-up has not passed (or failed): refused, so the engine never sees it."""
    return GatewayError(503, f"this replica is not ready to serve (phase {phase}); another replica may serve "
                             f"the request", "not_ready", headers={"Retry-After": "1"})


def nested_too_deeply() -> GatewayError:
    """JSON that nests deeper than Python's recursion limit lets the gateway read it, or write it again."""
    return bad_request(f"the request body nests JSON arrays and objects too deeply (the limit is Python's recursion "
                       f"limit, {sys.getrecursionlimit()} levels, less the gateway's own call depth)", None,
                       "invalid_json")


def lone_surrogate(body: Any) -> GatewayError:
    """The 400 for a body whose strings are not valid Unicode: a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON
    syntax, but no text). It names the first such field; only called once writing the body failed."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in reversed(list(items)):
            here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
            for text in (key, item):
                if isinstance(text, str) and (bad := _surrogate_in(text)) is not None:
                    field = here.encode("utf-8", "backslashreplace").decode()[:200]  # a key may be the bad string
                    return bad_request(f"'{field}' has a lone UTF-16 surrogate ({bad}): JSON strings must be valid "
                                       "Unicode text", field, "invalid_value")
            pending.append((here, item))
    return bad_request("the request body has a string that is not valid Unicode", None, "invalid_value")


def _surrogate_in(text: str) -> str | None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None
