"""Attribution against synthetic timelines whose true per-request GPU time is known."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from metering_builders import (
    CONFIG,
    attribute,
    attribute_online,
    batched_timeline,
    engine_timeline,
    exact_intervals,
    request,
)
from tensorfleet.gateway.services import Outcome
from tensorfleet.metering import chain, records, units
from tensorfleet.metering.attribution import Attributor, time_shares, work_spans
from tensorfleet.metering.events import ColdStartEvent
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.nvml import GpuInterval
from tensorfleet.metering.writer import UsageWriter

PLACEMENTS = ["steps", "admission"]


def test_a_lone_request_gets_all_busy_time_while_it_ran_and_idle_goes_to_nobody() -> None:
    event = request("only", admitted=1.0, first_token=1.2, chunks=((1.2, 1), (1.3, 1), (1.4, 1)), done=1.4)
    intervals = [(0.0, 1.0, 30.0), (1.0, 1.2, 150.0), (1.2, 1.4, 120.0), (1.4, 2.0, 0.0)]
    settled, _, finalised = attribute([event], intervals)
    assert settled["only"].share.gpu_ms == pytest.approx(270.0)
    assert sum(f.unattributed_ms for f in finalised) == pytest.approx(30.0)  # busy before it: nobody's


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("period", [0.1, 0.037])
def test_batched_gpu_attribution_matches_ground_truth(seed: int, period: float, placement: str) -> None:
    timeline = batched_timeline(seed)
    end = timeline.steps[-1][1] + 0.5
    settled, _, finalised = attribute(timeline.events, exact_intervals(timeline.steps, 0.5, end, period),
                                      placement=placement)  # type: ignore[arg-type]
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


def _run(raw_requests: list, raw_intervals: list, gpus: int, placement: str = "steps") -> tuple[dict, list, list]:
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
    settled, _, finalised = attribute(events, intervals, gpus, placement)  # type: ignore[arg-type]
    return settled, finalised, intervals


@settings(max_examples=150, deadline=None)
@given(st.lists(request_strategy, max_size=8), interval_strategy, st.integers(1, 4), st.sampled_from(PLACEMENTS))
def test_conservation_and_no_negative_shares(raw_requests: list, raw_intervals: list, gpus: int,
                                             placement: str) -> None:
    settled, finalised, intervals = _run(raw_requests, raw_intervals, gpus, placement)
    measured = sum(busy for _, _, busy in intervals)
    billed = sum(f.billed_ms for f in finalised)
    excluded = sum(f.excluded_ms for f in finalised)
    unattributed = sum(f.unattributed_ms for f in finalised)
    assert billed + excluded + unattributed == pytest.approx(measured, rel=1e-9, abs=1e-9)
    assert sum(s.share.gpu_ms for s in settled.values()) == pytest.approx(billed + excluded, rel=1e-9, abs=1e-9)
    assert all(s.share.gpu_ms >= 0 and 0 <= s.coverage <= 1 + 1e-9 for s in settled.values())
    assert sum(s.share.gpu_ms for s in settled.values() if s.billable) == pytest.approx(billed, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(request_strategy, max_size=6), interval_strategy, st.sampled_from(PLACEMENTS))
def test_idle_time_is_billed_to_nobody(raw_requests: list, raw_intervals: list, placement: str) -> None:
    settled, finalised, _intervals = _run(raw_requests, raw_intervals, 1, placement)
    for item in finalised:
        if item.busy_ms == 0:
            assert item.billed_ms == item.excluded_ms == 0
    # No request gets more than the busy time of the intervals its work touched.
    for key, share in settled.items():
        assert share.share.gpu_ms <= sum(f.busy_ms for f in finalised) + 1e-9, key


@settings(max_examples=100, deadline=None)
@given(st.lists(request_strategy, min_size=1, max_size=6), interval_strategy, st.sampled_from(PLACEMENTS))
def test_warm_up_before_the_first_billable_request_is_never_billed(raw_requests: list, raw_intervals: list,
                                                                   placement: str) -> None:
    # Shift every billable request after a warm-up phase that has its own busy time.
    warm = [(a, t, g, p, False) for a, t, g, p, _ in raw_requests]
    settled_warm, finalised, _ = _run(warm, raw_intervals, 1, placement)
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


def _queued_behind_each_other() -> list:
    # d decodes, one step every 20 ms. a (1,500 tokens) and b (400) reach the engine during the step that ends at 0.0;
    # with 1,000 tokens per step the scheduler gives a 999 tokens in (0.0, 0.02], then a's last 501 and b's 400 in
    # (0.02, 0.04], where both first tokens come out.
    d = request("d", admitted=-0.05, first_token=-0.02, chunks=tuple((0.02 * i, 1) for i in range(-1, 4)), done=0.06,
                prompt=10)
    a = request("a", admitted=-0.01, first_token=0.04, chunks=((0.04, 1),), done=0.04, prompt=1500)
    b = request("b", admitted=-0.009, first_token=0.04, chunks=((0.04, 1),), done=0.04, prompt=400)
    return [d, a, b]


QUEUED_INTERVALS = [(-0.04, -0.02, 20.0), (-0.02, 0.0, 20.0), (0.0, 0.04, 40.0), (0.04, 0.06, 20.0)]


def test_a_prompt_queued_behind_an_earlier_one_is_billed_only_for_the_steps_that_processed_it() -> None:
    settled, attributor, _ = attribute(_queued_behind_each_other(), QUEUED_INTERVALS, step_tokens=1000)
    # step 1: a 999 of 1,000 tokens (d's decode is the last); step 2: a 501 + its first token, b 400 + its first
    # token, d 1. Spread from the admission, b would take 401/1904 of step 1 too.
    assert settled["a"].share.gpu_ms == pytest.approx(20.0 * 999 / 1000 + 20.0 * 502 / 904, rel=1e-9)
    assert settled["b"].share.gpu_ms == pytest.approx(20.0 * 401 / 904, rel=1e-9)
    assert attributor.steps is not None
    assert attributor.steps.outcomes == {"replayed": 3}


def test_the_admission_placement_still_spreads_the_prompt_from_the_step_in_progress_to_its_first_token() -> None:
    settled, attributor, _ = attribute(_queued_behind_each_other(), QUEUED_INTERVALS, placement="admission",
                                       step_tokens=1000)
    # The attribution before the step model: both prompts (and their first tokens) over (0.0, 0.04], by density.
    assert settled["a"].share.gpu_ms == pytest.approx(40.0 * 1501 / 1904, rel=1e-9)
    assert settled["b"].share.gpu_ms == pytest.approx(40.0 * 401 / 1904, rel=1e-9)
    assert attributor.steps is None
    assert attributor.learned() == {}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 600]), st.sampled_from([0.05, 0.1]))
def test_conservation_on_a_batching_engine_online(seed: int, step_tokens: int | None, period: float) -> None:
    timeline = engine_timeline(seed, requests=25)
    intervals = exact_intervals(timeline.steps, 0.0, timeline.steps[-1][1] + 0.2, period)
    settled, _, finalised = attribute_online(timeline.events, intervals, step_tokens=step_tokens)
    measured = sum(busy for _, _, busy in intervals)
    assert sum(f.billed_ms + f.unattributed_ms for f in finalised) == pytest.approx(measured, rel=1e-9)
    assert sum(s.share.gpu_ms for s in settled.values()) == pytest.approx(sum(f.billed_ms for f in finalised))
    assert all(s.share.gpu_ms >= 0 for s in settled.values())


def _errors(settled: dict, truth: dict[str, float]) -> list[float]:
    return sorted(abs(settled[key].share.gpu_ms - true) / true for key, true in truth.items())


@pytest.mark.parametrize("seed", range(4))
def test_prompts_placed_on_the_engines_steps_track_the_truth_where_spreading_them_does_not(seed: int) -> None:
    # A vLLM-like engine: FCFS queueing, chunked prefill in a 600-token budget, 0.8 ms idle between steps, tokens
    # seen 0.2-1 ms late; exact busy time every 50 ms.
    timeline = engine_timeline(seed)
    intervals = exact_intervals(timeline.steps, 0.0, timeline.steps[-1][1] + 0.5, 0.05)
    steps, attributor, _ = attribute_online(timeline.events, intervals, step_tokens=600)
    spread, _, _ = attribute_online(timeline.events, intervals, placement="admission")
    on_steps, spread_out = _errors(steps, timeline.truth_ms), _errors(spread, timeline.truth_ms)
    ninetieth = int(0.9 * len(on_steps))
    assert statistics.median(on_steps) < 0.015
    assert on_steps[ninetieth] < 0.08
    assert spread_out[ninetieth] > 2 * on_steps[ninetieth]
    assert attributor.learned()["idle_per_step"] == pytest.approx(0.0008, rel=0.05)  # the engine's idle gap


def test_the_step_budget_is_learned_on_a_longer_run() -> None:
    timeline = engine_timeline(7, requests=240)
    intervals = exact_intervals(timeline.steps, 0.0, timeline.steps[-1][1] + 0.5, 0.05)
    settled, attributor, _ = attribute_online(timeline.events, intervals)
    assert 0.95 * 600 <= attributor.learned()["budget"] <= 600
    assert statistics.median(_errors(settled, timeline.truth_ms)) < 0.015


def test_time_shares_weigh_time_by_the_share_in_which_the_gpu_computed() -> None:
    weights = time_shares([("a", 0.0, 1.0, 1.0), ("b", 1.0, 2.0, 1.0)], [(0.0, 1.0, 0.5), (1.0, 2.0, 1.0)])
    assert weights == pytest.approx({"a": 0.5, "b": 1.0})


def test_a_streamed_request_without_prompt_work_starts_in_the_step_that_emitted_its_first_token() -> None:
    # d decodes every 10 ms; r (its whole prompt cached) was admitted at 0.013 and got its first token with d's at
    # 0.04: its first token's work lies in the step from 0.03 to 0.04, not since its admission.
    d = request("d", admitted=-0.01, first_token=0.0, chunks=tuple((0.01 * i, 1) for i in range(7)), prompt=10)
    r = request("r", admitted=0.013, first_token=0.0401, chunks=((0.0401, 1), (0.0502, 1)), prompt=64, cached=64)
    settled, _, _ = attribute([d, r], [(-0.01, 0.07, 70.0)])
    assert settled["r"].share.gpu_ms == pytest.approx(70.0 * 0.02 / 0.07 / 2, rel=0.05)  # half of two 10 ms steps


def _writer_through(tmp_path: Path, share: float) -> tuple[UsageWriter, chain.Signer, int]:
    """A writer that journalled an engine timeline's requests and saw the first ``share`` of its GPU intervals;
    and how many requests there were."""
    signer = chain.Signer(chain.generate_key())
    ledger = Ledger(tmp_path / "usage.db", signer, {"namespace": "team-a", "service": "llama", "pod": "pod-1"})
    writer = UsageWriter(ledger, 1)
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
    timeline = engine_timeline(1)
    intervals = exact_intervals(timeline.steps, 0.0, timeline.steps[-1][1] + 0.5, 0.05)
    writer.cycle([(ctx, event) for event in timeline.events], [], 0.0, now=0.0)
    gpu = [GpuInterval(start, end, busy, None, 0, busy / (end - start) / 1000.0, "gpm")
           for start, end, busy in intervals][:int(share * len(intervals))]
    for i in range(0, len(gpu), 10):
        writer.cycle([], gpu[i:i + 10], gpu[i:i + 10][-1].end, now=gpu[i:i + 10][-1].end)
    return writer, signer, len(timeline.events)


def test_the_writer_journals_what_the_step_model_learned_and_a_restart_starts_from_it(tmp_path: Path) -> None:
    writer, signer, requests = _writer_through(tmp_path, 1.0)
    learned = writer.attributor.learned()
    assert learned["idle_per_step"] == pytest.approx(0.0008, rel=0.05)
    assert REGISTRY.get_sample_value("tensorfleet_metering_step_idle_seconds") == learned["idle_per_step"]
    assert (REGISTRY.get_sample_value("tensorfleet_metering_prompt_placements_total", {"outcome": "replayed"})
            or 0) >= 0.8 * requests
    again = UsageWriter(Ledger(tmp_path / "usage.db", signer), 1)
    again.restore()
    assert again.attributor.learned() == pytest.approx(learned)
    assert UsageWriter(writer.ledger, 1, placement="admission").attributor.learned() == {}


def _records(ledger: Ledger) -> int:
    return int(ledger.conn.execute("SELECT count(*) FROM records").fetchone()[0])


@pytest.mark.parametrize("earlier_boot", [False, True])
def test_requests_restored_from_the_journal_keep_the_learned_budget(tmp_path: Path, earlier_boot: bool) -> None:
    # Killed halfway: requests pending, the step model journalled. The neighbours settled before the restart
    # are gone from the step model, so a journalled request's replay must not re-learn the budget from its steps.
    writer, signer, requests = _writer_through(tmp_path, 0.5)
    learned = writer.attributor.learned()
    assert learned["budget"] == pytest.approx(600, rel=0.05)
    assert writer.attributor.pending() > 0
    if earlier_boot:  # monotonic times of another boot: settled at once with what was measured
        with writer.ledger.transaction():
            writer.ledger.set_meta("boot_id", "an-earlier-boot")
    again = UsageWriter(Ledger(tmp_path / "usage.db", signer), 1)
    assert again.restore() == writer.attributor.pending()
    if not earlier_boot:
        again.cycle([], [], math.inf, final=True)
    assert _records(again.ledger) == requests
    assert again.attributor.learned() == pytest.approx(learned, rel=0.05)
    assert again.attributor.learned()["budget"] == learned["budget"]


@pytest.mark.parametrize("journalled", ['{"budget": "many"}', '{"budget": 0}', '[1, 2]', "{not json",
                                        '{"idle_per_step": -1}', '{"linkage": NaN}'])
def test_an_unreadable_step_model_in_the_journal_is_learned_again(tmp_path: Path, journalled: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    writer, signer, requests = _writer_through(tmp_path, 0.5)
    with writer.ledger.transaction():
        writer.ledger.set_meta("step_model", journalled)
    again = UsageWriter(Ledger(tmp_path / "usage.db", signer), 1)
    again.restore()
    assert "journalled step model" in caplog.text
    assert "learning it again" in caplog.text
    assert "budget" not in again.attributor.learned()  # unbounded until learned, not a bad value
    again.cycle([], [], math.inf, final=True)
    assert _records(again.ledger) == requests  # and nothing lost


def test_a_request_submitted_again_is_billed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Twice in one cycle, again while pending, and again after its record is in the ledger: one record each.
    # 1,200 requests, so the cycle's lookup of recorded ids spans several queries.
    ledger = Ledger(tmp_path / "usage.db", chain.Signer(chain.generate_key()), {"namespace": "t", "service": "s"})
    writer = UsageWriter(ledger, 1, placement="admission")
    writer.start_timing(0.0, 0.1)
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
    events = [request(f"r{i}", admitted=0.001 * i, first_token=0.001 * i + 0.01, chunks=((0.001 * i + 0.01, 4),))
              for i in range(1200)]
    start = ColdStartEvent("pod-1", 1_700_000_000.0, (("engine", 30.0),), 30.0)  # and a pod's start: once
    writer.cycle([(ctx, start), (ctx, start)] + [(ctx, e) for e in events[:700]] + [(ctx, events[3])], [], 0.0, now=0.0)
    writer.cycle([(ctx, events[4])], [], math.inf, now=3.0, final=True)
    assert _records(ledger) == 701
    writer.cycle([(ctx, start)] + [(ctx, e) for e in events], [], math.inf, now=4.0, final=True)
    assert _records(ledger) == 1201
    assert caplog.text.count("submitted twice") == 2 + 700
    ids = [row[0] for row in ledger.conn.execute("SELECT id FROM records")]
    assert len(set(ids)) == 1201
    assert ledger.recorded([*ids[::2], "not-a-record"]) == set(ids[::2])


def collected_events(a_failed: bool) -> list:
    """a (collected: the gateway reads the engine's stream for one JSON answer) and b (streamed) decode side by side,
    one token per 50 ms step each, for 10 s; a's event built as the gateway builds it, after the engine failed it
    (relay._engine_failed) when ``a_failed``."""
    outcome = Outcome(admitted=0.0)
    for i in range(1, 200):
        outcome.tokens_at(0.05 * i + 0.0002, 1)
    if a_failed:
        outcome.failed(502, "engine_error")
    a = request("a", admitted=0.0, first_token=outcome.first_token, tenant="tenant-a", done=10.0, prompt=50,
                chunks=tuple((c.at, c.tokens) for c in outcome.chunks), completion=outcome.streamed_tokens)
    b = request("b", admitted=0.0, first_token=0.0504, chunks=tuple((0.05 * i + 0.0004, 1) for i in range(1, 200)),
                done=10.0, prompt=50, tenant="tenant-b")
    return [dataclasses.replace(a, streaming=False, status=outcome.status), b]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_request_the_engine_failed_keeps_its_gpu_time_and_its_neighbour_pays_the_same(placement: str) -> None:
    # Before, Outcome.failed dropped the failed request's token timings: the attribution saw no decode work for it
    # and billed its GPU time to the request beside it (b: 9,975 GPU-ms instead of 5,000).
    intervals = [(0.1 * i, 0.1 * (i + 1), 100.0) for i in range(100)]  # 10 s, fully busy
    healthy, _, _ = attribute(collected_events(False), intervals, placement=placement)
    failed, _, _ = attribute(collected_events(True), intervals, placement=placement)
    assert failed["b"].share.gpu_ms == pytest.approx(healthy["b"].share.gpu_ms, rel=1e-6)
    assert failed["a"].share.gpu_ms == pytest.approx(healthy["a"].share.gpu_ms, rel=1e-6)
    assert collected_events(True)[0].completion_tokens == 0  # what it generated is not delivered: not billed


def test_requests_without_gpu_work_are_settled_in_the_cycle_that_takes_them(tmp_path: Path) -> None:
    # Before, a request with no work spans (a cache hit, a 429, an engine error with no counted prompt) was placed
    # only when the sink closed: it stayed pending, in memory and in the journal, and its record (a cache hit's
    # carries token prices) was not written while the gateway ran.
    ledger = Ledger(tmp_path / "usage.db", chain.Signer(chain.generate_key()), {"namespace": "n", "service": "s"})
    writer = UsageWriter(ledger, 1)
    writer.measurement = "gpm"
    ctx = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
    served = request("served", admitted=1.0, first_token=1.05, chunks=((1.05, 1), (1.1, 1)), done=1.1)
    hit = request("hit", admitted=None, done=1.02, cache_hit=True, prompt=100, completion=20)
    refused = request("refused", admitted=None, done=1.01, status=429, prompt=0, completion=0)
    writer.cycle([(ctx, served), (ctx, hit), (ctx, refused)], [], 0.0, now=1.2)  # nothing final yet
    ids = {r[0]: r[1] for r in ledger.conn.execute("SELECT json_extract(body, '$.requestId'), "
                                                   "json_extract(body, '$.gpuMs') FROM records")}
    assert ids == {"hit": 0.0, "refused": 0.0}
    writer.cycle([], [GpuInterval(1.0, 1.2, 100.0, None, 0, 0.5, "gpm")], 1.2, now=1.2)
    assert ledger.conn.execute("SELECT count(*) FROM pending").fetchone()[0] == 0
    assert writer.attributor.pending() == 0
