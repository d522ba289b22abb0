"""Context-window management for chat requests (``tokenPolicy.contextStrategy``).

A chat prompt may use at most ``limit`` tokens: the smaller of ``tokenPolicy.maxInputTokens`` and the
model's context window less the client's output bound (``max_completion_tokens`` when set, else
``max_tokens``, as vLLM reads them; less one token when the client set none, so at least one can be
generated). Tokens are counted by the engine's own tokenizer with the model's chat template applied
(vLLM's ``/tokenize`` with the request's messages, tools and what else vLLM hands the template:
``documents`` and ``reasoning_effort`` go in ``chat_template_kwargs``), so the count is the one the engine
will see.

* ``reject`` (the default): a prompt over the limit gets a 400 whose error object carries ``limit`` and
  ``count``.
* ``truncate-oldest``: the oldest turns are dropped until the prompt fits. A turn is a user message
  with the assistant and tool messages that answer it, so tool calls stay paired with their results and
  roles keep alternating. System (and developer) messages and the last user turn (the last user
  message and everything after it) are never dropped; if the prompt does not fit even then, it is
  rejected as above. A request that fits is not touched: its bytes go upstream as they came.

Cost in tokenizer calls: when ``maxInputTokens`` is unset, a request whose raw body is so small that it
must fit (body bytes plus the template's own tokens, measured once, within the limit) is not counted at
all: every token of the rendered prompt covers at least one byte of it and the engine still checks its
window. Otherwise one call counts the whole prompt; a truncation then searches for the fewest turns to
drop, starting from an estimate in proportion to each turn's size and bracketing it by galloping and
bisection: two more calls when the estimate is right, about ``2 log2(turns)`` at worst.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tensorfleet.gateway.config import GatewayConfig
from tensorfleet.gateway.engine import CHAT
from tensorfleet.gateway.errors import GatewayError
from tensorfleet.gateway.hooks import ProxyRequest, TokenCounter
from tensorfleet.gateway.metrics import GatewayMetrics

TRUNCATED_TURNS_HEADER = "X-TensorFleet-Truncated-Turns"
TRUNCATED_TOKENS_HEADER = "X-TensorFleet-Truncated-Tokens"
KEPT_ROLES = frozenset({"system", "developer"})
# Request fields that change what the chat template renders beyond the messages' own bytes.
_TEMPLATE_FIELDS = ("tools", "functions", "documents", "reasoning_effort", "chat_template", "chat_template_kwargs",
                    "mm_processor_kwargs")
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})
_TEMPLATE_PROBE = [{"role": "user", "content": ""}]


@dataclasses.dataclass(frozen=True)
class Limit:
    tokens: int
    source: str  # what sets it, for the error message


def input_limit(max_input_tokens: int | None, window: int | None, client_max_tokens: int | None,
                output_bound: str = "max_tokens") -> Limit | None:
    """The most prompt tokens a chat request may have, or None when nothing limits it; ``output_bound``: the
    field ``client_max_tokens`` came from, for the message."""
    limits = []
    if max_input_tokens is not None:
        limits.append(Limit(max_input_tokens, "tokenPolicy.maxInputTokens"))
    if window is not None:
        if client_max_tokens is None:
            limits.append(Limit(window - 1, f"the model's context window of {window} tokens less one to generate"))
        else:
            limits.append(Limit(window - client_max_tokens, f"the model's context window of {window} tokens less "
                                                            f"{output_bound} {client_max_tokens}"))
    return min(limits, key=lambda limit: limit.tokens) if limits else None


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A chat's messages with the turns that truncate-oldest may drop, oldest first."""

    messages: Sequence[Any]
    turns: tuple[tuple[int, ...], ...]  # message indices of each droppable turn

    @classmethod
    def split(cls, messages: Sequence[Any]) -> Conversation:
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
        users = [i for i, role in enumerate(roles) if role == "user"]
        kept_from = users[-1] if users else len(messages) - 1  # the last user turn, to the end
        turns: list[tuple[int, ...]] = []
        current: list[int] = []
        for index in range(kept_from):
            if roles[index] in KEPT_ROLES:
                continue
            if roles[index] == "user" and current:
                turns.append(tuple(current))
                current = []
            current.append(index)
        if current:
            turns.append(tuple(current))
        return cls(messages, tuple(turns))

    def without(self, turns: int) -> list[Any]:
        """The messages with the ``turns`` oldest droppable turns taken out."""
        dropped = {index for turn in self.turns[:turns] for index in turn}
        return [m for index, m in enumerate(self.messages) if index not in dropped]

    def dropped_messages(self, turns: int) -> int:
        return sum(len(turn) for turn in self.turns[:turns])

    def estimate(self, tokens: int, excess: int) -> int:
        """Turns to drop so that about ``excess`` of the prompt's ``tokens`` go, sharing tokens by size."""
        sizes = [len(json.dumps(m, ensure_ascii=False)) for m in self.messages]
        total = sum(sizes) or 1
        dropped = 0.0
        for count, turn in enumerate(self.turns, start=1):
            dropped += tokens * sum(sizes[i] for i in turn) / total
            if dropped >= excess:
                return count
        return len(self.turns)


@dataclasses.dataclass
class Search:
    turns: int | None  # fewest turns whose removal makes the prompt fit; None: even all of them do not
    counts: dict[int, int]  # prompt tokens with k turns dropped, for every k tried


