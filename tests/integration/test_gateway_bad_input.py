"""Bad input and the gateway's own failures: every answer JSON, never a 500 for what a client sent, and
metered as what the client got. Against the stand-in engine, and a test double of tritonserver's model API."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engines.standin import StandinEngine
from gateway_support import RecordingSinkDouble, gateway_document, running_gateway, serving, url, wait_until
from integration.test_gateway_pipeline import post
from tensorfleet.gateway.engine import MAX_REMEMBERED_MODELS, TOKENIZE_CONCURRENCY
from tensorfleet.gateway.hooks import ProxyRequest, TokenCounter
from tensorfleet.gateway.server import Gateway

pytestmark = pytest.mark.integration


class _BrokenHook:
    """A request hook with a bug in it."""

    async def before_upstream(self, request: ProxyRequest, tokens: TokenCounter) -> None:
        raise RuntimeError("a bug in a hook")


async def test_an_unexpected_error_is_metered_as_the_500_the_client_got(tmp_path: pathlib.Path) -> None:
    sink = RecordingSinkDouble()
    async with serving(StandinEngine().app()) as upstream, \
            running_gateway(tmp_path, upstream, sink=sink, hooks={"request_hooks": [_BrokenHook()]}) as gw, \
            aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": "a"})
        await wait_until(lambda: sink.client_requests(), 5, "the metering event")
        labels: dict[str, Any] = {"model": "tiny", "endpoint": "/v1/completions"}
        counted = {code: gw.metrics.registry.get_sample_value("tensorfleet_gateway_requests_total",
                                                               {**labels, "code": code}) for code in ("2xx", "5xx")}
    assert (status, body["error"]["code"]) == (500, "internal_error")
    (event,) = sink.client_requests()
    assert (event.status, event.error) == (500, "internal_error")
    assert counted == {"2xx": None, "5xx": 1.0}


def nested(depth: int) -> bytes:
    """A completions body with a field nested ``depth`` deep; max_tokens over the ceiling, so the clamp writes
    the body again."""
    return b'{"model":"tiny","prompt":"a","max_tokens":100000,"x":' + b"[" * depth + b"]" * depth + b"}"


async def test_deeply_nested_json_is_400_never_500(tmp_path: pathlib.Path) -> None:
    # Python's JSON reader and writer stop at its recursion limit, less the caller's stack: bodies a little
    # below the limit parse and then fail when the body is written again (the clamp), deeper ones fail parsing.
    limit = sys.getrecursionlimit()  # 1000 in the gateway's process; a test dependency raises it
    answers: dict[int, tuple[int, str]] = {}
    async with serving(StandinEngine().app()) as upstream, running_gateway(tmp_path, upstream) as gw, \
            aiohttp.ClientSession() as session:
        for depth in (*range(limit - 100, limit + 1, 4), 100_000):
            status, body, _ = await post(session, url(gw, "/v1/completions"), nested(depth))
            answers[depth] = (status, "" if status == 200 else body["error"]["code"] + ": " + body["error"]["message"])
    refused = {depth: answer for depth, answer in answers.items() if answer[0] != 200}
    assert refused, "no depth was refused"
    assert all(status == 400 and "nests JSON arrays and objects too deeply" in message
               and f"recursion limit, {limit} levels" in message for status, message in refused.values()), refused
    assert answers[100_000][1].startswith("invalid_json: ")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
async def test_nan_and_infinity_are_not_json(tmp_path: pathlib.Path, literal: bytes) -> None:
    engine = StandinEngine()
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream) as gw, \
            aiohttp.ClientSession() as session:
        warm_up = len(engine.raw)
        status, body, _ = await post(session, url(gw, "/v1/completions"),
                                     b'{"model":"tiny","prompt":"a","temperature":%b}' % literal)
        forwarded = engine.raw[warm_up:]
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert f"{literal.decode()} is not a JSON value" in body["error"]["message"]
    assert forwarded == []


LONE_SURROGATES = {  # each makes the gateway write the body again, or key it for the cache
    "max_tokens clamped": ("/v1/completions", b'{"model":"tiny","prompt":"\\ud800","max_tokens":100000}', "prompt"),
    "stream_options rewritten": ("/v1/completions", b'{"model":"tiny","prompt":"a\\udfff","stream":true,'
                                                    b'"stream_options":{}}', "prompt"),
    "cache key": ("/v1/completions", b'{"model":"tiny","prompt":"\\udfff x","temperature":0}', "prompt"),
    "chat": ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"hi"},'
                                     b'{"role":"user","content":"\\ud83d"}],"max_tokens":100000}',
             "messages[1].content"),
}


@pytest.mark.parametrize("case", list(LONE_SURROGATES))
async def test_a_lone_surrogate_is_400_naming_the_field(tmp_path: pathlib.Path, case: str) -> None:
    path, raw, field = LONE_SURROGATES[case]
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"responseCache": {"enabled": True}})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        warm_up = len(engine.raw)
        status, body, _ = await post(session, url(gw, path), raw)
        forwarded = engine.raw[warm_up:]
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_value", field)
    assert f"'{field}' has a lone UTF-16 surrogate" in body["error"]["message"]
    assert forwarded == []


async def test_a_batch_over_the_prompt_limit_is_400_naming_it(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"maxInputTokens": 100})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        warm_up = len(engine.raw)
        answers = [await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": prompts})
                   for prompts in (["a"] * 1025, [[1, 2]] * 1025)]
        forwarded = engine.raw[warm_up:]
    for status, body, _ in answers:
        assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_value", "prompt")
        assert "'prompt' has 1025 prompts, over the limit of 1024 prompts in one request " \
               "(TENSORFLEET_GATEWAY_MAX_BATCH_PROMPTS)" in body["error"]["message"]
    assert forwarded == []


class _TokenizeConcurrencyEngine(StandinEngine):
    """The stand-in, recording how many /tokenize calls it serves at once; each takes a few ms."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizing = self.peak = 0

    async def tokenize(self, request: Any) -> Any:
        self.tokenizing += 1
        self.peak = max(self.peak, self.tokenizing)
        try:
            await asyncio.sleep(0.002)  # the tokenizer's work, so that calls overlap
            return await super().tokenize(request)
        finally:
            self.tokenizing -= 1


