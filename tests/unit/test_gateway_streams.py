"""The streaming hot path on recorded vLLM 0.32 output: counts, usage taken out again, clean stops."""

from __future__ import annotations

import json

from tensorfleet.gateway import sse
from tensorfleet.gateway.hooks import Stop
from tensorfleet.gateway.streams import VLLMStream

# Recorded from vLLM 0.32.0 (the tiny test Llama): the same request with continuous usage ...
WITH_USAGE = [
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":4,"total_tokens":4,"completion_tokens":0,"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}',
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":4,"total_tokens":5,"completion_tokens":1,"completion_tokens_details":null}}',  # noqa: E501
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"content":"fox"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2,"completion_tokens_details":null}}',
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[],"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2},"system_fingerprint":"vllm-0.32.0-6cbbe294"}',
    b"[DONE]",
]
# ... and as vLLM sends it when the client asks for nothing.
WITHOUT_USAGE = [
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}',
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',  # noqa: E501
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"tiny","choices":[{"index":0,"delta":{"content":"fox"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"vllm-0.32.0-6cbbe294"}',
    b"[DONE]",
]


def run(stream: VLLMStream, payloads: list[bytes]) -> tuple[bytes, list[int]]:
    out, counts = [], []
    for payload in payloads:
        events, tokens = stream.process(payload)
        out.extend(events)
        counts.append(tokens)
    out.extend(stream.finish())
    return b"".join(out), counts


def test_a_client_that_asked_for_nothing_gets_the_plain_stream_byte_for_byte() -> None:
    stream = VLLMStream(client_usage=False, client_continuous=False)
    out, counts = run(stream, WITH_USAGE)
    assert out == b"".join(sse.event(p) for p in WITHOUT_USAGE)
    assert counts == [0, 1, 1, 0, 0]
    assert stream.usage is not None
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (4, 2)


def test_a_client_that_asked_for_usage_gets_the_usage_event() -> None:
    out, _ = run(VLLMStream(client_usage=True, client_continuous=False), WITH_USAGE)
    events = [json.loads(e[6:]) for e in sse.EventSplitter().feed(out)[:-1]]
    assert "usage" in events[-1]
    assert events[-1]["choices"] == []
    assert all("usage" not in e for e in events[:-1])


def test_continuous_usage_passes_through_when_asked() -> None:
    out, _ = run(VLLMStream(client_usage=True, client_continuous=True), WITH_USAGE)
    assert out == b"".join(sse.event(p) for p in WITH_USAGE)


def test_tokens_are_counted_per_choice() -> None:
    stream = VLLMStream(False, False)
    a1 = b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    b1 = b'{"choices":[{"index":1,"delta":{}}],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    a3 = b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":4,"completion_tokens":3}}'
    assert [stream.process(p)[1] for p in (a1, b1, a3)] == [1, 1, 2]
    assert stream.completion_tokens == 4
    assert stream.prompt_tokens == 4


def test_usage_in_another_layout_is_read_and_cut_the_same() -> None:
    """vLLM's own layout is found with one search; any other order of the fields (or nested token
    details) takes the general path, with the same counts and the same bytes out."""
    vllm = b'{"choices":[{"index":1,"text":"a"}],"usage":{"prompt_tokens":4,"total_tokens":7,"completion_tokens":3,' \
           b'"prompt_tokens_details":{"cached_tokens":2}},"x":1}'
    other = b'{"choices":[{"index":1,"text":"a"}],"usage":{"completion_tokens":3,"prompt_tokens_details":' \
            b'{"cached_tokens":2},"prompt_tokens":4,"total_tokens":7},"x":1}'
    for payload in (vllm, other):
        stream = VLLMStream(client_usage=True, client_continuous=False)
        events, tokens = stream.process(payload)
        assert events == [sse.event(b'{"choices":[{"index":1,"text":"a"}],"x":1}')]
        assert (tokens, stream.prompt_tokens, stream._per_choice) == (3, 4, {1: 3})


def test_a_stopped_stream_ends_with_a_final_chunk_and_done() -> None:
    stream = VLLMStream(client_usage=True, client_continuous=False)
    run(stream, WITH_USAGE[:2])
    events = sse.EventSplitter().feed(b"".join(stream.stopped(Stop("runaway"), 4)))
    final, usage = json.loads(events[0][6:]), json.loads(events[1][6:])
    assert final == {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                     "choices": [{"index": 0, "finish_reason": "length", "delta": {}}]}
    assert usage["usage"] == {"prompt_tokens": 4, "total_tokens": 5, "completion_tokens": 1}
    assert events[2] == b"data: [DONE]"


def test_the_splitter_keeps_partial_events_for_the_next_read() -> None:
    splitter = sse.EventSplitter()
    assert splitter.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'data: {"a":1}']
    assert splitter.feed(b':2}\r\n\r\n') == [b'data: {"b":2}']
    assert splitter.pending == b""


