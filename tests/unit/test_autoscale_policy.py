"""The autoscaling policy: examples of each rule, then properties over generated loads and histories."""

from __future__ import annotations

import dataclasses
import datetime
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import inference_service
from tensorfleet.api.types import InferenceService
from tensorfleet.autoscale import policy, signals
from tensorfleet.autoscale import status as records
from tensorfleet.autoscale.policy import Decision, History, Observation, PolicyConfig

CONFIG = PolicyConfig(min_replicas=1, max_replicas=20, target_kv_cache_usage=0.8, target_queue_depth=4.0,
                      target_gpu_utilization=0.85)


def obs(time: float, spec: int, ready: int | None = None, *, kv: float | None = 0.5, queue: float | None = 0.0,
        concurrency: float | None = None, util: float | None = 1.0, startup: float | None = 30.0,
        **counts: int) -> Observation:
    ready = spec if ready is None else ready
    return Observation(time=time, spec_replicas=spec, ready=ready, scraped=ready, kv_cache_usage=kv, queue_depth=queue,
                       concurrency=concurrency, gpu_utilization=util, startup_seconds=startup, **counts)


def run(config: PolicyConfig, observations: list[Observation], history: History | None = None) -> list[Decision]:
    history = history or History()
    decisions = []
    for observation in observations:
        decision = policy.decide(config, history, observation)
        history = decision.history
        decisions.append(decision)
    return decisions


def steady(spec: int, seconds: float, start: float = 0.0, step: float = 2.0, **signal: float) -> list[Observation]:
    return [obs(start + i * step, spec, **signal) for i in range(int(seconds / step))]


# ---- signals to replicas ------------------------------------------------------------------------------


def test_each_signal_asks_for_current_times_value_over_target() -> None:
    config = dataclasses.replace(CONFIG, target_in_flight=10.0)
    asked = policy.replicas_asked(config, obs(0, 4, kv=0.9, queue=8.0, concurrency=50.0))
    assert asked == pytest.approx({"kvCacheUsage": 4 * 0.9 / 0.8, "queueDepth": 2.0, "concurrency": 5.0})


def test_kv_cache_usage_scales_up_at_once() -> None:
    decision = run(CONFIG, [obs(0, 2, kv=1.0)])[-1]
    assert (decision.replicas, decision.reason) == (3, "ScaledUp")  # ceil(2 x 1.0 / 0.8)
    assert "kvCacheUsage asks for 2.5 replicas" in decision.message


def test_queue_scale_up_is_limited_to_the_rate_times_ready_replicas() -> None:
    decision = run(CONFIG, [obs(0, 2, queue=40.0)])[-1]
    assert decision.replicas == 4  # asks for 10, at most 2 x 2 ready
    assert "limited to 2x the 2 ready" in decision.message


def test_pending_and_unschedulable_pods_are_not_capacity() -> None:
    # 6 asked for, 2 ready, 4 not running: the rate limit counts the ready ones, so nothing more is added.
    decision = run(CONFIG, [obs(0, 6, ready=2, queue=40.0, pending=2, unschedulable=2)])[-1]
    assert (decision.replicas, decision.reason) == (6, "ScaleUpLimited")
    assert "at most 2x the 2 ready may be asked for (spec.autoscaling.maxScaleUpRate) and 6 already are" in (
        decision.message)


def test_a_stored_rate_of_1_says_it_blocks_every_scale_up() -> None:
    """The CRD refuses maxScaleUpRate 1 now; an object stored before must not read as load within tolerance."""
    config = dataclasses.replace(CONFIG, max_scale_up_rate=1.0)
    decision = run(config, steady(2, 60, kv=1.0, queue=400.0))[-1]
    assert (decision.replicas, decision.reason) == (2, "ScaleUpLimited")
    assert "queueDepth asks for 100.0 replicas" in decision.message


def test_an_ask_above_max_replicas_says_so() -> None:
    decision = run(CONFIG, [obs(0, 20, kv=1.0)])[-1]
    assert (decision.replicas, decision.reason) == (20, "ScaleUpLimited")
    assert decision.message.endswith("but spec.autoscaling.maxReplicas is 20")


