"""The request pipeline: authenticate, validate, apply the token policy, forward, stream, meter.

Order for a generating request: tenant (401) -> body (413/408/400) -> engine checks of the body
(400/404) -> warm-up passed (503 not_ready) -> engine up (503) -> max_tokens clamp -> request hooks ->
response cache (a hit ends here) -> input count with the engine's tokenizer (400 over the limit) -> token
budget reservation (429) -> admission (503 when the queue is full) -> the engine. Every request yields
one metering event; the sink only queues it, so nothing waits on metering.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from tensorfleet.gateway.auth import AuthError
from tensorfleet.gateway.cache import cache_key, is_deterministic
from tensorfleet.gateway.errors import (
    GatewayError,
    bad_request,
    engine_unavailable,
    lone_surrogate,
    nested_too_deeply,
    not_ready,
)
from tensorfleet.gateway.hooks import ProxyRequest
from tensorfleet.gateway.messages import BodyIncomplete, BodyTooLarge, Request, Response, StreamResponse
from tensorfleet.gateway.ratelimit import RateLimited, Reservation
from tensorfleet.gateway.relay import COLLECT, Relay, client_status
from tensorfleet.gateway.services import CLIENT_CLOSED, Outcome, Services
from tensorfleet.gateway.streams import Usage
from tensorfleet.metering.events import RequestEvent

__all__ = ["CACHE_HEADER", "Counter", "Outcome", "Proxy", "Services"]

log = logging.getLogger(__name__)

CACHE_HEADER = "X-TensorFleet-Cache"
_STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_WINDOW_RETRY_SECONDS = 30.0
# Request ids: 64 random bits per process, then a counter: unique across pods and restarts like a UUID,
# without a getrandom() system call per request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(secrets.randbelow(1 << 32))


class Counter:
    """Token counting for hooks: the engine's tokenizer, timed; the model's context window, asked once."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._window: int | None = None
        self._window_asked = -_WINDOW_RETRY_SECONDS

    async def count_prompt(self, endpoint: str, body: Any) -> list[int]:
        started = time.perf_counter()
        try:
            return await self.services.engine.count_prompt(self.services.client, endpoint, body)
        finally:
            self.services.metrics.tokenize_seconds.observe(time.perf_counter() - started)

    async def context_window(self) -> int | None:
        configured = self.services.config.max_model_len
        if configured is not None:
            return configured
        now = time.monotonic()
        if self._window is None and now - self._window_asked >= _WINDOW_RETRY_SECONDS:
            self._window_asked = now
            self._window = await self.services.engine.context_window(self.services.client)
        return self._window


