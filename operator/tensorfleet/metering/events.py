"""What the gateway tells metering about each request: the contract between the two halves.

The gateway builds one ``RequestEvent`` per request and one ``ColdStartEvent`` per pod start and hands
them to an ``EventSink``. ``submit`` must never block the response path and never raise: a sink
queues the event and does its work (attribution, ledger append, export) elsewhere.

Times: ``*_at`` fields are wall-clock seconds (``time.time()``) for records; the others are
``time.monotonic()`` seconds, the base the NVML sampler also uses, so intervals line up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class TokenChunk:
    """Tokens the engine generated that the gateway forwarded at one moment (monotonic seconds)."""

    at: float
    tokens: int


@dataclasses.dataclass(frozen=True)
class RequestEvent:
    request_id: str  # unique per request, assigned by the gateway
    tenant: str
    model: str  # the served model name
    endpoint: str  # e.g. /v1/chat/completions
    received_at: float  # wall clock
    received: float  # monotonic: the request arrived
    admitted: float | None  # monotonic: sent to the engine (None: rejected before admission)
    first_token: float | None  # monotonic: first generated token forwarded (prompt processed by then)
    done: float  # monotonic: response finished (or aborted)
    chunks: tuple[TokenChunk, ...]  # generated tokens as they were forwarded; one chunk at `done` if not streamed
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the engine served from its prefix cache
    status: int  # HTTP status sent to the client
    streaming: bool
    billable: bool  # False for warm-up requests and anything served before the pod was ready
    cache_hit: bool = False  # answered from the gateway's response cache: no GPU time
    truncated: bool = False
    truncated_tokens: int = 0
    runaway_stopped: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ColdStartEvent:
    """One pod start: container start -> engine healthy -> warm -> ready, each stage timed. Never billed."""

    pod: str
    started_at: float  # wall clock of the container start
    stages: tuple[tuple[str, float], ...]  # (stage name, seconds), in order
    total_seconds: float


class EventSink(Protocol):
    def submit(self, event: RequestEvent | ColdStartEvent) -> None:
        """Take the event; return at once; never raise."""

    def admitted(self, request_id: str, at: float) -> None:
        """``request_id`` was sent to the engine at monotonic ``at``: attribution counts its prompt work from
        then while it is in flight, before its event arrives. Return at once; never raise."""

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """gateway.json changed (prices, resource units); applies to requests submitted from now on.
        ValueError when the new configuration is unusable (the previous one stays)."""
