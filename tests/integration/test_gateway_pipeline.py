"""The gateway's request pipeline over real sockets, against the stand-in engine (fast, controllable).

What only a real engine can show (exact stream bytes, its tokenizer, aborts) is in test_gateway_vllm.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engines.processes import free_port
from engines.standin import FINGERPRINT, StandinEngine
from gateway_support import RecordingSinkDouble, gateway_document, running_gateway, serving, url, wait_until
from tensorfleet import telemetry

pytestmark = pytest.mark.integration

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


async def post(session: aiohttp.ClientSession, target: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with session.post(target, data=data, headers={"Content-Type": "application/json",
                                                        **kwargs.pop("headers", {})}, **kwargs) as response:
        raw = await response.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return response.status, parsed, response.headers


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def test_stream_gets_exactly_what_the_client_asked_for(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, sink=sink) as gw, \
            aiohttp.ClientSession() as session, \
            session.post(url(gw, "/v1/chat/completions"), json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        raw = await response.read()
    sent = engine.received[-1]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}  # asked upstream
    events = events_of(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # nothing the client did not ask for
    assert all(c["choices"] for c in chunks)  # no usage-only event
    assert chunks[-1]["system_fingerprint"] == FINGERPRINT  # put back where vLLM puts it without usage
    (event,) = sink.client_requests()
    assert event.completion_tokens == 3
    assert sum(c.tokens for c in event.chunks) == 3
    assert event.prompt_tokens == engine.count(CHAT)
    assert event.streaming
    assert event.billable
    assert event.first_token is not None
    assert event.admitted is not None
    assert event.received <= event.admitted
    assert sink.admissions[event.request_id] == event.admitted  # metering heard of it while in flight


async def test_stream_keeps_usage_the_client_asked_for(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream) as gw, \
            aiohttp.ClientSession() as session:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
            chunks = [json.loads(e[6:]) for e in events_of(await response.read())[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" not in c for c in chunks[:-1])  # continuous usage was the gateway's, taken out


async def test_max_tokens_is_clamped_and_set(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream) as gw, \
            aiohttp.ClientSession() as session:
        await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a b"})
        await post(session, url(gw, "/v1/chat/completions"), {"model": "tiny", "messages": [
            {"role": "user", "content": "a b"}]})
        await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a b", "max_tokens": 5000})
        await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a b", "max_tokens": 7})
        raw = b'{"model": "tiny", "prompt": "a b", "max_tokens": 9}'
        await post(session, url(gw, "/v1/completions"), raw)
    # unset: vLLM's own 16 on completions, the ceiling (64) on chat, where vLLM's default is the rest of the window
    assert [r["max_tokens"] for r in engine.received[-5:]] == [16, 64, 64, 7, 9]
    assert engine.headers[-1]["Content-Length"] == str(len(raw))  # an untouched request goes up byte for byte


async def test_over_long_input_is_400_naming_the_limit_and_count(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"maxInputTokens": 5})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url(gw, "/v1/completions"),
                                     {"model": "tiny", "prompt": "one two three four five six"})
        ok, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "one two"})
    assert status == 400
    assert ok == 200
    assert body["error"]["code"] == "context_length_exceeded"
    assert "6 tokens" in body["error"]["message"]
    assert "limit of 5" in body["error"]["message"]


async def test_tenant_budget_reserves_then_settles(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"tenantTokensPerMinute": 100, "maxOutputTokens": 40})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        # Reserves ~prompt + 40, uses prompt + 4: the unused part comes back, so a second one fits.
        for _ in range(2):
            status, _, _ = await post(session, url(gw, "/v1/completions"),
                                      {"model": "tiny", "prompt": "a b", "max_tokens": 4})
            assert status == 200
        available = gw.services.limiter.available("default")
        assert available is not None
        assert available > 60
        status, body, headers = await post(session, url(gw, "/v1/completions"),
                                           {"model": "tiny", "prompt": "a " * 300, "max_tokens": 40})
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "100 tokens per minute" in body["error"]["message"]


async def test_the_budget_reserves_the_output_bound_vllm_honours(tmp_path: pathlib.Path) -> None:
    # vLLM's chat endpoint generates max_completion_tokens when it is set, whatever max_tokens says: a burst that
    # reserved the smaller one would overrun the tenant's budget together.
    engine = StandinEngine(token_delay=0.02)
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"tenantTokensPerMinute": 200})
    body = {**CHAT, "max_tokens": 1, "max_completion_tokens": 60}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        statuses = [s for s, _, _ in await asyncio.gather(*(post(session, url(gw, "/v1/chat/completions"), body)
                                                             for _ in range(10)))]
    served = [e for e in sink.client_requests() if e.status == 200]
    assert {e.completion_tokens for e in served} == {60}
    assert sum(e.prompt_tokens + e.completion_tokens for e in served) <= 200
    assert statuses.count(429) == 10 - len(served)


async def test_completions_take_only_max_tokens_as_the_output_bound(tmp_path: pathlib.Path) -> None:
    # vLLM's CompletionRequest has no max_completion_tokens (it ignores it) and defaults max_tokens to 16.
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"maxOutputTokens": 8})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, _ = await post(session, url(gw, "/v1/completions"),
                                       {"model": "tiny", "prompt": "a b", "max_completion_tokens": 4})
    assert status == 200
    assert engine.received[-1]["max_tokens"] == 8
    assert engine.received[-1]["max_completion_tokens"] == 4  # not honoured there: passed on as sent
    assert answer["usage"]["completion_tokens"] == 8


async def test_a_refused_request_bills_no_tokens_though_its_prompt_was_counted(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"tenantTokensPerMinute": 100, "maxInputTokens": 500})
    body = {"model": "tiny", "prompt": " ".join(["word"] * 90), "max_tokens": 5}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink) as gw, \
            aiohttp.ClientSession() as session:
        statuses = [(await post(session, url(gw, "/v1/completions"), body))[0] for _ in range(2)]
        await wait_until(lambda: len(sink.client_requests()) == 2, 5, "the events")
    assert statuses == [200, 429]
    assert [(e.prompt_tokens, e.completion_tokens) for e in sink.client_requests()] == [(90, 5), (0, 0)]


class HeldEngine(StandinEngine):
    """The stand-in, whose generations wait while ``release`` is clear (it starts set, for the warm-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.release.set()

    async def generate(self, request: Any) -> Any:
        await self.release.wait()
        return await super().generate(request)


@pytest.mark.parametrize("ending", ["refused: queue full", "client gone while queued"])
async def test_a_request_that_never_reaches_the_engine_gives_its_budget_back(tmp_path: pathlib.Path,
                                                                              ending: str) -> None:
    engine = HeldEngine()
    document = gateway_document(tokenPolicy={"tenantTokensPerMinute": 600_000, "maxOutputTokens": 100_000})
    small, big = {"model": "tiny", "prompt": "a", "max_tokens": 20}, {"model": "tiny", "prompt": "a",
                                                                     "max_tokens": 100_000}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, max_in_flight=1, max_queue=1) as gw, \
            aiohttp.ClientSession() as session:
        engine.release.clear()
        services, target = gw.services, url(gw, "/v1/completions")
        waiting = [asyncio.create_task(post(session, target, small))]  # takes the one slot
        await wait_until(lambda: services.admission.in_flight == 1, 5, "the slot taken")
        if ending == "refused: queue full":
            waiting.append(asyncio.create_task(post(session, target, small)))  # fills the queue
            await wait_until(lambda: services.admission.waiting == 1, 5, "the queue full")
            before = services.limiter.available("default")
            status, body, _ = await post(session, target, big)  # reserves ~100k tokens, then 503
            assert (status, body["error"]["code"]) == (503, "queue_full")
        else:
            before = services.limiter.available("default")
            _, writer = await asyncio.open_connection("127.0.0.1", gw.ports["client"])
            raw = json.dumps(big).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(raw), raw))
            await wait_until(lambda: services.admission.waiting == 1, 5, "the request queued")
            writer.close()  # the client gives up while its request waits for the slot
            await wait_until(lambda: services.active.count == 1, 5, "the abandoned request finished")
        after = services.limiter.available("default")
        engine.release.set()
        assert [(await task)[0] for task in waiting] == [200] * len(waiting)
    assert before is not None
    assert after is not None
    assert after >= before, f"{before - after:.0f} tokens of the budget kept by a request the engine never saw"


