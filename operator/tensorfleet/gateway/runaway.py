"""Runaway-output control: recognise generations that have degenerated into a loop.

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
detector is incremental: a feed costs time in proportion to its length, memory is bounded by
``window_tokens``, and the verdict and the trip point do not depend on how the text was cut into
pieces. ``tensorfleet.gateway.runaway_hook`` plugs it into the gateway.
"""

from __future__ import annotations

import re
from itertools import compress, repeat
from operator import is_not

from tensorfleet.gateway.config import RunawayConfig

REPETITION = "repetition"
PUNCTUATION = "punctuation"
PIECE = 16  # characters: longer words are counted in pieces of this size
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"[{_CJK}]|[^\W{_CJK}]{{1,{PIECE}}}")  # words, cut from their start into pieces
_ASCII_PIECES = re.compile(rf"[A-Za-z0-9_]{{1,{PIECE}}}")  # the same for ASCII text, and faster
_GAPS = re.compile(r"\W+")  # punctuation, symbols, whitespace (ideographs are word characters)
_WORD_RUN = re.compile(rf"[^\W{_CJK}]+")  # matched against reversed text to find a trailing word or gap


class RunawayDetector:
    """One choice's generated text, fed piece by piece; ``feed`` returns where it tripped, if it did.

    A feed splits its text into words and hashes them in C (a regular expression and ``map``), and hashes
    their n-grams in C too (``zip`` of shifted lists). While no new n-gram was seen in the window, or while
    the new words go on repeating the period being followed, a feed is a handful of list, set and
    dictionary operations whatever its length (C loops). Only from a word where something may start or
    end do the words go through ``_step`` one by one, which follows the repetition exactly, so the verdict
    and the trip point do not depend on how the text was cut into pieces.
    """

    __slots__ = ("_base", "_forget_at", "_keep", "_last_seen", "_max_punct", "_max_repeats", "_n", "_needed",
                 "_pending", "_period", "_punct_run", "_run", "_units", "_window", "count", "signal")

    def __init__(self, ngram_size: int = 4, max_repeats: int = 12, window_tokens: int = 256,
                 max_punctuation_run: int = 200) -> None:
        self._n = ngram_size
        self._max_repeats = max_repeats
        self._window = window_tokens
        self._max_punct = max_punctuation_run
        self._units: list[int] = []  # hashes of the latest words; _units[0] is word number _base
        self._base = 0
        self._keep = window_tokens + ngram_size  # words kept behind the newest: a period back and an n-gram
        self._last_seen: dict[int, int] = {}  # n-gram hash -> position of its last word
        self._forget_at = 2 * window_tokens
        self._period = 0  # distance of the repetition being followed (0: none)
        self._run = 0  # words in a row equal to the word ``_period`` before them
        self._needed = 0  # ``_run`` at which the repetition trips
        self._pending = ""  # a word that may continue in the next piece of text
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
        body = text
        trailing = _WORD_RUN.match(text[::-1])  # (reversed: a search anchored at the end is quadratic)
        if trailing is not None:  # may go on in the next piece: keep all but its full pieces
            split = len(text) - trailing.end() + (trailing.end() - 1) // PIECE * PIECE
            body, self._pending = text[:split], text[split:]
        if not body:
            return None
        gap_trip = self._gaps(body)
        word_trip = self._words(body, len(body) if gap_trip is None else gap_trip)
        if self._pending:
            self._punct_run = 0
        if word_trip is not None:
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
            run = self._punct_run
            for gap in _GAPS.finditer(body):
                run = (run if gap.start() == 0 else 0) + len(gap.group())
                if run > self._max_punct:
                    return gap.end() - (run - self._max_punct) + 1
        tail = _GAPS.match(body[::-1])
        if tail is None:
            self._punct_run = 0
        else:
            self._punct_run = (self._punct_run if tail.end() == len(body) else 0) + tail.end()
        return None

    def _longest_gap(self, body: str) -> int:
        """The longest run of punctuation or whitespace in ``body``, the run it continues included."""
        leading = _GAPS.match(body)
        carried = self._punct_run + leading.end() if leading is not None else 0
        return max([carried, *map(len, _GAPS.findall(body))])

    def _words(self, body: str, before: int) -> int | None:
        """Take the words of ``body``; where the repetition tripped (the end of that word), if it did and
        ``before`` that position."""
        split = _ASCII_PIECES if body.isascii() else _PIECES
        pieces = split.findall(body)
        if not pieces:
            return None
        new = list(map(hash, pieces))
        n = self._n
        extended = (self._units[-(n - 1):] if n > 1 else []) + new
        # One n-gram hash per word that has n - 1 words before it.
        keys = list(map(hash, zip(*[extended[k:] for k in range(n)], strict=False)))
        start = self.count
        self._units.extend(new)
        self.count = start + len(new)
        tripped = self._take(start, keys, len(new) - len(keys))
        if len(self._units) > 2 * self._keep + len(new):
            drop = len(self._units) - self._keep
            del self._units[:drop]
            self._base += drop
        if tripped is None:
            return None
        end = next(m.end() for k, m in enumerate(split.finditer(body)) if k == tripped - start)
        return end if end <= before else None

    def _take(self, start: int, keys: list[int], first: int) -> int | None:
        """Follow the stored words from ``start``, whose n-gram hashes ``keys`` begin at its word ``first``;
        the position of the word that tripped, if one did.

        Words go through ``_step`` one by one only where something happens: a repeated n-gram that may start
        a repetition, or the word that ends one. Between those, whole stretches are taken at once.
        """
        end = self.count
        # Words whose n-gram was seen before (``_step`` looks at how long ago), or earlier in this feed.
        seen = map(is_not, map(self._last_seen.get, keys), repeat(None))
        candidates = list(compress(range(start + first, end), seen))
        if len(set(keys)) != len(keys):
            earliest: dict[int, int] = {}
            repeated_here = (start + first + k for k, key in enumerate(keys) if earliest.setdefault(key, k) != k)
            candidates = sorted({*candidates, *repeated_here})
        position, upcoming = start, iter(candidates)
        candidate = next(upcoming, end)
        while position < end:
            if self._period:  # take the words that go on repeating it, at once
                going_on = self._going_on(position, end)
                if self._run + going_on >= self._needed:
                    return position + self._needed - self._run - 1
                self._run += going_on
                self._remember(keys, start + first, position, position + going_on)
                position += going_on
            else:  # take the words up to the next that may start a repetition, at once
                while candidate < position:
                    candidate = next(upcoming, end)
                self._remember(keys, start + first, position, candidate)
                position = candidate
            if position < end:
                if self._step(position, keys[position - start - first] if position >= start + first else None):
                    return position
                position += 1
        return None

    def _going_on(self, position: int, end: int) -> int:
        """How many words from ``position`` (before ``end``) repeat the word ``_period`` before them."""
        units, at, period = self._units, position - self._base, self._period
        low, high = 0, end - position  # the first ``low`` words repeat; past ``high`` not all do
        if units[at:at + high] == units[at - period:at - period + high]:
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if units[at + low:at + middle] == units[at + low - period:at + middle - period]:
                low = middle
            else:
                high = middle
        return low

    def _remember(self, keys: list[int], key_start: int, position: int, end: int) -> None:
        """Record the n-grams of the words from ``position`` to ``end``; ``keys`` starts at word ``key_start``."""
        low = max(position, key_start)
        if end > low:
            self._last_seen.update(zip(keys[low - key_start:end - key_start], range(low, end), strict=True))
            if len(self._last_seen) > self._forget_at:
                self._forget(end - 1)

    def _step(self, i: int, key: int | None) -> bool:
        """Word ``i`` (stored), with the hash of the n-gram it ends (None before n words); True when it trips."""
        units, base = self._units, self._base
        period = self._period
        if period:
            if units[i - base] == units[i - period - base]:
                self._run += 1
            else:
                period = self._period = 0
        if key is None:
            return False
        last_seen = self._last_seen
        if not period:
            seen = last_seen.get(key)
            if seen is not None and i - seen <= self._window and self._same(i, i - seen):
                self._follow(i - seen)
                period = self._period
        last_seen[key] = i
        if len(last_seen) > self._forget_at:
            self._forget(i)
        return period != 0 and self._run >= self._needed

    def _same(self, i: int, distance: int) -> bool:
        """The n words ending at ``i`` equal the n ending ``distance`` before."""
        at = i - self._base + 1
        return self._units[at - self._n:at] == self._units[at - distance - self._n:at - distance]

    def _follow(self, period: int) -> None:
        self._period = period
        self._run = self._n
        block = ((self._n + period - 1) // period) * period
        self._needed = (self._max_repeats + 1) * block - period  # the block seen more than max_repeats times

    def _forget(self, i: int) -> None:
        oldest = i - self._window
        self._last_seen = {key: at for key, at in self._last_seen.items() if at >= oldest}