def test_warming_pods_are_not_averaged_as_idle() -> None:
    targets = [signals.PodTarget("a", "ready", "http://a"), signals.PodTarget("b", "ready", "http://b"),
               signals.PodTarget("c", "warming", "http://c"), signals.PodTarget("d", "pending")]
    busy = signals.PodMetrics(kv_cache_usage=0.9, in_flight=10, gateway_queue=2, ready=True)
    observation = signals.observe(0.0, 4, targets, {"a": busy, "b": busy})
    assert (observation.ready, observation.warming, observation.pending) == (2, 1, 1)
    assert observation.kv_cache_usage == pytest.approx(0.9)  # not diluted to 0.45 by the starting pod
    decisions = run(CONFIG, [dataclasses.replace(observation, time=t) for t in range(0, 600, 2)])
    # The two ready replicas carry 2.25 replicas' worth: 3 are kept (idle-looking warming pods would say 2).
    assert min(d.replicas for d in decisions) == 3


def test_gpu_utilization_gates_scale_up() -> None:
    decision = run(CONFIG, [obs(0, 2, kv=1.0, util=0.3)])[-1]
    assert (decision.replicas, decision.reason) == (2, "GPUsNotBusy")
    assert "GPU utilization is 30%" in decision.message


def test_pegged_gpu_utilization_alone_adds_nothing_and_does_not_hold_replicas() -> None:
    decisions = run(CONFIG, steady(6, 400, kv=0.2, util=1.0))  # batching GPUs at 100%, little load
    assert all(d.replicas <= 6 for d in decisions)
    assert decisions[-1].replicas < 6  # utilization does not forbid scaling down


def test_gpu_gate_is_open_without_a_gpu_metric() -> None:
    assert run(CONFIG, [obs(0, 2, kv=1.0, util=None)])[-1].replicas == 3


def test_load_within_the_tolerance_band_changes_nothing() -> None:
    decision = run(CONFIG, [obs(0, 10, kv=0.85)])[-1]  # asks for 10.6 replicas, within 10% of 10
    assert (decision.replicas, decision.reason) == (10, "Stable")


# ---- scale-down ------------------------------------------------------------------------------------------


def test_no_scale_down_before_a_whole_window_was_observed() -> None:
    windows = policy.derive_windows(CONFIG, 30.0)
    decisions = run(CONFIG, steady(8, windows.scale_down_seconds + 10, kv=0.1))
    first_down = next(i for i, d in enumerate(decisions) if d.reason == "ScaledDown")
    assert decisions[first_down].history.observations[-1].time >= windows.scale_down_seconds
    assert decisions[first_down].replicas == 4  # asks for 1, but at most halves


def test_scale_down_waits_for_the_stable_window_after_each_change() -> None:
    history = run(CONFIG, steady(8, 200, kv=0.1))[-1].history
    after = run(CONFIG, steady(4, 100, start=200, kv=0.2), history)
    changes = [d for d in after if d.changed]
    stable = policy.derive_windows(CONFIG, 30.0).stable_seconds
    assert changes
    assert changes[0].history.observations[-1].time - 200 >= stable


def test_the_scale_down_window_remembers_the_largest_ask() -> None:
    decisions = run(CONFIG, steady(6, 200, kv=0.75))  # asks for 5.6: holds 6
    assert {d.replicas for d in decisions} == {6}
    quiet = run(CONFIG, steady(6, 240, start=200, kv=0.2), decisions[-1].history)
    window = policy.derive_windows(CONFIG, 30.0).scale_down_seconds
    first = next(d for d in quiet if d.changed)
    assert first.history.observations[-1].time - 200 >= window - 2  # the last high ask left the window first
    assert all(d.replicas == 6 for d in quiet[: int((window - 2) / 2)])


def test_panic_blocks_scale_down_for_a_stable_window() -> None:
    burst = [obs(t, 4, queue=100.0) for t in (294, 296, 298)]
    decisions = run(CONFIG, [*steady(4, 294, kv=0.1), *burst])
    assert decisions[-1].panic
    assert decisions[-1].reason == "ScaledUp"
    later = run(CONFIG, steady(8, 50, start=300, kv=0.1), decisions[-1].history)
    assert all(d.panic and d.replicas >= 8 for d in later)  # idle now, but a burst was seen: nothing removed


def backlog(spec: int, queue: float, fall: float, seconds: float = 20.0, **signal: float) -> list[Observation]:
    """A queue falling by ``fall`` requests a second on ``spec`` ready replicas with full KV caches."""
    return [obs(t, spec, kv=1.0, queue=max(0.0, queue - fall * t), **signal) for t in range(0, int(seconds), 2)]


