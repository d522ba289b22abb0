"""Split measured GPU busy time across the requests that were in flight: pure, in memory, no I/O.

The model (docs/metering.md has the derivation):

* The sampler yields contiguous intervals ``k = [b_k, b_{k+1})`` with the busy GPU time measured in
  each (``busy_k`` = length x activity, summed over the engine's GPUs).
* Each request is a set of *work spans*: its uncached prompt tokens and each forwarded chunk of
  generated tokens, spread over the time in which the engine worked on them. A chunk spans the time
  since the request's previous chunk (the decode step that made it). The prompt is placed on the
  engine steps that processed it (``steps.EngineSteps``: the step ends the gateway sees in forwarded
  tokens, and the scheduler's first-come-first-served fill of the token budget, ending in the step
  that emitted the first token); with ``placement="admission"`` it is spread over
  ``[admitted, first_token]`` instead. A span's *density* is tokens per second.
* Within an interval, at every instant the GPU's time goes to the requests with work at that instant in
  proportion to their density, the instant weighted by the share of its step in which the GPU computed
  (``beta``, 1 without a learned idle time between steps):
  ``w_ek = integral over k of beta(t) rho_e(t) / sum_j rho_j(t) dt``.
  Request e receives ``busy_k * w_ek / sum_j w_jk``. The shares of an interval add up to ``busy_k``
  exactly (conservation by construction); an interval where nobody had work (idle, or busy with
  work no request claims) gives nothing to anyone.

Intervals are *finalised* once every request that could overlap them has been reported (the caller
decides when, with a watermark); only then are their shares computed. A request is *settled* when
all the intervals it spans are final. Requests that are not billable (warm-up) take their share like
any other so that billable requests are not charged for them, and that share is then left out.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

from tensorfleet.metering.events import RequestEvent
from tensorfleet.metering.holds import Hold, Holds
from tensorfleet.metering.steps import EngineSteps, Step

IntervalKind = Literal["gpm", "utilization", "timing", "gap"]
Placement = Literal["steps", "admission"]
PLACEMENTS: tuple[Placement, ...] = ("steps", "admission")
MIN_SPAN_SECONDS = 0.001  # work reported at one instant is spread over the millisecond before it
PRUNE_MARGIN_SECONDS = 2.0  # step history kept before the oldest moment a placement or interval needs


class WorkSpan(NamedTuple):
    """``tokens`` of work spread uniformly over ``[start, end]`` (monotonic seconds, end > start).

    A named tuple, not a frozen dataclass: a request has one span per forwarded chunk (a streamed answer, one
    per token), and a frozen dataclass took several times as long to build (bench.metering_writer).
    """

    start: float
    end: float
    tokens: float
    prompt: bool = False  # the prompt's span
    first: bool = False  # it ends when the first generated token was forwarded (streamed requests)
    engine_tokens: float | None = None  # prompt tokens as the engine's budget counts them (unweighted)

    @property
    def density(self) -> float:
        return self.tokens / (self.end - self.start)


def _span(start: float, end: float, tokens: float, prompt: bool = False) -> WorkSpan:
    if end - start < MIN_SPAN_SECONDS:
        start = end - MIN_SPAN_SECONDS
    return WorkSpan(start, end, tokens, prompt)


def work_spans(event: RequestEvent, prefill_weight: float = 1.0) -> list[WorkSpan]:
    """The GPU work a request did, as spans; empty when it never reached the GPU."""
    if event.admitted is None or event.cache_hit:
        return []
    admitted, done = event.admitted, max(event.done, event.admitted)
    spans: list[WorkSpan] = []
    uncached = max(0, event.prompt_tokens - event.cached_tokens)
    prompt_end = min(max(event.first_token, admitted), done) if event.first_token is not None else done
    streamed = event.streaming and event.first_token is not None and bool(event.chunks)
    if uncached > 0 and prefill_weight > 0:
        span = _span(admitted, prompt_end, prefill_weight * uncached, prompt=True)
        spans.append(span._replace(first=streamed, engine_tokens=float(uncached)))
    generated = _generated_spans(event, admitted, done)
    if generated and streamed:
        generated[0] = generated[0]._replace(first=True)
    spans.extend(generated)
    return spans


def _generated_spans(event: RequestEvent, admitted: float, done: float) -> list[WorkSpan]:
    chunked = sum([c.tokens for c in event.chunks if c.tokens > 0])
    total = event.completion_tokens if event.completion_tokens > 0 else chunked
    if total <= 0:
        return []
    if chunked <= 0:  # usage without chunk timings: spread over the generation phase
        start = event.first_token if event.first_token is not None else admitted
        return [_span(min(max(start, admitted), done), done, float(total))]
    scale = total / chunked
    spans: list[WorkSpan] = []
    previous = admitted
    # One span per chunk, the time since the previous chunk (see _span; inlined: a long stream has thousands).
    for chunk in event.chunks:
        tokens = chunk.tokens
        if tokens <= 0:
            continue
        at = chunk.at
        at = done if at > done else admitted if at < admitted else at
        if at - previous < MIN_SPAN_SECONDS:
            if spans:  # forwarded together with the previous chunk
                last = spans[-1]
                spans[-1] = WorkSpan(last.start, last.end, last.tokens + tokens * scale)
                continue
            spans.append(WorkSpan(at - MIN_SPAN_SECONDS, at, tokens * scale))
        else:
            spans.append(WorkSpan(previous, at, tokens * scale))
        previous = at
    return spans


@dataclasses.dataclass
class Share:
    """What a request has received so far, from the intervals finalised up to now."""

    gpu_ms: float = 0.0
    energy_mj: float | None = None  # None while no interval it was in measured energy (a GPU without the counter)
    covered_tokens: float = 0.0  # work that fell in measured, open intervals


@dataclasses.dataclass
class _Interval:
    start: float
    end: float
    busy_ms: float | None  # None: not measured (timing-only): active time x GPUs
    energy_mj: float | None
    kind: IntervalKind
    pieces: list[tuple[str, float, float, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Request:
    key: str
    spans: list[WorkSpan]
    billable: bool
    share: Share
    total_tokens: float
    last_k: int = -1  # index of the last interval it has work in; -1 until placed
    placed: bool = False
    journalled: bool = False  # restored from the journal after a restart

    @property
    def admitted(self) -> float:
        return self.spans[0].start if self.spans else math.inf

    @functools.cached_property
    def step_ends(self) -> list[float]:
        """When this request's decode steps ended, as far as the gateway saw (its chunks' times)."""
        return [s.end for s in self.spans if not s.prompt]

    @property
    def streamed(self) -> bool:
        return any(s.first for s in self.spans)


@dataclasses.dataclass(frozen=True)
class Finalised:
    """One interval's outcome: its busy time and who got it."""

    k: int
    start: float
    end: float
    busy_ms: float
    kind: IntervalKind
    billed_ms: float
    excluded_ms: float  # taken by requests that are not billable (warm-up)
    unattributed_ms: float  # busy while no request had work
    held_ms: float = 0.0  # held for requests still in flight (holds.py): billed or not once their events come


