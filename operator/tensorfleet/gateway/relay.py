"""Talking to the engine for one admitted request: forward it, relay the answer, let the guards watch.

Three ways an answer comes back:

* a stream the client asked for: forwarded event by event (``_stream``);
* a plain answer: read whole and passed on (``_plain``);
* a plain answer the client asked for while a response guard (runaway control) watches: the engine is
  asked for a stream, watched event by event and folded back into one body (``_collect``), so that a
  stop aborts the engine request instead of waiting for every token.

A guard's ``Stop`` aborts the engine request (closing the connection makes vLLM abort it) and ends the
answer cleanly: streams get a final chunk with the stop's ``finish_reason``, usage if asked and
``[DONE]``; collected answers end their unfinished choices the same way. Usage, and so billing, counts
only the tokens produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tensorfleet.gateway import sse
from tensorfleet.gateway.assemble import ResponseAssembler
from tensorfleet.gateway.engine import TritonEngine
from tensorfleet.gateway.errors import GatewayError, engine_error_message, engine_unavailable, error_response
from tensorfleet.gateway.hooks import ProxyRequest, ResponseGuard, Stop, compact
from tensorfleet.gateway.messages import Request, Response, StreamResponse
from tensorfleet.gateway.services import CLIENT_CLOSED, Outcome, Services
from tensorfleet.gateway.streams import TritonStream, Usage, VLLMStream
from tensorfleet.gateway.upstream import EngineUnreachable, Exchange

log = logging.getLogger(__name__)

COLLECT = "_collect"  # ProxyRequest flag: a plain request sent upstream as a stream for a guard to watch
_COLLECT_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
Emit = Callable[[list[bytes]], Awaitable[None]]


class Relay:
    def __init__(self, services: Services) -> None:
        self.s = services

    def guard(self, proxied: ProxyRequest) -> ResponseGuard | None:
        """The response guards of this request, if any hook watches it."""
        guards = [g for hook in self.s.response_hooks if (g := hook.open(proxied)) is not None]
        if not guards:
            return None
        return guards[0] if len(guards) == 1 else _AllGuards(guards)

    async def forward(self, request: Request, proxied: ProxyRequest, outcome: Outcome, original_options: Any,
                      key: str | None, guard: ResponseGuard | None, payload: bytes) -> Response | StreamResponse:
        """Send ``payload`` (the body, ``proxied.upstream_bytes()``) to the engine and relay its answer."""
        s = self.s
        connections = s.client.connections
        headers = {"Content-Type": "application/json", "X-Request-Id": proxied.request_id}
        try:
            upstream = await connections.post(s.engine.upstream_path(proxied), payload, headers, outcome.went_to_engine)
            try:
                if upstream.status == 200 and proxied.streaming:
                    return await self._stream(request, proxied, outcome, upstream, original_options, guard, key)
                if upstream.status == 200 and proxied.flags.get(COLLECT):
                    return await self._collect(proxied, outcome, upstream, guard, key)
                return await self._plain(proxied, outcome, upstream, guard, key)
            finally:
                connections.release(upstream)  # kept if read to the end, else closed (aborts the engine request)
        except TimeoutError:
            raise GatewayError(504, "the engine stopped answering "
                                    f"(nothing for {s.settings.upstream_idle_timeout_seconds:g} s)",
                               "engine_timeout") from None
        except EngineUnreachable as exc:
            s.state.set_engine_up(False)
            raise engine_unavailable(str(exc)) from None
        except OSError as exc:
            raise engine_unavailable(str(exc) or type(exc).__name__) from None

    # ---- plain answers ------------------------------------------------------------------------------------

    async def _plain(self, proxied: ProxyRequest, outcome: Outcome, upstream: Exchange,
                     guard: ResponseGuard | None, key: str | None) -> Response:
        data = await upstream.read()
        done = time.monotonic()
        outcome.status = client_status(upstream.status)
        body: Any = None
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        outcome.usage = self.s.engine.usage_from_body(body)
        if outcome.usage is None and upstream.status == 200:
            outcome.usage = await self._count_triton_output(proxied, body)
        if outcome.usage is not None and outcome.usage.completion_tokens:
            outcome.tokens_at(done, outcome.usage.completion_tokens)
        if upstream.status >= 500:
            outcome.error = "engine_error"
            return error_response(outcome.status, _engine_message(body, upstream.status), "engine_error",
                                  request_id=proxied.request_id)
        if guard is not None and upstream.status == 200 and isinstance(body, dict) \
                and (stop := guard.on_body(body)) is not None:
            # Generated before it could be watched (the engine cannot stream this request): every token
            # was produced and is billed; the client gets the text up to the loop.
            proxied.flags[f"{stop.reason}_stopped"] = True
            data, key = compact(body), None
        if key is not None and upstream.status == 200 and outcome.usage is not None:
            self.s.cache.put(key, 200, upstream.content_type, (data,), outcome.usage.prompt_tokens,
                             outcome.usage.completion_tokens)
            self.s.metrics.cache_entries.set(len(self.s.cache))
        headers = {"X-Request-Id": proxied.request_id, **proxied.response_headers}
        return Response(outcome.status, data, upstream.content_type, headers)

    async def _count_triton_output(self, proxied: ProxyRequest, body: Any) -> Usage | None:
        """Triton answers carry no usage: count the output (and the prompt, if not yet) with its tokenizer model."""
        engine = self.s.engine
        if not isinstance(engine, TritonEngine) or not isinstance(body, dict) \
                or not isinstance(body.get("text_output"), str):
            return None
        completion, prompt = await asyncio.gather(engine.count_text(self.s.client, body["text_output"]),
                                                  self.triton_prompt(proxied))
        return Usage(prompt, completion or 0)

    async def triton_prompt(self, proxied: ProxyRequest) -> int:
        engine = self.s.engine
        if proxied.prompt_tokens is not None or not isinstance(engine, TritonEngine):
            return proxied.prompt_tokens or 0
        return sum(await engine.count_prompt(self.s.client, proxied.endpoint, proxied.body))

    async def _collect(self, proxied: ProxyRequest, outcome: Outcome, upstream: Exchange,
                       guard: ResponseGuard | None, key: str | None) -> Response:
        """A plain answer built from the engine's stream, watched by ``guard`` as it is generated."""
        stream = self.s.engine.new_stream(proxied, _COLLECT_OPTIONS)
        assembler = ResponseAssembler()

        async def take(events: list[bytes]) -> None:
            for event in events:
                payload = sse.payload(event.rstrip(b"\n"))
                if payload is not None and payload != sse.DONE:
                    try:
                        assembler.add(json.loads(payload))
                    except ValueError:
                        log.warning("request %s: the engine sent an event that is not JSON", proxied.request_id)

        try:
            stopped = await self._pump(stream, upstream, outcome, guard, take)
        except (OSError, TimeoutError) as exc:
            raise _broke_off(exc) from None
        finally:
            _take_prompt(proxied, stream)
        if stream.error is not None:  # what the same request sent plain gets: the engine's failure
            return _engine_failed(proxied, outcome, stream.error)
        if stopped is not None:
            upstream.close()  # abort the engine request now: vLLM cancels it when the connection drops
            proxied.flags[f"{stopped.reason}_stopped"] = True
        outcome.usage = stream.usage if stream.usage is not None and stopped is None \
            else Usage(proxied.prompt_tokens or 0, stream.completion_tokens)
        data = compact(assembler.body(stopped, outcome.usage))
        if key is not None and _complete(stream, stopped):
            self.s.cache.put(key, 200, "application/json", (data,), outcome.usage.prompt_tokens,
                             outcome.usage.completion_tokens)
            self.s.metrics.cache_entries.set(len(self.s.cache))
        headers = {"X-Request-Id": proxied.request_id, **proxied.response_headers}
        return Response(200, data, "application/json", headers)

    # ---- streams ------------------------------------------------------------------------------------------

    async def _stream(self, request: Request, proxied: ProxyRequest, outcome: Outcome,
                      upstream: Exchange, original_options: Any, guard: ResponseGuard | None,
                      key: str | None) -> StreamResponse:
        content_type = upstream.headers.get("content-type", "text/event-stream")
        response = request.stream(200, {"Content-Type": content_type, "Cache-Control": "no-cache",
                                        "X-Request-Id": proxied.request_id, **proxied.response_headers})
        stream = self.s.engine.new_stream(proxied, original_options)
        sent: list[bytes] | None = [] if key is not None else None
        ending: list[bytes] = []  # the answer's last events, written together with its end

        async def write(events: list[bytes]) -> None:
            chunk = b"".join(events)
            if sent is not None:
                sent.append(chunk)
            if upstream.at_end:
                ending.append(chunk)
                return
            try:
                await response.write(chunk)
            except ConnectionError:
                raise _ClientGone from None

        try:
            stopped = await self._pump(stream, upstream, outcome, guard, write)
        except _ClientGone:  # released unread: the engine request is aborted (vLLM cancels it on disconnect)
            return self._client_gone(outcome, response)
        except (OSError, TimeoutError) as exc:
            if not response.started:  # nothing sent yet: the client can still get a proper error
                raise _broke_off(exc) from None
            outcome.status, outcome.error = 502, "engine_disconnected"
            log.warning("the engine broke off stream %s: %s", proxied.request_id, exc)
            request.abort()  # a truncated stream, not a clean end the client could trust
            return response
        finally:  # however it ended (the client gone too: the prompt was processed, and is billed)
            _take_prompt(proxied, stream)
        if stopped is not None:
            upstream.close()  # abort the engine request now, before the closing events are written
            proxied.flags[f"{stopped.reason}_stopped"] = True
            ending.extend(stream.stopped(stopped, proxied.prompt_tokens or 0))
        else:
            tail = stream.finish()
            ending.extend(tail)
            if sent is not None:
                sent.extend(tail)
        try:
            await response.write_eof(b"".join(ending))
        except ConnectionError:
            return self._client_gone(outcome, response)
        if stream.usage is None and proxied.prompt_tokens is None:
            proxied.prompt_tokens = await self.triton_prompt(proxied)
        outcome.usage = stream.usage or Usage(proxied.prompt_tokens or 0, outcome.streamed_tokens)
        if sent is not None and key is not None and _complete(stream, stopped):
            self.s.cache.put(key, 200, content_type, tuple(sent), outcome.usage.prompt_tokens,
                             outcome.usage.completion_tokens)
            self.s.metrics.cache_entries.set(len(self.s.cache))
        return response

    def _client_gone(self, outcome: Outcome, response: StreamResponse) -> StreamResponse:
        outcome.status, outcome.error = CLIENT_CLOSED, "client_disconnected"
        self.s.metrics.client_disconnects.inc()
        return response

    @staticmethod
    async def _pump(stream: VLLMStream | TritonStream, upstream: Exchange, outcome: Outcome,
                    guard: ResponseGuard | None, emit: Emit) -> Stop | None:
        """Pass events on as they arrive; returns the guard's Stop if one stopped the answer."""
        splitter = sse.EventSplitter()
        async for data in upstream.chunks():
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
                outcome.tokens_at(time.monotonic(), tokens)
            if out:
                await emit(out)
            if stop is not None:
                return stop
        return None