def test_byte_level_field_helpers() -> None:
    payload = b'{"x":1,"usage":{"a":{"b":2},"completion_tokens":17},"y":2}'
    assert sse.int_field(payload, b"completion_tokens") == 17
    assert sse.int_field(payload, b"missing") is None
    start, end = sse.object_span(payload, b"usage") or (0, 0)
    assert payload[:start] + payload[end:] == b'{"x":1,"y":2}'
    assert sse.object_span(b'{"x":1}', b"usage") is None
    assert sse.payload(b": comment") is None


def test_a_stopped_stream_finishes_every_unfinished_choice() -> None:
    stream = VLLMStream(client_usage=False, client_continuous=False)
    head = b'{"id":"c2","object":"text_completion","created":1,"model":"tiny","choices":[{"index":'
    stream.process(head + b'0,"text":" a","logprobs":null,"finish_reason":null}],"usage":{"completion_tokens":1}}')
    stream.process(head + b'1,"text":" b","logprobs":null,"finish_reason":null}],"usage":{"completion_tokens":1}}')
    stream.process(head + b'2,"text":" c","logprobs":null,"finish_reason":"stop"}],"usage":{"completion_tokens":1}}')
    events = sse.EventSplitter().feed(b"".join(stream.stopped(Stop("runaway"), 4)))
    finals = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    assert [f["choices"] for f in finals if f["choices"] and f["choices"][0].get("text") == ""] == [
        [{"index": 0, "finish_reason": "length", "text": ""}], [{"index": 1, "finish_reason": "length", "text": ""}]]
    assert events[-1] == b"data: [DONE]"


def test_a_stream_folds_back_into_the_plain_answer() -> None:
    from tensorfleet.gateway.assemble import ResponseAssembler
    from tensorfleet.gateway.streams import Usage

    assembler = ResponseAssembler()
    for payload in WITH_USAGE[:-1]:
        assembler.add(json.loads(payload))
    assert assembler.body(None, Usage(0, 0)) == {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " thefox"}, "logprobs": None,
                     "finish_reason": "length", "stop_reason": None}],
        "system_fingerprint": "vllm-0.32.0-6cbbe294",
        "usage": {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2}}
    stopped = ResponseAssembler()
    for payload in WITH_USAGE[:2]:
        stopped.add(json.loads(payload))
    body = stopped.body(Stop("runaway"), Usage(4, 1))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == " the"
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 5, "completion_tokens": 1}


def test_tool_calls_reasoning_and_logprobs_are_merged() -> None:
    from tensorfleet.gateway.assemble import ResponseAssembler
    from tensorfleet.gateway.streams import Usage

    deltas = [{"role": "assistant", "content": ""}, {"reasoning": "think "}, {"reasoning": "more"},
              {"tool_calls": [{"id": "call_1", "type": "function", "index": 0,
                               "function": {"name": "get", "arguments": "{\"a\""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assembler = ResponseAssembler()
    for delta in deltas:
        assembler.add({"id": "c", "object": "chat.completion.chunk", "created": 2, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None,
                                    "logprobs": {"content": [{"token": "x", "logprob": -1.0}]}}]})
    assembler.add({"id": "c", "object": "chat.completion.chunk", "created": 2, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": None}]})
    (choice,) = assembler.body(None, Usage(3, 5))["choices"]
    assert choice["message"] == {"role": "assistant", "content": None, "reasoning": "think more", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"a\": 1}"}}]}
    assert len(choice["logprobs"]["content"]) == 5
    assert choice["finish_reason"] == "tool_calls"
