"""What the request pipeline works with: the gateway's shared services, and one request's outcome."""

from __future__ import annotations

import dataclasses

from tensorfleet.gateway.auth import TenantResolver
from tensorfleet.gateway.cache import ResponseCache
from tensorfleet.gateway.config import GatewayConfig
from tensorfleet.gateway.engine import Engine, EngineClient
from tensorfleet.gateway.hooks import RequestHook, ResponseHook
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.ratelimit import Reservation, TokenRateLimiter
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.gateway.state import ActiveRequests, Admission, GatewayState
from tensorfleet.gateway.streams import Usage
from tensorfleet.metering.events import EventSink, TokenChunk

CLIENT_CLOSED = 499  # nginx's code for "client closed the connection", used in metering records only


@dataclasses.dataclass
class Services:
    settings: GatewaySettings
    config: GatewayConfig
    engine: Engine
    client: EngineClient
    resolver: TenantResolver
    limiter: TokenRateLimiter
    cache: ResponseCache
    metrics: GatewayMetrics
    sink: EventSink
    state: GatewayState
    admission: Admission
    active: ActiveRequests
    request_hooks: list[RequestHook] = dataclasses.field(default_factory=list)
    response_hooks: list[ResponseHook] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    """What happened to one request, filled in as it goes; becomes the metering event."""

    status: int = 200
    admitted: float | None = None
    sent: bool = False  # the request went to the engine, which may have started on it
    reservation: Reservation | None = None  # the tenant's budget taken for it, settled when it is metered
    first_token: float | None = None
    chunks: list[TokenChunk] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    streamed_tokens: int = 0
    cache_hit: bool = False
    error: str | None = None
    queued: bool = True  # counted in the queue-depth gauge until admitted or refused

    def went_to_engine(self) -> None:
        self.sent = True

    def tokens_at(self, now: float, tokens: int) -> None:
        """``tokens`` generated tokens forwarded (or collected) at ``now``."""
        self.chunks.append(TokenChunk(now, tokens))
        self.streamed_tokens += tokens
        if self.first_token is None:
            self.first_token = now

    def failed(self, status: int, error: str) -> None:
        """The engine failed the request and the client gets the error: what it generated is not delivered, so
        none of its tokens is billed (the prompt is, once the engine had it, as for any failure). Its chunks stay:
        the GPU did that work, and metering gives its time to this request, not to the requests beside it."""
        self.status, self.error = status, error
        self.streamed_tokens = 0