async def test_a_batch_is_counted_a_few_prompts_at_a_time(tmp_path: pathlib.Path) -> None:
    engine = _TokenizeConcurrencyEngine()
    document = gateway_document(tokenPolicy={"maxInputTokens": 2})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        prompts = ["a"] * 99 + ["a b c"]  # the last one is over the limit
        over = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": prompts})
        fits = await post(session, url(gw, "/v1/completions"), {"model": "tiny", "prompt": prompts[:-1]})
    assert (over[0], over[1]["error"]["code"]) == (400, "context_length_exceeded")
    assert "prompt 99 has 3 tokens" in over[1]["error"]["message"]
    assert fits[0] == 200
    assert len(engine.received[-1]["prompt"]) == 99
    assert 1 < engine.peak <= TOKENIZE_CONCURRENCY


class _TritonDouble:
    """Test double of tritonserver's HTTP API, as far as the gateway's model checks go: health, repository index,
    readiness and metadata per model (aiohttp decodes path segments, as a server may), generate. It records the
    raw paths it is asked for."""

    def __init__(self) -> None:
        self.ready = {"tiny"}
        self.raw_paths: list[str] = []
        self.generated: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/health/ready", self.answer)
        app.router.add_get("/metrics", self.answer)
        app.router.add_post("/v2/repository/index", self.index)
        app.router.add_get("/v2/models/{model}/ready", self.model_ready)
        app.router.add_get("/v2/models/{model}", self.metadata)
        app.router.add_post("/v2/models/{model}/generate", self.generate)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": "tiny", "state": "READY"}])

    def _known(self, request: web.Request) -> bool:
        self.raw_paths.append(request.raw_path)
        return request.match_info["model"] in self.ready

    async def model_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._known(request) else 400)

    async def metadata(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return web.json_response({"error": "unknown model"}, status=400)
        return web.json_response({"name": request.match_info["model"]})

    async def generate(self, request: web.Request) -> web.Response:
        self.generated.append(request.raw_path)
        body = await request.json()
        if request.match_info["model"] not in self.ready:
            return web.json_response({"error": "unknown model"}, status=400)
        return web.json_response({"model_name": request.match_info["model"],
                                  "text_output": " tok" * int(body.get("max_tokens") or 1)})


@contextlib.asynccontextmanager
async def _triton_gateway(tmp_path: pathlib.Path, engine: _TritonDouble, **token_policy: Any) -> AsyncIterator[Gateway]:
    document = gateway_document(runtime="triton", tokenPolicy={"maxOutputTokens": 5, **token_policy},
                                warmup={"requests": [{"prompt": "warm up", "maxTokens": 2}]})
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, document, runtime="triton", engine_metrics_url=upstream + "/metrics",
                            triton_tokenizer_model="none") as gw:
        yield gw


