"""Attribution against synthetic timelines whose true per-request GPU time is known."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering_builders import attribute, batched_timeline, exact_intervals, request
from tensorfleet.metering.attribution import Attributor, time_shares, work_spans


def test_a_lone_request_gets_all_busy_time_while_it_ran_and_idle_goes_to_nobody() -> None:
    event = request("only", admitted=1.0, first_token=1.2, chunks=((1.2, 1), (1.3, 1), (1.4, 1)), done=1.4)
    intervals = [(0.0, 1.0, 30.0), (1.0, 1.2, 150.0), (1.2, 1.4, 120.0), (1.4, 2.0, 0.0)]
    settled, _, finalised = attribute([event], intervals)
    assert settled["only"].share.gpu_ms == pytest.approx(270.0)
    assert sum(f.unattributed_ms for f in finalised) == pytest.approx(30.0)  # busy before it: nobody's


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("period", [0.1, 0.037])
def test_batched_gpu_attribution_matches_ground_truth(seed: int, period: float) -> None:
    timeline = batched_timeline(seed)
    end = timeline.steps[-1][1] + 0.5
    settled, _, finalised = attribute(timeline.events, exact_intervals(timeline.steps, 0.5, end, period))
    for key, truth in timeline.truth_ms.items():
        assert settled[key].share.gpu_ms == pytest.approx(truth, rel=1e-9), key
    measured = sum(f.busy_ms for f in finalised)
    assert sum(s.share.gpu_ms for s in settled.values()) == pytest.approx(measured, rel=1e-12)


def test_prefill_and_decode_in_one_step_are_split_by_tokens() -> None:
    # One 50 ms step: request a decodes 1 token while b processes a 999-token prompt and its first token.
    a = request("a", admitted=0.0, first_token=0.05, chunks=((0.05, 1), (0.1, 1)), done=0.1, prompt=1)
    b = request("b", admitted=0.05, first_token=0.1, chunks=((0.1, 1),), done=0.1, prompt=999)
    settled, _, _ = attribute([a, b], [(0.0, 0.05, 50.0), (0.05, 0.1, 50.0)])
    assert settled["b"].share.gpu_ms == pytest.approx(50.0 * 1000 / 1001)
    assert settled["a"].share.gpu_ms == pytest.approx(50.0 + 50.0 / 1001)


def test_warm_up_takes_its_share_and_billable_requests_are_not_charged_for_it() -> None:
    warm = request("warm", admitted=0.0, first_token=0.1, chunks=((0.1, 1),), done=0.1, prompt=99, billable=False)
    paid = request("paid", admitted=0.0, first_token=0.1, chunks=((0.1, 1),), done=0.1, prompt=99)
    settled, _, finalised = attribute([warm, paid], [(0.0, 0.1, 100.0)])
    assert settled["paid"].share.gpu_ms == pytest.approx(50.0)
    assert sum(f.excluded_ms for f in finalised) == pytest.approx(50.0)
    assert sum(f.billed_ms for f in finalised) == pytest.approx(50.0)


def test_requests_that_never_reached_the_gpu_cost_nothing() -> None:
    rejected = request("rejected", admitted=None, done=0.05, status=429)
    cached = request("cached", admitted=0.0, done=0.01, cache_hit=True, chunks=((0.01, 5),))
    assert work_spans(rejected) == []
    assert work_spans(cached) == []
    settled, _, finalised = attribute([rejected, cached], [(0.0, 0.1, 80.0)])
    assert settled["rejected"].share.gpu_ms == 0.0
    assert settled["cached"].share.gpu_ms == 0.0
    assert sum(f.unattributed_ms for f in finalised) == pytest.approx(80.0)


def test_cached_prompt_tokens_are_not_work_and_chunks_scale_to_the_engines_count() -> None:
    event = request("r", admitted=0.0, first_token=0.1, chunks=((0.2, 3), (0.3, 1)), done=0.3,
                    prompt=120, cached=100, completion=8)
    spans = work_spans(event)
    assert spans[0].tokens == 20
    assert (spans[0].start, spans[0].end) == (0.0, 0.1)
    assert [s.tokens for s in spans[1:]] == [6.0, 2.0]  # 4 forwarded tokens stand for the engine's 8
    assert (spans[1].start, spans[1].end) == (0.0, 0.2)


def test_non_streamed_request_spreads_its_work_over_its_whole_time() -> None:
    event = request("r", admitted=1.0, first_token=None, chunks=((3.0, 50),), done=3.0, prompt=50)
    spans = work_spans(event)
    assert {(s.start, s.end) for s in spans} == {(1.0, 3.0)}
    assert sum(s.tokens for s in spans) == 100


def test_a_request_reported_after_its_intervals_were_final_keeps_conservation() -> None:
    attributor = Attributor()
    attributor.add_interval(0.0, 1.0, 500.0, None, "gpm")
    attributor.add_interval(1.0, 2.0, 500.0, None, "gpm")
    early = request("early", admitted=0.0, first_token=0.5, chunks=((0.5, 1),), done=0.5)
    attributor.add_request("early", work_spans(early), True)
    first = attributor.finalise(1.0)
    late = request("late", admitted=0.2, first_token=1.5, chunks=((1.5, 1),), done=1.5)
    attributor.add_request("late", work_spans(late), True)
    second = attributor.finalise(math.inf)
    settled = {s.key: s for s in attributor.settle()}
    assert settled["early"].share.gpu_ms == pytest.approx(500.0)  # interval 0 was final before "late" came
    assert settled["late"].coverage < 1.0  # its work in interval 0 went unmeasured, and the record says so
    assert settled["late"].share.gpu_ms == pytest.approx(500.0)
    assert sum(f.busy_ms for f in first + second) == pytest.approx(1000.0)


def test_a_gap_in_sampling_bills_nothing_for_it() -> None:
    attributor = Attributor()
    attributor.add_interval(0.0, 1.0, 1000.0, None, "gpm")
    attributor.add_interval(2.0, 3.0, 1000.0, None, "gpm")  # the sampler missed [1, 2]
    event = request("r", admitted=0.0, first_token=3.0, chunks=((3.0, 1),), done=3.0)
    attributor.add_request("r", work_spans(event), True)
    attributor.finalise(math.inf)
    (settled,) = attributor.settle()
    assert settled.share.gpu_ms == pytest.approx(2000.0)
    assert settled.coverage == pytest.approx(2 / 3)


def test_timing_only_intervals_count_active_time_times_gpus() -> None:
    attributor = Attributor(gpus=2)
    attributor.add_interval(0.0, 1.0, None, None, "timing")
    event = request("r", admitted=0.25, first_token=0.75, chunks=((0.75, 1),), done=0.75)
    attributor.add_request("r", work_spans(event), True)
    attributor.finalise(math.inf)
    (settled,) = attributor.settle()
    assert settled.share.gpu_ms == pytest.approx(1000.0)  # 0.5 s active on 2 GPUs


def test_time_shares_split_overlaps_by_density() -> None:
    weights = time_shares([("a", 0.0, 1.0, 1.0), ("b", 0.5, 1.0, 3.0)])
    assert weights["a"] == pytest.approx(0.5 + 0.5 * 0.25)
    assert weights["b"] == pytest.approx(0.5 * 0.75)


# -- properties ----------------------------------------------------------------------------------
chunk_gaps = st.lists(st.tuples(st.floats(0.0, 0.3), st.integers(0, 4)), max_size=6)
request_strategy = st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 0.5), chunk_gaps, st.integers(0, 500),
                             st.booleans())
interval_strategy = st.lists(st.tuples(st.floats(0.01, 0.3), st.floats(0.0, 1.0)), min_size=1, max_size=30)


def _run(raw_requests: list, raw_intervals: list, gpus: int) -> tuple[dict, list, list]:
    intervals, t = [], 0.0
    for length, activity in raw_intervals:
        intervals.append((t, t + length, length * 1000.0 * activity * gpus))
        t += length
    events = []
    for i, (admitted, ttft, gaps, prompt, billable) in enumerate(raw_requests):
        at, chunks = admitted + ttft, []
        for gap, tokens in gaps:
            at += gap
            chunks.append((at, tokens))
        events.append(request(f"r{i}", admitted=admitted, first_token=admitted + ttft, chunks=tuple(chunks),
                              done=at, prompt=prompt, billable=billable))
    settled, _, finalised = attribute(events, intervals, gpus)
    return settled, finalised, intervals


@settings(max_examples=150, deadline=None)
@given(st.lists(request_strategy, max_size=8), interval_strategy, st.integers(1, 4))
def test_conservation_and_no_negative_shares(raw_requests: list, raw_intervals: list, gpus: int) -> None:
    settled, finalised, intervals = _run(raw_requests, raw_intervals, gpus)
    measured = sum(busy for _, _, busy in intervals)
    billed = sum(f.billed_ms for f in finalised)
    excluded = sum(f.excluded_ms for f in finalised)
    unattributed = sum(f.unattributed_ms for f in finalised)
    assert billed + excluded + unattributed == pytest.approx(measured, rel=1e-9, abs=1e-9)
    assert sum(s.share.gpu_ms for s in settled.values()) == pytest.approx(billed + excluded, rel=1e-9, abs=1e-9)
    assert all(s.share.gpu_ms >= 0 and 0 <= s.coverage <= 1 + 1e-9 for s in settled.values())
    assert sum(s.share.gpu_ms for s in settled.values() if s.billable) == pytest.approx(billed, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(request_strategy, max_size=6), interval_strategy)
def test_idle_time_is_billed_to_nobody(raw_requests: list, raw_intervals: list) -> None:
    settled, finalised, _intervals = _run(raw_requests, raw_intervals, 1)
    for item in finalised:
        if item.busy_ms == 0:
            assert item.billed_ms == item.excluded_ms == 0
    # No request gets more than the busy time of the intervals its work touched.
    for key, share in settled.items():
        assert share.share.gpu_ms <= sum(f.busy_ms for f in finalised) + 1e-9, key


@settings(max_examples=100, deadline=None)
@given(st.lists(request_strategy, min_size=1, max_size=6), interval_strategy)
def test_warm_up_before_the_first_billable_request_is_never_billed(raw_requests: list, raw_intervals: list) -> None:
    # Shift every billable request after a warm-up phase that has its own busy time.
    warm = [(a, t, g, p, False) for a, t, g, p, _ in raw_requests]
    settled_warm, finalised, _ = _run(warm, raw_intervals, 1)
    assert sum(f.billed_ms for f in finalised) == 0
    assert all(not s.billable for s in settled_warm.values())


def test_a_prompt_arriving_mid_step_is_not_billed_for_the_step_in_progress() -> None:
    # d decodes (chunks end every step); a's 2000-token prefill runs [0, 0.066]; b arrives at 0.033, mid-step,
    # and its prefill runs [0.066, 0.1]. The engine could not have started b before 0.066: d's next chunk says so.
    d = request("d", admitted=-0.05, first_token=-0.01, chunks=((-0.01, 1), (0.0, 1), (0.066, 1), (0.1, 1)),
                done=0.1, prompt=10)
    a = request("a", admitted=0.0, first_token=0.066, chunks=((0.066, 1),), done=0.066, prompt=2000)
    b = request("b", admitted=0.033, first_token=0.1, chunks=((0.1, 1),), done=0.1, prompt=1000)
    intervals = [(-0.1, 0.0, 50.0), (0.0, 0.05, 50.0), (0.05, 0.1, 50.0)]
    settled, _, _ = attribute([d, a, b], intervals)
    assert settled["a"].share.gpu_ms == pytest.approx(66.0 * 2001 / 2002, rel=1e-6)
    assert settled["b"].share.gpu_ms == pytest.approx(34.0 * 1001 / 1002, rel=1e-6)