def test_a_backlog_the_replicas_drain_within_a_startup_asks_for_no_more_of_them() -> None:
    """A falling queue of 200 (50 replicas' worth) that 8 replicas empty in ~10 s, within the 30 s
    startup: a replica ordered now would arrive after it is gone, and the full KV caches are the same backlog."""
    decisions = run(CONFIG, backlog(8, 300.0, 10.0, seconds=24))
    assert [d.replicas for d in decisions[1:]] == [8] * (len(decisions) - 1)  # the first sample shows no trend
    assert decisions[-1].reason == "Stable"
    assert "a backlog of 80 queued requests is falling and empties in about 8s" in decisions[-1].message
    after = run(CONFIG, steady(8, 30, start=24, kv=0.3), decisions[-1].history)
    assert all(d.replicas == 8 for d in after)  # the saturated samples of the drain ask for no more either


def test_a_backlog_falling_too_slowly_or_rising_still_scales_up() -> None:
    slow = run(CONFIG, backlog(8, 200.0, 1.0))[-1]  # 180 left at 1 a second: 180 s, not 30
    rising = run(CONFIG, backlog(8, 200.0, -5.0))[-1]
    assert (slow.reason, rising.reason) == ("ScaledUp", "ScaledUp")


# ---- bounds, missing data ------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "replicas", "reason"), [(25, 20, "AboveMaximum"), (0, 1, "BelowMinimum")])
def test_bounds_win_even_without_metrics(spec: int, replicas: int, reason: str) -> None:
    decision = run(CONFIG, [obs(0, spec, ready=0)])[-1]
    assert (decision.replicas, decision.reason) == (replicas, reason)
    assert "spec.autoscaling" in decision.message


def test_no_metrics_holds() -> None:
    observation = dataclasses.replace(obs(0, 3, kv=None, queue=None), scraped=0)
    decision = run(CONFIG, [observation])[-1]
    assert (decision.replicas, decision.reason) == (3, "NoMetrics")


def blind(spec: int, seconds: float, start: float, **fields: int) -> list[Observation]:
    """Ticks without metrics: no gateway answered (``scraped=0``) or none was ready (``ready=0``)."""
    return [dataclasses.replace(obs(start + i * 2.0, spec, kv=None, queue=None, util=None), **fields)
            for i in range(int(seconds / 2.0))]


@pytest.mark.parametrize("fields", [{"scraped": 0}, {"ready": 0, "scraped": 0}], ids=["no metrics", "none ready"])
def test_one_sample_after_an_outage_removes_nothing(fields: dict[str, int]) -> None:
    """Windows (startup 30 s): scale-down 120 s. 10 minutes at 7.5 of 8 replicas' load, 130 s blind, then one dip:
    the scale-down window holds one real sample, which is no reason to halve the fleet."""
    busy = steady(8, 600, kv=0.75)
    assert all(d.replicas == 8 for d in run(CONFIG, busy))
    last = run(CONFIG, [*busy, *blind(8, 130, 600, **fields), obs(730, 8, kv=0.1)])[-1]
    assert (last.replicas, last.reason) == (8, "Stable"), last.message


def test_a_restart_during_a_metrics_outage_removes_nothing_on_the_first_sample() -> None:
    last = run(CONFIG, [*blind(8, 130, 0, scraped=0), obs(130, 8, kv=0.1)])[-1]
    assert last.replicas == 8, last.message


def test_scale_down_resumes_a_window_after_an_outage() -> None:
    history = run(CONFIG, [*steady(8, 600, kv=0.75), *blind(8, 130, 600, scraped=0)])[-1].history
    window = policy.derive_windows(CONFIG, 30.0).scale_down_seconds
    quiet = run(CONFIG, steady(8, 200, start=730, kv=0.1), history)
    first = next(d for d in quiet if d.changed)
    assert (first.replicas, first.reason) == (4, "ScaledDown")
    assert first.history.observations[-1].time - 728 >= window  # the last blind tick left the window first


def test_windows_follow_the_measured_startup_time() -> None:
    def windows(config: PolicyConfig, startup: float | None) -> tuple[float | bool, ...]:
        return dataclasses.astuple(policy.derive_windows(config, startup))

    assert windows(CONFIG, 30.0) == (30.0, True, 6.0, 60.0, 120.0)
    assert windows(CONFIG, 120.0) == (120.0, True, 12.0, 60.0, 120.0)
    assert windows(CONFIG, 600.0) == (600.0, True, 60.0, 300.0, 600.0)
    assert windows(CONFIG, None)[:2] == (60.0, False)
    explicit = dataclasses.replace(CONFIG, scale_down_stabilization_seconds=5.0, panic_window_seconds=1.0)
    assert windows(explicit, 120.0)[2:] == (1.0, 5.0, 5.0)


