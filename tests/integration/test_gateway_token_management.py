"""Context strategy and runaway control through the real gateway over sockets, against the stand-in engine.

The stand-in counts words as tokens and can generate a loop (a few words over and over) or clean text
(the words of a long prose file): what the stand-in cannot show — the real tokenizer and chat template,
aborts inside vLLM — is in test_gateway_vllm_tokens.py.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engines.standin import StandinEngine
from gateway_support import (
    RecordingSinkDouble,
    gateway_document,
    running_gateway,
    serving,
    stream_chunks,
    streamed_text,
    url,
    wait_until,
)
from integration.test_gateway_pipeline import MidStreamFailureStandinDouble, post
from tensorfleet.gateway.context import TRUNCATED_TOKENS_HEADER, TRUNCATED_TURNS_HEADER

pytestmark = pytest.mark.integration

PROSE = (pathlib.Path(__file__).resolve().parents[1] / "data" / "runaway" / "clean-prose.txt").read_text().split()
SYSTEM = {"role": "system", "content": "answer in one line"}


def conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i} " + "word " * 8},
                     {"role": "assistant", "content": f"answer {i} " + "word " * 8}]
    return [*messages, {"role": "user", "content": "and the last question?"}]


def runaway_document(**runaway: Any) -> dict[str, Any]:
    return gateway_document(tokenPolicy={"maxOutputTokens": 400, "runaway": {"enabled": True, **runaway}})


def metric(gateway: Any, name: str, labels: dict[str, str]) -> float | None:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


# ---- context strategy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("token_policy", [{"maxInputTokens": 900}, {}], ids=["max-input", "window-only"])
async def test_truncate_oldest_sends_a_request_that_fits_byte_for_byte(tmp_path: pathlib.Path,
                                                                       token_policy: dict[str, Any]) -> None:
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"contextStrategy": "truncate-oldest", **token_policy})
    # Odd spacing and key order: any re-serialisation would show. Big enough to be counted either way.
    raw = (b'{ "messages": ' + json.dumps(conversation(30), indent=1).encode()
           + b', "max_tokens": 5, "model": "tiny", "temperature": 0.5 }')
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        status, body, headers = await post(session, url(gw, "/v1/chat/completions"), raw)
    assert status == 200, body
    assert engine.raw[-1] == raw
    assert TRUNCATED_TURNS_HEADER not in headers


async def test_truncate_oldest_drops_old_turns_and_flags_the_request(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"contextStrategy": "truncate-oldest", "maxInputTokens": 60})
    body = {"model": "tiny", "max_tokens": 4, "messages": conversation(6)}
    full = StandinEngine.count(body)
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, headers = await post(session, url(gw, "/v1/chat/completions"), body)
        (tokenizes,) = [m for m in gw.metrics.registry.collect() if m.name == "tensorfleet_gateway_tokenize_seconds"]
    assert status == 200, answer
    sent = engine.received[-1]["messages"]
    assert sent[0] == SYSTEM
    assert sent[-1] == body["messages"][-1]
    assert sent[1:-1] == body["messages"][-1 - 2 * (len(sent) - 2) // 2:-1]  # the newest whole turns
    kept = StandinEngine.count({"messages": sent})
    assert kept <= 60 < StandinEngine.count({"messages": [sent[0], *body["messages"][-3 - (len(sent) - 2):]]})
    assert headers[TRUNCATED_TURNS_HEADER] == str((len(body["messages"]) - len(sent)) // 2)
    assert headers[TRUNCATED_TOKENS_HEADER] == str(full - kept)
    (event,) = sink.client_requests()
    assert event.truncated
    assert event.truncated_tokens == full - kept
    assert event.prompt_tokens == kept == answer["usage"]["prompt_tokens"]
    calls = next(s.value for s in tokenizes.samples if s.name.endswith("_count"))
    assert calls <= 3  # the whole prompt, then the estimate and its neighbour


async def test_reject_answers_400_naming_the_limit_and_the_count(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine()
    document = gateway_document(tokenPolicy={"maxInputTokens": 60})
    body = {"model": "tiny", "max_tokens": 4, "messages": conversation(6)}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, _ = await post(session, url(gw, "/v1/chat/completions"), body)
        rejections = metric(gw, "tensorfleet_gateway_context_rejections_total", {"model": "tiny"})
    assert status == 400
    error = answer["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert error["limit"] == 60
    assert error["count"] == StandinEngine.count(body)
    assert "tokenPolicy.maxInputTokens" in error["message"]
    assert not [r for r in engine.received if "messages" in r]
    assert rejections == 1


class RagTemplateStandinDouble(StandinEngine):
    """The stand-in with a RAG chat template, placed as vLLM places it: a chat request's ``documents`` are
    rendered into the prompt (ChatCompletionRequest.build_chat_params), while ``/tokenize`` ignores a top-level
    ``documents`` and renders only what comes in ``chat_template_kwargs`` (TokenizeChatRequest)."""

    @staticmethod
    def count(body: dict[str, Any]) -> int:
        return StandinEngine.count(body) + _document_words(body.get("documents"))

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        count = StandinEngine.count(body) + _document_words((body.get("chat_template_kwargs") or {}).get("documents"))
        return web.json_response({"count": count, "max_model_len": 1024, "tokens": list(range(count))})


def _document_words(documents: Any) -> int:
    return sum(len(str(document.get("text", "")).split()) for document in documents or ())


@pytest.mark.parametrize("strategy", ["reject", "truncate-oldest"])
async def test_documents_count_against_max_input_tokens(tmp_path: pathlib.Path, strategy: str) -> None:
    engine = RagTemplateStandinDouble()
    document = gateway_document(tokenPolicy={"maxInputTokens": 100, "contextStrategy": strategy})
    body = {"model": "tiny", "max_tokens": 4, "documents": [{"title": "manual", "text": "lorem " * 600}],
            "chat_template_kwargs": {"citation_mode": "fast"},
            "messages": [{"role": "user", "content": "summarise the manual"}]}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, _ = await post(session, url(gw, "/v1/chat/completions"), body)
    assert status == 400, answer
    assert answer["error"]["code"] == "context_length_exceeded"
    assert answer["error"]["count"] == RagTemplateStandinDouble.count(body) == 606
    assert not [r for r in engine.received if "messages" in r]


# ---- runaway control -----------------------------------------------------------------------------------------

async def test_a_looping_stream_is_stopped_cleanly_and_billed_for_what_was_produced(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.002, words=["I", "am", "sorry", "."])
    sink = RecordingSinkDouble()
    body = {"model": "tiny", "max_tokens": 400, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "apologise"}]}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, runaway_document(), sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        warmed = engine.completed
        async with session.post(url(gw, "/v1/chat/completions"), json=body) as response:
            raw = await response.read()
        await wait_until(lambda: engine.aborted == 1, 5, "the engine request aborted")
        stops = metric(gw, "tensorfleet_gateway_runaway_stops_total", {"model": "tiny", "signal": "repetition"})
    chunks = stream_chunks(raw)
    produced = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert chunks[-2]["choices"] == [{"index": 0, "finish_reason": "length", "delta": {}}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == produced
    # "." is no word: the period is 3 words, counted in blocks of 6 (ngramSize 4); 13 blocks are 26
    # periods of 4 tokens. The stop comes then (give or take events the engine sent together), not at 400.
    assert 104 <= produced < 120
    assert streamed_text(chunks).startswith(" I am sorry . I am sorry")
    (event,) = sink.client_requests()
    assert event.runaway_stopped
    assert not event.truncated
    assert event.completion_tokens == produced == sum(c.tokens for c in event.chunks)
    assert stops == 1
    assert engine.completed == warmed


async def test_a_looping_plain_request_is_watched_as_a_stream_and_cut_short(tmp_path: pathlib.Path) -> None:
    engine = StandinEngine(token_delay=0.002, words=["I", "am", "sorry", "."])
    sink = RecordingSinkDouble()
    body = {"model": "tiny", "max_tokens": 400, "messages": [{"role": "user", "content": "apologise"}]}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, runaway_document(), sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, headers = await post(session, url(gw, "/v1/chat/completions"), body)
        await wait_until(lambda: engine.aborted == 1, 5, "the engine request aborted")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert engine.received[-1]["stream"] is True  # asked upstream as a stream, so it could be aborted
    (choice,) = answer["choices"]
    assert answer["object"] == "chat.completion"
    assert choice["finish_reason"] == "length"
    produced = len(choice["message"]["content"].split())
    assert answer["usage"]["completion_tokens"] == produced < 120
    assert answer["usage"]["prompt_tokens"] == StandinEngine.count(body)
    (event,) = sink.client_requests()
    assert event.runaway_stopped
    assert event.completion_tokens == produced
    assert not event.streaming
    assert len(event.chunks) > 1  # real token timings for metering, not one chunk at the end


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
async def test_clean_text_is_not_stopped(tmp_path: pathlib.Path, stream: bool) -> None:
    engine = StandinEngine(words=PROSE)
    sink = RecordingSinkDouble()
    body = {"model": "tiny", "max_tokens": 300, "stream": stream, "prompt": "tell me about serving"}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, runaway_document(), sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(url(gw, "/v1/completions"), json=body) as response:
            raw = await response.read()
        direct = await post(session, upstream + "/v1/completions", {**body, "stream": False})
    if stream:
        text = streamed_text(stream_chunks(raw))
    else:
        answer = json.loads(raw)
        expected = direct[1]
        assert answer["usage"] == expected["usage"]
        assert answer["system_fingerprint"] == expected["system_fingerprint"]
        assert answer["choices"] == [{**expected["choices"][0], "logprobs": None, "stop_reason": None}]
        text = answer["choices"][0]["text"]
    assert text == "".join(" " + w for w in PROSE[:300])
    (event,) = sink.client_requests()
    assert not event.runaway_stopped
    assert event.completion_tokens == 300
    assert engine.aborted == 0


class VLLMPlainOnlyFieldsStandinDouble(StandinEngine):
    """The stand-in with vLLM's answers to the fields a watched plain request must not be streamed for:
    ``prompt_logprobs`` refused on a stream (completion/protocol.py, chat_completion/protocol.py: "not
    available when `stream=True`"), and the plain answer's ``token_ids``/``prompt_token_ids``,
    ``prompt_text`` and ``kv_transfer_params``, which a folded stream does not give back."""

    async def _plain(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        answer = json.loads((await super()._plain(request, body)).text or "{}")
        n, prompt_ids = answer["usage"]["completion_tokens"], list(range(self.count(body)))
        holder = answer if "messages" in body else answer["choices"][0]
        extra = {"return_token_ids": {"prompt_token_ids": prompt_ids}, "return_prompt_text": {"prompt_text": "p"},
                 "kv_transfer_params": {"kv_transfer_params": {"remote_block_ids": [7]}}}
        for field, fields in extra.items():
            if body.get(field):
                holder.update(fields)
        if body.get("return_token_ids"):
            answer["choices"][0]["token_ids"] = list(range(n))
        return web.json_response(answer)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("prompt_logprobs"):
            return web.json_response({"error": {"message": "`prompt_logprobs` are not available when "
                                                           "`stream=True`.", "code": 400}}, status=400)
        return await super()._stream(request, body)


@pytest.mark.parametrize("field", [{"prompt_logprobs": 1}, {"prompt_logprobs": -1}, {"return_token_ids": True},
                                   {"return_prompt_text": True}, {"kv_transfer_params": {"do_remote_decode": True}}],
                         ids=["prompt-logprobs", "all-prompt-logprobs", "token-ids", "prompt-text", "kv-transfer"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_watched_plain_request_the_engine_cannot_stream_gets_the_engines_own_answer(
        tmp_path: pathlib.Path, path: str, field: dict[str, Any]) -> None:
    engine = VLLMPlainOnlyFieldsStandinDouble(words=PROSE)
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 20, "temperature": 0, **field}
    body.update({"prompt": "hello there"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "hello there"}]})
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, runaway_document()) as gw, \
            aiohttp.ClientSession() as session:
        status, answer, _ = await post(session, url(gw, path), body)
        _, direct, _ = await post(session, upstream + path, body)
    assert status == 200, answer
    assert not engine.received[-2].get("stream")  # the gateway's request: plain, judged whole
    assert {k: v for k, v in answer.items() if k not in ("id", "created")} == \
        {k: v for k, v in direct.items() if k not in ("id", "created")}


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("runaway", [False, True], ids=["runaway-off", "runaway-on"])
async def test_an_engine_failure_mid_generation_is_a_502_whether_watched_or_not(
        tmp_path: pathlib.Path, runaway: bool, cache: bool) -> None:
    """Watched, the plain request is streamed upstream and the failure comes as vLLM's error event: the client
    gets what it gets unwatched (the engine's 500 as a 502), nothing generated is billed, nothing is cached."""
    engine = MidStreamFailureStandinDouble()
    sink = RecordingSinkDouble()
    document = gateway_document(tokenPolicy={"runaway": {"enabled": runaway}, "responseCache": {"enabled": cache}})
    body = {"model": "tiny", "max_tokens": 50, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    async with serving(engine.app()) as upstream, running_gateway(tmp_path, upstream, document, sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        answers = [await post(session, url(gw, "/v1/chat/completions"), body) for _ in range(2)]
        await wait_until(lambda: len(sink.client_requests()) == 2, 5, "both metered")
    for status, answer, headers in answers:
        assert status == 502, answer
        assert answer["error"]["code"] == "engine_error"
        assert answer["error"]["message"] == "the engine failed: Internal server error"
        assert headers.get("X-TensorFleet-Cache") != "hit"
    assert [r.get("stream", False) for r in engine.received if "messages" in r] == [runaway, runaway]
    for event in sink.client_requests():
        assert (event.status, event.error, event.completion_tokens) == (502, "engine_error", 0)  # tokens not billed
        assert bool(event.chunks) == runaway  # the work streamed upstream keeps its GPU time (docs/metering.md)


class EchoingStandinDouble(StandinEngine):
    """The stand-in generating clean prose, echoing a completions prompt as vLLM does: the first chunk's
    text (a plain answer's text) is the prompt followed by the first token (completion/serving.py)."""

    def __init__(self) -> None:
        super().__init__(words=PROSE)
        self.echoed = ""

    def token(self, index: int) -> str:
        return (self.echoed if index == 0 else "") + super().token(index)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.echoed = body.get("prompt", "") if body.get("echo") else ""
        return await super().generate(request)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
async def test_an_echoed_prompt_is_not_judged_as_generated_text(tmp_path: pathlib.Path, stream: bool) -> None:
    """A code prompt with repeated rows, echoed: only the clean generated text is watched."""
    engine = EchoingStandinDouble()
    sink = RecordingSinkDouble()
    prompt = "Fill in this configuration, one value per line:\n" + "x = 0\n" * 40 + "Answer:"
    body = {"model": "tiny", "max_tokens": 200, "stream": stream, "echo": True, "prompt": prompt}
    async with serving(engine.app()) as upstream, \
            running_gateway(tmp_path, upstream, runaway_document(), sink=sink) as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(url(gw, "/v1/completions"), json=body) as response:
            raw = await response.read()
        await wait_until(lambda: sink.client_requests(), 5, "metered")
    text = streamed_text(stream_chunks(raw)) if stream else json.loads(raw)["choices"][0]["text"]
    assert text == prompt + "".join(" " + w for w in PROSE[:200])
    (event,) = sink.client_requests()
    assert not event.runaway_stopped
    assert event.completion_tokens == 200
