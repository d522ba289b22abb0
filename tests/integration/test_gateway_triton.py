"""The gateway in front of a real tritonserver: generate and generate_stream, tokens from the repository's
tokenizer model (TensorRT-LLM's preprocessing), max_tokens clamped, Triton's pending count re-exported."""

from __future__ import annotations

import asyncio
import json
import pathlib

import aiohttp
import pytest

from gateway_support import RecordingSinkDouble, gateway_document, running_gateway, url
from integration.test_gateway_pipeline import events_of, post
from tensorfleet import telemetry

pytestmark = pytest.mark.integration

GENERATE = "/v2/models/tiny/generate"
STREAM = "/v2/models/tiny/generate_stream"


def triton_document(**token_policy: object) -> dict[str, object]:
    return gateway_document(runtime="triton", tokenPolicy={"maxOutputTokens": 5, **token_policy},
                            warmup={"requests": [{"prompt": "warm up", "maxTokens": 2}]})


async def test_generate_and_stream_through_the_gateway(triton_url: str, tmp_path: pathlib.Path) -> None:
    sink = RecordingSinkDouble()
    body = {"text_input": "a b c", "max_tokens": 3}
    async with running_gateway(tmp_path, triton_url, triton_document(), sink, runtime="triton") as gw, \
            aiohttp.ClientSession() as session:
        direct = await post(session, triton_url + GENERATE, body)
        proxied = await post(session, url(gw, GENERATE), body)
        async with session.post(triton_url + STREAM, json={**body, "stream": True}) as response:
            direct_stream = await response.read()
        async with session.post(url(gw, STREAM), json={**body, "stream": True}) as response:
            proxied_stream = await response.read()
        clamped = await post(session, url(gw, GENERATE), {"text_input": "a", "max_tokens": 50})
    assert proxied[0] == 200
    assert proxied[1] == direct[1] == {"model_name": "tiny", "model_version": "1",
                                                             "text_output": "w0 w1 w2"}
    assert proxied_stream == direct_stream
    assert len(events_of(proxied_stream)) == 3
    assert clamped[1]["text_output"].split() == ["w0", "w1", "w2", "w3", "w4"]  # maxOutputTokens 5
    plain, streamed, _ = sink.client_requests()
    assert (plain.prompt_tokens, plain.completion_tokens) == (3, 3)  # counted by the tokenizer model
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (3, 3)
    assert [c.tokens for c in streamed.chunks]
    assert sum(c.tokens for c in streamed.chunks) == 3


async def test_input_limit_and_unknown_models(triton_url: str, tmp_path: pathlib.Path) -> None:
    async with running_gateway(tmp_path, triton_url, triton_document(maxInputTokens=3), runtime="triton") as gw, \
            aiohttp.ClientSession() as session:
        over = await post(session, url(gw, GENERATE), {"text_input": "a b c d", "max_tokens": 2})
        fits = await post(session, url(gw, GENERATE), {"text_input": "a b c", "max_tokens": 2})
        unknown = await post(session, url(gw, "/v2/models/nope/generate"), {"text_input": "a"})
        await asyncio.sleep(0.5)  # an engine metrics poll
        async with session.get(url(gw, "/metrics", admin=True)) as response:
            metrics = await response.text()
    assert over[0] == 400
    assert "has 4 tokens" in over[1]["error"]["message"]
    assert fits[0] == 200
    assert json.dumps(fits[1])
    assert unknown[0] == 404
    assert unknown[1]["error"]["code"] == "model_not_found"
    assert f"\n{telemetry.ENGINE_WAITING} 0.0" in metrics  # nv_inference_pending_request_count, re-exported


async def test_runaway_control_stops_a_looping_triton_generation(triton_url: str, tmp_path: pathlib.Path) -> None:
    sink = RecordingSinkDouble()
    document = triton_document(maxOutputTokens=300, runaway={"enabled": True})
    body = {"text_input": "repeat: all work and no play", "max_tokens": 300}
    async with running_gateway(tmp_path, triton_url, document, sink, runtime="triton") as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(url(gw, STREAM), json={**body, "stream": True}) as response:
            streamed = await response.read()
        plain = await post(session, url(gw, GENERATE), body)
    events = events_of(streamed)
    assert all(json.loads(e[6:])["text_output"] for e in events)  # whole events, then the stream just ends
    assert 5 * 13 <= len(events) < 300  # 13 repeats of the 5-word sentence, then the next batch end
    assert plain[0] == 200
    text = plain[1]["text_output"]
    assert text.startswith("all work and no play all work")
    assert len(text.split()) < 300  # cut at the loop
    stream_event, plain_event = sink.client_requests()
    assert stream_event.runaway_stopped
    assert stream_event.completion_tokens == len(events)
    assert plain_event.runaway_stopped
    assert plain_event.completion_tokens == 300  # generated before it could be watched: produced, so billed


async def test_fields_inside_parameters_are_read_clamped_and_counted(triton_url: str, tmp_path: pathlib.Path) -> None:
    # Triton's generate extension makes each key of "parameters" a model input, as it does a top-level key.
    sink = RecordingSinkDouble()
    async with running_gateway(tmp_path, triton_url, triton_document(maxInputTokens=3), sink, runtime="triton") as gw, \
            aiohttp.ClientSession() as session:
        over = await post(session, url(gw, GENERATE), {"max_tokens": 2, "parameters": {"text_input": "a b c d"}})
        fits = await post(session, url(gw, GENERATE), {"max_tokens": 2, "parameters": {"text_input": "a b c"}})
        clamped = await post(session, url(gw, GENERATE), {"parameters": {"text_input": "a b c", "max_tokens": 50}})
        default = await post(session, url(gw, GENERATE), {"text_input": "a", "parameters": {"temperature": 1}})
        twice = await post(session, url(gw, GENERATE), {"text_input": "a", "max_tokens": 2,
                                                        "parameters": {"max_tokens": 2}})
    assert over[0] == 400
    assert "has 4 tokens" in over[1]["error"]["message"]
    assert over[1]["error"]["param"] == "parameters.text_input"
    assert fits[0] == 200
    assert clamped[0] == 200, clamped
    assert clamped[1]["text_output"].split() == ["w0", "w1", "w2", "w3", "w4"]  # maxOutputTokens 5
    assert default[0] == 200
    assert len(default[1]["text_output"].split()) == 5  # the gateway's bound, top-level beside the parameters
    assert twice[0] == 400
    assert twice[1]["error"]["param"] == "parameters.max_tokens"
    assert "both" in twice[1]["error"]["message"]
    served = [(e.prompt_tokens, e.completion_tokens) for e in sink.client_requests() if e.status == 200]
    assert served == [(3, 2), (3, 5), (1, 5)]  # each prompt counted where the client put it
