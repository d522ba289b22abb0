"""Runaway-output control: stop generations that have degenerated into a loop.

``RunawayDetector`` watches one choice's generated text as it arrives and trips on either signal:

* **repetition** — the text ends in the same block of words repeated back to back more than
  ``max_repeats`` times. A block is the loop's period, or, when the period is shorter than
  ``ngram_size`` words, the smallest whole number of periods that is at least ``ngram_size`` words (so
  "no no no" counts in blocks of four words by default). Periods up to ``window_tokens`` words are
  recognised; that is also how many words the detector remembers.
* **punctuation** — more than ``max_punctuation_run`` characters in a row that are punctuation,
  symbols or whitespace only (no letter, digit or ideograph).

Words are runs of letters, digits and underscores; each CJK ideograph or kana is a word of its own; a
word longer than 16 characters counts as pieces of 16 (so a loop without spaces is still seen). The
detector is incremental: each chunk costs time in proportion to its length (one dictionary lookup and
a few integer operations per word), memory is bounded by ``window_tokens``, and the verdict does not
depend on how the text was cut into chunks.

``RunawayHook`` plugs it into the gateway as a ``ResponseHook``: per request, one detector per choice,
fed from the engine's stream events (read at the byte level, no JSON parsed on the hot path) or a
whole response body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tensorfleet.gateway.config import GatewayConfig, RunawayConfig
from tensorfleet.gateway.hooks import ProxyRequest, Stop
from tensorfleet.gateway.metrics import GatewayMetrics

REPETITION = "repetition"
PUNCTUATION = "punctuation"
PIECE = 16  # characters: longer words are counted in pieces of this size
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SPLIT = re.compile(rf"([{_CJK}])|([^\W{_CJK}]+)|(\W+)")
_MOD = (1 << 61) - 1  # rolling hash of the last n words, modulo a Mersenne prime
_BASE = 1_000_003


class RunawayDetector:
    """One choice's generated text, fed chunk by chunk; ``feed`` returns where it tripped, if it did."""

    __slots__ = ("_block_cache", "_hash", "_last_seen", "_max_punct", "_max_repeats", "_n", "_needed", "_pending",
                 "_period", "_power", "_punct_run", "_ring", "_run", "_size", "_window", "count", "signal")

    def __init__(self, ngram_size: int = 4, max_repeats: int = 12, window_tokens: int = 256,
                 max_punctuation_run: int = 200) -> None:
        self._n = ngram_size
        self._max_repeats = max_repeats
        self._window = window_tokens
        self._max_punct = max_punctuation_run
        self._size = window_tokens + ngram_size + 1  # ring of word hashes: a period back, plus one n-gram
        self._ring = [0] * self._size
        self._power = pow(_BASE, ngram_size, _MOD)
        self._hash = 0
        self._last_seen: dict[int, int] = {}  # n-gram hash -> position of its last word
        self._period = 0  # distance of the repetition being followed (0: none)
        self._run = 0  # words in a row equal to the word ``_period`` before them
        self._needed = 0  # ``_run`` at which the repetition trips
        self._block_cache: dict[int, int] = {}
        self._pending = ""  # a word that may continue in the next chunk
        self._punct_run = 0
        self.count = 0  # words seen
        self.signal: str | None = None  # REPETITION or PUNCTUATION once tripped

    @classmethod
    def from_config(cls, config: RunawayConfig) -> RunawayDetector:
        return cls(config.ngram_size, config.max_repeats, config.window_tokens, config.max_punctuation_run)

    def feed(self, text: str) -> int | None:
        """Take the next piece of text; the number of its characters up to the trip point, or None."""
        if self.signal is not None:
            return 0
        carried = len(self._pending)
        if carried:
            text, self._pending = self._pending + text, ""
        end = len(text)
        for match in _SPLIT.finditer(text):
            ideograph, word, gap = match.groups()
            if gap is not None:
                self._punct_run += len(gap)
                if self._punct_run > self._max_punct:
                    self.signal = PUNCTUATION
                    return max(0, match.end() - (self._punct_run - self._max_punct) + 1 - carried)
                continue
            self._punct_run = 0
            if ideograph is not None:
                tripped_at = match.end() if self._word(ideograph) else None
            else:
                tripped_at = self._long_word(word, match.start(), match.end() == end)
            if tripped_at is not None:
                self.signal = REPETITION
                return max(0, tripped_at - carried)
        return None

    def _long_word(self, word: str, at: int, at_end: bool) -> int | None:
        """A word starting at ``at``, in pieces of PIECE characters; a tail that may go on in the next chunk
        waits. Where it tripped, if it did."""
        start = 0
        while len(word) - start > PIECE:
            start += PIECE
            if self._word(word[start - PIECE:start]):
                return at + start
        rest = word[start:] if start else word
        if at_end:
            self._pending = rest
            return None
        return at + len(word) if self._word(rest) else None

    def _word(self, word: str) -> bool:
        unit = hash(word)
        i = self.count
        ring, size, n = self._ring, self._size, self._n
        if i >= n:
            self._hash = (self._hash * _BASE + unit - ring[(i - n) % size] * self._power) % _MOD
        else:
            self._hash = (self._hash * _BASE + unit) % _MOD
        ring[i % size] = unit
        self.count = i + 1
        if self._period:
            if unit == ring[(i - self._period) % size]:
                self._run += 1
            else:
                self._period = 0
        if i + 1 < n:
            return False
        key = self._hash
        if not self._period:
            seen = self._last_seen.get(key)
            if seen is not None and i - seen <= self._window and self._same(i, i - seen):
                self._follow(i - seen)
        self._last_seen[key] = i
        if len(self._last_seen) > 2 * self._window:
            self._forget(i)
        return bool(self._period) and self._run >= self._needed

    def _same(self, i: int, distance: int) -> bool:
        ring, size = self._ring, self._size
        return all(ring[(i - k) % size] == ring[(i - distance - k) % size] for k in range(self._n))

    def _follow(self, period: int) -> None:
        self._period = period
        self._run = self._n
        block = ((self._n + period - 1) // period) * period
        self._needed = (self._max_repeats + 1) * block - period  # the block seen more than max_repeats times

    def _forget(self, i: int) -> None:
        oldest = i - self._window
        self._last_seen = {key: at for key, at in self._last_seen.items() if at >= oldest}


# ---- reading generated text out of engine payloads ------------------------------------------------------

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
    index, at = _int_at(payload, start + len(_CHOICES))
    if payload.find(b'{"index":', at) >= 0:  # several choices in one event: not what vLLM sends
        return body_texts(_json(payload))
    for prefix, closing in ((_DELTA_CONTENT, b"}"), (_TEXT, b",")):
        if payload.startswith(prefix, at):
            text, end = _string_at(payload, at + len(prefix))
            if payload.startswith(closing, end + 1):  # nothing else in the delta (or after the text)
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

class RunawayGuard:
    """One request's detectors, one per choice; a Stop when any of them trips."""

    __slots__ = ("config", "detectors", "on_trip")

    def __init__(self, config: RunawayConfig, on_trip: Callable[[str], None]) -> None:
        self.config = config
        self.detectors: dict[int, RunawayDetector] = {}
        self.on_trip = on_trip

    def _detector(self, index: int) -> RunawayDetector:
        detector = self.detectors.get(index)
        if detector is None:
            detector = self.detectors[index] = RunawayDetector.from_config(self.config)
        return detector

    def on_event(self, payload: bytes) -> Stop | None:
        for index, text in stream_texts(payload):
            detector = self._detector(index)
            if detector.feed(text) is not None:
                return self._stop(detector)
        return None

    def on_body(self, body: dict[str, Any]) -> Stop | None:
        """A whole response: on a trip the generated text is cut where the loop was recognised, in place."""
        stop: Stop | None = None
        for index, text in body_texts(body):
            detector = self._detector(index)
            keep = detector.feed(text)
            if keep is not None:
                _cut(body, index, text, keep)
                stop = stop or self._stop(detector)
        return stop

    def _stop(self, detector: RunawayDetector) -> Stop:
        self.on_trip(detector.signal or REPETITION)
        return Stop("runaway", "length")


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

        return RunawayGuard(runaway, tripped)