@pytest.mark.parametrize("leaves", ["stream, after two events", "stream, before its first token", "plain"])
async def test_a_client_that_leaves_is_billed_and_charged_the_prompt_the_engine_took(tmp_path: pathlib.Path,
                                                                                    leaves: str) -> None:
    """The engine processed the prompt before the client hung up: it is billed and charged to the tenant's
    budget, as the engine told it in the stream or, if it had not yet, as its tokenizer counts it afterwards."""
    engine = StandinEngine(token_delay=1.0 if "before" in leaves else 0.05)
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"tenantTokensPerMinute": 6000, "maxOutputTokens": 100})
    body = {"model": "tiny", "prompt": " ".join(["word"] * 500), "max_tokens": 100, "stream": leaves != "plain"}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink) as gw, \
            aiohttp.ClientSession() as session:
        limiter, now = gw.services.limiter, time.monotonic()
        limiter.clock = lambda: now  # no refill while the test runs: the budget's changes are exact
        before = limiter.available("default")
        if leaves == "stream, after two events":
            async with session.post(url(gw, "/v1/completions"), json=body) as response:
                await response.content.readuntil(b"\n\n")
                await response.content.readuntil(b"\n\n")
        else:
            with pytest.raises(TimeoutError):
                await post(session, url(gw, "/v1/completions"), body, timeout=aiohttp.ClientTimeout(total=0.5))
        await wait_until(lambda: len(sink.client_requests()) == 1 and gw.services.active.count == 0, 5, "the event")
        after = limiter.available("default")
    (event,) = sink.client_requests()
    assert (event.status, event.billable, event.prompt_tokens) == (499, True, 500)
    if leaves == "stream, after two events":
        assert 2 <= event.completion_tokens < 100  # what was streamed, and nothing after the client left
    else:
        assert event.completion_tokens == 0
    assert before is not None
    assert after is not None
    assert before - after == event.prompt_tokens + event.completion_tokens


