"""Engine steps as the gateway sees them: bursts of forwarded tokens, prompt placement, what is learned."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorfleet.metering.steps import LOOKBACK_SECONDS, EngineSteps, most_agreed, water_level

STEP = 0.02  # a 20 ms step
SPREAD = 0.0008  # the gateway sees one step's tokens within 0.8 ms


def decoder(steps: EngineSteps, ends: list[float], rng: random.Random, first_token: bool = False) -> list[float]:
    """A request that got a token at each of ``ends`` (seen a little later)."""
    emissions = [t + rng.uniform(0.0, SPREAD) for t in ends]
    steps.add_request(emissions, first_token)
    return emissions


def busy_engine(count: int = 4, start: float = 0.0, n_steps: int = 40,
                seed: int = 0) -> tuple[EngineSteps, list[float]]:
    """``count`` requests decoding through ``n_steps`` back-to-back steps (learned spread, no budget)."""
    rng = random.Random(seed)
    steps = EngineSteps()
    ends = [start + STEP * (i + 1) for i in range(n_steps)]
    for _ in range(count):
        decoder(steps, ends, rng, first_token=True)
    steps.add_request([ends[-1] + 1.0 + STEP * i for i in range(300)], False)  # enough gaps to learn the spread
    steps.engaged(ends[-1] + 1.0)
    return steps, ends


def test_bursts_of_tokens_are_steps_and_first_tokens_are_not_decodes() -> None:
    steps, ends = busy_engine(count=5)
    assert steps.linkage == pytest.approx(STEP / 2, rel=0.05)  # half the usual gap between a request's tokens
    steps.add_request([ends[10] + 0.0001, ends[11] + 0.0002], True)  # a new request's first two tokens
    found = steps.steps(ends[9] + 0.005, ends[12] + 0.005)
    assert [round(s.end, 3) for s in found] == [round(t, 3) for t in ends[10:13]]
    assert [s.decodes for s in found] == [5, 6, 5]


def test_a_prompt_arriving_mid_step_waits_for_the_next_step_and_a_long_one_is_chunked() -> None:
    steps, ends = busy_engine(count=3)
    steps.configured_budget = 1000
    admitted = ends[4] + 0.007  # during the step that ends at ends[5]
    first_token = ends[8] + 0.0003  # the prompt took the steps ending at ends[6], ends[7] and ends[8]
    steps.add_request([first_token], True)
    pieces = steps.place_prompt(admitted, first_token, 2500, first_token)
    assert [round(hi, 3) for _, hi, _ in pieces] == [round(t, 3) for t in ends[6:9]]
    assert [amount for _, _, amount in pieces] == pytest.approx([997, 997, 506])  # budget less 3 decodes
    assert steps.outcomes == {"replayed": 1}


def test_prompts_arriving_together_fill_the_budget_first_come_first_served() -> None:
    steps, ends = busy_engine(count=2)
    steps.configured_budget = 1000
    admitted = ends[4] + 0.005  # both during the step ending at ends[5]: they start in the next one
    steps.add_request([ends[6] + 0.0004], True)  # "a" (600 tokens) finished in the step ending at ends[6]
    steps.add_request([ends[7] + 0.0004], True)  # "b" (600 tokens) only in the one after
    a = steps.place_prompt(admitted, ends[6] + 0.0004, 600, ends[6])
    b = steps.place_prompt(admitted + 0.0001, ends[7] + 0.0004, 600, ends[7])
    assert [(round(hi, 3), amount) for _, hi, amount in a] == [(round(ends[6], 3), pytest.approx(600))]
    assert [(round(hi, 3), amount) for _, hi, amount in b] == [(round(ends[6], 3), pytest.approx(398)),
                                                               (round(ends[7], 3), pytest.approx(202))]


def test_a_prompt_held_back_longer_than_the_replay_says_is_placed_on_the_steps_before_its_first_token() -> None:
    steps, ends = busy_engine(count=2)
    steps.configured_budget = 1000
    first_token = ends[9] + 0.0002  # the replay would have finished it at ends[5]; something held it back
    steps.add_request([first_token], True)
    pieces = steps.place_prompt(ends[3] + 0.01, first_token, 300, first_token)
    assert [(round(hi, 3), amount) for _, hi, amount in pieces] == [(round(ends[9], 3), pytest.approx(300))]
    assert steps.outcomes == {"started-later": 1}


def test_when_the_budget_was_larger_than_estimated_the_rest_is_spread_over_the_prompts_steps() -> None:
    steps, ends = busy_engine(count=2)
    steps.configured_budget = 500
    first_token = ends[6] + 0.0002
    steps.add_request([first_token], True)
    pieces = steps.place_prompt(ends[3] + 0.01, first_token, 1200, first_token)  # two steps of 498 cannot hold it
    assert [(round(hi, 3), amount) for _, hi, amount in pieces] == [(round(ends[5], 3), pytest.approx(600)),
                                                                    (round(ends[6], 3), pytest.approx(600))]
    assert steps.outcomes == {"over-budget": 1}


def test_an_idle_engine_starts_the_step_at_the_admission() -> None:
    steps = EngineSteps(step_tokens=2048)
    steps.add_request([10.05], True)
    assert steps.place_prompt(10.0, 10.05, 800, 10.05) == [(10.0, 10.05, 800)]


def test_without_a_first_token_the_prompt_takes_the_first_steps_after_the_admission() -> None:
    steps, ends = busy_engine(count=2)
    steps.configured_budget = 1000
    pieces = steps.place_prompt(ends[2] + 0.01, None, 1500, ends[20])
    assert [(round(hi, 3), round(amount)) for _, hi, amount in pieces] == [(round(ends[4], 3), 998),
                                                                           (round(ends[5], 3), 502)]
    assert steps.outcomes == {"not-streamed": 1}


def test_the_budget_is_learned_from_where_first_tokens_came_out() -> None:
    rng = random.Random(3)
    budget, decodes = 1500, 2
    steps, ends = busy_engine(count=decodes, n_steps=400)
    step = 0
    while step < 380:  # one prompt at a time, of random size, each after the previous one's first token
        tokens = rng.randint(100, 4000)
        needed = math.ceil(tokens / (budget - decodes))
        first_token = ends[step + 1 + needed] + 0.0003  # it waits out the step in progress, then is chunked
        steps.add_request([first_token], True)
        steps.place_prompt(ends[step] + 0.005, first_token, tokens, first_token)
        step += needed + 1
    # The least budget every prompt agrees with: a prompt that nearly fills its steps bounds it from below.
    assert steps.learned_budget is not None
    assert budget * 0.98 <= steps.budget <= budget
    assert steps.learned()["budget"] == steps.learned_budget


def test_idle_time_between_steps_is_learned_and_weighs_a_steps_time() -> None:
    steps, ends = busy_engine(count=2)
    for k in range(0, 40, 5):  # 100 ms intervals, five 20 ms steps each, 1 ms idle after each step
        around = steps.around(ends[k] - 0.0001, ends[k] + 0.1 - 0.0001)
        steps.observe_idle(ends[k] - 0.0001, ends[k] + 0.1 - 0.0001, 0.005, around)
    assert steps.idle_per_step == pytest.approx(0.001)
    fractions = steps.kernel_fractions(ends[10], ends[12], steps.around(ends[10], ends[12]))
    assert len(fractions) == 3  # the steps ending in [ends[10], ends[12]] and the one reaching into it
    assert [share for _, _, share in fractions] == pytest.approx([0.95] * 3, abs=0.003)  # 1 - 1 ms / 20 ms


def test_water_level_and_the_most_agreed_value() -> None:
    assert water_level([0.0, 0.0], 1000) == 500
    assert water_level([100.0, 0.0, 900.0], 1000) == pytest.approx(550)  # 550 + 450 = 1000, 900 holds none
    assert water_level([], 5) == math.inf
    assert most_agreed([(1990, 2050), (2000, math.inf), (2010, 2060), (900, 1000)]) == 2010
    assert most_agreed([(10, math.inf), (30, math.inf)]) == 30


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.floats(0.0, 0.2), st.integers(0, 12), st.floats(1.0, 20000.0),
       st.sampled_from([None, 300, 2048]), st.booleans())
def test_placed_prompt_work_adds_up_is_never_negative_and_lies_between_admission_and_first_token(
        decoders: int, offset: float, steps_to_first: int, tokens: float, budget: int | None, streamed: bool) -> None:
    steps, ends = busy_engine(count=decoders, seed=decoders)
    steps.configured_budget = budget
    admitted = ends[3] + offset
    first_token = max(admitted + 0.001, ends[min(39, 4 + steps_to_first)] + 0.0003)
    steps.add_request([first_token], True)
    pieces = steps.place_prompt(admitted, first_token if streamed else None, tokens, first_token)
    assert sum(amount for _, _, amount in pieces) == pytest.approx(tokens)
    assert all(amount >= 0 for _, _, amount in pieces)
    assert all(admitted <= lo < hi <= first_token + SPREAD for lo, hi, _ in pieces)


def _step_before_from_steps(steps: EngineSteps, t: float) -> float | None:
    """step_before as first written: every step in a growing window, then the last one or the one before it."""
    lookback = 0.05
    while True:
        found = steps.steps(t - lookback, t)
        if found and found[-1].last >= t - steps.linkage:
            found = found[:-1]
        if found or lookback >= LOOKBACK_SECONDS:
            return found[-1].end if found else None
        lookback *= 4


@st.composite
def _token_runs(draw: st.DrawFn, link: float) -> list[float]:
    """Tokens in runs: each gap a multiple of the spread, some exactly one (binary fractions add up exactly),
    some far longer than a bucket."""
    at = draw(st.integers(0, 400)) / 4096
    times = [at]
    for gap in draw(st.lists(st.sampled_from([0.0, 0.25, 0.999, 1.0, 1.001, 3.0, 40.0]), max_size=400)):
        at += gap * link
        times.append(at)
    return times


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2**-12, 2**-10, 2**-8, 2**-6, 2**-4]), st.data())  # the longest: over a bucket
def test_step_before_walks_to_the_same_step_as_listing_every_step(link: float, data: st.DataObject) -> None:
    """step_before walks back over the last two steps only, crossing a bucket whose gaps are all within the
    spread in one move; it must find what listing all the steps finds: for sparse tokens, long runs over many
    buckets, a spread longer than a bucket, moments on a token, and after more tokens were added."""
    emissions = data.draw(st.one_of(st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=300),
                                    _token_runs(link)))
    moments = data.draw(st.lists(st.floats(-0.1, 2.2), min_size=1, max_size=20))
    later = set(data.draw(st.lists(st.integers(0, len(emissions) - 1), max_size=len(emissions) // 2)))
    steps = EngineSteps()
    steps.linkage = link
    for batch in ([t for i, t in enumerate(emissions) if i not in later], [emissions[i] for i in sorted(later)]):
        steps.add_request(sorted(batch), False)
        for t in [*moments, *batch[:5], *batch[-5:], *(x + link for x in batch[-3:])]:
            assert steps.step_before(t) == _step_before_from_steps(steps, t)
