"""Bad input and the gateway's own failures: every answer JSON, never a 500 for what a client sent, and
metered as what the client got. Against the stand-in engine."""

from __future__ import annotations

import asyncio
import pathlib
import sys
from typing import Any

import aiohttp
import pytest

from engines.standin import StandinEngine
from gateway_support import RecordingSinkDouble, gateway_document, running_gateway, serving, url, wait_until
from integration.test_gateway_pipeline import post
from tensorfleet.gateway.engine import TOKENIZE_CONCURRENCY
from tensorfleet.gateway.hooks import ProxyRequest, TokenCounter

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