async def test_deterministic_requests_are_cached(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"responseCache": {"enabled": True}})
    body = {"model": "tiny", "prompt": "a b", "max_tokens": 4, "temperature": 0}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink) as gw, \
            aiohttp.ClientSession() as session:
        first = await post(session, url(gw, "/v1/completions"), body)
        second = await post(session, url(gw, "/v1/completions"), body)
        sampled = await post(session, url(gw, "/v1/completions"), {**body, "temperature": 0.7})
        stream = {**body, "stream": True}
        async with session.post(url(gw, "/v1/completions"), json=stream) as response:
            streamed = await response.read()
        async with session.post(url(gw, "/v1/completions"), json=stream) as response:
            replayed, hit = await response.read(), response.headers.get("X-TensorFleet-Cache")
    assert first[2]["X-TensorFleet-Cache"] == "miss"
    assert second[2]["X-TensorFleet-Cache"] == "hit"
    assert first[1] == second[1]
    assert "X-TensorFleet-Cache" not in sampled[2]
    assert replayed == streamed
    assert hit == "hit"
    assert len([r for r in engine.received if r["prompt"] == "a b"]) == 3  # the hits never reached the engine
    hits = [e for e in sink.client_requests() if e.cache_hit]
    assert len(hits) == 2
    assert all(e.admitted is None and e.completion_tokens == 4 for e in hits)


async def test_tenants_never_share_cached_answers(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    keys = write_keys(tmp_path / "keys", {"team-a": "key-a", "team-b": "key-b"})
    document = gateway_document(auth={"apiKeysSecretRef": {"name": "keys"}},
                                tokenPolicy={"responseCache": {"enabled": True}})
    body = {"model": "tiny", "prompt": "the merger target is ACME", "max_tokens": 4, "temperature": 0}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, api_keys_dir=keys) as gw, \
            aiohttp.ClientSession() as session:
        answers = [await post(session, url(gw, "/v1/completions"), body, headers={"Authorization": f"Bearer {key}"})
                   for key in ("key-a", "key-b", "key-a")]
    assert [headers["X-TensorFleet-Cache"] for _, _, headers in answers] == ["miss", "miss", "hit"]
    assert answers[1][1]["id"] != answers[0][1]["id"]  # team-b's own answer, not team-a's
    assert len([r for r in engine.received if r["prompt"] == body["prompt"]]) == 2


