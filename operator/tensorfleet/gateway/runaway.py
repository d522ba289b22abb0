"""Runaway-output control: recognise generations that have degenerated into a loop.

``RunawayDetector`` watches one choice's generated text as it arrives and trips on either signal:

* **repetition** — the text ends in the same block of words repeated back to back more than
  ``max_repeats`` times. A block is the loop's period, or, when the period is shorter than
  ``ngram_size`` words, the smallest whole number of periods that is at least ``ngram_size`` words (so
  "no no no" counts in blocks of four words by default). Periods up to ``window_tokens`` words are
  recognised. The detector trips at the first word that ends such a run, whatever the period.
* **punctuation** — more than ``max_punctuation_run`` characters in a row that are punctuation,
  symbols or whitespace only (no letter, digit or ideograph).

Words are runs of letters, digits and underscores; each CJK ideograph or kana is a word of its own; a word
longer than 16 characters counts as pieces of 16 (so a loop without spaces is still seen). The detector is
incremental: a feed costs time in proportion to its length (times the window, on the C road below), memory
is bounded by about twice ``window_tokens`` words, and the verdict and the trip point do not depend on how
the text was cut into pieces. ``tensorfleet.gateway.runaway_hook`` plugs it into the gateway.

How it stays cheap. A run that trips with period ``p`` is a stretch of words each equal to the word ``p``
before it, long enough that any ``S = (max_repeats - 1) * ngram_size + 1`` consecutive words of its end
part contain a word whose n-gram also ends ``p`` words earlier. So the detector only *probes* every
``S``-th word (by absolute position, so the probes do not depend on the chunking): it looks the n-gram
ending there up in the recent words, joined into one byte string, with ``bytes.rfind``. Each earlier
occurrence within the window gives a candidate period; its stretch is measured exactly (slice comparisons,
backwards and forwards) and, while it reaches the newest word, followed as more words arrive. Clean text
therefore costs a translation, a split and an occasional search per feed, all in C.

Where the optional C extension ``_textscan`` was compiled, windows up to ``NATIVE_MAX_WINDOW`` words take
a shorter road: its ``DetectorCore`` reads the text (UTF-8: words, gaps, the word carried over, as above)
and keeps, for every period up to the window, how many words in a row have equalled the word a period before
them (the definition, word by word, in a loop without branches; words compared by Python's keyed 64-bit hash
of their bytes). It costs time in proportion to the window, so longer windows keep the probes. The tests
hold the two to the same verdicts and trip points.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Protocol

from tensorfleet.gateway.config import RunawayConfig

REPETITION = "repetition"
PUNCTUATION = "punctuation"
PIECE = 16  # characters: longer words are counted in pieces of this size
MAX_OCCURRENCES = 1024  # earlier occurrences of a probed n-gram looked at, nearest first (see the docs)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"[{_CJK}]|[^\W{_CJK}]{{1,{PIECE}}}")  # words, cut from their start into pieces
_ASCII_PIECES = re.compile(rb"[A-Za-z0-9_]{1,%d}" % PIECE)  # the same for ASCII text, as bytes
_GAPS = re.compile(r"\W+")  # punctuation, symbols, whitespace (ideographs are word characters)
_SPACES = re.compile(rb" +")  # the gaps of ASCII text once translated by _TO_SPACES
_WORD_RUN = re.compile(rf"[^\W{_CJK}]+")  # matched against reversed text to find a trailing word or gap
_WORD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_TO_SPACES = bytes(b if b in _WORD_BYTES else 0x20 for b in range(256))  # ASCII text: gaps become spaces
NATIVE_MAX_WINDOW = 1024  # words: the longest window the C extension's DetectorCore serves (see above)


class DetectorCore(Protocol):
    """The C extension's detector (tensorfleet/gateway/_textscan.c)."""

    @property
    def count(self) -> int: ...
    def feed(self, data: bytes, /) -> tuple[int, bool] | None: ...


