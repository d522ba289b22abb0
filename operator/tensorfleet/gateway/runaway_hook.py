"""Runaway control in the gateway: a ResponseHook that feeds each choice's generated text to a detector.

The guard reads the text out of the engine's stream events at the byte level: for a one-choice request
(nearly all of them) it keeps the events of a batch (``CHECK_EVERY``) and takes their text in one pass
over the batch (``EventShape``: in C where the optional extension ``_textscan`` was compiled, else one
regular expression), so the per-event cost is appending to a list; anything unusual
(several choices, reasoning, tool calls) goes through the general path, which reads every event on its
own. A stop therefore comes at most ``CHECK_EVERY`` events after
the loop was recognised. A whole (non-streamed) body is read as parsed JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from tensorfleet.gateway.config import GatewayConfig, RunawayConfig
from tensorfleet.gateway.hooks import ProxyRequest, Stop
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.runaway import REPETITION, TEXTSCAN, RunawayDetector

CHECK_EVERY = 16  # stream events per check

_CHOICES = b'"choices":[{"index":'
_DELTA_CONTENT = b',"delta":{"content":"'
_TEXT = b',"text":"'
_TEXT_FIELDS = (b'"reasoning":"', b'"reasoning_content":"', b'"content":"', b'"text":"', b'"arguments":"',
                b'"text_output":"')  # in the order an engine produces them


def stream_texts(payload: bytes) -> list[tuple[int, str]]:
    """(choice index, text) of one stream event: vLLM chat/completions chunks or a Triton response.

    vLLM's chunks hold one choice, ``{"index":N,"delta":{"content":"..."}`` or ``{"index":N,"text":"..."}``
    first: read without decoding the JSON. Anything else (several choices, reasoning, tool calls) takes
    the general paths.
    """
    start = payload.find(_CHOICES)
    if start < 0:
        if b'"choices"' in payload:
            return body_texts(_json(payload))
        return [(0, text) for text in _string_fields(payload, 0)] if b'"text_output":"' in payload else []
    at = start + len(_CHOICES)
    if payload[at + 1:at + 2] == b"," and 0x30 <= payload[at] <= 0x39:
        index, at = payload[at] - 0x30, at + 1
    else:
        index, at = _int_at(payload, at)
    if payload.find(b'{"index":', at) >= 0:  # several choices in one event: not what vLLM sends
        return body_texts(_json(payload))
    for prefix, closing in ((_DELTA_CONTENT, 0x7D), (_TEXT, 0x2C)):  # the delta's "}" or the choice's ","
        if payload.startswith(prefix, at):
            begin = at + len(prefix)
            end = payload.find(b'"', begin)
            if end > 0 and payload[end - 1] != 0x5C:  # no escaped quote
                raw = payload[begin:end]
                text = raw.decode("utf-8", "replace") if b"\\" not in raw else _string_at(payload, begin)[0]
            else:
                text, end = _string_at(payload, begin)
            if end + 1 < len(payload) and payload[end + 1] == closing:  # nothing else in the delta
                return [(index, text)] if text else []
    return [(index, text) for text in _string_fields(payload, at)]


def body_texts(body: Any) -> list[tuple[int, str]]:
    """(choice index, text) of a parsed event or a whole response body."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("text_output"), str):
        return [(0, body["text_output"])]
    found: list[tuple[int, str]] = []
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice["index"] if isinstance(choice.get("index"), int) else 0
        message = choice.get("delta") or choice.get("message") or {}
        parts = [choice.get("text")]
        if isinstance(message, dict):
            parts += [message.get("reasoning"), message.get("reasoning_content"), message.get("content")]
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                parts.append(function.get("arguments") if isinstance(function, dict) else None)
        found.extend((index, part) for part in parts if isinstance(part, str) and part)
    return found


def _string_fields(payload: bytes, start: int) -> list[str]:
    texts = []
    for field in _TEXT_FIELDS:
        at = payload.find(field, start)
        if at >= 0:
            text, _ = _string_at(payload, at + len(field))
            if text:
                texts.append(text)
    return texts


def _string_at(payload: bytes, at: int) -> tuple[str, int]:
    """The JSON string whose first character is at ``at`` (just after its opening quote), and where its
    closing quote is."""
    end = payload.find(b'"', at)
    while end > 0 and payload[end - 1] == 0x5C:  # a backslash: an odd number of them escapes the quote
        raw = payload[at:end]
        if (len(raw) - len(raw.rstrip(b"\\"))) % 2 == 0:
            break
        end = payload.find(b'"', end + 1)
    if end < 0:
        return "", len(payload)
    raw = payload[at:end]
    if b"\\" not in raw:
        return raw.decode("utf-8", "replace"), end
    try:
        return str(json.loads(b'"' + raw + b'"')), end
    except ValueError:
        return raw.decode("utf-8", "replace"), end