class MidStreamFailureStandinDouble(StandinEngine):
    """The stand-in failing a generation after ``tokens`` tokens, as vLLM does (chat_completion/serving.py,
    completion/serving.py): a stream gets ``data: {"error": ...}`` then ``[DONE]``; a plain request a 500.
    The warm-up (``ignore_eos``) is served."""

    ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                       "code": 500}}

    def __init__(self, tokens: int = 5) -> None:
        super().__init__()
        self.tokens = tokens

    async def _plain(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        if body.get("ignore_eos"):
            return await super()._plain(request, body)
        return web.json_response(self.ERROR, status=500)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        chat = "messages" in body
        head = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                "model": self.model}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for i in range(1, self.tokens + 1):
            choice = {"index": 0, **({"delta": {"content": self.token(i)}} if chat else {"text": self.token(i)}),
                      "logprobs": None, "finish_reason": None}
            chunk = {**head, "choices": [choice], "usage": self._usage(body, i)}
            await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
        await response.write(b"data: " + json.dumps(self.ERROR).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_that_failed_in_the_engine_is_passed_on_but_not_cached(tmp_path: pathlib.Path,
                                                                             path: str) -> None:
    engine = MidStreamFailureStandinDouble()
    document = gateway_document(tokenPolicy={"responseCache": {"enabled": True}})
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 50, "temperature": 0, "stream": True}
    body.update({"prompt": "a b"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        answers = []
        for _ in range(2):
            async with session.post(url(gw, path), json=body) as response:
                answers.append((await response.read(), response.headers.get("X-TensorFleet-Cache")))
    assert [hit for _, hit in answers] == ["miss", "miss"]
    assert all(raw.endswith(b'"code": 500}}\n\ndata: [DONE]\n\n') for raw, _ in answers)  # the client sees it
    assert len([r for r in engine.received if r.get("stream")]) == 2


def write_keys(folder: pathlib.Path, keys: dict[str, str]) -> str:
    folder.mkdir(exist_ok=True)
    for tenant, key in keys.items():
        (folder / tenant).write_text(hashlib.sha256(key.encode()).hexdigest() + "\n")
    return str(folder)


async def test_api_keys_identify_tenants_and_headers_cannot_bill_others(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    keys = write_keys(tmp_path / "keys", {"team-a": "key-a", "team-b": "key-b"})
    document = gateway_document(auth={"apiKeysSecretRef": {"name": "keys"}, "trustedTenantHeader": "X-Tenant",
                                      "trustedProxies": ["10.0.0.0/8"]})
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, sink, api_keys_dir=keys) as gw, \
            aiohttp.ClientSession() as session:
        target = url(gw, "/v1/completions")
        missing = await post(session, target, body)
        unknown = await post(session, target, body, headers={"Authorization": "Bearer nope"})
        spoofed = await post(session, target, body, headers={"X-Tenant": "team-b"})  # 127.0.0.1 is not trusted
        good = await post(session, target, body, headers={"Authorization": "Bearer key-a", "X-Tenant": "team-b"})
        async with session.get(url(gw, "/v1/models"), headers={"Authorization": "Bearer nope"}) as response:
            models_status = response.status
        async with session.get(url(gw, "/v1/models"), headers={"Authorization": "Bearer key-b"}) as response:
            listed = await response.json()
        write_keys(tmp_path / "keys", {"team-c": "key-c"})
        gw.reload()
        rotated = await post(session, target, body, headers={"Authorization": "Bearer key-c"})
    assert [missing[0], unknown[0], spoofed[0], good[0], rotated[0]] == [401, 401, 401, 200, 200]
    assert unknown[1]["error"]["code"] == "invalid_api_key"
    assert missing[1]["error"]["code"] == "missing_api_key"
    assert models_status == 401
    assert listed["data"][0]["id"] == "tiny"
    assert [e.tenant for e in sink.client_requests()] == ["team-a", "team-c"]
    assert "Authorization" not in engine.headers[-1]  # the tenant's key never reaches the engine


async def test_trusted_proxy_may_name_the_tenant(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    document = gateway_document(auth={"trustedTenantHeader": "X-Tenant", "trustedProxies": ["127.0.0.1/32"]})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink) as gw, \
            aiohttp.ClientSession() as session:
        status, _, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"},
                                  headers={"X-Tenant": "team-z"})
        bad, body, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"},
                                  headers={"X-Tenant": "team z!"})
    assert status == 200
    assert sink.client_requests()[0].tenant == "team-z"
    assert bad == 401
    assert body["error"]["code"] == "invalid_tenant"


