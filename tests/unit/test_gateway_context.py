"""Context-window management: turns, the limit, the search for the fewest turns to drop, the hook.

The token counter here is a test double that counts words the way a chat template would add tokens
around each message; the real engine's tokenizer is used in tests/integration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from gateway_support import gateway_document
from tensorfleet.gateway import config as gwconfig
from tensorfleet.gateway.context import (
    TRUNCATED_TOKENS_HEADER,
    TRUNCATED_TURNS_HEADER,
    ContextWindowPolicy,
    Conversation,
    fewest_turns,
    input_limit,
)
from tensorfleet.gateway.engine import VLLMEngine, rendered_template_kwargs
from tensorfleet.gateway.errors import GatewayError
from tensorfleet.gateway.hooks import ProxyRequest
from tensorfleet.gateway.metrics import GatewayMetrics

SYSTEM = {"role": "system", "content": "you are terse"}


class WordCounterDouble:
    """TokenCounter test double: 3 tokens per message plus its words, 1 for the generation prompt."""

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.calls: list[list[Any]] = []

    async def count_prompt(self, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        self.calls.append(list(body["messages"]))
        return [sum(3 + len(str(m.get("content") or "").split()) for m in body["messages"]) + 1]

    async def context_window(self) -> int | None:
        return self.window


def turn(i: int, words: int = 10) -> list[dict[str, Any]]:
    return [{"role": "user", "content": " ".join([f"q{i}"] * words)},
            {"role": "assistant", "content": " ".join([f"a{i}"] * words)}]


def chat(turns: int, words: int = 10, last: str = "what now?") -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        messages += turn(i, words)
    return [*messages, {"role": "user", "content": last}]


def request(messages: list[dict[str, Any]], max_tokens: int | None = 16, **extra: Any) -> ProxyRequest:
    body = {"model": "tiny", "messages": messages, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    raw = json.dumps(body).encode()
    return ProxyRequest(request_id="r", endpoint="/v1/chat/completions", tenant="t", body=body, raw=raw,
                        streaming=False, received=0.0, received_at=0.0, billable=True,
                        client_max_tokens=max_tokens)


def policy(**token_policy: Any) -> tuple[ContextWindowPolicy, GatewayMetrics]:
    config = gwconfig.parse(gateway_document(tokenPolicy=token_policy))
    metrics = GatewayMetrics()
    return ContextWindowPolicy(lambda: config, metrics), metrics


# ---- the pure parts ---------------------------------------------------------------------------------------

def test_turns_keep_system_messages_and_the_last_user_turn() -> None:
    messages = [SYSTEM, {"role": "assistant", "content": "hi, how can I help?"},
                *turn(0), {"role": "user", "content": "call a tool"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "system", "content": "late instruction"},
                {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "prefill"}]
    conversation = Conversation.split(messages)
    assert conversation.turns == ((1,), (2, 3), (4, 5, 6))  # greeting; q/a; tool call with its result
    assert conversation.without(2) == [SYSTEM, *messages[4:]]
    assert conversation.without(3) == [SYSTEM, messages[7], messages[8], messages[9]]
    assert Conversation.split([SYSTEM, {"role": "user", "content": "only"}]).turns == ()


def test_the_limit_is_the_tighter_of_max_input_and_the_window_less_max_tokens() -> None:
    assert input_limit(None, None, 10) is None
    assert input_limit(500, None, None) == input_limit(500, 2048, 100)
    limit = input_limit(500, 1024, 600)
    assert limit is not None
    assert limit.tokens == 424
    assert "less max_tokens 600" in limit.source
    limit = input_limit(None, 1024, None)
    assert limit is not None
    assert limit.tokens == 1023


@pytest.mark.parametrize("boundary", [1, 2, 5, 9, 17, 30])
@pytest.mark.parametrize("guess", [1, 4, 30])
async def test_the_search_finds_the_fewest_turns_with_few_counts(boundary: int, guess: int) -> None:
    calls: list[int] = []

    async def count_without(k: int) -> int:
        calls.append(k)
        return 1000 - 10 * k

    search = await fewest_turns(30, guess, count_without, 1000 - 10 * boundary)
    assert search.turns == boundary
    assert search.counts[boundary] == 1000 - 10 * boundary
    assert len(calls) == len(set(calls)) <= 2 * 5 + 1  # galloping then bisecting: O(log turns)
    if guess == boundary:
        assert len(calls) <= 2


async def test_the_search_reports_when_nothing_fits() -> None:
    async def count_without(k: int) -> int:
        return 500 - k

    search = await fewest_turns(4, 2, count_without, 100)
    assert search.turns is None
    assert search.counts[4] == 496


# ---- the hook -----------------------------------------------------------------------------------------------

async def test_a_prompt_that_fits_is_not_touched() -> None:
    hook, _ = policy(contextStrategy="truncate-oldest", maxInputTokens=500)
    proxied = request(chat(3))
    raw, body = proxied.raw, proxied.body
    await hook.before_upstream(proxied, WordCounterDouble())
    assert not proxied.modified
    assert proxied.upstream_bytes() == raw
    assert proxied.body is body
    assert proxied.prompt_tokens == 1 + 6 + 3 * 26 + 5  # counted once, and kept for the budget
    assert not proxied.flags
    assert not proxied.response_headers


async def test_reject_answers_400_with_the_limit_and_the_count() -> None:
    hook, metrics = policy(maxInputTokens=50)
    with pytest.raises(GatewayError) as error:
        await hook.before_upstream(request(chat(3)), WordCounterDouble())
    assert error.value.status == 400
    assert error.value.code == "context_length_exceeded"
    assert error.value.details == {"limit": 50, "count": 90}
    assert "90 tokens, over the limit of 50 input tokens (tokenPolicy.maxInputTokens)" in error.value.message
    assert metrics.registry.get_sample_value("tensorfleet_gateway_context_rejections_total", {"model": "tiny"}) == 1


async def test_truncate_oldest_drops_the_fewest_oldest_turns_and_says_so() -> None:
    hook, metrics = policy(contextStrategy="truncate-oldest", maxInputTokens=60)
    counter = WordCounterDouble()
    proxied = request(chat(5))  # 1 + 6 (system) + 5 x 26 + 5 (last) = 142 tokens
    await hook.before_upstream(proxied, counter)
    messages = proxied.body["messages"]
    assert messages == [SYSTEM, *turn(4), {"role": "user", "content": "what now?"}]  # 12 + 26 = 38 <= 60
    assert proxied.prompt_tokens == 38
    assert proxied.flags == {"truncated": True, "truncated_tokens": 142 - 38, "truncated_messages": 8}
    assert proxied.response_headers == {TRUNCATED_TURNS_HEADER: "4", TRUNCATED_TOKENS_HEADER: str(142 - 38)}
    assert proxied.prompt_tokens <= 60
    assert len(counter.calls) <= 3  # the whole prompt, the estimate, its neighbour
    assert metrics.registry.get_sample_value("tensorfleet_gateway_context_truncations_total",
                                             {"model": "tiny"}) == 1
    assert json.loads(proxied.upstream_bytes())["messages"] == messages


async def test_truncation_that_cannot_fit_is_rejected_with_both_counts() -> None:
    hook, _ = policy(contextStrategy="truncate-oldest", maxInputTokens=20)
    with pytest.raises(GatewayError) as error:
        await hook.before_upstream(request(chat(2, last="x " * 30)), WordCounterDouble())
    assert error.value.details == {"limit": 20, "count": 1 + 6 + 52 + 33, "countAfterTruncation": 1 + 6 + 33}
    assert "after truncate-oldest dropped every earlier turn" in error.value.message
    with pytest.raises(GatewayError) as error:  # nothing to drop at all
        await hook.before_upstream(request([SYSTEM, {"role": "user", "content": "x " * 30}]), WordCounterDouble())
    assert "no turn to drop" in error.value.message


async def test_the_context_window_less_max_tokens_is_a_limit_too() -> None:
    hook, _ = policy(contextStrategy="truncate-oldest")
    proxied = request(chat(5), max_tokens=80)
    await hook.before_upstream(proxied, WordCounterDouble(window=150))  # room for 70 prompt tokens
    assert proxied.prompt_tokens == 64
    assert proxied.response_headers[TRUNCATED_TURNS_HEADER] == "3"
    with pytest.raises(GatewayError) as error:
        await hook.before_upstream(request(chat(1), max_tokens=150), WordCounterDouble(window=150))
    assert error.value.param == "max_tokens"
    assert "leaves no room" in error.value.message


async def test_the_errors_name_the_output_bound_the_client_set() -> None:
    hook, _ = policy()
    proxied = request(chat(1), max_tokens=None, max_completion_tokens=150)
    VLLMEngine("tiny").clamp_output(proxied, 4096)  # on chat, vLLM's bound is max_completion_tokens when set
    with pytest.raises(GatewayError) as error:
        await hook.before_upstream(proxied, WordCounterDouble(window=150))
    assert error.value.param == "max_completion_tokens"
    assert error.value.message.startswith("max_completion_tokens 150 leaves no room for a prompt")
    proxied = request(chat(5), max_tokens=1, max_completion_tokens=140)
    VLLMEngine("tiny").clamp_output(proxied, 4096)
    with pytest.raises(GatewayError) as error:
        await hook.before_upstream(proxied, WordCounterDouble(window=150))
    assert "less max_completion_tokens 140" in error.value.message


async def test_small_requests_are_not_counted_when_only_the_window_limits_them() -> None:
    hook, _ = policy()
    counter = WordCounterDouble(window=4096)
    for _ in range(3):
        proxied = request(chat(2))
        await hook.before_upstream(proxied, counter)
        assert proxied.prompt_tokens is None
    assert counter.calls == [[{"role": "user", "content": ""}]]  # the template, measured once
    big = request(chat(40, words=60))  # its bytes alone could exceed the window: counted
    with pytest.raises(GatewayError):
        await hook.before_upstream(big, counter)
    tools = request(chat(1), tools=[{"type": "function", "function": {"name": "f"}}])
    await hook.before_upstream(tools, counter)  # the template renders tools: always counted
    assert tools.prompt_tokens is not None
    capped, _ = policy(maxInputTokens=4000)  # a policy limit the engine does not enforce: always counted
    proxied = request(chat(1))
    await capped.before_upstream(proxied, counter)
    assert proxied.prompt_tokens is not None


async def test_other_endpoints_and_odd_bodies_are_left_alone() -> None:
    hook, _ = policy(contextStrategy="truncate-oldest", maxInputTokens=5)
    completion = request(chat(1))
    completion.endpoint = "/v1/completions"
    await hook.before_upstream(completion, WordCounterDouble())
    assert completion.prompt_tokens is None


@pytest.mark.parametrize(("body", "kwargs"), [
    ({"documents": [{"text": "d"}]}, {"documents": [{"text": "d"}]}),
    ({"documents": [{"text": "d"}], "chat_template_kwargs": {"documents": [], "x": 1}},
     {"documents": [{"text": "d"}], "x": 1}),
    ({"documents": None, "chat_template_kwargs": {"documents": [{"text": "own"}]}}, {"documents": [{"text": "own"}]}),
    ({"reasoning_effort": "low"}, {"reasoning_effort": "low", "enable_thinking": True}),
    ({"reasoning_effort": "none"}, {"reasoning_effort": "none", "enable_thinking": False}),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}},
     {"reasoning_effort": "high", "enable_thinking": False}),
    ({"chat_template_kwargs": "not an object", "documents": []}, "not an object"),
], ids=["documents", "over-the-clients", "none-keeps-the-clients", "effort", "effort-none", "client-thinking",
        "odd-kwargs"])
def test_tokenize_gets_what_vllm_hands_the_chat_template(body: dict[str, Any], kwargs: Any) -> None:
    """As vLLM 0.32's ChatCompletionRequest.build_chat_params merges them (merge_kwargs drops None values)."""
    assert rendered_template_kwargs(body) == kwargs
