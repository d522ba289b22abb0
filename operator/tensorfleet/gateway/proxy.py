"""The request pipeline: authenticate, validate, apply the token policy, forward, stream, meter.

Order for a generating request: tenant (401) -> body (413/408/400) -> engine checks of the body
(400/404) -> engine up (503) -> max_tokens clamp -> request hooks -> response cache (a hit ends here)
-> input count with the engine's tokenizer (400 over the limit) -> token budget reservation (429) ->
admission (503 when the queue is full) -> the engine. Every request yields one metering event; the
sink only queues it, so nothing waits on metering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from tensorfleet.gateway import sse
from tensorfleet.gateway.auth import AuthError, TenantResolver
from tensorfleet.gateway.cache import ResponseCache, cache_key, is_deterministic
from tensorfleet.gateway.config import GatewayConfig
from tensorfleet.gateway.engine import Engine, EngineClient, TritonEngine
from tensorfleet.gateway.errors import GatewayError, bad_request, engine_unavailable, error_response
from tensorfleet.gateway.hooks import ProxyRequest, RequestHook, ResponseGuard, ResponseHook, Stop
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.ratelimit import RateLimited, Reservation, TokenRateLimiter
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.gateway.state import ActiveRequests, Admission, GatewayState
from tensorfleet.gateway.streams import TritonStream, Usage, VLLMStream
from tensorfleet.metering.events import EventSink, RequestEvent, TokenChunk

log = logging.getLogger(__name__)

CACHE_HEADER = "X-TensorFleet-Cache"
_STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
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
    first_token: float | None = None
    chunks: list[TokenChunk] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    streamed_tokens: int = 0
    cache_hit: bool = False
    error: str | None = None
    queued: bool = True  # counted in the queue-depth gauge until admitted or refused


class Counter:
    """Token counting for hooks: the engine's tokenizer, timed."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def count_prompt(self, endpoint: str, body: Any) -> list[int]:
        started = time.perf_counter()
        try:
            return await self.services.engine.count_prompt(self.services.client, endpoint, body)
        finally:
            self.services.metrics.tokenize_seconds.observe(time.perf_counter() - started)