async def test_not_ready_until_warm_and_nothing_before_ready_is_billed(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(healthy=False)
    sink = RecordingSinkDouble()
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, sink=sink, wait_ready=False) as gw, \
            aiohttp.ClientSession() as session:
        await asyncio.sleep(0.3)
        async with session.get(url(gw, "/readyz", admin=True)) as response:
            assert response.status == 503
            assert (await response.json())["phase"] == "waiting_for_engine"
        status, body, headers = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
        assert status == 503
        assert body["error"]["code"] == "not_ready"
        assert headers["Retry-After"] == "1"
        # The start in progress, for the alert on slow starts (when it began; 0 once warm).
        began = gw.state.metrics.registry.get_sample_value("tensorfleet_gateway_engine_start_timestamp_seconds")
        assert began is not None
        assert 0 < began <= time.time()  # the container's (here: pytest's) start
        engine.healthy = True
        await wait_until(lambda: gw.state.ready, 10, "ready")
        assert gw.state.metrics.registry.get_sample_value("tensorfleet_gateway_engine_start_timestamp_seconds") == 0
        async with session.get(url(gw, "/readyz", admin=True)) as response:
            assert response.status == 200
        async with session.get(url(gw, "/metrics", admin=True)) as response:
            metrics = await response.text()
    warmups = [e for e in sink.requests if e.tenant == "tensorfleet:warmup"]
    assert len(warmups) == 2
    assert all(e.status == 200 for e in warmups)
    assert not any(e.billable for e in sink.requests if e.status != 200 or e.tenant == "tensorfleet:warmup")
    assert [e.billable for e in sink.client_requests()] == [False]  # the 503 before ready: never served
    (cold,) = sink.cold_starts
    assert [name for name, _ in cold.stages] == ["engine_healthy", "warmed_up", "ready"]
    assert cold.total_seconds >= 0.3
    assert f"{telemetry.READY} 1.0" in metrics
    assert 'tensorfleet_gateway_warmup_state{tensorfleet_gateway_warmup_state="ready"} 1.0' in metrics
    # metering's metrics (the default registry) are served beside the gateway's: dashboards and alerts need them
    assert 'tensorfleet_metering_ledger_verification_failures_total{kind="edited"}' in metrics
    assert "tensorfleet_metering_spool_records" in metrics


