"""What the gateway tells metering about each request: the contract between the two halves.

The gateway builds one ``RequestEvent`` per request and one ``ColdStartEvent`` per engine start (the pod's,
and each engine restart it sees) and hands them to an ``EventSink``. ``submit`` must never block the
response path and never raise: a sink queues the event and does its work (attribution, ledger append,
export) elsewhere.

Times: ``*_at`` fields are wall-clock seconds (``time.time()``) for records; the others are
``time.monotonic()`` seconds, the base the NVML sampler also uses, so intervals line up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol

# Bounds of an event the metering sink takes (``request_problem``, ``chunks_problem``, ``cold_start_problem``): far
# outside anything a gateway produces, inside what a record can hold (an RFC 3339 time, a decimal price).
MAX_WALL_CLOCK = 1e10  # seconds since 1970: the year 2286
MAX_MONOTONIC = 1e12  # seconds since boot
MAX_SECONDS = 1e7  # a request's life (received -> done), a cold start's stage: 115 days
MAX_TOKENS = 10**9
Problem = tuple[str, str]  # (field, message naming the value and the limit)


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
    billable: bool  # False for warm-up requests, and client requests refused before the pod's warm-up passed
    cache_hit: bool = False  # answered from the gateway's response cache: no GPU time
    truncated: bool = False
    truncated_tokens: int = 0
    runaway_stopped: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ColdStartEvent:
    """One engine start: container start (or the previous engine seen gone) -> engine healthy -> warm -> ready,
    each stage timed. Never billed."""

    pod: str
    started_at: float  # wall clock of the container start (or of the previous engine seen gone)
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


# -- validation: a handful of comparisons per event, on the gateway's response path --------------------------
_TEXTS = ("request_id", "tenant", "model", "endpoint")
_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "truncated_tokens")
_FLAGS = ("streaming", "billable", "cache_hit", "truncated", "runaway_stopped")
# Every field a problem can name: the label values of tensorfleet_metering_events_rejected_total{field}.
PROBLEM_FIELDS = (*(f.name for f in dataclasses.fields(RequestEvent)), "chunks.at", "chunks.tokens",
                  *(f.name for f in dataclasses.fields(ColdStartEvent)))


def _number(value: Any, low: float, high: float) -> bool:
    """A real number (not a bool) within [low, high]; False for NaN and infinities."""
    return (type(value) is float or type(value) is int) and low <= value <= high


def _problem(field: str, value: Any, limit: str) -> Problem:
    return field, f"{field}={value!r:.100}: must be {limit}"


def request_problem(event: RequestEvent) -> Problem | None:
    """The first field of ``event`` a usage record cannot be made of (its token chunks aside: ``chunks_problem``),
    or None. Every time finite, token counts non-negative integers, within the bounds above."""
    e, low, high, tokens = event, -MAX_MONOTONIC, MAX_MONOTONIC, MAX_TOKENS
    # One expression for an event as the gateway builds it (a comparison is False for NaN); the field by field
    # search below only runs when this fails (it also takes integer times).
    if (type(e.received_at) is float and 0.0 <= e.received_at <= MAX_WALL_CLOCK and type(e.received) is float
            and type(e.done) is float and low <= e.received <= high and low <= e.done <= high
            and e.done - e.received <= MAX_SECONDS
            and (e.admitted is None or (type(e.admitted) is float and low <= e.admitted <= high))
            and (e.first_token is None or (type(e.first_token) is float and low <= e.first_token <= high))
            and type(e.prompt_tokens) is int and 0 <= e.prompt_tokens <= tokens
            and type(e.completion_tokens) is int and 0 <= e.completion_tokens <= tokens
            and type(e.cached_tokens) is int and 0 <= e.cached_tokens <= tokens
            and type(e.truncated_tokens) is int and 0 <= e.truncated_tokens <= tokens
            and type(e.request_id) is str and type(e.tenant) is str and type(e.model) is str
            and type(e.endpoint) is str and type(e.streaming) is bool and type(e.billable) is bool
            and type(e.cache_hit) is bool and type(e.truncated) is bool and type(e.runaway_stopped) is bool
            and type(e.status) is int and 0 <= e.status <= 999 and (e.error is None or type(e.error) is str)
            and type(e.chunks) is tuple):
        return None
    return _request_field_problem(event)


def _request_field_problem(event: RequestEvent) -> Problem | None:
    if not _number(event.received_at, 0.0, MAX_WALL_CLOCK):
        return _problem("received_at", event.received_at, f"a wall-clock time within [0, {MAX_WALL_CLOCK:g}]")
    for name in ("received", "done", "admitted", "first_token"):
        value = getattr(event, name)
        if not _number(value, -MAX_MONOTONIC, MAX_MONOTONIC) and (value is not None or name in ("received", "done")):
            return _problem(name, value, f"a monotonic time within [-{MAX_MONOTONIC:g}, {MAX_MONOTONIC:g}]")
    if event.done - event.received > MAX_SECONDS:
        return _problem("done", event.done, f"at most {MAX_SECONDS:g} s after received={event.received!r}")
    for name in _COUNTS:
        value = getattr(event, name)
        if type(value) is not int or not 0 <= value <= MAX_TOKENS:
            return _problem(name, value, f"an integer within [0, {MAX_TOKENS}]")
    for name in _TEXTS:
        if type(getattr(event, name)) is not str:
            return _problem(name, getattr(event, name), "a string")
    for name in _FLAGS:
        if type(getattr(event, name)) is not bool:
            return _problem(name, getattr(event, name), "true or false")
    if type(event.status) is not int or not 0 <= event.status <= 999:
        return _problem("status", event.status, "an HTTP status code within [0, 999]")
    if event.error is not None and type(event.error) is not str:
        return _problem("error", event.error, "a string or None")
    if type(event.chunks) is not tuple:
        return _problem("chunks", event.chunks, "a tuple of TokenChunk")
    return None


def chunks_problem(times: list[float], tokens: list[int]) -> Problem | None:
    """What is wrong with a request's token chunks (their times and token counts), or None: a few passes in C
    (a sum is NaN or infinite when a term is; sorting an ordered list is one pass), no Python loop."""
    try:
        if times:
            ordered = sorted(times) if math.isfinite(sum(times)) else [math.nan]
            if not (ordered[0] >= -MAX_MONOTONIC and ordered[-1] <= MAX_MONOTONIC):
                bad_time = next((t for t in times if not _number(t, -MAX_MONOTONIC, MAX_MONOTONIC)), times)
                return _problem("chunks.at", bad_time,
                                f"a monotonic time within [-{MAX_MONOTONIC:g}, {MAX_MONOTONIC:g}]")
        if tokens:
            counts = sorted(tokens) if type(sum(tokens)) is int else [-1]
            if not (counts[0] >= 0 and counts[-1] <= MAX_TOKENS):
                bad_count = next((n for n in tokens if type(n) is not int or not 0 <= n <= MAX_TOKENS), tokens)
                return _problem("chunks.tokens", bad_count, f"an integer within [0, {MAX_TOKENS}]")
    except TypeError:
        return _problem("chunks", list(zip(times, tokens, strict=True))[:3], "(monotonic time, token count) pairs")
    return None


def cold_start_problem(event: ColdStartEvent) -> Problem | None:
    """The first field of a cold start a record cannot be made of, or None."""
    if type(event.pod) is not str:
        return _problem("pod", event.pod, "a string")
    if not _number(event.started_at, 0.0, MAX_WALL_CLOCK):
        return _problem("started_at", event.started_at, f"a wall-clock time within [0, {MAX_WALL_CLOCK:g}]")
    if not _number(event.total_seconds, 0.0, MAX_SECONDS):
        return _problem("total_seconds", event.total_seconds, f"seconds within [0, {MAX_SECONDS:g}]")
    if type(event.stages) is not tuple:
        return _problem("stages", event.stages, "a tuple of (name, seconds)")
    for stage in event.stages:
        if not (type(stage) is tuple and len(stage) == 2 and type(stage[0]) is str
                and _number(stage[1], 0.0, MAX_SECONDS)):
            return _problem("stages", stage, f"a (name, seconds) pair with seconds within [0, {MAX_SECONDS:g}]")
    return None
