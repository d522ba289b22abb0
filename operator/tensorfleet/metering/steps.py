"""The engine's steps as the gateway sees them, and where each prompt was processed: pure, in memory.

vLLM's scheduler (and TensorRT-LLM's in-flight batcher, which works the same way) runs the GPU in
*steps*. Each step decodes one token for every running request, then fills what is left of a token
budget (vLLM's ``max_num_batched_tokens``) with prompt tokens of the requests in the order they
arrived; a prompt that does not fit is processed in chunks over the next steps, and its first token
comes out of the step that finishes it. Prefix-cached prompt tokens take no budget.

The gateway cannot see inside a step, but it sees where steps end: a step hands one token to every
decoding request at about the same moment, so the tokens the gateway forwards come in bursts, one
burst per step. From those bursts and each request's admission, uncached prompt size and first
token this module reconstructs:

* ``steps(lo, hi)``: the step ends in a time range and how many requests decoded in each;
* ``place_prompt``: which steps processed a prompt and how many of its tokens each. It replays the
  scheduler's first-come-first-served fill of the budget that decodes and earlier prompts left,
  starting with the first step that began after the admission, and reconciles the replay with the
  step that really emitted the first token;
* ``kernel_fractions``: the share of each step's time in which the GPU computed. Between two steps
  the engine works on the CPU (scheduling, sampling, output) and the GPU idles; weighting time by
  this share keeps the idle gap of a short decode step from counting as much work as the same gap
  after a long prefill step.

Three quantities are learned from what the gateway sees rather than configured:

* the burst spread that separates two steps: half the 10th percentile of the gaps between one
  request's consecutive tokens (two tokens of one request never come from one step);
* the token budget (unless configured): the value most recent prompts' first tokens agree with.
  Each prompt whose chunks the replay places gives the range of budgets under which the replay ends
  in the step that emitted its first token; the budget is the lowest value inside most ranges;
* the idle time per step: measured idle GPU time over the number of steps seen, in sampling
  intervals where some request had work all the time.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import operator
from collections.abc import Sequence

BUCKET_SECONDS = 0.05  # emissions are kept in time buckets: insertion in any order, sorted reads by range
LOOKBACK_SECONDS = 0.5  # how far back the step before a moment is looked for (longer: idle in between)
STEP_BEFORE_LOOKBACK_SECONDS = 0.8  # step_before's: the widest of the windows it used to widen (0.05, 0.2, 0.8 s)
DEFAULT_LINKAGE_SECONDS = 0.001  # burst spread before enough token gaps were seen
GAPS_KEPT = 2048
BUDGET_RANGES_KEPT = 512
IDLE_INTERVALS_KEPT = 600  # one minute of 100 ms sampling intervals
MIN_GAPS = 64
ESTIMATE_EVERY = 16  # new budget ranges between two estimates, once there are this many
MIN_IDLE_STEPS = 20


@dataclasses.dataclass(frozen=True)
class Step:
    """One engine step as seen at the gateway: its tokens were forwarded in ``[end, last]``."""

    end: float  # the first token of the step the gateway forwarded
    last: float  # the last one
    decodes: int  # generated tokens other than first tokens: the requests that decoded in it


class _Bucketed:
    """Floats by time bucket, sorted lazily per bucket; and runs of them closer than a spread, walked back."""

    def __init__(self) -> None:
        self._items: dict[int, list[float]] = {}
        self._unsorted: set[int] = set()
        self._widest: dict[int, float] = {}  # bucket -> the widest gap between two of its items, once asked

    def add(self, times: Sequence[float]) -> None:
        """Each of ``times``, in any order; one dictionary lookup per bucket when they come in order."""
        items, unsorted, widest, floor = self._items, self._unsorted, self._widest, math.floor
        previous: int | None = None
        current: list[float] = []
        for t in times:
            bucket = floor(t / BUCKET_SECONDS)
            if bucket != previous:
                current = items.setdefault(bucket, [])
                unsorted.add(bucket)
                widest.pop(bucket, None)
                previous = bucket
            current.append(t)

    def _sorted(self, bucket: int) -> list[float] | None:
        items = self._items.get(bucket)
        if items and bucket in self._unsorted:
            items.sort()
            self._unsorted.discard(bucket)
        return items

    def between(self, lo: float, hi: float) -> list[float]:
        out: list[float] = []
        for bucket in range(math.floor(lo / BUCKET_SECONDS), math.floor(hi / BUCKET_SECONDS) + 1):
            items = self._sorted(bucket)
            if items:
                out.extend(items)
        return out[bisect.bisect_left(out, lo):bisect.bisect_right(out, hi)]

    def prune(self, before: float) -> None:
        limit = math.floor(before / BUCKET_SECONDS)
        for bucket in [b for b in self._items if b < limit]:
            del self._items[bucket]
            self._unsorted.discard(bucket)
            self._widest.pop(bucket, None)

    # -- runs: positions are (bucket, index); a bucket's items are sorted once a position is in it ------------
    def last_at_or_before(self, t: float, lowest: int) -> tuple[int, int] | None:
        """The last item at or before ``t``, in bucket ``lowest`` or later."""
        bucket = math.floor(t / BUCKET_SECONDS)
        items = self._sorted(bucket)
        index = bisect.bisect_right(items, t) - 1 if items else -1
        return (bucket, index) if index >= 0 else self._last_below(bucket, lowest)

    def _last_below(self, bucket: int, lowest: int) -> tuple[int, int] | None:
        """The last item of the nearest non-empty bucket before ``bucket``, looking no further than ``lowest``."""
        while bucket > lowest:
            bucket -= 1
            items = self._sorted(bucket)
            if items:
                return bucket, len(items) - 1
        return None

    def at(self, position: tuple[int, int]) -> float:
        return self._items[position[0]][position[1]]

    def before(self, position: tuple[int, int], lowest: int) -> tuple[int, int] | None:
        """The item before the one at ``position``, in bucket ``lowest`` or later."""
        bucket, index = position
        return (bucket, index - 1) if index > 0 else self._last_below(bucket, lowest)

    def run_start(self, position: tuple[int, int], lo: float, link: float) -> tuple[int, int] | None:
        """The first item of the run (consecutive items at most ``link`` apart) that the item at ``position`` is
        in; None if the run began at or before ``lo``. A bucket whose gaps are all within ``link`` is crossed
        in one step, so a long run costs a step per bucket, not per item."""
        bucket, index = position
        while True:
            items = self._items[bucket]
            if index > 0 and self._widest_gap(bucket, items) <= link:
                index = 0
            while index > 0 and items[index] > lo and items[index] - items[index - 1] <= link:
                index -= 1
            first = items[index]
            if first <= lo:
                return None
            if index > 0:
                return bucket, index
            previous = self._last_below(bucket, math.floor((first - link) / BUCKET_SECONDS))
            if previous is None or first - self.at(previous) > link:
                return bucket, 0
            bucket, index = previous

    def _widest_gap(self, bucket: int, items: list[float]) -> float:
        widest = self._widest.get(bucket)
        if widest is None:
            widest = self._widest[bucket] = max(map(operator.sub, itertools.islice(items, 1, None), items),
                                                default=0.0)
        return widest


class _Coverage:
    """A union of time ranges, kept as sorted disjoint ``[start, end]`` pairs."""

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._ends: list[float] = []

    def add(self, start: float, end: float, slack: float) -> None:
        i = bisect.bisect_left(self._ends, start - slack)  # the first range that reaches this one
        j = bisect.bisect_right(self._starts, end + slack)  # past the last range that this one reaches
        if i < j:
            start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def covers(self, lo: float, hi: float) -> bool:
        i = bisect.bisect_right(self._starts, lo) - 1
        return i >= 0 and self._ends[i] >= hi

    def prune(self, before: float) -> None:
        drop = bisect.bisect_left(self._ends, before)
        del self._starts[:drop]
        del self._ends[:drop]


class EngineSteps:
    """Step ends seen in forwarded tokens, the prompt work placed on them, and what was learned."""

    def __init__(self, step_tokens: int | None = None) -> None:
        self.configured_budget = step_tokens
        self.learned_budget: float | None = None
        self.idle_per_step = 0.0  # seconds the GPU idles between two steps (learned)
        self.linkage = DEFAULT_LINKAGE_SECONDS
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._emissions = _Bucketed()
        self._first_tokens = _Bucketed()
        self._decoding = _Coverage()  # when some request was decoding: every step then ended in a burst
        self._used: dict[int, dict[float, float]] = {}  # bucket -> {step end: prompt tokens placed}
        self._gaps: collections.deque[float] = collections.deque(maxlen=GAPS_KEPT)
        self._new_gaps = 0
        self._budget_ranges: collections.deque[tuple[float, float]] = collections.deque(maxlen=BUDGET_RANGES_KEPT)
        self._new_ranges = 0
        self._idle: collections.deque[tuple[float, int]] = collections.deque(maxlen=IDLE_INTERVALS_KEPT)
        self._idle_sums = [0.0, 0]  # idle seconds and steps over self._idle
        self._engaged_until = -math.inf

    # -- what the gateway saw --------------------------------------------------------------------
    @property
    def budget(self) -> float:
        """Prompt and decode tokens one step may process: configured, learned, or unbounded until learned."""
        if self.configured_budget:
            return float(self.configured_budget)
        return self.learned_budget if self.learned_budget is not None else math.inf

    def add_request(self, emissions: Sequence[float], first_token: bool) -> None:
        """A request's forwarded tokens (sorted times); ``first_token``: the first of them is its first token."""
        if not emissions:
            return
        self._emissions.add(emissions)
        if first_token:
            self._first_tokens.add(emissions[:1])
        gaps = [b - a for a, b in itertools.pairwise(emissions) if b > a]
        self._gaps.extend(gaps)
        self._new_gaps += len(gaps)
        if first_token and len(emissions) > 1:
            self._decoding.add(emissions[0], emissions[-1], self.linkage)
        if self._new_gaps >= 256 and len(self._gaps) >= MIN_GAPS:
            ordered = sorted(self._gaps)
            self.linkage = 0.5 * ordered[len(ordered) // 10]
            self._new_gaps = 0

    def engaged(self, until: float) -> None:
        """A request placed (in admission order) kept the engine busy until ``until``."""
        self._engaged_until = max(self._engaged_until, until)

    def steps(self, lo: float, hi: float) -> list[Step]:
        """Steps whose forwarded tokens began in ``(lo, hi]``, oldest first."""
        margin = 10 * self.linkage  # a burst is far shorter: the steps at both edges are whole
        times = self._emissions.between(lo - margin, hi + margin)
        if not times:
            return []
        firsts = self._first_tokens.between(lo - margin, hi + margin)
        link = self.linkage
        cuts = [0, *(i for i, (a, b) in enumerate(itertools.pairwise(times), start=1) if b - a > link), len(times)]
        out: list[Step] = []
        for i, j in itertools.pairwise(cuts):
            start, last = times[i], times[j - 1]
            if lo < start <= hi:
                first = bisect.bisect_right(firsts, last) - bisect.bisect_left(firsts, start)
                out.append(Step(start, last, (j - i) - first))
        return out

    def step_before(self, t: float) -> float | None:
        """The end of the step before the one whose tokens arrived at ``t`` (looking back at most
        ``STEP_BEFORE_LOOKBACK_SECONDS``: longer, and the engine idled in between). What ``steps`` would give,
        walking back over the last two steps only: the start of the last step that began in ``(t - lookback,
        t]``, or of the one before it when ``t`` is inside the last one's burst."""
        emissions, link, lo = self._emissions, self.linkage, t - STEP_BEFORE_LOOKBACK_SECONDS
        lowest = math.floor(lo / BUCKET_SECONDS)  # earlier buckets hold only times before lo
        last = emissions.last_at_or_before(t, lowest)  # a token of the last step begun by t
        start = emissions.run_start(last, lo, link) if last is not None else None
        if last is None or start is None:  # no step began in the window
            return None
        if emissions.at(last) < t - link:  # that step's burst ended before t (the next token, after t, is not in it)
            return emissions.at(start)
        previous = emissions.before(start, lowest)  # t is inside that step's burst: the one before
        previous_start = emissions.run_start(previous, lo, link) if previous is not None else None
        return emissions.at(previous_start) if previous_start is not None else None

    # -- prompts ---------------------------------------------------------------------------------
    def place_prompt(self, admitted: float, first_token: float | None, tokens: float,
                     until: float, learn: bool = True) -> list[tuple[float, float, float]]:
        """``(start, end, tokens)`` of the prompt in each step that processed it.

        ``first_token``: when the gateway forwarded the first generated token (the prompt was done in the
        step that emitted it); None when not streamed: then the replay runs forward from the admission
        within the steps up to ``until``. ``learn``: whether the placement may tell the budget.
        """
        window = self.steps(admitted, first_token if first_token is not None else until)
        if not window or tokens <= 0:
            self.outcomes["unseen"] += 1
            return [(admitted, first_token if first_token is not None else until, tokens)] if tokens > 0 else []
        starts = [admitted] + [max(admitted, step.end) for step in window[:-1]]
        used = [self._used_in(step) for step in window]
        bases = [step.decodes + u for step, u in zip(window, used, strict=True)]
        first = 1 if len(window) > 1 and self._engaged_until > admitted else 0
        if first_token is None:
            alloc, outcome = _fill_forward(self._caps(bases), first, tokens), "not-streamed"
        else:
            joinable = self._between_steps(admitted)
            # Every step in between ended in a burst, and the step it started in is certain: it tells the budget.
            if learn and not self.configured_budget and not joinable and self._decoding.covers(admitted, first_token):
                self._learn_budget(bases, first, tokens)
            alloc, outcome = _fill_to_first_token(self._caps(bases), first, tokens, joinable)
        self.outcomes[outcome] += 1
        pieces: list[tuple[float, float, float]] = []
        for step, start, amount in zip(window, starts, alloc, strict=True):
            if amount > 0:
                self._add_used(step.end, amount)
                pieces.append((start, step.end, amount))
        return pieces

    def _between_steps(self, admitted: float) -> bool:
        """Whether a step's tokens began to arrive less than one idle gap before the admission: then the engine
        may have been between two steps, and the request may have joined the next one."""
        return self.idle_per_step > 0 and bool(self.steps(admitted - self.idle_per_step, admitted))

    def _caps(self, bases: list[float]) -> list[float]:
        budget = self.budget
        return [max(0.0, budget - base) for base in bases]

    def _used_in(self, step: Step) -> float:
        total = 0.0
        lo, hi = step.end - self.linkage, step.last + self.linkage
        for bucket in range(math.floor(lo / BUCKET_SECONDS), math.floor(hi / BUCKET_SECONDS) + 1):
            for at, amount in self._used.get(bucket, {}).items():
                if lo <= at <= hi:
                    total += amount
        return total

    def _add_used(self, at: float, amount: float) -> None:
        entries = self._used.setdefault(math.floor(at / BUCKET_SECONDS), {})
        entries[at] = entries.get(at, 0.0) + amount

    def _learn_budget(self, bases: list[float], first: int, tokens: float) -> None:
        """Record the budgets under which the replay from ``first`` ends in the last step; re-estimate."""
        low = water_level(bases[first:], tokens)
        high = water_level(bases[first:-1], tokens) if len(bases) - 1 > first else math.inf
        if low < high:
            self._budget_ranges.append((low, high))
            self._new_ranges += 1
        if self._new_ranges and (self._new_ranges >= ESTIMATE_EVERY or len(self._budget_ranges) < ESTIMATE_EVERY):
            self._new_ranges = 0
            self.learned_budget = most_agreed(self._budget_ranges)

    # -- GPU idle between steps ------------------------------------------------------------------
    def around(self, start: float, end: float) -> list[Step]:
        """The steps that ended in ``[start, end]``, and the one before (for ``kernel_fractions``)."""
        lookback = 0.05
        while True:
            steps = self.steps(start - lookback, end + self.linkage)
            if (steps and steps[0].end < start) or lookback >= LOOKBACK_SECONDS:
                return steps
            lookback *= 4

    def observe_idle(self, start: float, end: float, idle_seconds: float, steps: Sequence[Step]) -> None:
        """A sampling interval in which some request had work all the time idled ``idle_seconds`` per GPU;
        ``steps``: those around it (``around``)."""
        count = sum(1 for step in steps if start < step.end <= end)
        if count <= 0 or not self._decoding.covers(start, end):  # steps nobody got a token from are unseen
            return
        if len(self._idle) == self._idle.maxlen:
            old_idle, old_count = self._idle[0]
            self._idle_sums[0] -= old_idle
            self._idle_sums[1] -= old_count
        self._idle.append((max(0.0, idle_seconds), count))
        self._idle_sums[0] += max(0.0, idle_seconds)
        self._idle_sums[1] += count
        if self._idle_sums[1] >= MIN_IDLE_STEPS:
            self.idle_per_step = max(0.0, self._idle_sums[0] / self._idle_sums[1])

    def kernel_fractions(self, start: float, end: float, steps: Sequence[Step]) -> list[tuple[float, float, float]]:
        """``(from, to, share)``: between consecutive step ends in ``[start, end]`` (``steps``: ``around``), the
        share of the time the GPU computed, ``1 - idle_per_step / step length`` (a step is never taken as
        shorter than two idle gaps)."""
        idle = self.idle_per_step
        if idle <= 0:
            return []
        out = []
        for before, step in itertools.pairwise(steps):
            if step.end <= start or before.end >= end:
                continue
            length = step.end - before.end
            out.append((before.end, step.end, 1.0 - idle / max(length, 2.0 * idle)))
        return out

    # -- housekeeping ----------------------------------------------------------------------------
    def prune(self, before: float) -> None:
        """Forget what happened before ``before`` (no placement or interval reaches back that far)."""
        self._emissions.prune(before)
        self._first_tokens.prune(before)
        self._decoding.prune(before)
        limit = math.floor(before / BUCKET_SECONDS)
        for bucket in [b for b in self._used if b < limit]:
            del self._used[bucket]

    def learned(self) -> dict[str, float]:
        """What was learned, to journal (so a restart does not start from nothing)."""
        out = {"idle_per_step": self.idle_per_step, "linkage": self.linkage}
        if self.learned_budget is not None:
            out["budget"] = self.learned_budget
        return out

    def restore_learned(self, values: dict[str, float]) -> None:
        self.idle_per_step = float(values.get("idle_per_step", self.idle_per_step))
        self.linkage = float(values.get("linkage", self.linkage))
        if "budget" in values:
            self.learned_budget = float(values["budget"])


def _greedy(caps: list[float], start: int, tokens: float) -> tuple[list[float], int | None]:
    """Fill ``caps`` from ``start`` on, as the scheduler does; the index of the step that finished the prompt."""
    alloc = [0.0] * len(caps)
    left = tokens
    for j in range(start, len(caps)):
        take = min(caps[j], left)
        alloc[j] = take
        left -= take
        if left <= 1e-9 * max(1.0, tokens):
            return alloc, j
    return alloc, None


def _fill_to_first_token(caps: list[float], first: int, tokens: float, joinable: bool) -> tuple[list[float], str]:
    """The scheduler's fill from the first step it could use, reconciled with the step that emitted the first
    token (the last one).

    * It ends there: the replay stands.
    * It does not fit by then: if the request may have joined the step before ``first`` (``joinable``: it
      arrived while the engine was between steps) and the fill from there ends in the last step, it did;
      otherwise the steps had more budget than estimated, and the rest is spread over them by their room.
    * It ends earlier: the request started later than the replay says (held back by something the gateway
      cannot see, such as the engine's sequence limit): the nearest later start that ends in the last step,
      else the latest fill that does.
    """
    last = len(caps) - 1
    alloc, end = _greedy(caps, first, tokens)
    if end == last:
        return alloc, "replayed"
    if end is None:
        if joinable and first > 0:
            earlier, end = _greedy(caps, first - 1, tokens)
            if end == last:
                return earlier, "started-earlier"
        return _spread_rest(alloc, tokens - sum(alloc), first), "over-budget"
    for start in range(first + 1, last + 1):
        alloc, end = _greedy(caps, start, tokens)
        if end == last:
            return alloc, "started-later"
    alloc = [0.0] * len(caps)
    left = tokens
    for j in range(last, first - 1, -1):
        take = min(caps[j], left)
        alloc[j] = take
        left -= take
    return _spread_rest(alloc, left, first), "filled-back"


def _fill_forward(caps: list[float], first: int, tokens: float) -> list[float]:
    alloc, end = _greedy(caps, first, tokens)
    return alloc if end is not None else _spread_rest(alloc, tokens - sum(alloc), first)


def _spread_rest(alloc: list[float], left: float, first: int) -> list[float]:
    """``alloc`` with ``left`` more tokens spread over the steps from ``first`` on, by what each already holds
    (evenly when none holds any)."""
    if left <= 0:
        return alloc
    held = sum(alloc[first:])
    if held <= 0:
        return [a + left / (len(alloc) - first) if j >= first else a for j, a in enumerate(alloc)]
    return [a + left * a / held if j >= first else a for j, a in enumerate(alloc)]


def water_level(bases: Sequence[float], tokens: float) -> float:
    """The least budget ``C`` with ``sum(max(0, C - b)) >= tokens``; infinite when there are no steps."""
    if not bases:
        return math.inf
    ordered = sorted(bases)
    total = 0.0
    for k, base in enumerate(ordered, start=1):
        total += base
        level = (tokens + total) / k
        if k == len(ordered) or level <= ordered[k]:
            return level
    return math.inf  # unreachable


def most_agreed(ranges: Sequence[tuple[float, float]]) -> float:
    """The lowest value inside the largest number of the half-open ``[low, high)`` ranges."""
    events = sorted([(low, 1) for low, _ in ranges] + [(high, -1) for _, high in ranges if high != math.inf],
                    key=lambda e: (e[0], e[1]))
    best, best_at, inside = -1, math.inf, 0
    for at, change in events:
        inside += change
        if inside > best:
            best, best_at = inside, at
    return best_at