async def test_client_requests_are_refused_until_the_warm_up_passed(tmp_path: pathlib.Path) -> None:
    """The engine is healthy but still warming up: a client request that reaches the pod anyway (its IP, a
    stale endpoint) is refused, so it neither competes with the warm-up nor gets served unbilled."""
    engine = StandinEngine(token_delay=0.3)  # a warm-up request of 2 tokens: ~0.6 s
    sink = RecordingSinkDouble()
    document = gateway_document(warmup={"requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, sink, wait_ready=False) as gw, \
            aiohttp.ClientSession() as session:
        await wait_until(lambda: gw.state.phase == "warming_up", 5, "warming up")
        early = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a b", "max_tokens": 1})
        await wait_until(lambda: gw.state.ready, 10, "ready")
        served = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a b", "max_tokens": 1})
    assert (early[0], early[1]["error"]["code"], early[2]["Retry-After"]) == (503, "not_ready", "1")
    assert "warming_up" in early[1]["error"]["message"]
    assert served[0] == 200
    assert [b["prompt"] for b in engine.received] == ["warm up", "a b"]  # the refused request never got there
    refused, billed = sink.client_requests()
    assert (refused.billable, refused.admitted, refused.prompt_tokens, refused.completion_tokens) == (False, None, 0, 0)
    assert (billed.billable, billed.completion_tokens) == (True, 1)


async def test_a_restarted_engine_is_warmed_up_again_before_the_pod_serves(tmp_path: pathlib.Path) -> None:
    """The engine container restarts on its own (OOM, its liveness probe) while the gateway runs on: its port
    refuses connections, then a new, cold engine process answers there."""
    port = free_port()
    sink = RecordingSinkDouble()
    document = gateway_document(warmup={"requests": [{"prompt": "warm up", "maxTokens": 2}]})
    body = {"model": "tiny", "prompt": "a b", "max_tokens": 1}
    async with running_gateway(tmp_path, f"http://127.0.0.1:{port}", document, sink, wait_ready=False) as gw, \
            aiohttp.ClientSession() as session:
        async with serving(StandinEngine().app(), port=port):
            await wait_until(lambda: gw.state.ready, 10, "ready")
            before = await post(session, url(gw, "/v1/completions"), body)
        await wait_until(lambda: gw.state.phase == "waiting_for_engine", 5, "the engine seen gone")
        gone = await post(session, url(gw, "/v1/completions"), body)
        restarted = StandinEngine(token_delay=0.3)  # cold: a warm-up request takes ~0.6 s
        async with serving(restarted.app(), port=port):
            await wait_until(lambda: gw.state.phase == "warming_up", 5, "warming the new engine up")
            warming = await post(session, url(gw, "/v1/completions"), body)
            await wait_until(lambda: gw.state.ready, 10, "ready again")
            after = await post(session, url(gw, "/v1/completions"), body)
    assert [before[0], gone[0], warming[0], after[0]] == [200, 503, 503, 200]
    assert gone[1]["error"]["code"] == warming[1]["error"]["code"] == "not_ready"
    assert [b["prompt"] for b in restarted.received] == ["warm up", "a b"]  # warmed up before it served
    assert len([e for e in sink.requests if e.tenant == "tensorfleet:warmup"]) == 2  # one per engine process
    assert [e.billable for e in sink.client_requests()] == [True, False, False, True]
    first, second = sink.cold_starts
    assert [name for name, _ in second.stages] == ["engine_healthy", "warmed_up", "ready"]
    assert dict(second.stages)["warmed_up"] >= 0.5  # the new engine's own warm-up
    assert second.started_at > first.started_at


async def test_a_restarted_engine_must_pass_the_latency_bound_too(tmp_path: pathlib.Path) -> None:
    port = free_port()
    document = gateway_document(warmup={"maxLatencyMs": 250, "timeoutSeconds": 2,
                                        "requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with running_gateway(tmp_path, f"http://127.0.0.1:{port}", document, wait_ready=False) as gw:
        async with serving(StandinEngine().app(), port=port):
            await wait_until(lambda: gw.state.ready, 10, "ready")
        await wait_until(lambda: not gw.state.serving, 5, "the engine seen gone")
        async with serving(StandinEngine(token_delay=0.2).app(), port=port):  # 2 tokens: ~400 ms
            await wait_until(lambda: gw.state.failed is not None, 10, "warm-up failure")
    assert not gw.state.ready
    assert "maxLatencyMs 250" in (gw.state.failed or "")


async def test_warmup_latency_bound_holds_readiness(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.05)  # 2 tokens: ~100 ms per warm-up request
    document = gateway_document(warmup={"maxLatencyMs": 20, "timeoutSeconds": 1})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, wait_ready=False) as gw, \
            aiohttp.ClientSession() as session:
        await wait_until(lambda: gw.state.failed is not None, 10, "warm-up failure")
        assert not gw.state.ready
        assert "maxLatencyMs 20" in (gw.state.failed or "")
        warmups = len(engine.received)
        status, body, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
    assert (status, body["error"]["code"]) == (503, "not_ready")  # a failed pod serves nothing until restarted
    assert len(engine.received) == warmups