def test_startup_time_is_remembered_when_pods_stop_reporting_it() -> None:
    decisions = run(CONFIG, [obs(0, 2, startup=300.0), obs(2, 2, startup=None)])
    assert decisions[-1].windows.startup_seconds == 300.0


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("garbage", [
    {"queue": INF}, {"queue": NAN}, {"kv": INF}, {"concurrency": INF}, {"queue": -INF, "kv": NAN, "util": NAN},
])
def test_a_signal_that_is_no_finite_number_is_missing(garbage: dict[str, float]) -> None:
    config = dataclasses.replace(CONFIG, target_in_flight=10.0)
    signal = {"kv": 0.4, "queue": 8.0, "concurrency": 20.0, **garbage}
    asked = policy.replicas_asked(config, obs(0, 4, **signal))
    fields = {"kvCacheUsage": "kv", "queueDepth": "queue", "concurrency": "concurrency"}
    assert asked == pytest.approx({name: 2.0 for name, field in fields.items() if field not in garbage})
    decisions = run(config, steady(4, 40, **signal))
    assert {d.reason for d in decisions} == {"Stable"}  # 2 of 4 asked for: under the tolerance, no history yet


def test_with_only_garbage_signals_the_policy_holds_and_bounds_still_win() -> None:
    held = run(CONFIG, steady(3, 20, kv=INF, queue=INF))[-1]
    assert (held.replicas, held.reason) == (3, "NoSignals")
    raised = run(dataclasses.replace(CONFIG, min_replicas=5), [obs(0, 3, kv=NAN, queue=INF)])[-1]
    assert (raised.replicas, raised.reason) == (5, "BelowMinimum")


def test_a_huge_finite_signal_asks_for_max_replicas_without_overflow() -> None:
    decisions = run(CONFIG, steady(4, 20, queue=1.7e308, kv=None))  # averaging these over a window overflows
    assert decisions[0].signals[0].stable == policy.MOST_REPLICAS
    assert (decisions[0].replicas, decisions[0].reason) == (8, "ScaledUp")  # 2x the 4 ready


@pytest.mark.parametrize(("ask", "replicas"), [(INF, policy.MOST_REPLICAS), (1e300, policy.MOST_REPLICAS),
                                               (NAN, 0), (-INF, 0), (2.5, 3)])
def test_whole_replicas_for_any_ask(ask: float, replicas: int) -> None:
    assert policy._ceil(ask) == replicas


def test_a_startup_time_that_is_no_finite_number_is_not_a_measurement() -> None:
    assert policy.derive_windows(CONFIG, INF) == policy.derive_windows(CONFIG, None)
    decisions = run(CONFIG, [obs(0, 2, startup=300.0), obs(2, 2, startup=INF), obs(4, 2, startup=NAN)])
    assert [d.windows.startup_seconds for d in decisions] == [300.0, 300.0, 300.0]