class Proxy:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.counter = Counter(services)
        self.relay = Relay(services)
        self._counting: set[asyncio.Future[None]] = set()

    # ---- entry points -------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response | StreamResponse:
        s = self.s
        received, received_at = time.monotonic(), time.time()
        request_id = f"tf-{_ID_PREFIX}{next(_ids):016x}"
        s.active.enter()
        s.metrics.queue_depth.inc()
        proxied: ProxyRequest | None = None
        outcome = Outcome()
        try:
            tenant = self._tenant(request)
            body, raw = await self._parse(request)
            proxied = ProxyRequest(request_id=request_id, endpoint=request.route, tenant=tenant, body=body,
                                   raw=raw, streaming=False, received=received, received_at=received_at,
                                   billable=s.state.serving)
            if s.engine.runtime == "triton":
                proxied.flags["_path"] = request.path  # decoded; quoted again when sent (EngineConnections.post)
            s.engine.validate(proxied, request.match.get("model"))
            return await self._serve(request, proxied, outcome)
        except GatewayError as exc:
            outcome.status, outcome.error = exc.status, exc.code
            return exc.response(request_id)
        except asyncio.CancelledError:
            outcome.status, outcome.error = CLIENT_CLOSED, "client_disconnected"
            s.metrics.client_disconnects.inc()
            raise
        except RecursionError:
            if outcome.admitted is None:  # the body, parsed or written again (the clamp, the cache key): a 400
                error = nested_too_deeply()
                outcome.status, outcome.error = error.status, error.code
                return error.response(request_id)
            outcome.status, outcome.error = 500, "internal_error"  # in the engine's answer: a 500 as below
            raise
        except Exception:  # a bug: the server answers 500 (and logs it); meter what the client got
            outcome.status, outcome.error = 500, "internal_error"
            raise
        finally:
            if outcome.queued:
                s.metrics.queue_depth.dec()
            # Metering and metrics run right after this step, once a plain answer has been written to the
            # client, not before it; the request stays active (a drain waits) until they have.
            asyncio.get_running_loop().call_soon(self._finish, proxied, outcome, time.monotonic())

    def _finish(self, proxied: ProxyRequest | None, outcome: Outcome, done: float) -> None:
        if proxied is not None and _prompt_to_count(proxied, outcome):
            task = asyncio.ensure_future(self._count_then_finish(proxied, outcome, done))
            self._counting.add(task)  # a reference, until it is done
            task.add_done_callback(self._counting.discard)
            return
        try:
            if proxied is not None:
                usage = _usage(proxied, outcome)
                self.s.limiter.settle(outcome.reservation, usage.prompt_tokens + usage.completion_tokens)
                self._record(proxied, outcome, done)
        finally:
            self.s.active.leave()

    async def _count_then_finish(self, proxied: ProxyRequest, outcome: Outcome, done: float) -> None:
        """A request its client left while the engine had it: count the prompt the engine took (off the
        response path, as the engine's tokenizer counts it for maxInputTokens), then bill and charge it."""
        counts: list[int] = []
        try:
            counts = await self.counter.count_prompt(proxied.endpoint, proxied.body)
        except Exception as exc:  # the engine (its tokenizer) is gone too: nothing is known to bill
            log.warning("request %s: its client left and its prompt could not be counted: %s", proxied.request_id,
                        exc)
        finally:
            proxied.prompt_tokens = sum(counts)
            self._finish(proxied, outcome, done)

    async def passthrough(self, request: Request) -> Response | StreamResponse:
        try:
            self._tenant(request)
            target = quote(request.path) + (f"?{request.query}" if request.query else "")  # path decoded, query not
            async with self.s.client.session.get(self.s.client.base_url + target) as upstream:
                data = await upstream.read()
                return Response(client_status(upstream.status), data, upstream.content_type)
        except GatewayError as exc:
            return exc.response()
        except (aiohttp.ClientError, OSError) as exc:
            return engine_unavailable(str(exc) or type(exc).__name__).response()

    # ---- the pipeline ----------------------------------------------------------------------------

    def _tenant(self, request: Request) -> str:
        header = self.s.config.auth.trusted_tenant_header
        try:
            return self.s.resolver.resolve(request.headers.get("authorization"),
                                           request.headers.get(header.lower()) if header else None, request.remote)
        except AuthError as exc:
            raise GatewayError(exc.status, str(exc), exc.code, headers={"WWW-Authenticate": "Bearer"}) from None

    async def _parse(self, request: Request) -> tuple[dict[str, Any], bytes]:
        settings = self.s.settings
        try:  # a Content-Length over the limit is flagged by the server (same limit): read raises BodyTooLarge
            if request.complete:  # the whole body came with the headers: nothing to wait for
                raw = await request.read()
            else:
                async with asyncio.timeout(settings.body_read_timeout_seconds):  # no extra task, unlike wait_for
                    raw = await request.read()
        except BodyTooLarge:
            raise _too_large(settings.max_body_bytes) from None
        except BodyIncomplete as exc:
            raise bad_request(str(exc), None, "invalid_body") from None
        except TimeoutError:
            raise GatewayError(408, f"the request body did not arrive within "
                                    f"{settings.body_read_timeout_seconds:g} s", "request_timeout") from None
        try:  # what json.loads(raw) does, with a decoder that refuses NaN and the infinities
            body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        # Nesting too deep for the decoder (RecursionError) is answered by generate, as for the body written again.
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        return body, raw

    async def _serve(self, request: Request, proxied: ProxyRequest, outcome: Outcome) -> Response | StreamResponse:
        s = self.s
        if not s.state.serving:  # before the warm-up passed (or after it failed) the engine serves warm-up only
            raise not_ready(s.state.phase)
        if not s.state.engine_up:
            raise engine_unavailable("it failed its last health check or connection")
        await s.engine.ensure_model(s.client, request.match.get("model"))
        original_options = proxied.body.get("stream_options")
        max_tokens = s.engine.clamp_output(proxied, s.config.token_policy.max_output_tokens)
        for hook in s.request_hooks:
            await hook.before_upstream(proxied, self.counter)
        key = self._cache_key(proxied)
        if key is not None and (cached := s.cache.get(key)) is not None:
            s.metrics.cache_lookups.labels("hit").inc()
            return await self._serve_cached(request, proxied, outcome, cached)
        prompt_tokens = await self._check_input(proxied)
        # Settled when the request is metered (_finish), however it ends: refused by admission, cancelled while
        # queued, served, or left by its client.
        outcome.reservation = self._reserve(proxied, prompt_tokens + max_tokens * s.engine.choices(proxied))
        guard = self.relay.guard(proxied)
        if guard is not None and not proxied.streaming and s.engine.can_stream_instead(proxied):
            proxied.flags[COLLECT] = True  # watched while generated, so a stop saves the rest
        s.engine.prepare_upstream(proxied, bool(proxied.flags.get(COLLECT)))
        payload = proxied.upstream_bytes()  # before admission: a body that cannot be written again takes no slot
        await s.admission.acquire()
        s.metrics.queue_depth.dec()
        outcome.queued = False
        try:
            outcome.admitted = time.monotonic()
            self._tell_sink_admitted(proxied.request_id, outcome.admitted)
            return await self.relay.forward(request, proxied, outcome, original_options, key, guard, payload)
        finally:
            s.admission.release()

    def _cache_key(self, proxied: ProxyRequest) -> str | None:
        if not self.s.config.token_policy.cache.enabled or not is_deterministic(proxied.body):
            return None
        proxied.response_headers[CACHE_HEADER] = "miss"
        self.s.metrics.cache_lookups.labels("miss").inc()
        try:
            return cache_key(proxied.tenant, proxied.flags.get("_path", proxied.endpoint), proxied.body)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): parsed, but not text that can be written
            raise lone_surrogate(proxied.body) from None

    async def _check_input(self, proxied: ProxyRequest) -> int:
        """Prompt tokens (counted when a limit needs them, else estimated); 400 naming the limit when over."""
        limit = self.s.config.token_policy.max_input_tokens
        if proxied.prompt_tokens is not None:
            return proxied.prompt_tokens
        if limit is None:
            return len(proxied.raw) // 4  # a reservation estimate only; settled against the real count
        counts = await self.counter.count_prompt(proxied.endpoint, proxied.body)
        for index, count in enumerate(counts):
            if count > limit:
                which = "the prompt" if len(counts) == 1 else f"prompt {index}"
                param = self.s.engine.prompt_field(proxied)
                raise GatewayError(400, f"{which} has {count} tokens, over the limit of {limit} input tokens "
                                        f"(tokenPolicy.maxInputTokens)", "context_length_exceeded", param,
                                   details={"limit": limit, "count": count})
        proxied.prompt_tokens = sum(counts) if counts else None
        return sum(counts) if counts else len(proxied.raw) // 4

    def _reserve(self, proxied: ProxyRequest, tokens: int) -> Reservation | None:
        try:
            return self.s.limiter.reserve(proxied.tenant, tokens)
        except RateLimited as exc:
            self.s.metrics.rate_limited.labels(self.s.metrics.tenant_label(proxied.tenant)).inc()
            raise GatewayError(429, str(exc), "rate_limit_exceeded",
                               headers={"Retry-After": str(exc.retry_after)}) from None

    async def _serve_cached(self, request: Request, proxied: ProxyRequest, outcome: Outcome,
                            cached: Any) -> Response | StreamResponse:
        outcome.cache_hit = True
        outcome.usage = Usage(cached.prompt_tokens, cached.completion_tokens)
        headers = {"X-Request-Id": proxied.request_id, **proxied.response_headers, CACHE_HEADER: "hit"}
        if not proxied.streaming:
            return Response(cached.status, cached.chunks[0], cached.content_type, headers)
        response = request.stream(cached.status, {**headers, "Content-Type": cached.content_type,
                                                  "Cache-Control": "no-cache"})
        await response.write_eof(b"".join(cached.chunks))
        return response

    # ---- metering and metrics ------------------------------------------------------------------------

    def _record(self, proxied: ProxyRequest, outcome: Outcome, done: float) -> None:
        s = self.s
        usage = _usage(proxied, outcome)
        event = RequestEvent(
            request_id=proxied.request_id, tenant=proxied.tenant, model=s.config.served_model,
            endpoint=proxied.endpoint, received_at=proxied.received_at, received=proxied.received,
            admitted=outcome.admitted, first_token=outcome.first_token, done=done, chunks=tuple(outcome.chunks),
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, status=outcome.status, streaming=proxied.streaming,
            billable=proxied.billable, cache_hit=outcome.cache_hit,
            truncated=bool(proxied.flags.get("truncated")), truncated_tokens=int(proxied.flags.get(
                "truncated_tokens", 0)), runaway_stopped=bool(proxied.flags.get("runaway_stopped")),
            error=outcome.error)
        try:
            s.sink.submit(event)
        except Exception:  # the contract says submit never raises; a broken sink must not break serving
            s.metrics.dropped_events.inc()
            log.exception("the metering sink raised on submit")
        self._observe(proxied, outcome, usage, done)

    def _tell_sink_admitted(self, request_id: str, at: float) -> None:
        try:
            self.s.sink.admitted(request_id, at)
        except Exception:  # a hint for attribution: it must never fail the request
            log.exception("the metering sink raised on admitted")

    def _observe(self, proxied: ProxyRequest, outcome: Outcome, usage: Usage, done: float) -> None:
        m, model, endpoint = self.s.metrics, self.s.config.served_model, proxied.endpoint
        m.child(m.requests, model, endpoint, _STATUS_CLASS[min(outcome.status // 100, 5)]).inc()
        m.child(m.latency, model, endpoint, "true" if proxied.streaming else "false").observe(done - proxied.received)
        if outcome.first_token is not None and not outcome.cache_hit:
            m.child(m.ttft, model).observe(outcome.first_token - proxied.received)
        if usage.prompt_tokens or usage.completion_tokens:
            tier, tenant = self.s.config.tier, m.tenant_label(proxied.tenant)
            m.child(m.tokens, model, tier, "input").inc(usage.prompt_tokens)
            m.child(m.tokens, model, tier, "output").inc(usage.completion_tokens)
            m.child(m.tenant_tokens, tenant, "input").inc(usage.prompt_tokens)
            m.child(m.tenant_tokens, tenant, "output").inc(usage.completion_tokens)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or infinities)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large")


def _usage(proxied: ProxyRequest, outcome: Outcome) -> Usage:
    """What is billed and charged to the budget: the usage the engine (or the cache) told, else the prompt once
    the engine had the request, and the tokens it streamed. Nothing before the engine had it (refused with
    429 or by admission, left while queued), even where the prompt was counted for maxInputTokens."""
    if outcome.usage is not None:
        return outcome.usage
    return Usage((proxied.prompt_tokens or 0) if outcome.sent else 0, outcome.streamed_tokens)


def _prompt_to_count(proxied: ProxyRequest, outcome: Outcome) -> bool:
    """Whether the request's client left after the engine had it, before the engine told its prompt's tokens."""
    return outcome.status == CLIENT_CLOSED and outcome.sent and outcome.usage is None and proxied.prompt_tokens is None
