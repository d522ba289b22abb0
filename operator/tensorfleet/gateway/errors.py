"""Errors the gateway answers with: always JSON in the OpenAI error shape, always a 4xx or 503/502/504."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tensorfleet.gateway.frontend import Response, error_body, error_type


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


def nested_too_deeply() -> GatewayError:
    """JSON that nests deeper than Python's recursion limit lets the gateway read it, or write it again."""
    return bad_request(f"the request body nests JSON arrays and objects too deeply (the limit is Python's recursion "
                       f"limit, {sys.getrecursionlimit()} levels, less the gateway's own call depth)", None,
                       "invalid_json")
