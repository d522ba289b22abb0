"""The chart's alerts, evaluated by Prometheus' own promtool over series as the gateways export them."""

from __future__ import annotations

from typing import Any

import pytest

from chart import alert_rules, promtool_test_rules, render

pytestmark = pytest.mark.e2e

THRESHOLD = 600  # metrics.prometheusRule.coldStartSeconds, the chart's default
# A gateway's target labels: the PodMonitor's (namespace, pod, ...) and the pod's InferenceService.
POD = {"namespace": "team-a", "inferenceservice": "llama", "pod": "llama-0", "container": "gateway",
       "job": "team-a/tensorfleet-gateways", "instance": "10.0.0.1:9090"}


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return alert_rules(render({"metrics": {"prometheusRule": {"enabled": True}}}))


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One input series of a gateway pod, in promtool's notation ("0x20": 21 samples of 0, "_": no sample)."""
    selector = ",".join(f'{key}="{value}"' for key, value in {**labels, **POD}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def firing(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"exp_labels": {"severity": "warning", **labels}}]


def assert_alerts(rules: list[dict[str, Any]], alert: str, inputs: list[dict[str, str]],
                  expected: dict[str, list[dict[str, Any]]]) -> None:
    """``alert`` fires at each eval time (e.g. "10m") exactly as ``expected`` says, given the input series."""
    tests = [{"interval": "1m", "input_series": inputs,
              "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": alerts}
                                  for at, alerts in expected.items()]}]
    result = promtool_test_rules(rules, tests)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- TensorfleetUsageEventsNotBilled ------------------------------------------------------------------

NOT_BILLED = {"namespace": "team-a", "inferenceservice": "llama", "pod": "llama-0"}
DROPPED, QUARANTINED = "tensorfleet_metering_events_dropped_total", "tensorfleet_metering_events_quarantined_total"
REJECTED = "tensorfleet_metering_events_rejected_total"
# What a gateway exports from its start (metering/metrics.py): the unlabelled counters and every field of the
# rejected one at 0.
AT_ZERO = [series(DROPPED, "0x30"), series(QUARANTINED, "0x30"), series(REJECTED, "0x30", field="done")]


@pytest.mark.parametrize("counter", [DROPPED, QUARANTINED, REJECTED])
def test_events_not_billed_alert_on_any_of_the_three_counters(rules: list[dict[str, Any]], counter: str) -> None:
    # Before, the three were joined with `or`: increase() drops the metric name, so the dropped counter (at 0)
    # hid the quarantined one of the same pod, and the rejected one of a field.
    inputs = [s for s in AT_ZERO if not s["series"].startswith(counter + "{")]
    inputs.append(series(counter, "0 0 0 0 0 3x25", **({"field": "done"} if counter == REJECTED else {})))
    assert_alerts(rules, "TensorfleetUsageEventsNotBilled", inputs,
                  {"3m": [], "10m": firing(NOT_BILLED), "25m": [], })


def test_events_not_billed_alert_with_only_some_counters_exported(rules: list[dict[str, Any]]) -> None:
    """A gateway of an older release, without the rejected counter: the others still raise the alert."""
    assert_alerts(rules, "TensorfleetUsageEventsNotBilled",
                  [series(DROPPED, "0x30"), series(QUARANTINED, "0 0 0 0 0 3x25")],
                  {"3m": [], "10m": firing(NOT_BILLED)})


# ---- TensorfleetSlowColdStart -------------------------------------------------------------------------

SLOW = {"namespace": "team-a", "inferenceservice": "llama", "pod": "llama-0"}
PROCESS_START, READY = "process_start_time_seconds", "tensorfleet_gateway_ready"
STARTUP, START_BEGAN = "tensorfleet_gateway_startup_seconds", "tensorfleet_gateway_engine_start_timestamp_seconds"


def a_pod(ready: str, startup: str, start_began: str) -> list[dict[str, str]]:
    """A gateway whose container started at minute 1 (60 s): what it exports, minute by minute."""
    return [series(PROCESS_START, "_ 60x90"), series(READY, ready), series(STARTUP, startup),
            series(START_BEGAN, start_began)]


def test_a_quick_engine_restart_of_a_long_running_pod_is_not_a_slow_cold_start(
        rules: list[dict[str, Any]]) -> None:
    # Warm after 5 minutes; at minute 60 the engine container restarts, warm again at minute 64 (240 s). Before,
    # the alert measured the gateway process's age, an hour, and fired at 62 minutes.
    pod = a_pod(ready="_ 0x4 1x53 0x3 1x30", startup="_ 0x4 300x57 240x30", start_began="_ 60x4 0x53 3600x3 0x30")
    assert_alerts(rules, "TensorfleetSlowColdStart", pod, {"12m": [], "63m": [], "66m": [], "80m": []})


def test_a_cold_start_slower_than_the_threshold_alerts_while_it_lasts(rules: list[dict[str, Any]]) -> None:
    never_ready = a_pod(ready="_ 0x30", startup="_ 0x30", start_began="_ 60x30")  # started at 60 s
    assert_alerts(rules, "TensorfleetSlowColdStart", never_ready, {"10m": [], "15m": firing(SLOW)})


def test_an_engine_restart_slower_than_the_threshold_alerts(rules: list[dict[str, Any]]) -> None:
    # The engine is lost at minute 60 and not warm again by minute 75: past 600 s from minute 70, firing at 72.
    pod = a_pod(ready="_ 0x4 1x53 0x30", startup="_ 0x4 300x80", start_began="_ 60x4 0x53 3600x30")
    assert_alerts(rules, "TensorfleetSlowColdStart", pod, {"68m": [], "75m": firing(SLOW)})


def test_a_finished_cold_start_slower_than_the_threshold_alerts(rules: list[dict[str, Any]]) -> None:
    pod = a_pod(ready="_ 0x14 1x30", startup="_ 0x14 900x30", start_began="_ 60x14 0x30")  # ready after 15 min
    assert_alerts(rules, "TensorfleetSlowColdStart", pod, {"20m": firing(SLOW)})