@dataclasses.dataclass(frozen=True)
class Settled:
    key: str
    share: Share
    total_tokens: float
    billable: bool

    @property
    def coverage(self) -> float:
        return 1.0 if self.total_tokens <= 0 else min(1.0, self.share.covered_tokens / self.total_tokens)


class Attributor:
    """Online attribution: intervals in, requests in, finalise by watermark, settle requests.

    ``placement``: ``"steps"`` places prompt work on the engine steps that processed it (learning the step
    budget unless ``step_tokens`` gives it, and the GPU's idle time between steps); ``"admission"`` spreads
    it from the end of the step in progress at admission to the first token.
    """

    def __init__(self, gpus: int = 1, first_k: int = 0, placement: Placement = "steps",
                 step_tokens: int | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
        self.gpus = gpus
        self.steps = EngineSteps(step_tokens) if placement == "steps" else None
        self._base = first_k  # index of self._intervals[0]
        self._intervals: list[_Interval] = []
        self._starts: list[float] = []  # start of each interval in _intervals, for bisect
        self._final = first_k  # intervals with index < _final are final (and dropped)
        self._last_end: float | None = None
        self._requests: dict[str, _Request] = {}
        self._unplaced: dict[str, _Request] = {}
        self.touched: set[str] = set()  # requests whose share changed since the caller last cleared this
        self.holds = Holds()  # requests in flight past the settle horizon, and what they received meanwhile
        self.claimed: list[tuple[bool, Hold]] = []  # (billable, hold) taken over by events; the caller clears it

    # -- intervals -----------------------------------------------------------------------------
    @property
    def frontier(self) -> int:
        """Index of the first interval that is not final."""
        return self._final

    @property
    def last_end(self) -> float | None:
        return self._last_end

    def set_last_end(self, end: float) -> None:
        """Where the next interval starts (restoring after a restart)."""
        self._last_end = end

    def add_interval(self, start: float, end: float, busy_ms: float | None, energy_mj: float | None,
                     kind: IntervalKind) -> list[int]:
        """Append an interval (a gap interval first when it does not start where the last ended)."""
        added: list[int] = []
        if self._last_end is not None and start > self._last_end + 1e-9:
            added.append(self._append(_Interval(self._last_end, start, 0.0, None, "gap")))
        elif self._last_end is not None:
            start = self._last_end
        if end > start:
            added.append(self._append(_Interval(start, end, busy_ms, energy_mj, kind)))
        return added

    def _append(self, interval: _Interval) -> int:
        self._intervals.append(interval)
        self._starts.append(interval.start)
        self._last_end = interval.end
        return self._base + len(self._intervals) - 1

    def interval(self, k: int) -> tuple[float, float, float | None, float | None, IntervalKind]:
        item = self._intervals[k - self._base]
        return item.start, item.end, item.busy_ms, item.energy_mj, item.kind

    def open_intervals(self) -> Iterable[int]:
        return range(max(self._final, self._base), self._base + len(self._intervals))

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, key: str, spans: list[WorkSpan], billable: bool, share: Share | None = None,
                    request_id: str | None = None) -> None:
        """Take a request; it is placed when the interval its work starts in is finalised (by then every
        request that was in flight when it was admitted is known). ``share``: progress restored from a journal;
        such a request teaches the step model no budget (the tokens of the requests settled before the restart
        are gone, so its window of steps is not all seen). ``request_id``: the gateway's id, whose share held
        while it was in flight (holds.py) it takes over."""
        request = _Request(key, spans, billable, share or Share(), sum(s.tokens for s in spans),
                           journalled=share is not None)
        if request_id is not None and (hold := self.holds.claim(request_id)) is not None:
            request.share.gpu_ms += hold.gpu_ms
            if hold.energy_mj is not None:
                request.share.energy_mj = (request.share.energy_mj or 0.0) + hold.energy_mj
            request.share.covered_tokens += hold.covered_tokens(spans)
            self.claimed.append((billable, hold))
            self.touched.add(key)
        self._requests[key] = request
        if spans:
            self._unplaced[key] = request
        else:  # no GPU work (a cache hit, a refused request): no interval to wait for, settled at once
            request.placed = True
        if self.steps is not None:
            self.steps.add_request(request.step_ends, request.streamed)

    def _placeable(self, request: _Request) -> bool:
        return self._last_end is not None and (not request.spans or request.spans[-1].end <= self._last_end)

    def place_all(self) -> None:
        """Place every request now (closing down): work past the last interval is left uncovered."""
        for request in sorted(self._unplaced.values(), key=lambda r: r.admitted):
            self._place(request)
        self._unplaced.clear()

    def _place_due(self, before: float) -> None:
        """Place the placeable requests whose work starts before ``before``."""
        due = [r for r in self._unplaced.values() if r.admitted < before and self._placeable(r)]
        for request in sorted(due, key=lambda r: r.admitted):
            del self._unplaced[request.key]
            self._place(request)

    def earliest_unplaceable(self) -> float | None:
        """Start of the earliest request whose work is not covered by intervals yet."""
        starts = [r.admitted for r in self._unplaced.values() if r.spans and not self._placeable(r)]
        return min(starts) if starts else None

    def _engine_free_after(self, request: _Request) -> float | None:
        """The end of the engine step in progress when ``request`` was admitted: the first chunk, after the
        admission, of any request that then had work (already placed: placement goes in admission order).
        The engine cannot start a new prompt earlier."""
        admitted = request.admitted
        index = bisect.bisect_right(self._starts, admitted) - 1
        if index < 0 or index >= len(self._intervals) or self._base + index < self._final:
            return None
        running = {key for key, lo, hi, _ in self._intervals[index].pieces if lo <= admitted < hi}
        ends = []
        for key in running - {request.key}:
            times = self._requests[key].step_ends
            after = bisect.bisect_right(times, admitted)
            if after < len(times):
                ends.append(times[after])
        return min(ends) if ends else None

    def _aligned(self, request: _Request) -> list[WorkSpan]:
        """The request's spans, those that begin at its admission moved to when the engine was free."""
        free = self._engine_free_after(request)
        if free is None:
            return request.spans
        admitted = request.admitted
        return [WorkSpan(free, span.end, span.tokens, span.prompt)
                if span.start == admitted and free < span.end - MIN_SPAN_SECONDS else span
                for span in request.spans]

    def _in_steps(self, steps: EngineSteps, request: _Request) -> list[WorkSpan]:
        """The request's spans with its prompt on the steps that processed it, and the span of its first chunk
        (which starts at the admission) starting where the step that emitted it (or the prompt) began."""
        admitted, spans = request.admitted, request.spans
        if not spans:
            return []
        done = max(span.end for span in spans)
        out: list[WorkSpan] = []
        prompt_ends: float | None = None
        for span in spans:
            if span.prompt:
                first_token = span.end if span.first else None
                engine_tokens = span.engine_tokens or span.tokens
                pieces = steps.place_prompt(admitted, first_token, engine_tokens, done, learn=not request.journalled)
                scale = span.tokens / engine_tokens if engine_tokens > 0 else 0.0
                out += [_span(lo, hi, amount * scale, prompt=True) for lo, hi, amount in pieces]
                prompt_ends = max((hi for _, hi, _ in pieces), default=None)
            elif span.start == admitted:
                before = steps.step_before(span.end) if span.first else None
                if span.first and before is not None:
                    start = max(admitted, before)
                else:
                    start = prompt_ends if prompt_ends is not None and not span.first else admitted
                out.append(_span(min(start, span.end), span.end, span.tokens))
            else:
                out.append(span)
        steps.engaged(done)
        return out

    def _place(self, request: _Request) -> None:
        request.placed = True
        spans = self._in_steps(self.steps, request) if self.steps is not None else self._aligned(request)
        starts, intervals, key = self._starts, self._intervals, request.key
        count, open_from, last = len(intervals), self._final - self._base, request.last_k - self._base
        for span in spans:  # a span per chunk: written out with comparisons, as min/max calls cost more
            start, end = span.start, span.end
            density = span.tokens / (end - start)
            index = bisect.bisect_right(starts, start) - 1
            index = index if index > 0 else 0
            while index < count:
                interval = intervals[index]
                if interval.start >= end:
                    break
                lo = start if start > interval.start else interval.start
                hi = end if end < interval.end else interval.end
                if hi > lo and index >= open_from:
                    interval.pieces.append((key, lo, hi, density))
                    last = index if index > last else last
                index += 1
        request.last_k = last + self._base

    # -- finalise and settle -------------------------------------------------------------------
    def finalise(self, watermark: float) -> list[Finalised]:
        """Finalise every open interval that ends at or before ``watermark``, oldest first."""
        if (earliest := self.earliest_unplaceable()) is not None:
            watermark = min(watermark, earliest)
        done: list[Finalised] = []
        while self._final - self._base < len(self._intervals):
            interval = self._intervals[self._final - self._base]
            if interval.end > watermark:
                break
            self._place_due(interval.end)
            done.append(self._finalise_one(self._final, interval))
            self._final += 1
        self._drop_final()
        return done

    def _finalise_one(self, k: int, interval: _Interval) -> Finalised:
        fractions = None
        if self.steps is not None and interval.busy_ms is not None and interval.kind != "gap":
            around = self.steps.around(interval.start, interval.end)
            self._learn_idle(interval, around)
            fractions = self.steps.kernel_fractions(interval.start, interval.end, around)
        held = self.holds.pieces(interval.start, interval.end, interval.pieces) if self.holds.open else []
        weights = time_shares(interval.pieces + held if held else interval.pieces, fractions)
        active = sum(weights.values())
        # Timing only (busy_ms None): busy whenever some request had work.
        busy = active * 1000.0 * self.gpus if interval.busy_ms is None else interval.busy_ms
        energy = None
        if interval.energy_mj is not None and interval.end > interval.start:
            energy = interval.energy_mj * min(1.0, busy / ((interval.end - interval.start) * 1000.0 * self.gpus))
        held_ms = self.holds.credit(held, weights, busy, active, energy, interval.kind != "gap") if held else 0.0
        billed, excluded = self._credit(interval, weights, busy, active, energy)
        unattributed = busy if active <= 0 else 0.0
        return Finalised(k, interval.start, interval.end, busy, interval.kind, billed, excluded, unattributed,
                         held_ms)

    def _credit(self, interval: _Interval, weights: dict[str, float], busy: float, active: float,
                energy: float | None) -> tuple[float, float]:
        """Add an interval's shares to its requests (``busy * weight / active``); the billed and excluded sums."""
        billed = excluded = 0.0
        if active > 0:
            for key, weight in weights.items():
                request = self._requests.get(key)
                if request is None:  # a request still in flight: Holds.credit
                    continue
                part = busy * weight / active
                request.share.gpu_ms += part
                self.touched.add(key)
                if energy is not None:
                    request.share.energy_mj = (request.share.energy_mj or 0.0) + energy * weight / active
                if request.billable:
                    billed += part
                else:
                    excluded += part
        if interval.kind != "gap":
            for key, lo, hi, density in interval.pieces:
                self._requests[key].share.covered_tokens += density * (hi - lo)
                self.touched.add(key)
        return billed, excluded

    def _learn_idle(self, interval: _Interval, around: list[Step]) -> None:
        """An interval in which some request had work all the time: its idle GPU time is the engine's between
        its steps."""
        assert self.steps is not None
        assert interval.busy_ms is not None
        length = interval.end - interval.start
        if length > 0 and covered_seconds(interval.pieces) >= length * (1 - 1e-9):
            idle = length - interval.busy_ms / 1000.0 / self.gpus
            self.steps.observe_idle(interval.start, interval.end, idle, around)

    def _drop_final(self) -> None:
        """Forget final intervals, keeping the list short (placement of late work drops it anyway)."""
        drop = self._final - self._base
        if drop > 0:
            del self._intervals[:drop]
            del self._starts[:drop]
            self._base = self._final
        if self.steps is not None and drop > 0:
            oldest = min([r.admitted for r in self._unplaced.values()] +
                         [self._intervals[0].start if self._intervals else self._last_end or 0.0])
            self.steps.prune(oldest - PRUNE_MARGIN_SECONDS)

    def learned(self) -> dict[str, float]:
        """What the step model learned (empty with ``placement="admission"``), for the journal."""
        return self.steps.learned() if self.steps is not None else {}

    def restore_learned(self, values: dict[str, float]) -> None:
        if self.steps is not None:
            self.steps.restore_learned(values)

    def settle(self) -> list[Settled]:
        """The placed requests whose intervals are all final, removed from the attributor."""
        ready = [r for r in self._requests.values() if r.placed and r.last_k < self._final]
        for request in ready:
            del self._requests[request.key]
        return [Settled(r.key, r.share, r.total_tokens, r.billable) for r in ready]

    def shares(self, keys: Iterable[str]) -> dict[str, Share]:
        return {k: self._requests[k].share for k in keys if k in self._requests}

    def pending(self) -> int:
        return len(self._requests)


