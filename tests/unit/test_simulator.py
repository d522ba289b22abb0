"""The trace-replay simulator: trace input, replica physics, the three controllers and the command."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import re

import pytest
from click.testing import CliRunner

from tensorfleet.autoscale import policy
from tensorfleet.autoscale.simulator import cluster, controllers, model, runs, trace
from tensorfleet.cli import main

A10G = model.PROFILES["a10g-llama3-8b"]


def steady_trace(rate: float, seconds: float, context: int = 1000, generated: int = 200, seed: int = 7) -> trace.Trace:
    """Poisson arrivals at ``rate`` per second (deterministic for a seed)."""
    rng, times, now = random.Random(seed), [], 0.0
    while now < seconds:
        now += rng.expovariate(rate)
        times.append(now)
    return trace.Trace(tuple(t - times[0] for t in times), (context,) * len(times), (generated,) * len(times))


# ---- traces --------------------------------------------------------------------------------------------


def test_trace_reads_the_azure_format_sorted_and_rebased() -> None:
    parsed = trace.parse_trace([
        "TIMESTAMP,ContextTokens,GeneratedTokens\n",
        "2023-11-16 18:15:50.9951690,396,109\n",
        "2023-11-16 18:15:46.6805900,374,44\n",
    ])
    assert parsed.arrivals == (0.0, pytest.approx(4.314579))
    assert (parsed.context_tokens, parsed.generated_tokens) == ((374, 396), (44, 109))
    seconds = trace.parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens\n", "10.5,1,1\n", "12,2,2\n"])
    assert seconds.arrivals == (0.0, 1.5)


def test_date_times_keep_their_offset_with_or_without_a_fraction() -> None:
    """As datetime.isoformat() writes them: the fraction only when the microsecond is not 0. Cutting the fraction
    at 6 characters dropped '+01:00' from the second row: the requests came out an hour and 1.5 s apart."""
    parsed = trace.parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens\n", "2023-11-16T18:00:00+01:00,1,1\n",
                                "2023-11-16T18:00:01.500000+01:00,1,1\n", "2023-11-16T17:00:02.5Z,1,1\n",
                                "2023-11-16T18:00:03.12345678+01:00,1,1\n"])
    assert parsed.arrivals == pytest.approx((0.0, 1.5, 2.5, 3.123456))


def test_a_byte_order_mark_before_the_header_is_not_part_of_the_first_column() -> None:
    """Excel's 'CSV UTF-8' writes one: the trace was refused as missing its TIMESTAMP column."""
    parsed = trace.parse_trace(["\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\n", "0,1,1\n", "2,1,1\n"])
    assert parsed.arrivals == (0.0, 2.0)