def _int_at(payload: bytes, at: int) -> tuple[int, int]:
    """The unsigned integer whose first digit is at ``at``, and the position after it."""
    end = at
    while end < len(payload) and 0x30 <= payload[end] <= 0x39:
        end += 1
    return (int(payload[at:end]) if end > at else 0), end


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


# ---- the hook -------------------------------------------------------------------------------------------

_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'  # a JSON string's body (the unrolled form: no backtracking)
native_string_bodies: Callable[[bytes, bytes, int], tuple[bytes, int]] | None = (
    TEXTSCAN.string_bodies if TEXTSCAN is not None else None)  # None: EventShape's regular expression reads


class EventShape:
    """The usual shape of a one-choice request's stream events: the text is the JSON string that starts
    with ``prefix`` (which ends with the string's opening quote) and is followed by the byte ``closing``
    (-1: anything), with nothing else in the event's delta."""

    __slots__ = ("closing", "pattern", "prefix")

    def __init__(self, prefix: bytes, closing: int) -> None:
        self.prefix = prefix
        self.closing = closing
        after = re.escape(bytes([closing])) if closing >= 0 else b""
        self.pattern = re.compile(re.escape(prefix[:-1]) + _STRING + after, re.DOTALL)  # "\\." escapes any byte

    def texts(self, data: bytes) -> tuple[bytes, int]:
        """The bodies of the texts in ``data`` end to end, still escaped (escapes never span two), and
        how many texts there were."""
        if native_string_bodies is not None:
            return native_string_bodies(data, self.prefix, self.closing)
        return self.texts_in_python(data)

    def texts_in_python(self, data: bytes) -> tuple[bytes, int]:
        """``texts`` without the C extension (the fallback, and what the tests hold the extension to)."""
        found = self.pattern.findall(data)
        return b"".join(found), len(found)


# For a one-choice request: the text of an event of the usual shape, with nothing else in its delta.
# (A JSON string cannot hold a bare quote, so '{"content":' is the delta's own: "delta" need not be scanned for.)
SINGLE_CHOICE_SHAPES = {"chat": EventShape(b'{"content":"', ord("}")),
                        "completions": EventShape(b',"text":"', ord(",")),
                        "triton": EventShape(b'"text_output":"', -1)}


class EchoedPrompt:
    """The prompt text vLLM puts before the generated text of an ``echo`` request, which is not judged.

    Completions: each choice's first streamed text is its prompt followed by the first token (a whole answer's
    text starts with the prompt). Chat: a whole answer's content starts with the last message's when that is
    the assistant's; a stream sends that in events of their own, which carry no tokens and are never judged.
    A prompt of token ids is echoed as text the gateway does not know: the first streamed text is dropped whole.
    """

    __slots__ = ("_choices", "_prompts", "_seen", "streamed")

    def __init__(self, body: dict[str, Any]) -> None:
        self.streamed = "messages" not in body  # completions: the echo comes with the first token
        n = body.get("n")
        self._choices = n if isinstance(n, int) and n > 0 else 1
        self._prompts = _echoed_texts(body)
        self._seen: set[int] = set()

    def prefix(self, index: int) -> str | None:
        """The echoed text before choice ``index``'s generated text, when known."""
        prompts = self._prompts
        at = index // self._choices if len(prompts) > 1 else 0
        return prompts[at] if at < len(prompts) else None

    def generated(self, index: int, text: str) -> str:
        """A streamed text of choice ``index`` less the echoed prompt."""
        if not self.streamed or index in self._seen:
            return text
        self._seen.add(index)
        prefix = self.prefix(index)
        return text[len(prefix):] if prefix is not None and text.startswith(prefix) else ""


def _echoed_texts(body: dict[str, Any]) -> list[str]:
    if "messages" in body:
        messages = body["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return []
        content = last.get("content")
        if isinstance(content, list):  # vLLM joins the text parts with newlines
            content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return [content] if isinstance(content, str) and content else []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt if isinstance(p, str)] if isinstance(prompt, list) else []