def covered_seconds(pieces: list[tuple[str, float, float, float]]) -> float:
    """The measure of the time in which some piece has work."""
    total, reach = 0.0, -math.inf
    for _, lo, hi, _ in sorted(pieces, key=lambda p: p[1]):
        if hi > reach:
            total += hi - max(lo, reach)
            reach = hi
    return total


def time_shares(pieces: list[tuple[str, float, float, float]],
                fractions: list[tuple[float, float, float]] | None = None) -> dict[str, float]:
    """``w_e = integral of beta * rho_e / sum rho``: each request's share of the active time, in seconds.

    Pieces are ``(request, start, end, density)``; ``fractions`` are ``(start, end, beta)``, sorted and not
    overlapping, the share of time the GPU computed (1 elsewhere). A sweep over the breakpoints builds the
    total density; with ``F(t) = integral beta dt / sum rho`` a piece's weight is
    ``density * (F(end) - F(start))``. Without fractions the weights add up to the measure of the time
    when some request had work.
    """
    if not pieces:
        return {}
    breaks = {p[1] for p in pieces} | {p[2] for p in pieces}
    lo, hi = min(breaks), max(breaks)
    beta = [f for f in fractions or [] if f[1] > lo and f[0] < hi]
    breaks.update(t for f in beta for t in f[:2] if lo < t < hi)
    points = sorted(breaks)
    index = {t: i for i, t in enumerate(points)}
    rate = [0.0] * len(points)
    count = [0] * len(points)
    for _, lo, hi, density in pieces:
        rate[index[lo]] += density
        rate[index[hi]] -= density
        count[index[lo]] += 1
        count[index[hi]] -= 1
    cumulative = [0.0] * len(points)
    total_rate, active, f = 0.0, 0, 0
    for i in range(len(points) - 1):
        total_rate += rate[i]
        active += count[i]
        while f < len(beta) and beta[f][1] <= points[i]:
            f += 1
        share = beta[f][2] if f < len(beta) and beta[f][0] <= points[i] else 1.0
        step = share * (points[i + 1] - points[i]) / total_rate if active > 0 and total_rate > 0 else 0.0
        cumulative[i + 1] = cumulative[i] + step
    weights: dict[str, float] = {}
    for key, lo, hi, density in pieces:
        weights[key] = weights.get(key, 0.0) + density * (cumulative[index[hi]] - cumulative[index[lo]])
    return weights
