"""Context strategy, runaway control and the output ceiling against the real vLLM (CPU, the tiny test Llama).

The tiny random Llama loops at once with greedy decoding (" fox fox fox ..."), which makes it a real
degenerate generator for runaway control; its tokenizer and chat template are the engine's own, so the
counts the gateway acts on are checked against vLLM's ``/tokenize`` and the prompt token ids vLLM
reports for the request it actually ran.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway_support import (
    RecordingSinkDouble,
    gateway_document,
    running_gateway,
    stream_chunks,
    streamed_text,
    url,
    wait_until,
)
from integration.test_gateway_pipeline import post
from integration.test_gateway_vllm import engine_metric, merged, settled_metric
from tensorfleet.gateway.context import TRUNCATED_TOKENS_HEADER, TRUNCATED_TURNS_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYSTEM = {"role": "system", "content": "you answer for the tenant budget"}
LOOPING = {"model": "tiny", "prompt": "the quick brown fox", "temperature": 0, "ignore_eos": True}
GENERATED = "vllm:generation_tokens_total"
T = TypeVar("T")


def conversation(turns: int, words: int) -> list[dict[str, Any]]:
    vocabulary = ["engineers", "meter", "tokens", "on", "many", "gpus", "and", "gateways", "stream", "every",
                  "chunk", "to", "clients"]
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        said = " ".join(vocabulary[(i + j) % len(vocabulary)] for j in range(words))
        messages += [{"role": "user", "content": f"turn {i}: {said}"},
                     {"role": "assistant", "content": f"reply {i}: {said[::-1]}"}]
    return [*messages, {"role": "user", "content": "so what is the budget now?"}]


async def tokenize(session: aiohttp.ClientSession, vllm_url: str, messages: list[dict[str, Any]]) -> list[int]:
    status, answer, _ = await post(session, vllm_url + "/tokenize", {"model": "tiny", "messages": messages})
    assert status == 200, answer
    return list(answer["tokens"])


@pytest.mark.parametrize(("token_policy", "max_tokens", "limit"), [
    ({"maxInputTokens": 200}, 8, 200),
    ({"maxOutputTokens": 300}, 300, 1024 - 300),  # the model's window less max_tokens
], ids=["max-input-tokens", "context-window"])
async def test_truncation_keeps_the_system_message_and_the_newest_turns_and_fits(
        vllm_url: str, tmp_path: pathlib.Path, token_policy: dict[str, Any], max_tokens: int, limit: int) -> None:
    sink = RecordingSinkDouble()
    messages = conversation(12, 24 if limit > 500 else 8)
    document = gateway_document(tokenPolicy={"contextStrategy": "truncate-oldest", **token_policy})
    async with running_gateway(tmp_path, vllm_url, document, sink) as gw, aiohttp.ClientSession() as session:
        full = len(await tokenize(session, vllm_url, messages))
        # What truncate-oldest must send: the system message and the most turns that fit, newest first.
        for kept in range(12, -1, -1):
            expected = [SYSTEM, *messages[1 + 2 * (12 - kept):]]
            expected_ids = await tokenize(session, vllm_url, expected)
            if len(expected_ids) <= limit:
                break
        body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True}
        status, answer, headers = await post(session, url(gw, "/v1/chat/completions"), body)
    assert full > limit
    assert 0 < kept < 12
    assert status == 200, answer
    assert answer["prompt_token_ids"] == expected_ids  # exactly what vLLM ran: the system message, the newest turns
    assert answer["usage"]["prompt_tokens"] == len(expected_ids) <= limit
    assert headers[TRUNCATED_TURNS_HEADER] == str(12 - kept)
    assert headers[TRUNCATED_TOKENS_HEADER] == str(full - len(expected_ids))
    (event,) = sink.client_requests()
    assert event.truncated
    assert event.truncated_tokens == full - len(expected_ids)
    assert event.prompt_tokens == len(expected_ids)


async def test_reject_gives_the_limit_and_the_engines_count(vllm_url: str, tmp_path: pathlib.Path) -> None:
    messages = conversation(6, 8)
    document = gateway_document(tokenPolicy={"maxInputTokens": 100})
    async with running_gateway(tmp_path, vllm_url, document) as gw, aiohttp.ClientSession() as session:
        count = len(await tokenize(session, vllm_url, messages))
        status, answer, _ = await post(session, url(gw, "/v1/chat/completions"),
                                       {"model": "tiny", "messages": messages, "max_tokens": 4})
    assert status == 400
    assert answer["error"]["limit"] == 100
    assert answer["error"]["count"] == count > 100
    assert f"the prompt has {count} tokens, over the limit of 100 input tokens" in answer["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
async def test_output_stops_at_the_ceiling_when_the_client_sets_no_limit(
        vllm_url: str, tmp_path: pathlib.Path, stream: bool, path: str) -> None:
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"maxOutputTokens": 7})
    body: dict[str, Any] = {"model": "tiny", "temperature": 0, "ignore_eos": True, "stream": stream,
                            "stream_options": {"include_usage": True} if stream else None}
    body.update({"messages": [{"role": "user", "content": "hello world"}]} if "chat" in path
                else {"prompt": "hello world"})
    assert "max_tokens" not in body
    async with running_gateway(tmp_path, vllm_url, document, sink) as gw, aiohttp.ClientSession() as session, \
            session.post(url(gw, path), json={k: v for k, v in body.items() if v is not None}) as response:
        raw = await response.read()
    assert response.status == 200, raw
    if stream:
        chunks = stream_chunks(raw)
        usage = chunks[-1]["usage"]
        finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    else:
        answer = json.loads(raw)
        usage, finish = answer["usage"], [c["finish_reason"] for c in answer["choices"]]
    assert usage["completion_tokens"] == 7
    assert finish == ["length"]
    (event,) = sink.client_requests()
    assert event.completion_tokens == 7


async def test_completions_without_a_limit_keep_vllms_default_under_a_higher_ceiling(
        vllm_url: str, tmp_path: pathlib.Path) -> None:
    # vLLM (and OpenAI's API) generate at most 16 tokens on /v1/completions without max_tokens; before, the
    # gateway set max_tokens to the ceiling (4096 by default), so the client got and paid for up to 256x that.
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"maxOutputTokens": 40})
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True, "prompt": "hello world"}
    async with running_gateway(tmp_path, vllm_url, document, sink) as gw, aiohttp.ClientSession() as session:
        status, answer, _ = await post(session, url(gw, "/v1/completions"), body)
        direct_status, direct, _ = await post(session, f"{vllm_url}/v1/completions", body)
    assert (status, direct_status) == (200, 200), answer
    assert answer["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 16
    (event,) = sink.client_requests()
    assert event.completion_tokens == 16


async def aborted_in_vllm(session: aiohttp.ClientSession, vllm_url: str,
                          send: Callable[[], Awaitable[T]]) -> T:
    """What ``send`` returned, for a request of 900 tokens that vLLM did not run to its end.

    The gateway closes the engine connection when it stops a loop; vLLM then aborts the request, but on
    this machine's two shared cores the abort can land after the tiny model has generated all 900 tokens
    (it generates hundreds per second). So a try in which vLLM ran the request to its end proves nothing
    either way, and the request is sent again, up to three times: a gateway that does not abort the
    engine request makes every try run to 900 tokens. vLLM's token counter is read settled, so a warm-up
    request counted late does not throw it off."""
    generated = []
    for _ in range(3):
        before = await settled_metric(session, vllm_url, GENERATED)
        result = await send()
        for _ in range(100):
            if await engine_metric(session, vllm_url, "vllm:num_requests_running") == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("vLLM still runs the request")
        generated.append(await settled_metric(session, vllm_url, GENERATED) - before)
        if generated[-1] < 900:
            return result
    raise AssertionError(f"vLLM generated {generated} tokens: every request ran to its end, none was aborted")


async def test_runaway_stops_a_real_loop_in_a_stream_and_aborts_it_in_vllm(vllm_url: str,
                                                                            tmp_path: pathlib.Path) -> None:
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"maxOutputTokens": 900, "runaway": {"enabled": True}})
    body = {**LOOPING, "max_tokens": 900, "stream": True, "stream_options": {"include_usage": True}}

    async def send() -> bytes:
        async with session.post(url(gw, "/v1/completions"), json=body) as response:
            return await response.read()

    async with running_gateway(tmp_path, vllm_url, document, sink) as gw, aiohttp.ClientSession() as session:
        raw = await aborted_in_vllm(session, vllm_url, send)
        await wait_until(lambda: len(sink.client_requests()) >= 1, 5, "the event")
    chunks = stream_chunks(raw)
    produced = chunks[-1]["usage"]["completion_tokens"]
    assert streamed_text(chunks).startswith(" fox fox fox")
    assert [c["finish_reason"] for c in chunks[-2]["choices"]] == ["length"]
    assert 52 <= produced < 120  # 13 blocks of 4 " fox": stopped long before 900
    event = sink.client_requests()[-1]
    assert event.runaway_stopped
    assert event.completion_tokens == produced == sum(c.tokens for c in event.chunks)


async def test_runaway_watches_a_plain_request_as_it_is_generated(vllm_url: str, tmp_path: pathlib.Path) -> None:
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"maxOutputTokens": 900, "runaway": {"enabled": True}})
    body = {**LOOPING, "max_tokens": 900}

    async def send() -> tuple[int, Any]:
        status, answer, _ = await post(session, url(gw, "/v1/completions"), body)
        return status, answer

    async with running_gateway(tmp_path, vllm_url, document, sink) as gw, aiohttp.ClientSession() as session:
        status, answer = await aborted_in_vllm(session, vllm_url, send)
        _, direct, _ = await post(session, vllm_url + "/v1/completions", {**body, "max_tokens": 150})
    assert status == 200, answer
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "length"
    assert direct["choices"][0]["text"].startswith(choice["text"])  # the engine's own text, cut short
    assert 52 <= answer["usage"]["completion_tokens"] < 120
    assert answer["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    event = sink.client_requests()[-1]
    assert event.runaway_stopped
    assert event.completion_tokens == answer["usage"]["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
async def test_a_watched_plain_answer_is_the_engines_own(vllm_url: str, tmp_path: pathlib.Path, path: str) -> None:
    """Sampled text from the tiny model is noise, not a loop: runaway control lets it through, and the answer
    folded back from the stream carries the same text, finish reason and usage as vLLM's plain answer."""
    document = gateway_document(tokenPolicy={"runaway": {"enabled": True}})
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 40, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    body.update({"messages": [{"role": "user", "content": "hello world"}]} if "chat" in path
                else {"prompt": "hello world"})
    async with running_gateway(tmp_path, vllm_url, document) as gw, aiohttp.ClientSession() as session:
        _, direct, _ = await post(session, vllm_url + path, body)
        status, proxied, _ = await post(session, url(gw, path), body)
    assert status == 200, proxied
    texts, finishes, usage = merged(json.dumps(proxied).encode())
    assert (texts, finishes) == merged(json.dumps(direct).encode())[:2]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: usage[k] for k in counts} == {k: direct["usage"][k] for k in counts}
    assert proxied["object"] == direct["object"]
    assert proxied["system_fingerprint"] == direct["system_fingerprint"]