@pytest.mark.parametrize(("lines", "message"), [
    (["TIMESTAMP,ContextTokens\n", "1,2\n"], "missing column(s) GeneratedTokens"),
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n", "1,2,3\n", "2,lots,3\n"],
     "t.csv:3: column ContextTokens: 'lots' is not a whole number"),
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n", "yesterday,2,3\n"], "t.csv:2: column TIMESTAMP"),
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n", "0,1,1\n", "\n", "1,1,1\n", "2,x,1\n"],
     "t.csv:5: column ContextTokens: 'x'"),  # the blank line 3 is skipped, and still counted
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n", '0,1,"1\n', '"\n', "1,x,1\n"], "t.csv:4: column ContextTokens"),
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n", "1,2,0\n"], "column GeneratedTokens: 0 is outside [1,"),
    (["TIMESTAMP,ContextTokens,GeneratedTokens\n"], "the trace has no requests"),
])
def test_bad_traces_name_the_line_and_column(lines: list[str], message: str) -> None:
    with pytest.raises(trace.TraceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        trace.parse_trace(lines, "t.csv")


@pytest.mark.parametrize(("rows", "message"), [
    (["0,2,3\n", "nan,2,3\n"], "t.csv:3: column TIMESTAMP: 'nan' is not a finite number"),
    (["0,2,3\n", "-inf,2,3\n"], "t.csv:3: column TIMESTAMP: '-inf' is not a finite number"),
    (["0,2,3\n", "1e12,2,3\n"], "t.csv:3: column TIMESTAMP: '1e12' makes the trace span 11574074.1 days "
                                  "(from line 2); at most 31"),
    (["2023-11-16 18:15:46,2,3\n", "2023-12-18 18:15:46,2,3\n"], "t.csv:3: column TIMESTAMP: "
     "'2023-12-18 18:15:46' makes the trace span 32.0 days (from line 2); at most 31"),
    (["0,2,3\n", "2023-11-16 18:15:46.6805900,2,3\n"], "t.csv:3: column TIMESTAMP: '2023-11-16 18:15:46.6805900' "
     "is a date-time, but line 2 is seconds: use one format"),
])
def test_traces_with_no_sensible_span_are_refused(rows: list[str], message: str) -> None:
    """A NaN sorted anywhere and gave 'infs' TTFTs with exit 0; inf, 1e12 or seconds mixed with dates made a span
    simulated tick by tick for ever, one timeline sample per simulated second."""
    with pytest.raises(trace.TraceError, match=re.escape(message)):
        trace.parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens\n", *rows], "t.csv")


@pytest.mark.parametrize("field", ["decode_step_seconds_per_sequence", "startup_seconds", "decode_step_seconds",
                                   "prefill_tokens_per_second"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_replica_model_numbers_must_be_finite(field: str, value: str) -> None:
    """NaN passed `x < 0` and inf passed both checks: the table showed 'infs' TTFTs with exit 0."""
    with pytest.raises(ValueError, match=re.escape(f"--set {field}='{value}': expected a finite number")):
        A10G.with_overrides({field: value})
    with pytest.raises(ValueError, match=f"replica model {field} must be a finite number"):
        dataclasses.replace(A10G, **{field: float(value)})


def test_replica_model_overrides_are_checked() -> None:
    assert A10G.with_overrides({"max-batch": "64", "startup_seconds": "30"}).max_batch == 64
    with pytest.raises(ValueError, match="not a replica model field"):
        A10G.with_overrides({"speed": "1"})
    with pytest.raises(ValueError, match="expected a whole number"):
        A10G.with_overrides({"max_batch": "many"})
    with pytest.raises(ValueError, match="prefill_tokens_per_second must be a finite number greater than 0"):
        A10G.with_overrides({"prefill_tokens_per_second": "0"})


# ---- replica physics -----------------------------------------------------------------------------------


def test_one_request_on_an_idle_replica_takes_prefill_then_one_step_per_token() -> None:
    one = trace.Trace((0.0,), (1950,), (101,))
    log = cluster.RequestLog(1)
    sim = cluster.Cluster(one, A10G, log, tick=0.01)
    sim.scale_to(1, startup=0.0)
    sim.run_until(10.0)
    prefill = 1950 * A10G.step_seconds(0, 2048) / 2048  # at the rate of full mixed steps
    assert log.admit[0] == 0.0
    assert log.first[0] == pytest.approx(prefill, abs=0.011)
    assert log.finish[0] - log.first[0] == pytest.approx(100 * A10G.step_seconds(1), rel=0.02)


def test_more_load_than_capacity_builds_a_queue_that_more_replicas_absorb() -> None:
    load = steady_trace(rate=4.0, seconds=120)
    waits = {}
    for replicas in (1, 4):
        log = cluster.RequestLog(len(load))
        sim = cluster.Cluster(load, A10G, log)
        sim.scale_to(replicas, startup=0.0)
        sim.run_until(400.0)
        waits[replicas] = max(a - t for a, t in zip(log.admit, load.arrivals, strict=True))
    assert waits[1] > 30.0  # one replica serves ~1.6 requests/s of these
    assert waits[4] < 1.0


def test_a_request_too_long_for_the_kv_cache_is_rejected_not_queued_forever() -> None:
    log = cluster.RequestLog(2)
    sim = cluster.Cluster(trace.Trace((0.0, 0.0), (40_000, 100), (10, 10)), A10G, log)
    sim.scale_to(1, startup=0.0)
    sim.run_until(5.0)
    assert log.rejects == [0]
    assert not math.isnan(log.finish[1])


def test_gpu_utilization_is_busy_time_so_it_pins_with_any_batch() -> None:
    sim = cluster.Cluster(steady_trace(rate=0.5, seconds=60), A10G, cluster.RequestLog(100))
    sim.scale_to(2, startup=0.0)
    sim.run_until(30.0)
    _, metrics = sim.pods(30.0)
    utilization = sorted(m.gpu_utilization or 0.0 for m in metrics.values())
    assert utilization[-1] > 0.9  # a quarter of its batch in use, the GPU looks full
    assert all((m.kv_cache_usage or 0.0) < 0.3 for m in metrics.values())


def test_removed_replicas_drain_and_are_billed_until_empty() -> None:
    sim = cluster.Cluster(steady_trace(rate=2.0, seconds=10), A10G, cluster.RequestLog(100))
    sim.scale_to(3, startup=0.0)
    sim.run_until(5.0)
    sim.scale_to(1, startup=0.0)
    assert len(sim.replicas) == 3
    assert len(sim.active()) == 1
    sim.run_until(200.0)
    assert len(sim.replicas) == 1
    sim.scale_to(2, startup=60.0)
    targets, _ = sim.pods(1.0)
    assert sorted(t.phase for t in targets) == ["ready", "warming"]


# ---- controllers -------------------------------------------------------------------------------------


def test_tensorfleet_controller_runs_the_operators_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = policy.decide

    def spy(config: policy.PolicyConfig, history: policy.History, observation: policy.Observation) -> policy.Decision:
        calls.append(observation)
        return real(config, history, observation)

    monkeypatch.setattr(policy, "decide", spy)
    load = steady_trace(rate=3.0, seconds=60)
    runs.replay(load, A10G, controllers.TensorfleetController(policy.PolicyConfig(max_replicas=8,
                                                                                   target_kv_cache_usage=0.8)), 2)
    assert len(calls) >= 30
    assert all(o.ready >= 1 and o.kv_cache_usage is not None for o in calls)


def test_replay_refuses_an_interval_shorter_than_the_tick() -> None:
    """At most one decision per step: interval 0.5 at tick 1 decided every 1 s and divided a tick's busy time
    by 0.5 s."""
    controller = controllers.TensorfleetController(policy.PolicyConfig(max_replicas=4), interval=0.5)
    with pytest.raises(ValueError, match=re.escape("interval 0.5 s is shorter than the tick 1 s")):
        runs.replay(steady_trace(rate=1.0, seconds=10), A10G, controller, 1, tick=1.0)


@pytest.mark.parametrize(("rate", "seed"), [(2.0, 3), (4.0, 1), (6.0, 2)])
def test_constant_load_settles_and_stays(rate: float, seed: int) -> None:
    """Closed loop, Poisson arrivals at a constant rate, from an over-provisioned start: the replicas find
    their level within ten minutes (at most one scale-down the policy learns to undo) and then hold."""
    load = steady_trace(rate=rate, seconds=1800, seed=seed)
    fast = dataclasses.replace(A10G, startup_seconds=30.0)
    ours = controllers.TensorfleetController(policy.PolicyConfig(max_replicas=20, target_kv_cache_usage=0.8))
    result = runs.replay(load, fast, ours, initial_replicas=8)
    ups = [e for e in result.events if e.after > e.before]
    assert len(ups) <= 2, result.events
    assert all(e.time < 600 for e in result.events), result.events
    tail = {s.billed for s in result.timeline if 700 < s.time < 1800}
    assert len(tail) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_backlog_queued_while_replicas_warm_up_is_not_read_as_lasting_demand(seed: int) -> None:
    """A load step (1.5 -> 5 requests/s of the trace's mean request, 120 s startup) queues a backlog of
    hundreds of requests while the first new replicas start. Read as demand (queue / targetQueueDepth),
    it doubled the replicas again once the replicas already ordered were ready and emptying it: 2 -> 16
    for a load that settles at 5. The backlog asks only for what the replicas there cannot drain in time."""
    calm, busy = steady_trace(1.5, 300, 1155, 211, seed), steady_trace(5.0, 1200, 1155, 211, seed + 10)
    load = trace.Trace((*calm.arrivals, *(300 + t for t in busy.arrivals)), (1155,) * (len(calm) + len(busy)),
                       (211,) * (len(calm) + len(busy)))
    slow = dataclasses.replace(A10G, startup_seconds=120.0)
    ours = controllers.TensorfleetController(policy.PolicyConfig(max_replicas=40, target_kv_cache_usage=0.8))
    result = runs.replay(load, slow, ours, initial_replicas=2)
    settled, peak = result.events[-1].after, max(e.after for e in result.events)
    assert peak <= 2 * settled, result.events


def test_hpa_on_utilization_runs_away_while_tensorfleet_follows_the_load() -> None:
    load = steady_trace(rate=3.0, seconds=600)
    fast = dataclasses.replace(A10G, startup_seconds=30.0)
    hpa = runs.replay(load, fast, controllers.HPAController(1, 12, 0.85, initial_replicas=3), 3)
    ours = runs.replay(load, fast, controllers.TensorfleetController(
        policy.PolicyConfig(max_replicas=12, target_kv_cache_usage=0.8)), 3)
    assert max(s.billed for s in hpa.timeline) == 12
    assert ours.gpu_hours < 0.6 * hpa.gpu_hours


def test_oracle_meets_the_slo_with_fewest_replicas() -> None:
    load = steady_trace(rate=3.0, seconds=300)
    oracle = runs.oracle_run(load, A10G, 2.0, 1, 10)
    waits = [a - t for a, t in zip(oracle.log.admit, load.arrivals, strict=True)]
    assert max(waits) <= 2.0 + 1e-6
    fixed = runs.replay(load, A10G, controllers.HPAController(4, 4, 0.85), 4)
    assert oracle.gpu_hours < fixed.gpu_hours


# ---- the command ---------------------------------------------------------------------------------------


def write_trace(path: pathlib.Path, load: trace.Trace) -> pathlib.Path:
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"{t:.3f},{c},{g}" for t, c, g in zip(load.arrivals, load.context_tokens, load.generated_tokens,
                                                     strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_simulate_command_compares_the_three_and_writes_plot_and_json(tmp_path: pathlib.Path) -> None:
    csv = write_trace(tmp_path / "trace.csv", steady_trace(rate=2.0, seconds=240))
    result = CliRunner().invoke(main, [
        "simulate", "--trace", str(csv), "--startup-seconds", "20", "--max-replicas", "6",
        "--plot", str(tmp_path / "plot.png"), "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    assert "tensorfleet" in result.output
    assert "hpa" in result.output
    assert "oracle" in result.output
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads((tmp_path / "out.json").read_text())
    assert set(figures["results"]) == {"tensorfleet", "hpa", "oracle"}
    assert figures["results"]["oracle"]["gpuHoursOverOracle"] == 1.0
    assert figures["model"]["startup_seconds"] == 20.0


@pytest.mark.parametrize(("args", "message"), [
    (["--min-replicas", "0"], "spec.autoscaling.minReplicas must be at least 1"),
    (["--max-scale-up-rate", "1"], "spec.autoscaling.maxScaleUpRate must be at least 2"),
    (["--min-replicas", "5", "--max-replicas", "2"], "minReplicas must be less than or equal to"),
    (["--set", "speed=3"], "not a replica model field"),
    (["--profile", "tpu"], "'tpu' is not one of"),
    (["--interval", "0.5", "--tick", "1"], "Invalid value for --interval: 0.5 is shorter than --tick 1: the "
     "simulation decides at most once a tick"),  # it decided every tick, and overstated GPU utilization
])
def test_simulate_rejects_bad_settings_naming_them(tmp_path: pathlib.Path, args: list[str], message: str) -> None:
    csv = write_trace(tmp_path / "trace.csv", steady_trace(rate=1.0, seconds=10))
    result = CliRunner().invoke(main, ["simulate", "--trace", str(csv), "--plot", "", *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize("flag", ["--tick", "--interval", "--slo-seconds", "--startup-seconds"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_simulate_refuses_a_number_that_is_not_finite(tmp_path: pathlib.Path, flag: str, value: str) -> None:
    """NaN passed every bound of click.FloatRange and inf every open one: --tick nan never ended, --slo-seconds nan
    and --interval inf printed figures, --startup-seconds nan was blamed on --set."""
    csv = write_trace(tmp_path / "trace.csv", steady_trace(rate=1.0, seconds=10))
    result = CliRunner().invoke(main, ["simulate", "--trace", str(csv), "--plot", "", flag, value])
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}': " in result.output
    assert "tensorfleet " not in result.output  # the comparison table: nothing ran


def test_simulate_reports_a_bad_trace_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,3,x\n")
    result = CliRunner().invoke(main, ["simulate", "--trace", str(bad), "--plot", ""])
    assert result.exit_code == 1
    assert "bad.csv:3: column GeneratedTokens" in result.output


@pytest.mark.parametrize(("text", "message"), [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,10\n1,\"" + "1" * 200_000 + "\",10\n", "big.csv:3: "),
    ('"' + "T" * 200_000 + '",ContextTokens,GeneratedTokens\n0,10,10\n', "big.csv:1: "),
])
def test_simulate_refuses_a_field_over_the_csv_limit_in_one_line(tmp_path: pathlib.Path, text: str,
                                                                  message: str) -> None:
    """The csv module's own error (a field over its 131072-character limit) escaped as a traceback."""
    big = tmp_path / "big.csv"
    big.write_text(text)
    result = CliRunner().invoke(main, ["simulate", "--trace", str(big), "--plot", ""])
    assert result.exit_code == 1
    assert f"{message}field larger than field limit (131072)" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_simulate_reads_its_files_naming_the_flag(tmp_path: pathlib.Path) -> None:
    """A trace that is not UTF-8 was a UnicodeDecodeError traceback."""
    bad = tmp_path / "trace.csv"
    bad.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,10\n\xff\xfe,100,10\n")
    result = CliRunner().invoke(main, ["simulate", "--trace", str(bad), "--plot", ""])
    assert result.exit_code == 2
    assert f"Invalid value for --trace: {bad}: not UTF-8 text" in result.output


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_simulate_checks_its_outputs_before_the_run(tmp_path: pathlib.Path, flag: str) -> None:
    """An output in a missing folder was an OSError traceback after the whole run and its printed table."""
    csv = write_trace(tmp_path / "trace.csv", steady_trace(rate=1.0, seconds=10))
    out = tmp_path / "missing" / "out"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(csv), "--plot", "", flag, str(out)])
    assert result.exit_code == 2
    assert f"Invalid value for {flag}: {out}: no such folder" in result.output
    assert "tensorfleet " not in result.output  # the comparison table: nothing ran


@pytest.mark.parametrize(("manifest", "named"), [
    ("a: [\n", "not valid YAML"),
    ("---\nkind: InferenceService\n---\nkind: InferenceService\n", "must be one InferenceService manifest"),
    ("kind: InferenceService\nspec: [1]\n", "spec: Invalid value: must be a mapping"),
    ("kind: InferenceService\nspec:\n  autoscaling: 3\n", "spec.autoscaling: Invalid value: must be a mapping"),
    ("kind: InferenceService\nmetadata:\n  annotations: {built: !!timestamp 2020-01-01}\n",
     "not valid YAML: a !!timestamp value is not JSON"),
], ids=["not-yaml", "two-documents", "spec-not-a-mapping", "autoscaling-not-a-mapping", "timestamp-tag"])
def test_simulate_refuses_a_service_manifest_it_cannot_use(tmp_path: pathlib.Path, manifest: str, named: str) -> None:
    """Each was a traceback (ComposerError, AttributeError, ...)."""
    csv = write_trace(tmp_path / "trace.csv", steady_trace(rate=1.0, seconds=10))
    service = tmp_path / "svc.yaml"
    service.write_text(manifest)
    result = CliRunner().invoke(main, ["simulate", "--trace", str(csv), "--plot", "", "--service", str(service)])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for --service: {service}: {named}" in result.output