def test_garbage_signals_never_break_the_status_record() -> None:
    observation = obs(0, 2, kv=1.0, queue=INF, util=INF, startup=INF)
    decision = run(CONFIG, [observation])[-1]
    assert (decision.replicas, decision.reason) == (3, "ScaledUp")  # on kvCacheUsage, the finite signal
    record = records.decision_status(decision, None, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    assert (record["startupSeconds"], record["startupMeasured"]) == (60, False)
    assert "gpuUtilizationPercent" not in record
    assert [s["name"] for s in record["signals"]] == ["kvCacheUsage"]


def test_config_from_the_crd_section() -> None:
    body = inference_service(autoscaling={"mode": "tensorfleet", "minReplicas": 2, "maxReplicas": 9,
                                          "targetInFlight": 12, "panicWindowSeconds": 5}, replicas=None)
    config = PolicyConfig.from_spec(InferenceService.from_body(body).spec.autoscaling)
    assert (config.min_replicas, config.max_replicas, config.target_in_flight) == (2, 9, 12.0)
    assert (config.target_kv_cache_usage, config.target_gpu_utilization) == (0.8, 0.85)  # CRD defaults
    assert (config.panic_window_seconds, config.scale_down_stabilization_seconds) == (5.0, None)


# ---- properties ------------------------------------------------------------------------------------------

bounds = st.tuples(st.integers(1, 30), st.integers(0, 30)).map(lambda t: (t[0], t[0] + t[1]))
ratios = st.floats(0.0, 1.0)


@st.composite
def configs(draw: st.DrawFn) -> PolicyConfig:
    low, high = draw(bounds)
    return PolicyConfig(
        min_replicas=low, max_replicas=high, target_queue_depth=draw(st.sampled_from([1.0, 4.0, 16.0])),
        target_in_flight=draw(st.sampled_from([None, 8.0, 32.0])),
        target_kv_cache_usage=draw(st.sampled_from([None, 0.6, 0.8])),
        target_gpu_utilization=draw(st.sampled_from([None, 0.85])),
        scale_down_stabilization_seconds=draw(st.sampled_from([None, 0.0, 10.0])),
        panic_window_seconds=draw(st.sampled_from([None, 2.0])),
        max_scale_up_rate=draw(st.sampled_from([1.0, 2.0, 10.0])))


@st.composite
def observation_lists(draw: st.DrawFn) -> list[Observation]:
    count = draw(st.integers(1, 40))
    out, spec, time = [], draw(st.integers(0, 60)), 0.0
    for _ in range(count):
        time += draw(st.sampled_from([0.5, 2.0, 15.0]))
        ready = draw(st.integers(0, max(spec, 1)))
        out.append(Observation(
            time=time, spec_replicas=spec, ready=ready, scraped=draw(st.integers(0, ready)),
            queue_depth=draw(st.none() | st.floats(0, 500)), concurrency=draw(st.none() | st.floats(0, 2000)),
            kv_cache_usage=draw(st.none() | ratios), gpu_utilization=draw(st.none() | ratios),
            startup_seconds=draw(st.none() | st.floats(1, 900))))
        spec = draw(st.integers(0, 60))
    return out


@settings(max_examples=100, deadline=None)
@given(configs(), observation_lists())
def test_never_outside_min_and_max(config: PolicyConfig, observations: list[Observation]) -> None:
    for decision in run(config, observations):
        assert config.min_replicas <= decision.replicas <= config.max_replicas


@settings(max_examples=100, deadline=None)
@given(configs(), observation_lists(), st.floats(1.0, 20.0))
def test_monotone_in_the_load(config: PolicyConfig, observations: list[Observation], factor: float) -> None:
    """More load (every signal at least as high) never asks for fewer replicas, from any history."""
    *before, last = observations
    history = run(config, before)[-1].history if before else History()
    more = dataclasses.replace(
        last, queue_depth=None if last.queue_depth is None else last.queue_depth * factor,
        concurrency=None if last.concurrency is None else last.concurrency * factor,
        kv_cache_usage=None if last.kv_cache_usage is None else min(1.0, last.kv_cache_usage * factor),
        gpu_utilization=None if last.gpu_utilization is None else min(1.0, last.gpu_utilization * factor))
    assert policy.decide(config, history, more).replicas >= policy.decide(config, history, last).replicas


@settings(max_examples=30, deadline=None)
@given(st.floats(0.3, 25.0), st.integers(1, 30), st.sampled_from([0.6, 0.8]), st.sampled_from([None, 30.0, 300.0]))
def test_no_oscillation_under_constant_load(demand: float, start: int, target: float, startup: float | None) -> None:
    """A constant load (``demand`` replicas' worth, spread over whatever is ready) converges without
    ever reversing direction, and then holds."""
    config = PolicyConfig(min_replicas=1, max_replicas=40, target_kv_cache_usage=target)
    windows = policy.derive_windows(config, startup)
    history, replicas, path = History(), start, []
    for step in range(int((windows.scale_down_seconds + 6 * windows.stable_seconds) / 2) + 50):
        usage = min(1.0, demand * target / replicas)
        decision = policy.decide(config, history, obs(step * 2.0, replicas, kv=usage, util=1.0, startup=startup))
        history, replicas = decision.history, decision.replicas
        path.append(replicas)
    moves = [b - a for a, b in itertools.pairwise(path) if b != a]
    assert all(m > 0 for m in moves) or all(m < 0 for m in moves), path
    assert len(set(path[-len(path) // 4:])) == 1  # settled
    assert path[-1] * (1 + config.tolerance) >= demand - 1e-9  # and not below what the load needs