def _textscan() -> ModuleType | None:
    """The optional C extension (tensorfleet/gateway/_textscan.c), or None where it was not compiled: then
    the probes serve every window here, and runaway_hook reads event text with a regular expression."""
    try:
        from tensorfleet.gateway import _textscan
    except ImportError:
        return None
    return _textscan


TEXTSCAN = _textscan()
native_detector_core: Callable[[int, int, int, int], DetectorCore] | None = (
    TEXTSCAN.DetectorCore if TEXTSCAN is not None else None)


class RunawayDetector:
    """One choice's generated text, fed piece by piece; ``feed`` returns where it tripped, if it did.

    ``_core`` is the C extension's DetectorCore where it serves the window: it then does all the work.
    Otherwise ``_words`` holds the latest words as bytes (``_words[0]`` is word number ``_base``) and
    ``_text`` the same words, each after one space, end to end: the string the probes search.
    ``_followed`` maps the period of each stretch that reaches the newest word to the stretch's first word
    equal to the word a period before it.
    """

    __slots__ = ("_base", "_core", "_count", "_every", "_followed", "_keep", "_max_punct", "_max_repeats", "_multiples",
                 "_multiples_trip", "_n", "_owner", "_pending", "_punct_run", "_text", "_window", "_words", "signal")

    def __init__(self, ngram_size: int = 4, max_repeats: int = 12, window_tokens: int = 256,
                 max_punctuation_run: int = 200, native: bool = True) -> None:
        """``native``: use the C extension where it serves the window (False: the probes, always)."""
        self._n = ngram_size
        self._max_repeats = max_repeats
        self._window = window_tokens
        self._max_punct = max_punctuation_run
        # Probe spacing: any run that trips has this many words in a row whose n-gram repeats a period back
        # (fewer probes are never wrong, so it is capped to bound the words kept).
        self._every = min((max_repeats - 1) * ngram_size + 1, window_tokens)
        # Words kept behind the first word of a feed: a stretch is found at most a probe spacing and an
        # n-gram after it starts, and is measured against the words a period (at most the window) before.
        self._keep = window_tokens + ngram_size + self._every + 1
        self._words: list[bytes] = []
        self._text = bytearray()
        self._base = 0
        self._followed: dict[int, int] = {}
        self._multiples: dict[int, dict[int, int]] = {}  # period -> {multiple: first word} followed under it
        self._multiples_trip: dict[int, int] = {}  # period -> where the first of its multiples trips
        self._owner: dict[int, int] = {}  # every period followed -> the period it is followed under
        self._pending = ""  # a word that may continue in the next piece of text
        self._punct_run = 0
        self._core = (native_detector_core(ngram_size, max_repeats, window_tokens, max_punctuation_run)
                      if native and native_detector_core is not None and window_tokens <= NATIVE_MAX_WINDOW else None)
        self._count = 0
        self.signal: str | None = None  # REPETITION or PUNCTUATION once tripped

    @property
    def count(self) -> int:
        """Words seen (the word the text ends in, which may go on, not yet)."""
        return self._core.count if self._core is not None else self._count

    @classmethod
    def from_config(cls, config: RunawayConfig, native: bool = True) -> RunawayDetector:
        return cls(config.ngram_size, config.max_repeats, config.window_tokens, config.max_punctuation_run, native)

    def feed(self, text: str) -> int | None:
        """Take the next piece of text; the number of its characters up to the trip point, or None."""
        if self.signal is not None:
            return 0
        if self._core is not None:  # (lone surrogates, which JSON escapes can make, are gaps there as here)
            return self._native(text.encode("utf-8", "surrogatepass"))
        carried = len(self._pending)
        if carried:
            text, self._pending = self._pending + text, ""
        if text.isascii():
            return self._ascii(text.encode("ascii"), carried)
        trailing = _WORD_RUN.match(text[::-1])  # (reversed: a search anchored at the end is quadratic)
        if trailing is not None:  # a trailing word may go on: keep all but its full pieces
            split = len(text) - trailing.end() + (trailing.end() - 1) // PIECE * PIECE
            text, self._pending = text[:split], text[split:]
        if not text:
            return None
        pieces = _PIECES.findall(text)
        words = " ".join(pieces).encode().split() if pieces else []
        gap_trip = self._gaps(text)
        word_trip = self._take(words) if words else None
        if word_trip is not None:
            word_trip = next(m.end() for k, m in enumerate(_PIECES.finditer(text)) if k == word_trip)
        return self._verdict(word_trip, gap_trip, carried)

    def feed_utf8(self, data: bytes) -> int | None:
        """``feed`` for UTF-8 text given as bytes (as the gateway reads it from the engine): the same verdict;
        ASCII text (nearly all of it) is read without decoding."""
        if self.signal is not None:
            return 0
        if self._core is not None:
            if not data.isascii():
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:  # read as feed() would read it
                    data = data.decode("utf-8", "replace").encode("utf-8")
            return self._native(data)
        carried = len(self._pending)
        if not data.isascii() or (carried and not self._pending.isascii()):
            return self.feed(data.decode("utf-8", "replace"))
        if carried:
            data, self._pending = self._pending.encode("ascii") + data, ""
        return self._ascii(data, carried)

    def _native(self, data: bytes) -> int | None:
        """``feed`` by the C extension's DetectorCore (valid UTF-8, lone surrogates allowed)."""
        assert self._core is not None
        tripped = self._core.feed(data)
        if tripped is None:
            return None
        at, punctuation = tripped
        self.signal = PUNCTUATION if punctuation else REPETITION
        return at

    def _ascii(self, data: bytes, carried: int) -> int | None:
        spaced = data.translate(_TO_SPACES)
        if spaced and spaced[-1] != 0x20:  # a trailing word may go on: keep all but its full pieces
            start = spaced.rfind(b" ") + 1
            split = start + (len(spaced) - start - 1) // PIECE * PIECE
            self._pending, spaced = data[split:].decode("ascii"), spaced[:split]
        if not spaced:
            return None
        words = spaced.split()
        if words and max(map(len, words)) > PIECE:
            words = _ASCII_PIECES.findall(spaced)
        gap_trip = self._spaced_gaps(spaced)
        word_trip = self._take(words) if words else None
        if word_trip is not None:
            word_trip = next(m.end() for k, m in enumerate(_ASCII_PIECES.finditer(spaced)) if k == word_trip)
        return self._verdict(word_trip, gap_trip, carried)

    def _verdict(self, word_trip: int | None, gap_trip: int | None, carried: int) -> int | None:
        """What a feed returns, given where its words and its gaps tripped (characters of the piece with the
        carried word in front), if they did."""
        if self._pending:
            self._punct_run = 0
        if word_trip is not None and (gap_trip is None or word_trip <= gap_trip):
            self.signal = REPETITION
            return max(0, word_trip - carried)
        if gap_trip is not None:
            self.signal = PUNCTUATION
            return max(0, gap_trip - carried)
        return None

    def _gaps(self, body: str) -> int | None:
        """Where in ``body`` a run of punctuation or whitespace grows past the limit, if it does; keeps the
        run going on at its end."""
        limit = self._max_punct
        if self._punct_run + len(body) > limit and self._longest_gap(body) > limit:
            return self._gap_trip(_GAPS.finditer(body))
        tail = _GAPS.match(body[::-1])
        self._punct_run = 0 if tail is None else (self._punct_run if tail.end() == len(body) else 0) + tail.end()
        return None

    def _spaced_gaps(self, spaced: bytes) -> int | None:
        """``_gaps`` for ASCII text whose gap characters were all turned into spaces: searches in C."""
        limit = self._max_punct
        if self._punct_run + len(spaced) > limit and (
                self._punct_run + len(spaced) - len(spaced.lstrip(b" ")) > limit or b" " * (limit + 1) in spaced):
            return self._gap_trip(_SPACES.finditer(spaced))
        tail = len(spaced) - len(spaced.rstrip(b" "))
        self._punct_run = (self._punct_run if tail == len(spaced) else 0) + tail
        return None

    def _gap_trip(self, gaps: Iterator[re.Match[str]] | Iterator[re.Match[bytes]]) -> int:
        """Where the run of punctuation or whitespace that goes past the limit does (the caller saw one)."""
        run = self._punct_run
        for gap in gaps:
            run = (run if gap.start() == 0 else 0) + gap.end() - gap.start()
            if run > self._max_punct:
                return gap.end() - (run - self._max_punct) + 1
        raise AssertionError("no run of punctuation past the limit")

    def _longest_gap(self, body: str) -> int:
        """The longest run of punctuation or whitespace in ``body``, the run it continues included."""
        leading = _GAPS.match(body)
        carried = self._punct_run + leading.end() if leading is not None else 0
        return max([carried, *map(len, _GAPS.findall(body))])

    def _take(self, words: list[bytes]) -> int | None:
        """Store ``words``; the index among them of the word where a repetition trips, if one does."""
        start = self._count
        self._words += words
        self._text += b" " + b" ".join(words)
        end = self._count = start + len(words)
        trips: list[int] = []
        if self._followed:  # the stretches followed so far: do they go on?
            for period, first in list(self._followed.items()):
                reach = start + self._going_on(start, end, period)
                if self._trip_word(first, period) < reach:
                    trips.append(self._trip_word(first, period))
                if period in self._multiples:
                    self._check_multiples(period, reach, end, trips)
                if reach < end:
                    del self._followed[period], self._owner[period]
        every = self._every  # probes: the words whose number is one less than a multiple of ``every``
        position = start if start >= self._n - 1 else self._n - 1
        position += (-position - 1) % every
        while position < end:
            self._probe(position, end, trips)
            position += every
        if len(self._words) > 2 * self._keep:
            drop = len(self._words) - self._keep
            del self._text[:sum(map(len, self._words[:drop])) + drop]
            del self._words[:drop]
            self._base += drop
        return max(0, min(trips) - start) if trips else None

    def _probe(self, position: int, end: int, trips: list[int]) -> None:
        """Look the n-gram ending at word ``position`` up among the earlier ones in the window; start following
        the stretches its occurrences belong to, and add to ``trips`` where they trip before ``end``."""
        words, base, n = self._words, self._base, self._n
        at = position - base + 1  # the probed n-gram is words[at - n:at]
        after = sum(map(len, words[at:])) + len(words) - at  # its end in _text, counted from the back
        length = sum(map(len, words[at - n:at])) + n
        text = self._text
        stop = len(text) - after  # the n-gram (each word after a space) is text[stop - length:stop]
        needle = text[stop - length:stop] + b" "
        found = text.rfind(needle, 0, stop - 1)
        # A stretch is found by the first probe in it, so it starts at most this many words before the probe;
        # one that ends before ``end`` and is shorter than it needs to be cannot trip.
        earliest = position - n - self._every + 2
        period, counted_to = 0, stop - length
        for _ in range(MAX_OCCURRENCES):
            if found < 0:
                break
            period += text.count(b" ", found, counted_to)  # words between this occurrence and the probe
            counted_to = found
            if period > self._window:
                break
            if period not in self._owner:  # (if it is, this occurrence is part of a stretch followed already)
                reach = position + 1 + self._going_on(position + 1, end, period)
                if reach == end or self._trip_word(earliest, period) < reach:
                    owner = self._covering(period, end)
                    known = at - n  # a stored word known to be in the run; a covering stretch knows an earlier one
                    if owner is not None:  # (in a loop of period 1, going back from the probe would cross it all)
                        known = max(min(known, self._followed[owner] - owner + period - base), period)
                    first = self._going_back(known, period) + base
                    if self._trip_word(first, period) < reach:
                        trips.append(self._trip_word(first, period))
                    if reach == end:
                        self._follow(period, first, owner)
            found = text.rfind(needle, 0, found + len(needle) - 1)

    def _covering(self, period: int, end: int) -> int | None:
        """A followed period whose stretch also is the stretch of ``period`` from word ``end`` on (``period`` is
        its multiple, and the stretch covers the words a ``period`` back), if there is one."""
        return next((owner for owner, first in self._followed.items()
                     if period % owner == 0 and end >= first - owner + period), None)

    def _follow(self, period: int, first: int, owner: int | None) -> None:
        """Follow the stretch of ``period`` that reaches the newest word: on its own, or under ``owner`` (from
        ``_covering``), whose stretch it goes on with (in a loop of period 1 every shorter distance repeats
        too: those need no work until the loop breaks)."""
        if owner is None:
            self._followed[period] = first
            self._owner[period] = period
            return
        self._multiples.setdefault(owner, {})[period] = first
        trip = self._trip_word(first, period)
        self._multiples_trip[owner] = min(self._multiples_trip.get(owner, trip), trip)
        self._owner[period] = owner

    def _check_multiples(self, period: int, reach: int, end: int, trips: list[int]) -> None:
        """The multiples followed under ``period``, whose stretch now reaches word ``reach``: they go on as far
        (where one trips before that, it is added to ``trips``); if that stretch ends, each goes on by itself."""
        if self._multiples_trip[period] < reach:
            trips.append(self._multiples_trip[period])
        if reach == end:
            return
        del self._multiples_trip[period]
        for multiple, first in self._multiples.pop(period).items():
            going = reach + self._going_on(reach, end, multiple)
            if self._trip_word(first, multiple) < going:
                trips.append(self._trip_word(first, multiple))
            if going == end:
                self._followed[multiple] = first
                self._owner[multiple] = multiple
            else:
                del self._owner[multiple]

    def _trip_word(self, first: int, period: int) -> int:
        """Where a run of words each equal to the word ``period`` before it, from word ``first`` on, trips: when
        its block (whole periods, at least an n-gram) has been seen more than ``max_repeats`` times."""
        block = -(-self._n // period) * period
        return first + (self._max_repeats + 1) * block - period - 1

    def _going_on(self, position: int, end: int, period: int) -> int:
        """How many words from ``position`` (before ``end``) repeat the word ``period`` before them."""
        words, at = self._words, position - self._base
        low, high = 0, end - position  # the first ``low`` words repeat; past ``high`` not all do
        step = 1
        while low + step < high:  # gallop: a run is usually short, or goes on to the end
            if words[at + low:at + low + step] != words[at + low - period:at + low + step - period]:
                high = low + step
                break
            low, step = low + step, 2 * step
        else:
            if words[at + low:at + high] == words[at + low - period:at + high - period]:
                return high
        while high - low > 1:
            middle = (low + high) // 2
            if words[at + low:at + middle] == words[at + low - period:at + middle - period]:
                low = middle
            else:
                high = middle
        return low

    def _going_back(self, at: int, period: int) -> int:
        """The first stored word of the run, ending with stored word ``at``, of words each equal to the word
        ``period`` before it (word ``at`` is one of them)."""
        words = self._words
        low, high = period, at  # words[high:at + 1] repeat; before ``low`` there is nothing to compare
        step = 1
        while high - step > low:  # gallop backwards
            if words[high - step:high] != words[high - step - period:high - period]:
                low = high - step
                break
            high, step = high - step, 2 * step
        else:
            if words[low:high] == words[low - period:high - period]:
                return low
        while high - low > 1:
            middle = (low + high) // 2
            if words[middle:high] == words[middle - period:high - period]:
                high = middle
            else:
                low = middle
        return high