async def test_triton_model_names_are_quoted_and_only_ready_ones_remembered(tmp_path: pathlib.Path) -> None:
    engine = _TritonDouble()
    async with _triton_gateway(tmp_path, engine) as gw, aiohttp.ClientSession() as session:
        warm_up = len(engine.generated)
        answers = [await post(session, url(gw, f"/v2/models/{name}/generate"), {"text_input": "a", "max_tokens": 2})
                   for name in ("tiny%3F0", "tiny%3F1", "tiny%23x")]
        async with session.get(url(gw, "/v2/models/tiny%3Fx")) as response:
            metadata = response.status
        remembered = set(gw.engine.models)
        served = await post(session, url(gw, "/v2/models/tiny/generate"), {"text_input": "a", "max_tokens": 2})
    assert [status for status, _, _ in answers] == [404] * 3
    assert {body["error"]["code"] for _, body, _ in answers} == {"model_not_found"}
    assert {"/v2/models/tiny%3F0/ready", "/v2/models/tiny%23x/ready", "/v2/models/tiny%3Fx"} <= set(engine.raw_paths)
    assert metadata == 400  # the engine's answer about `tiny?x`, not tiny's metadata
    assert remembered == {"tiny"}
    assert served[0] == 200
    assert engine.generated[warm_up:] == ["/v2/models/tiny/generate"]


async def test_triton_models_never_share_cached_answers(tmp_path: pathlib.Path) -> None:
    engine = _TritonDouble()
    engine.ready.add("other")
    body = {"text_input": "a", "max_tokens": 2, "temperature": 0}
    async with _triton_gateway(tmp_path, engine, responseCache={"enabled": True}) as gw, \
            aiohttp.ClientSession() as session:
        answers = [await post(session, url(gw, f"/v2/models/{name}/generate"), body)
                   for name in ("tiny", "other", "tiny")]
    assert [headers["X-TensorFleet-Cache"] for _, _, headers in answers] == ["miss", "miss", "hit"]
    assert [answer["model_name"] for _, answer, _ in answers] == ["tiny", "other", "tiny"]


async def test_triton_remembers_a_bounded_number_of_ready_models(tmp_path: pathlib.Path) -> None:
    engine = _TritonDouble()
    async with _triton_gateway(tmp_path, engine) as gw, aiohttp.ClientSession() as session:
        gw.engine.models = frozenset(f"other-{i}" for i in range(MAX_REMEMBERED_MODELS - 1))  # one place left
        engine.ready |= {"late-1", "late 2"}  # loaded after the index was read
        answers = [await post(session, url(gw, f"/v2/models/{name}/generate"), {"text_input": "a", "max_tokens": 2})
                   for name in ("late-1", "late%202", "late%202")]
        remembered = gw.engine.models
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert "late-1" in remembered
    assert "late 2" not in remembered  # the bound reached: asked again each time
    assert len(remembered) == MAX_REMEMBERED_MODELS
    assert engine.raw_paths.count("/v2/models/late%202/ready") == 2
    assert engine.generated[-1] == "/v2/models/late%202/generate"


async def test_triton_lone_surrogate_is_400_naming_the_field(tmp_path: pathlib.Path) -> None:
    engine = _TritonDouble()
    async with _triton_gateway(tmp_path, engine) as gw, aiohttp.ClientSession() as session:
        warm_up = len(engine.generated)
        status, body, _ = await post(session, url(gw, "/v2/models/tiny/generate"),
                                     b'{"text_input":"\\ud800","max_tokens":50}')  # clamped to 5: written again
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_value", "text_input")
    assert engine.generated[warm_up:] == []


async def test_a_request_offering_an_h2c_upgrade_is_served(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    body = b'{"model":"tiny","prompt":"hello","max_tokens":2}'
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports["client"])
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: %d\r\n\r\n%b"
                     % (len(body), body))
        answer = await reader.read()  # the connection closes after the answer
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert engine.raw[-1] == body
