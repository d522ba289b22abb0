from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import pytest
from click.testing import CliRunner

from tensorfleet import config, diff


def test_subset_ignores_fields_added_by_the_server() -> None:
    want = {"spec": {"ports": [{"port": 80, "targetPort": "http"}]}}
    have = {"spec": {"ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}], "clusterIP": "10.0.0.1"}}
    assert diff.is_subset(want, have)


def test_subset_sees_changed_values_and_list_lengths() -> None:
    assert not diff.is_subset({"a": {"b": 1}}, {"a": {"b": 2}})
    assert not diff.is_subset({"a": [1, 2]}, {"a": [1]})


def test_empty_values_match_their_absence() -> None:
    assert diff.is_subset({"metadata": {"annotations": {}}, "spec": {"x": []}}, {"metadata": {}, "spec": {}})


def test_quantities_compare_by_value() -> None:
    assert diff.is_subset({"resources": {"limits": {"cpu": "1000m", "memory": "1Gi"}}},
                          {"resources": {"limits": {"cpu": "1", "memory": "1024Mi"}}})
    assert diff.is_subset({"emptyDir": {"sizeLimit": "1Gi"}}, {"emptyDir": {"sizeLimit": "1024Mi"}})
    assert not diff.is_subset({"image": "1"}, {"image": "1.0"})  # not a quantity field


def test_hpa_metric_targets_compare_by_value_and_env_values_do_not() -> None:
    def metric(target: dict[str, str]) -> dict[str, Any]:
        return {"spec": {"metrics": [{"type": "Pods", "pods": {"metric": {"name": "q"}, "target": target}}]}}

    assert diff.is_subset(metric({"type": "AverageValue", "averageValue": "1000m"}),
                          metric({"type": "AverageValue", "averageValue": "1"}))
    assert diff.is_subset(metric({"type": "Value", "value": "1000"}), metric({"type": "Value", "value": "1k"}))
    assert not diff.is_subset(metric({"type": "AverageValue", "averageValue": "800m"}),
                              metric({"type": "AverageValue", "averageValue": "1"}))
    assert not diff.is_subset({"env": [{"name": "X", "value": "1000m"}]}, {"env": [{"name": "X", "value": "1"}]})


def test_hash_changes_with_content_only() -> None:
    obj = {"kind": "X", "metadata": {"name": "a"}, "spec": {"v": 1}}
    stamped = diff.stamp(obj)
    assert diff.content_hash(stamped) == diff.content_hash(obj)
    assert diff.content_hash({**obj, "spec": {"v": 2}}) != diff.content_hash(obj)
    assert diff.needs_apply(stamped, None) == "create"
    assert diff.needs_apply(stamped, stamped) is None


@dataclasses.dataclass(frozen=True)
class Sample:
    ENV_PREFIX: ClassVar[str] = "TF_TEST_"
    port: int = config.setting(8000, "port")
    names: tuple[str, ...] = config.setting((), "names")
    mode: Literal["a", "b"] = config.setting("a", "mode")
    enabled: bool = config.setting(False, "enabled")
    url: str | None = config.setting(None, "url")


def test_settings_from_env() -> None:
    env = {"TF_TEST_PORT": "9000", "TF_TEST_NAMES": "x, y", "TF_TEST_MODE": "b", "TF_TEST_ENABLED": "true"}
    assert config.from_env(Sample, env) == Sample(port=9000, names=("x", "y"), mode="b", enabled=True)


@pytest.mark.parametrize(("env", "message"), [
    ({"TF_TEST_PORT": "eighty"}, "TF_TEST_PORT='eighty': expected int"),
    ({"TF_TEST_MODE": "c"}, "TF_TEST_MODE='c': expected one of a, b"),
    ({"TF_TEST_ENABLED": "maybe"}, "TF_TEST_ENABLED='maybe': expected true or false"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        config.from_env(Sample, env)
    assert str(info.value) == message


def test_every_field_is_a_flag_and_an_env_var() -> None:
    import click

    @click.command()
    @config.click_options(Sample)
    def command(**options: object) -> None:
        click.echo(repr(config.from_click(Sample, options)))

    result = CliRunner().invoke(command, ["--port", "1", "--names", "a,b", "--enabled"], env={"TF_TEST_MODE": "b"})
    assert result.output.strip() == repr(Sample(port=1, names=("a", "b"), mode="b", enabled=True))
    help_text = CliRunner().invoke(command, ["--help"]).output
    for field in dataclasses.fields(Sample):
        assert config.env_name(Sample, field.name) in help_text


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--resync-seconds", "0", "TENSORFLEET_RESYNC_SECONDS=0.0: must be positive, at most 86400"),
    ("--resync-seconds", "-5", "TENSORFLEET_RESYNC_SECONDS=-5.0: must be positive, at most 86400"),
    ("--resync-seconds", "nan", "TENSORFLEET_RESYNC_SECONDS=nan: must be positive, at most 86400"),
    ("--debounce-seconds", "-0.1", "TENSORFLEET_DEBOUNCE_SECONDS=-0.1: must be between 0 and 60"),
    ("--metrics-port", "70000", "TENSORFLEET_METRICS_PORT=70000: must be between 0 (off) and 65535"),
    ("--engine-fetch-timeout-seconds", "0",
     "TENSORFLEET_ENGINE_FETCH_TIMEOUT_SECONDS=0: must be positive, at most 86400"),
    ("--autoscale-scrape-timeout-seconds", "inf",
     "TENSORFLEET_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS=inf: must be positive, at most 60"),
    ("--engine-build-memory", "0Gi",
     "TENSORFLEET_ENGINE_BUILD_MEMORY='0Gi': must be a positive Kubernetes quantity such as 4, 500m, 32Gi"),
    ("--engine-build-cpu", "four",
     "TENSORFLEET_ENGINE_BUILD_CPU='four': must be a positive Kubernetes quantity such as 4, 500m, 32Gi"),
])
def test_operator_settings_out_of_range_are_a_usage_error(flag: str, value: str, message: str) -> None:
    from tensorfleet.cli import main

    result = CliRunner().invoke(main, ["run", f"{flag}={value}", "--server", "http://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {message}"


def test_one_port_for_metrics_and_liveness_is_a_usage_error() -> None:
    """Each was checked free on its own, then the liveness server found the metrics server on it: a traceback."""
    from tensorfleet.cli import main
    from tensorfleet.settings import OperatorSettings

    result = CliRunner().invoke(main, ["run", "--metrics-port", "9999", "--liveness-port", "9999",
                                       "--server", "http://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: TENSORFLEET_METRICS_PORT=9999: must be different from TENSORFLEET_LIVENESS_PORT=9999: two endpoints "
        "cannot share a port")
    assert OperatorSettings(metrics_port=0, liveness_port=0).validate() == []


async def test_operator_settings_are_checked_at_startup_without_the_cli() -> None:
    """``kopf run`` (or a test's KopfRunner) reads the settings from the environment: the startup stops."""
    import kopf

    from tensorfleet import controller
    from tensorfleet.settings import OperatorSettings

    assert OperatorSettings(resync_seconds=86400, debounce_seconds=0, liveness_port=0).validate() == []
    memo = kopf.Memo(settings=config.from_env(OperatorSettings, {"TENSORFLEET_RESYNC_SECONDS": "0"}))
    with pytest.raises(kopf.PermanentError, match=r"^TENSORFLEET_RESYNC_SECONDS=0.0: must be positive"):
        await controller.startup(settings=kopf.OperatorSettings(), memo=memo)


def test_the_readme_names_the_commands_whose_every_flag_is_an_environment_variable() -> None:
    """The long-running processes take every flag from TENSORFLEET_*; the offline tools' per-invocation flags
    (a file to read, a trace to replay, `usage verify --trust-embedded-key`) are flags only, and the README says so."""
    import pathlib
    import re

    import click

    from tensorfleet.cli import main

    def leaves(command: click.Command, path: str) -> dict[str, list[click.Option]]:
        if not isinstance(command, click.Group):
            return {path: [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]}
        ctx = click.Context(command)
        return {name: options for sub in command.list_commands(ctx)
                for name, options in leaves(command.get_command(ctx, sub), f"{path} {sub}".strip()).items()}

    everyone = {name for name, options in leaves(main, "").items()
                if options and all(str(o.envvar or "").startswith("TENSORFLEET_") for o in options)}
    assert everyone == {"run", "gateway"}
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    claim = re.search(r"Every flag of (.+?) is also a `TENSORFLEET_\*`", readme.replace("\n", " "))
    assert claim is not None, "README: which commands take every flag from the environment?"
    assert set(re.findall(r"`tensorfleet (\w+)`", claim.group(1))) == everyone
