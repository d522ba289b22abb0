"""A non-streamed OpenAI response assembled from the engine's stream.

With runaway control on, the gateway asks vLLM for a stream even when the client did not, so that it
can watch the text as it is generated and abort the engine request the moment a loop is recognised
(a plain request can only be judged once every token has been paid for). ``ResponseAssembler`` folds
the chunks back into the body the client asked for: the same choices, text, reasoning, tool calls,
logprobs, finish reasons and usage as the engine's own non-streamed answer. vLLM-specific fields that
are always null (``refusal``, ``audio``, ``prompt_logprobs`` and the like) are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tensorfleet.gateway.hooks import Stop
from tensorfleet.gateway.streams import Usage


@dataclasses.dataclass
class _Choice:
    index: int
    role: str | None = None
    text: list[str] = dataclasses.field(default_factory=list)  # content (chat) or text (completions)
    extra: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reasoning, reasoning_content, ...
    tool_calls: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: Any = None

    def add_delta(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role" and isinstance(value, str):
                self.role = value
            elif key == "content" and isinstance(value, str):
                self.text.append(value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        self._add_tool_call(call)
            elif isinstance(value, str):
                self.extra.setdefault(key, []).append(value)

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        index = _index(call, len(self.tool_calls))
        merged = self.tool_calls.setdefault(index, {"id": None, "type": "function",
                                                    "function": {"name": None, "arguments": ""}})
        for key in ("id", "type"):
            if call.get(key):
                merged[key] = call[key]
        function = call.get("function") or {}
        if function.get("name"):
            merged["function"]["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            merged["function"]["arguments"] += function["arguments"]

    def add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, []).extend(value)
            elif value is not None or key not in self.logprobs:
                self.logprobs[key] = value


class ResponseAssembler:
    """Feed it every parsed stream chunk (``add``); ``body`` gives the non-streamed response."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.chat = False
        self.fingerprint: str | None = None
        self.final_usage: dict[str, Any] | None = None
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            self.chat = chunk.get("object") == "chat.completion.chunk"
        if isinstance(chunk.get("system_fingerprint"), str):
            self.fingerprint = chunk["system_fingerprint"]
        choices = chunk.get("choices") or []
        if not choices and isinstance(chunk.get("usage"), dict):
            self.final_usage = chunk["usage"]
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = _index(raw, 0)
            choice = self.choices.setdefault(index, _Choice(index))
            if isinstance(raw.get("delta"), dict):
                choice.add_delta(raw["delta"])
            if isinstance(raw.get("text"), str):
                choice.text.append(raw["text"])
            choice.add_logprobs(raw.get("logprobs"))
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
                choice.stop_reason = raw.get("stop_reason")

    def body(self, stop: Stop | None, usage: Usage) -> dict[str, Any]:
        """The response; after a ``stop`` unfinished choices end with its finish reason and usage counts
        only the tokens produced; otherwise usage is the engine's own."""
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            if stop is not None and choice.finish_reason is None:
                choice.finish_reason, choice.stop_reason = stop.finish_reason, None
            choices.append(self._choice(choice))
        if stop is None and self.final_usage is not None:
            usage_body = self.final_usage
        else:
            usage_body = {"prompt_tokens": usage.prompt_tokens,
                          "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                          "completion_tokens": usage.completion_tokens}
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "system_fingerprint": self.fingerprint, "usage": usage_body}

    def _choice(self, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        if not self.chat:
            return {"index": choice.index, "text": text, "logprobs": choice.logprobs,
                    "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        message: dict[str, Any] = {"role": choice.role or "assistant",
                                   "content": text if text or not choice.tool_calls else None}
        message.update({key: "".join(parts) for key, parts in choice.extra.items()})
        if choice.tool_calls:
            message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
        return {"index": choice.index, "message": message, "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}


def _index(item: dict[str, Any], default: int) -> int:
    index = item.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else default