def _complete(stream: VLLMStream | TritonStream, stopped: Stop | None) -> bool:
    """Whether the engine's answer ended as it meant to (to [DONE], no error event, no guard's stop): cacheable."""
    return stopped is None and stream.done and stream.error is None


def _engine_failed(proxied: ProxyRequest, outcome: Outcome, event: bytes) -> Response:
    """The answer to a collected request whose stream ended in the engine's error event, as vLLM answers the
    same failure in a plain request (its status, our 502 for a 5xx); the partial text is dropped."""
    try:
        body = json.loads(event)
    except ValueError:
        body = None
    code = body["error"].get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    engine_status = code if isinstance(code, int) and 400 <= code < 600 else 500
    outcome.failed(client_status(engine_status), "engine_error")
    return error_response(outcome.status, _engine_message(body, engine_status), "engine_error",
                          request_id=proxied.request_id)


def _take_prompt(proxied: ProxyRequest, stream: VLLMStream | TritonStream) -> None:
    """The prompt's tokens as the engine reported them in the stream (vLLM's continuous usage), if not yet known."""
    if proxied.prompt_tokens is None:
        proxied.prompt_tokens = stream.prompt_tokens


class _ClientGone(Exception):
    """The client went away while its stream was being written."""


class _AllGuards:
    def __init__(self, guards: list[ResponseGuard]) -> None:
        self.guards = guards

    def on_event(self, payload: bytes) -> Stop | None:
        return next((stop for g in self.guards if (stop := g.on_event(payload)) is not None), None)

    def on_body(self, body: dict[str, Any]) -> Stop | None:
        return next((stop for g in self.guards if (stop := g.on_body(body)) is not None), None)


def _broke_off(exc: BaseException) -> GatewayError:
    """The answer to a client whose engine answer ended early, before anything of it was sent on."""
    return GatewayError(502, f"the engine broke off the answer: {exc or type(exc).__name__}", "engine_disconnected")


def client_status(engine_status: int) -> int:
    """Engine errors the client cannot fix become 502 (never a 500 from the gateway)."""
    return 502 if engine_status >= 500 else engine_status


def _engine_message(body: Any, status: int) -> str:
    message = engine_error_message(body)
    return f"the engine failed: {message}" if message else f"the engine failed with status {status}"
