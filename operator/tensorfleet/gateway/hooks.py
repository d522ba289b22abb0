"""The request pipeline's extension points, and the request as it moves through the gateway.

Two kinds of policy plug in beside the token policy:

* a ``RequestHook`` runs after authentication, validation and the max-tokens clamp and before the input
  count, the rate limit and the engine. It may rewrite ``ProxyRequest.body`` (``replace_body``), add
  response headers and flags, or refuse the request by raising ``GatewayError``;
* a ``ResponseGuard`` (one per request, from ``ResponseHook.open``) sees every event the engine streams
  (and a non-streamed body) before the client does. Returning ``Stop`` aborts the engine request and
  ends the response cleanly: the client gets a final chunk with ``finish_reason`` and ``[DONE]``, and
  only the tokens produced are billed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

from tensorfleet.gateway.errors import lone_surrogate


@dataclasses.dataclass(frozen=True)
class Stop:
    """Stop the generation now; ``reason`` is recorded in the request's flags (e.g. ``runaway``)."""

    reason: str
    finish_reason: str = "length"


@dataclasses.dataclass
class ProxyRequest:
    request_id: str
    endpoint: str  # the route, e.g. /v1/chat/completions or /v2/models/{model}/generate
    tenant: str
    body: dict[str, Any]
    raw: bytes  # the body as received: sent upstream unchanged unless something rewrote it
    streaming: bool
    received: float  # monotonic
    received_at: float  # wall clock
    billable: bool
    modified: bool = False
    client_wants_usage: bool = False
    prompt_tokens: int | None = None  # counted with the engine's tokenizer, when the policy needed a count
    client_max_tokens: int | None = None  # the client's output bound the engine honours, after the clamp
    output_bound: str = "max_tokens"  # the field of client_max_tokens, as the client set it (a field path)
    response_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. truncated, truncated_tokens

    appended: dict[str, Any] = dataclasses.field(default_factory=dict)  # set by set_fields, sent after raw's

    def replace_body(self, body: dict[str, Any]) -> None:
        self.body = body
        self.modified = True

    def set_fields(self, fields: Mapping[str, Any]) -> None:
        """Set top-level fields of the body. While each is one the client did not send, the engine gets the
        client's own bytes with the new fields appended, instead of the whole body encoded again."""
        if self.modified or not self.body or any(name in self.body for name in fields) \
                or not (self.raw.lstrip()[:1] == b"{" and self.raw.rstrip()[-1:] == b"}"):  # e.g. UTF-16
            self.replace_body({**self.body, **fields})
            return
        self.body = {**self.body, **fields}
        self.appended.update(fields)

    def upstream_bytes(self) -> bytes:
        if self.modified:
            try:
                return compact(self.body)
            except UnicodeEncodeError:  # a lone surrogate ("\ud800"): parsed, but not text that can be written
                raise lone_surrogate(self.body) from None
        if self.appended:
            return self.raw.rstrip()[:-1] + b"," + compact(self.appended)[1:]
        return self.raw


def compact(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, as the gateway sends bodies on."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class TokenCounter(Protocol):
    async def count_prompt(self, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        """Prompt tokens of each sequence in the request, counted with the engine's own tokenizer."""

    async def context_window(self) -> int | None:
        """The model's context window in tokens (model.maxModelLen, else what the engine reports), if known."""


class RequestHook(Protocol):
    async def before_upstream(self, request: ProxyRequest, tokens: TokenCounter) -> None:
        """Rewrite or refuse the request (raise GatewayError) before it is counted and admitted."""


class ResponseGuard(Protocol):
    def on_event(self, payload: bytes) -> Stop | None:
        """One streamed event's JSON payload, before the client sees it."""

    def on_body(self, body: dict[str, Any]) -> Stop | None:
        """A whole (non-streamed) response body; with a Stop, the guard may have shortened its text in place."""


class ResponseHook(Protocol):
    def open(self, request: ProxyRequest) -> ResponseGuard | None:
        """A guard for this request's response, or None to let it through unwatched."""