class RunawayGuard:
    """One request's detectors, one per choice; a Stop when any of them trips.

    ``single`` (from SINGLE_CHOICE_SHAPES) marks a one-choice request: a batch whose every event has
    the usual shape is read in one pass. Anything else takes the general path, as does an ``echo``
    request (``echo``: its prompt is taken out of the text first).
    """

    __slots__ = ("_echo", "_events", "_single", "config", "detectors", "on_trip")

    def __init__(self, config: RunawayConfig, on_trip: Callable[[str], None],
                 single: EventShape | None = None, echo: EchoedPrompt | None = None) -> None:
        self.config = config
        self.detectors: dict[int, RunawayDetector] = {}
        self.on_trip = on_trip
        self._single = single if echo is None else None
        self._echo = echo
        self._events: list[bytes] = []

    def _detector(self, index: int) -> RunawayDetector:
        detector = self.detectors.get(index)
        if detector is None:
            detector = self.detectors[index] = RunawayDetector.from_config(self.config)
        return detector

    def on_event(self, payload: bytes) -> Stop | None:
        events = self._events
        events.append(payload)
        if len(events) < CHECK_EVERY:
            return None
        self._events = []
        return self.check(events)

    def check(self, events: list[bytes]) -> Stop | None:
        """Feed the text of ``events`` to the detectors."""
        if self._single is not None:
            raw, count = self._single.texts(b"".join(events))
            if count == len(events):
                detector = self._detector(0)
                tripped = detector.feed(_unescape(raw)) if b"\\" in raw else detector.feed_utf8(raw)
                return None if tripped is None else self._stop(detector)
        texts: dict[int, list[str]] = {}
        echo = self._echo
        for payload in events:
            for index, text in stream_texts(payload):
                texts.setdefault(index, []).append(text if echo is None else echo.generated(index, text))
        for index, parts in texts.items():
            detector = self._detector(index)
            if detector.feed("".join(parts)) is not None:
                return self._stop(detector)
        return None

    def on_body(self, body: dict[str, Any]) -> Stop | None:
        """A whole response: on a trip the generated text is cut where the loop was recognised, in place."""
        stop: Stop | None = None
        for index, text in body_texts(body):
            skip = _echoed_length(self._echo, index, text)
            detector = self._detector(index)
            keep = detector.feed(text[skip:] if skip else text)
            if keep is not None:
                _cut(body, index, text, skip + keep)
                stop = stop or self._stop(detector)
        return stop

    def _stop(self, detector: RunawayDetector) -> Stop:
        self.on_trip(detector.signal or REPETITION)
        return Stop("runaway", "length")


def _echoed_length(echo: EchoedPrompt | None, index: int, text: str) -> int:
    """How many characters at the start of a whole answer's ``text`` are the echoed prompt."""
    prefix = echo.prefix(index) if echo is not None else None
    return len(prefix) if prefix is not None and text.startswith(prefix) else 0


def _unescape(raw: bytes) -> str:
    """The text of a JSON string's body (as it stands between the quotes)."""
    try:
        return scanstring(raw.decode("utf-8", "replace") + '"', 0)[0]
    except ValueError:
        return raw.decode("utf-8", "replace")


def _cut(body: Any, index: int, text: str, keep: int) -> None:
    """Shorten ``text`` of choice ``index`` in a response body to ``keep`` characters; finish it with "length"."""
    if body.get("text_output") is text:
        body["text_output"] = text[:keep]
        return
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != index:
            continue
        message = choice.get("message")
        for holder, key in ((choice, "text"), (message, "content"), (message, "reasoning"),
                            (message, "reasoning_content")):
            if isinstance(holder, dict) and holder.get(key) is text:
                holder[key] = text[:keep]
                choice["finish_reason"] = "length"
                if "stop_reason" in choice:
                    choice["stop_reason"] = None
                return


class RunawayHook:
    """The gateway's ResponseHook for ``tokenPolicy.runaway`` (off by default)."""

    def __init__(self, config: Callable[[], GatewayConfig], metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics

    def open(self, request: ProxyRequest) -> RunawayGuard | None:
        config = self.config()
        runaway = config.token_policy.runaway
        if not runaway.enabled:
            return None
        model = config.served_model

        def tripped(signal: str) -> None:
            self.metrics.child(self.metrics.runaway_stops, model, signal).inc()

        echo = EchoedPrompt(request.body) if request.body.get("echo") else None
        return RunawayGuard(runaway, tripped, single_choice_shape(request), echo)


def single_choice_shape(request: ProxyRequest) -> EventShape | None:
    """The shape of a one-choice request's stream events, or None when it has several choices."""
    body = request.body
    if body.get("n", 1) not in (None, 1):
        return None
    if "text_input" in body or request.endpoint.startswith("/v2/"):
        return SINGLE_CHOICE_SHAPES["triton"]
    if "messages" in body:
        return SINGLE_CHOICE_SHAPES["chat"]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        return None  # a batch of prompts: one choice each
    return SINGLE_CHOICE_SHAPES["completions"]