async def fewest_turns(total: int, guess: int, count_without: Callable[[int], Awaitable[int]],
                       limit: int) -> Search:
    """The fewest of ``total`` turns to drop so the count fits ``limit``; the count never grows as turns go.

    Starts at ``guess``, gallops (steps 1, 2, 4, ...) towards the boundary until a probe lands on its
    other side, then bisects the bracket. Dropping no turn is known not to fit.
    """
    lo, hi = 0, total + 1  # count_without(lo) is over the limit; hi is the fewest known to fit
    counts: dict[int, int] = {}
    k, step, direction, bisecting = min(max(guess, 1), total), 1, 0, False
    while hi - lo > 1:
        counts[k] = await count_without(k)
        move = -1 if counts[k] <= limit else 1
        if move < 0:
            hi = k
        else:
            lo = k
        bisecting = bisecting or (direction != 0 and move != direction)
        direction = move
        if bisecting:
            k = (lo + hi) // 2
        else:
            k = min(max(k + move * step, lo + 1), hi - 1)
            step *= 2
    return Search(hi if hi <= total else None, counts)


class ContextWindowPolicy:
    """The gateway's RequestHook for ``tokenPolicy.contextStrategy`` (chat requests only)."""

    def __init__(self, config: Callable[[], GatewayConfig], metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._template_tokens: int | None = None  # the chat template's tokens around one empty message
        self._template_probed = False

    async def before_upstream(self, request: ProxyRequest, tokens: TokenCounter) -> None:
        if request.endpoint != CHAT or not isinstance(request.body.get("messages"), list):
            return
        config = self.config()
        policy = config.token_policy
        limit = input_limit(policy.max_input_tokens, await tokens.context_window(), request.client_max_tokens,
                            request.output_bound)
        if limit is None:
            return
        if limit.tokens < 1:
            raise GatewayError(400, f"{request.output_bound} {request.client_max_tokens} leaves no room for a "
                                    f"prompt in {limit.source}", "context_length_exceeded", request.output_bound,
                               details={"limit": limit.tokens})
        if policy.max_input_tokens is None and await self._surely_fits(request, tokens, limit.tokens):
            return
        (full,) = await tokens.count_prompt(CHAT, request.body)
        if full <= limit.tokens:
            request.prompt_tokens = full
            return
        if policy.context_strategy != "truncate-oldest":
            raise self._too_long(config, full, limit)
        await self._truncate(request, tokens, config, full, limit)

    async def _truncate(self, request: ProxyRequest, tokens: TokenCounter, config: GatewayConfig, full: int,
                        limit: Limit) -> None:
        conversation = Conversation.split(request.body["messages"])
        if not conversation.turns:
            raise self._too_long(config, full, limit, truncating=True)

        async def count_without(turns: int) -> int:
            (count,) = await tokens.count_prompt(CHAT, {**request.body, "messages": conversation.without(turns)})
            return count

        guess = conversation.estimate(full, full - limit.tokens)
        search = await fewest_turns(len(conversation.turns), guess, count_without, limit.tokens)
        if search.turns is None:
            raise self._too_long(config, full, limit, True, search.counts.get(len(conversation.turns)))
        fitted = search.counts[search.turns]
        request.replace_body({**request.body, "messages": conversation.without(search.turns)})
        request.prompt_tokens = fitted
        request.flags.update(truncated=True, truncated_tokens=full - fitted,
                             truncated_messages=conversation.dropped_messages(search.turns))
        request.response_headers[TRUNCATED_TURNS_HEADER] = str(search.turns)
        request.response_headers[TRUNCATED_TOKENS_HEADER] = str(full - fitted)
        model = config.served_model
        self.metrics.child(self.metrics.context_truncations, model).inc()
        self.metrics.child(self.metrics.context_truncated_tokens, model).inc(full - fitted)

    def _too_long(self, config: GatewayConfig, count: int, limit: Limit, truncating: bool = False,
                  after: int | None = None) -> GatewayError:
        """The 400 for a prompt over the limit; ``after``: its count once every droppable turn is gone."""
        self.metrics.child(self.metrics.context_rejections, config.served_model).inc()
        details: dict[str, Any] = {"limit": limit.tokens, "count": count}
        message = f"the prompt has {count} tokens, over the limit of {limit.tokens} input tokens ({limit.source})"
        if truncating and after is None:
            message += "; truncate-oldest has no turn to drop (it keeps system messages and the last user turn)"
        elif truncating:
            message += (f"; it still has {after} tokens after truncate-oldest dropped every earlier turn (it keeps "
                        "system messages and the last user turn)")
            details["countAfterTruncation"] = after
        return GatewayError(400, message, "context_length_exceeded", "messages", details=details)

    async def _surely_fits(self, request: ProxyRequest, tokens: TokenCounter, limit: int) -> bool:
        """True when the prompt cannot exceed ``limit`` whatever the tokenizer: too few bytes for that."""
        if len(request.raw) >= limit or any(key in request.body for key in _TEMPLATE_FIELDS):
            return False
        if not all(_plain_message(m) for m in request.body["messages"]):
            return False
        if not self._template_probed:
            try:
                (self._template_tokens,) = await tokens.count_prompt(CHAT, {"messages": _TEMPLATE_PROBE})
            except GatewayError as exc:
                if exc.status >= 500:
                    raise
                self._template_tokens = None  # a template that refuses the probe: always count
            self._template_probed = True
        return self._template_tokens is not None and len(request.raw) + self._template_tokens <= limit


def _plain_message(message: Any) -> bool:
    """Text only: every byte the template renders from it appears in the request body."""
    if not isinstance(message, Mapping) or not _PLAIN_MESSAGE_KEYS.issuperset(message):
        return False
    content = message.get("content")
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content)
