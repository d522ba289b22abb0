"""Per-request processing of an engine's event stream: token counts per event, and usage the client did
not ask for taken out again, so the client sees exactly the stream it asked for.

vLLM: the gateway always asks for ``stream_options: {include_usage, continuous_usage_stats}``; each event
then carries cumulative usage per choice, which gives the exact tokens of every forwarded event. When
the client did not ask for that, the per-event ``usage`` object is cut out; when it did not ask for
usage at all, the final usage-only event is dropped and the ``system_fingerprint`` vLLM moves onto it is
put back on the terminal event(s), which are held until the usage event arrives (same engine step).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tensorfleet.gateway import sse
from tensorfleet.gateway.hooks import Stop

_CHOICES = b'"choices":['
_FIRST_CHOICE = b'"choices":[{"index":0,'
# vLLM's usage object as it serialises it: one search finds the object and both counts (any other layout
# takes the general path through ``sse``).
_VLLM_USAGE = re.compile(rb',"usage":\{"prompt_tokens":(\d+),"total_tokens":\d+,"completion_tokens":(\d+)'
                         rb'(?:,"\w+":(?:null|\d+|\{[^{}]*\}))*\}')
_EMPTY_CHOICES = b'"choices":[]'
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = b'"system_fingerprint":"'
_ERROR = b'{"error"'  # vLLM's event for a generation that failed mid-stream (then [DONE]): no choices, no usage


class Usage:
    __slots__ = ("cached_tokens", "completion_tokens", "prompt_tokens")

    def __init__(self, prompt_tokens: int = 0, completion_tokens: int = 0, cached_tokens: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details") or {}
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                   int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0)


class VLLMStream:
    """Edits one vLLM stream; ``process`` returns the events to forward and the tokens they carry."""

    def __init__(self, client_usage: bool, client_continuous: bool) -> None:
        self.client_usage = client_usage
        self.client_continuous = client_continuous
        self.usage: Usage | None = None
        self.completion_tokens = 0
        self.prompt_tokens: int | None = None  # from the continuous usage, for streams stopped before the end
        self._per_choice: dict[int, int] = {}
        self._finished: set[int] = set()
        self._held: list[bytes] = []
        self.last_chunk: bytes | None = None
        self.done = False
        self.error: bytes | None = None  # the engine's error event: the generation failed

    def process(self, payload: bytes) -> tuple[list[bytes], int]:
        if payload == sse.DONE:
            self.done = True
            return [*self._flush(None), sse.event(payload)], 0
        if _EMPTY_CHOICES in payload and b'"usage":{' in payload:
            return self._usage_event(payload), 0
        self.last_chunk = payload
        finished = _FINISHED in payload
        tokens = 0
        found = _VLLM_USAGE.search(payload)
        usage = found.span() if found is not None else sse.object_span(payload, b"usage")
        if usage is not None or finished:
            at = payload.find(_CHOICES)
            index = 0 if at < 0 or payload.startswith(_FIRST_CHOICE, at) else sse.int_field(payload, b"index", at) or 0
            if finished:
                self._finished.add(index)
            if usage is not None:
                start, end = usage
                if found is not None:
                    tokens = self._add(index, int(found[2]), int(found[1]))
                else:
                    tokens = self._add(index, sse.int_field(payload, b"completion_tokens", start, end),
                                       sse.int_field(payload, b"prompt_tokens", start, end))
                if not self.client_continuous:
                    payload = payload[:start] + payload[end:]
        elif payload.startswith(_ERROR):  # only events without usage: the common path pays nothing
            self.error = payload
        if finished and not self.client_usage:
            self._held.append(payload)
            return [], tokens
        if self._held:
            return [*self._flush(None), sse.event(payload)], tokens
        return [sse.event(payload)], tokens

    def _add(self, index: int, cumulative: int | None, prompt: int | None) -> int:
        """New tokens of choice ``index``, given its cumulative count and the prompt's from the usage object."""
        if cumulative is None:
            return 0
        if self.prompt_tokens is None:
            self.prompt_tokens = prompt
        tokens = cumulative - self._per_choice.get(index, 0)
        self._per_choice[index] = cumulative
        if tokens <= 0:
            return 0
        self.completion_tokens += tokens
        return tokens

    def _usage_event(self, payload: bytes) -> list[bytes]:
        try:
            chunk = json.loads(payload)
        except ValueError:
            chunk = {}
        self.usage = Usage.from_openai(chunk.get("usage"))
        if self.client_usage:
            return [*self._flush(None), sse.event(payload)]
        return self._flush(chunk.get("system_fingerprint"))

    def _flush(self, fingerprint: str | None) -> list[bytes]:
        if not self._held:
            return []
        held, self._held = self._held, []
        if fingerprint is None:
            return [sse.event(p) for p in held]
        stamp = b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}"
        return [sse.event(p if _FINGERPRINT in p else p[:-1] + stamp) for p in held]

    def finish(self) -> list[bytes]:
        """Events still held when the engine closed the stream."""
        return self._flush(None)

    def stopped(self, stop: Stop, prompt_tokens: int) -> list[bytes]:
        """The events that end a stream cleanly when a guard stops it: a final chunk, usage if asked, [DONE]."""
        base: dict[str, Any] = {}
        if self.last_chunk is not None:
            try:
                base = json.loads(self.last_chunk)
            except ValueError:
                base = {}
        chat = base.get("object") == "chat.completion.chunk"
        head: dict[str, Any] = {k: base[k] for k in ("id", "object", "created", "model") if k in base}
        events = self._flush(None)
        unfinished = [i for i in sorted(self._per_choice) if i not in self._finished]
        for index in unfinished if self._per_choice else [0]:  # one final chunk per choice, as vLLM sends them
            choice: dict[str, Any] = {"index": index, "finish_reason": stop.finish_reason}
            if chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            events.append(sse.event(json.dumps({**head, "choices": [choice]}, separators=(",", ":")).encode()))
        if self.client_usage:
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + self.completion_tokens,
                     "completion_tokens": self.completion_tokens}
            usage_chunk: dict[str, Any] = {**head, "choices": [], "usage": usage}
            events.append(sse.event(json.dumps(usage_chunk, separators=(",", ":")).encode()))
        events.append(sse.event(sse.DONE))
        return events


class TritonStream:
    """Triton's generate_stream: one JSON event per response; TensorRT-LLM streams one token per event."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.completion_tokens = 0
        self.prompt_tokens: int | None = None
        self.last_chunk: bytes | None = None
        self.done = False
        self.error: bytes | None = None

    def process(self, payload: bytes) -> tuple[list[bytes], int]:
        self.last_chunk = payload
        tokens = 1
        if b'"error"' in payload[:12]:
            self.error, tokens = payload, 0
        self.completion_tokens += tokens
        return [sse.event(payload)], tokens

    def finish(self) -> list[bytes]:
        return []

    def stopped(self, stop: Stop, prompt_tokens: int) -> list[bytes]:
        return []