class Proxy:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.counter = Counter(services)

    # ---- entry points -------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        s = self.s
        received, received_at = time.monotonic(), time.time()
        request_id = f"tf-{uuid.uuid4().hex}"
        s.active.enter()
        s.metrics.queue_depth.inc()
        proxied: ProxyRequest | None = None
        outcome = Outcome()
        try:
            tenant = self._tenant(request)
            body, raw = await self._parse(request)
            proxied = ProxyRequest(request_id=request_id, endpoint=_route_path(request), tenant=tenant, body=body,
                                   raw=raw, streaming=False, received=received, received_at=received_at,
                                   billable=s.state.ready)
            if s.engine.runtime == "triton":
                proxied.flags["_path"] = request.rel_url.path
            s.engine.validate(proxied, request.match_info.get("model"))
            return await self._serve(request, proxied, outcome)
        except GatewayError as exc:
            outcome.status, outcome.error = exc.status, exc.code
            return exc.response(request_id)
        except asyncio.CancelledError:
            outcome.status, outcome.error = CLIENT_CLOSED, "client_disconnected"
            s.metrics.client_disconnects.inc()
            raise
        finally:
            if outcome.queued:
                s.metrics.queue_depth.dec()
            if proxied is not None:
                self._record(proxied, outcome)
            s.active.leave()

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        try:
            self._tenant(request)
            async with self.s.client.session.get(self.s.client.base_url + request.rel_url.path_qs) as upstream:
                data = await upstream.read()
                return web.Response(status=_client_status(upstream.status), body=data,
                                    content_type=upstream.content_type)
        except GatewayError as exc:
            return exc.response()
        except (aiohttp.ClientError, OSError) as exc:
            return engine_unavailable(str(exc) or type(exc).__name__).response()

    # ---- the pipeline ----------------------------------------------------------------------------

    def _tenant(self, request: web.Request) -> str:
        header = self.s.config.auth.trusted_tenant_header
        try:
            return self.s.resolver.resolve(request.headers.get("Authorization"),
                                           request.headers.get(header) if header else None, request.remote)
        except AuthError as exc:
            raise GatewayError(exc.status, str(exc), exc.code, headers={"WWW-Authenticate": "Bearer"}) from None

    async def _parse(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        settings = self.s.settings
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            raise _too_large(settings.max_body_bytes)
        try:
            async with asyncio.timeout(settings.body_read_timeout_seconds):  # no extra task, unlike wait_for
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(settings.max_body_bytes) from None
        except TimeoutError:
            raise GatewayError(408, f"the request body did not arrive within "
                                    f"{settings.body_read_timeout_seconds:g} s", "request_timeout") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        return body, raw

    async def _serve(self, request: web.Request, proxied: ProxyRequest, outcome: Outcome) -> web.StreamResponse:
        s = self.s
        if not s.state.engine_up:
            raise engine_unavailable("it is starting or failed its health check")
        await s.engine.ensure_model(s.client, request.match_info.get("model"))
        original_options = proxied.body.get("stream_options")
        max_tokens = s.engine.clamp_output(proxied, s.config.token_policy.max_output_tokens)
        for hook in s.request_hooks:
            await hook.before_upstream(proxied, self.counter)
        key = self._cache_key(proxied)
        if key is not None and (cached := s.cache.get(key)) is not None:
            s.metrics.cache_lookups.labels("hit").inc()
            return await self._serve_cached(request, proxied, outcome, cached)
        prompt_tokens = await self._check_input(proxied)
        reservation = self._reserve(proxied, prompt_tokens + max_tokens * s.engine.choices(proxied))
        s.engine.prepare_upstream(proxied)
        await s.admission.acquire()
        s.metrics.queue_depth.dec()
        outcome.queued = False
        try:
            outcome.admitted = time.monotonic()
            self._tell_sink_admitted(proxied.request_id, outcome.admitted)
            response = await self._forward(request, proxied, outcome, original_options, key)
        finally:
            s.admission.release()
            s.limiter.settle(reservation, _used_tokens(proxied, outcome))
        return response

    def _cache_key(self, proxied: ProxyRequest) -> str | None:
        if not self.s.config.token_policy.cache.enabled or not is_deterministic(proxied.body):
            return None
        proxied.response_headers[CACHE_HEADER] = "miss"
        self.s.metrics.cache_lookups.labels("miss").inc()
        return cache_key(proxied.endpoint, proxied.body)

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
                param = "messages" if "messages" in proxied.body else "prompt"
                raise bad_request(f"{which} has {count} tokens, over the limit of {limit} input tokens "
                                  f"(tokenPolicy.maxInputTokens)", param, "context_length_exceeded")
        proxied.prompt_tokens = sum(counts) if counts else None
        return sum(counts) if counts else len(proxied.raw) // 4

    def _reserve(self, proxied: ProxyRequest, tokens: int) -> Reservation | None:
        try:
            return self.s.limiter.reserve(proxied.tenant, tokens)
        except RateLimited as exc:
            self.s.metrics.rate_limited.labels(self.s.metrics.tenant_label(proxied.tenant)).inc()
            raise GatewayError(429, str(exc), "rate_limit_exceeded",
                               headers={"Retry-After": str(exc.retry_after)}) from None

    # ---- talking to the engine -----------------------------------------------------------------------

    async def _forward(self, request: web.Request, proxied: ProxyRequest, outcome: Outcome,
                       original_options: Any, key: str | None) -> web.StreamResponse:
        s = self.s
        guard = self._guard(proxied)
        url = s.client.base_url + s.engine.upstream_path(proxied)
        headers = {"Content-Type": "application/json", "X-Request-Id": proxied.request_id}
        try:
            upstream_cm = s.client.session.post(url, data=proxied.upstream_bytes(), headers=headers)
            async with upstream_cm as upstream:
                if proxied.streaming and upstream.status == 200:
                    return await self._stream(request, proxied, outcome, upstream, original_options, guard, key)
                return await self._plain(proxied, outcome, upstream, guard, key)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                s.state.set_engine_up(False)
            raise engine_unavailable(str(exc) or type(exc).__name__) from None
        except TimeoutError:
            raise GatewayError(504, "the engine stopped answering "
                                    f"(nothing for {s.settings.upstream_idle_timeout_seconds:g} s)",
                               "engine_timeout") from None

    def _guard(self, proxied: ProxyRequest) -> ResponseGuard | None:
        guards = [g for hook in self.s.response_hooks if (g := hook.open(proxied)) is not None]
        if not guards:
            return None
        return guards[0] if len(guards) == 1 else _AllGuards(guards)

    async def _plain(self, proxied: ProxyRequest, outcome: Outcome, upstream: aiohttp.ClientResponse,
                     guard: ResponseGuard | None, key: str | None) -> web.Response:
        data = await upstream.read()
        done = time.monotonic()
        outcome.status = _client_status(upstream.status)
        body: Any = None
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        outcome.usage = self.s.engine.usage_from_body(body)
        if outcome.usage is None and upstream.status == 200:
            outcome.usage = await self._count_triton_output(proxied, body)
        if outcome.usage is not None and outcome.usage.completion_tokens:
            outcome.first_token = done
            outcome.chunks.append(TokenChunk(done, outcome.usage.completion_tokens))
        if guard is not None and isinstance(body, dict) and (stop := guard.on_body(body)) is not None:
            proxied.flags[f"{stop.reason}_stopped"] = True
        if upstream.status >= 500:
            return error_response(outcome.status, _engine_message(body, upstream.status), "engine_error",
                                  request_id=proxied.request_id)
        if key is not None and upstream.status == 200 and outcome.usage is not None:
            self.s.cache.put(key, 200, upstream.content_type, (data,), outcome.usage.prompt_tokens,
                             outcome.usage.completion_tokens)
            self.s.metrics.cache_entries.set(len(self.s.cache))
        headers = {"X-Request-Id": proxied.request_id, **proxied.response_headers}
        return web.Response(status=outcome.status, body=data, content_type=upstream.content_type, headers=headers)

    async def _count_triton_output(self, proxied: ProxyRequest, body: Any) -> Usage | None:
        """Triton answers carry no usage: count the output (and the prompt, if not yet) with its tokenizer model."""
        engine = self.s.engine
        if not isinstance(engine, TritonEngine) or not isinstance(body, dict) \
                or not isinstance(body.get("text_output"), str):
            return None
        completion, prompt = await asyncio.gather(engine.count_text(self.s.client, body["text_output"]),
                                                  self._triton_prompt(proxied))
        return Usage(prompt, completion or 0)

    async def _triton_prompt(self, proxied: ProxyRequest) -> int:
        engine = self.s.engine
        if proxied.prompt_tokens is not None or not isinstance(engine, TritonEngine):
            return proxied.prompt_tokens or 0
        text = proxied.body.get("text_input")
        return (await engine.count_text(self.s.client, text) or 0) if isinstance(text, str) else 0

    async def _stream(self, request: web.Request, proxied: ProxyRequest, outcome: Outcome,
                      upstream: aiohttp.ClientResponse, original_options: Any, guard: ResponseGuard | None,
                      key: str | None) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache", "X-Request-Id": proxied.request_id, **proxied.response_headers})
        await response.prepare(request)
        stream = self.s.engine.new_stream(proxied, original_options)
        sent: list[bytes] | None = [] if key is not None else None
        try:
            stopped = await self._pump(response, stream, upstream, outcome, guard, sent)
        except _ClientGone:
            upstream.close()  # abort the engine request: vLLM cancels it when the connection drops
            outcome.status, outcome.error = CLIENT_CLOSED, "client_disconnected"
            self.s.metrics.client_disconnects.inc()
            return response
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            upstream.close()
            outcome.status, outcome.error = 502, "engine_disconnected"
            log.warning("the engine broke off stream %s: %s", proxied.request_id, exc)
            if request.transport is not None:
                request.transport.close()  # a truncated stream, not a clean end the client could trust
            return response
        except BaseException:
            upstream.close()
            raise
        if stopped is not None:
            upstream.close()
            proxied.flags[f"{stopped.reason}_stopped"] = True
            await response.write(b"".join(stream.stopped(stopped, proxied.prompt_tokens or stream.prompt_tokens or 0)))
        else:
            tail = stream.finish()
            if tail:
                await response.write(b"".join(tail))
                if sent is not None:
                    sent.extend(tail)
        await response.write_eof()
        if stream.usage is None and proxied.prompt_tokens is None:
            proxied.prompt_tokens = stream.prompt_tokens if stream.prompt_tokens is not None \
                else await self._triton_prompt(proxied)
        outcome.usage = stream.usage or Usage(proxied.prompt_tokens or 0, outcome.streamed_tokens)
        if sent is not None and key is not None and stopped is None and stream.done:
            self.s.cache.put(key, 200, response.content_type, tuple(sent), outcome.usage.prompt_tokens,
                             outcome.usage.completion_tokens)
            self.s.metrics.cache_entries.set(len(self.s.cache))
        return response

    async def _pump(self, response: web.StreamResponse, stream: VLLMStream | TritonStream,
                    upstream: aiohttp.ClientResponse, outcome: Outcome, guard: ResponseGuard | None,
                    sent: list[bytes] | None) -> Stop | None:
        """Forward events as they arrive; returns the guard's Stop if one stopped the stream."""
        splitter = sse.EventSplitter()
        async for data in upstream.content.iter_any():
            out: list[bytes] = []
            tokens = 0
            stop: Stop | None = None
            for event in splitter.feed(data):
                payload = sse.payload(event)
                if payload is None:
                    out.append(event + sse.SEPARATOR)
                    continue
                events, count = stream.process(payload)
                out.extend(events)
                tokens += count
                if guard is not None and count and (stop := guard.on_event(payload)) is not None:
                    break
            if tokens:
                now = time.monotonic()
                outcome.chunks.append(TokenChunk(now, tokens))
                outcome.streamed_tokens += tokens
                if outcome.first_token is None:
                    outcome.first_token = now
            if out:
                chunk = b"".join(out)
                try:
                    await response.write(chunk)
                except (ConnectionError, aiohttp.ClientConnectionError):
                    raise _ClientGone from None
                if sent is not None:
                    sent.append(chunk)
            if stop is not None:
                return stop
        return None

    async def _serve_cached(self, request: web.Request, proxied: ProxyRequest, outcome: Outcome,
                            cached: Any) -> web.StreamResponse:
        outcome.cache_hit = True
        outcome.usage = Usage(cached.prompt_tokens, cached.completion_tokens)
        headers = {"X-Request-Id": proxied.request_id, **proxied.response_headers, CACHE_HEADER: "hit"}
        if not proxied.streaming:
            return web.Response(status=cached.status, body=cached.chunks[0], content_type=cached.content_type,
                                headers=headers)
        response = web.StreamResponse(status=cached.status, headers={**headers, "Cache-Control": "no-cache"})
        response.content_type = cached.content_type
        await response.prepare(request)
        await response.write(b"".join(cached.chunks))
        await response.write_eof()
        return response

    # ---- metering and metrics ------------------------------------------------------------------------

    def _record(self, proxied: ProxyRequest, outcome: Outcome) -> None:
        s = self.s
        done = time.monotonic()
        usage = outcome.usage or Usage(proxied.prompt_tokens or 0, outcome.streamed_tokens)
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


class _ClientGone(Exception):
    """The client went away while its stream was being written."""


class _AllGuards:
    def __init__(self, guards: list[ResponseGuard]) -> None:
        self.guards = guards

    def on_event(self, payload: bytes) -> Stop | None:
        return next((stop for g in self.guards if (stop := g.on_event(payload)) is not None), None)

    def on_body(self, body: Any) -> Stop | None:
        return next((stop for g in self.guards if (stop := g.on_body(body)) is not None), None)


def _route_path(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large")


def _client_status(engine_status: int) -> int:
    """Engine errors the client cannot fix become 502 (never a 500 from the gateway)."""
    return 502 if engine_status >= 500 else engine_status


def _engine_message(body: Any, status: int) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"the engine failed: {body['error'].get('message', status)}"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"the engine failed: {body['error']}"
    return f"the engine failed with status {status}"


def _used_tokens(proxied: ProxyRequest, outcome: Outcome) -> int:
    usage = outcome.usage
    if usage is not None:
        return usage.prompt_tokens + usage.completion_tokens
    return (proxied.prompt_tokens or 0) + outcome.streamed_tokens
