"""``tensorfleet simulate``: replay a request trace under tensorfleet's autoscaler, an HPA-like baseline and the oracle.

Only click (and tensorfleet.config's flag types) is imported here; the simulator loads when the command runs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import click

from tensorfleet import config

_AUTOSCALING_FLAGS = {
    "min_replicas": "minReplicas",
    "max_replicas": "maxReplicas",
    "target_queue_depth": "targetQueueDepth",
    "target_in_flight": "targetInFlight",
    "target_gpu_utilization_percent": "targetGPUUtilizationPercent",
    "target_kv_cache_usage_percent": "targetKVCacheUsagePercent",
    "scale_down_stabilization_seconds": "scaleDownStabilizationSeconds",
    "panic_window_seconds": "panicWindowSeconds",
    "max_scale_up_rate": "maxScaleUpRate",
}
DEFAULT_MAX_REPLICAS = 40  # the CRD's default (1) would leave nothing to scale


def _autoscaling_options(command: Any) -> Any:
    for flag, field in reversed(_AUTOSCALING_FLAGS.items()):
        command = click.option(f"--{flag.replace('_', '-')}", flag, type=int, default=None,
                               help=f"spec.autoscaling.{field} (overrides --service)")(command)
    return command


@click.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with TIMESTAMP, ContextTokens, GeneratedTokens (the Azure LLM inference trace format).")
@click.option("--service", "service_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="InferenceService manifest whose spec.autoscaling to simulate (validated like the API server).")
@_autoscaling_options
@click.option("--profile", default="a10g-llama3-8b", show_default=True,
              help="Replica model: a10g-llama3-8b or l4-llama3-8b (see docs/autoscaling.md).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a replica model field, e.g. --set prefill_tokens_per_second=5000 (repeatable).")
@click.option("--startup-seconds", type=config.FiniteFloatRange(min=0), default=None,
              help="Engine load plus warm-up of a new replica [default: the profile's].")
@click.option("--slo-seconds", type=config.FiniteFloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Queue-wait SLO: longest wait from arrival to admission into the engine.")
@click.option("--interval", type=config.FiniteFloatRange(min=0.1), default=2.0, show_default=True,
              help="How often tensorfleet's autoscaler decides (the operator's --autoscale-interval-seconds); "
                   "at least --tick.")
@click.option("--tick", type=config.FiniteFloatRange(min=0.01, max=1.0), default=0.1, show_default=True,
              help="Simulation time step in seconds.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="simulation.png", show_default=True,
              help="PNG of load, replicas and queue over time ('' for none; needs matplotlib).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure and scale event as JSON here.")
@click.option("--events", "shown_events", type=click.IntRange(min=0), default=15, show_default=True,
              help="How many of tensorfleet's scale events to print.")
def simulate(trace_path: str, service_path: str | None, profile: str, overrides: tuple[str, ...],
             startup_seconds: float | None, slo_seconds: float, interval: float, tick: float, plot_path: str,
             json_path: str | None, shown_events: int, **autoscaling: int | None) -> None:
    """Replay a request trace under tensorfleet's autoscaling policy (the operator's own code), an HPA-like
    baseline on GPU utilization and the oracle lower bound, and compare GPU-hours, queue-wait SLO
    attainment, TTFT percentiles and scale events.
    """
    from tensorfleet import cli_files
    from tensorfleet.autoscale.simulator import compare, model, report, trace

    if interval < tick:
        raise click.BadParameter(f"{interval:g} is shorter than --tick {tick:g}: the simulation decides at most "
                                 "once a tick", param_hint="--interval")
    spec = _autoscaling_spec(service_path, autoscaling)
    replica = _replica_model(model, profile, overrides, startup_seconds)
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path:  # before the run, which can take minutes
            cli_files.check_writable(path, flag)
    try:
        requests = trace.parse_trace(cli_files.read_text(trace_path, "--trace").splitlines(keepends=True),
                                     trace_path)
    except trace.TraceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(requests)} requests over {requests.duration / 60:.1f} min from {trace_path}", err=True)
    click.echo(f"replica model {replica.name}: {replica.source}; startup {replica.startup_seconds:g} s", err=True)
    result = compare.compare(requests, replica, spec, slo_seconds, interval, tick)
    click.echo(report.table(result.summaries, slo_seconds))
    click.echo(f"\nwarm start: {result.initial_replicas} replicas; tensorfleet's scale events:")
    for event in result.runs[0].events[:shown_events]:
        click.echo(f"  {event.time / 60:6.1f} min  {event.reason}")
    if len(result.runs[0].events) > shown_events:
        click.echo(f"  ... {len(result.runs[0].events) - shown_events} more (--events, --json)")
    if json_path:
        with cli_files.naming("--json", json_path):
            pathlib.Path(json_path).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    if plot_path:
        title = f"{replica.name}, startup {replica.startup_seconds:g} s, queue-wait SLO {slo_seconds:g} s"
        try:
            with cli_files.naming("--plot", plot_path):
                report.plot(result.runs, requests, plot_path, title)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"plot: {plot_path}", err=True)


def _autoscaling_spec(service_path: str | None, flags: dict[str, int | None]) -> Any:
    """spec.autoscaling from the manifest and flags, validated and defaulted by the CRD as the API server would."""
    from tensorfleet.api import crds
    from tensorfleet.api.types import InferenceService

    body: dict[str, Any] = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "InferenceService",
                            "metadata": {"name": "simulated"}, "spec": {"model": {"uri": "hf://simulated/model"}}}
    if service_path:
        body = _service_manifest(service_path)
    autoscaling = dict((body.get("spec") or {}).get("autoscaling") or {})
    if not service_path:
        autoscaling.setdefault("maxReplicas", DEFAULT_MAX_REPLICAS)
    autoscaling.update({_AUTOSCALING_FLAGS[k]: v for k, v in flags.items() if v is not None})
    autoscaling["mode"] = "tensorfleet"
    body.setdefault("spec", {})["autoscaling"] = autoscaling
    body["spec"].pop("replicas", None)
    errors = crds.validate(body)
    if errors:
        raise click.UsageError("invalid autoscaling settings:\n  " + "\n  ".join(str(e) for e in errors))
    return InferenceService.from_body(body).spec.autoscaling


def _service_manifest(path: str) -> dict[str, Any]:
    """The one InferenceService in ``path``, its spec and spec.autoscaling mappings (the CRD checks the rest)."""
    import yaml

    from tensorfleet import cli_files
    from tensorfleet.api import manifest_yaml

    try:
        docs = manifest_yaml.load_all(cli_files.read_text(path, "--service"))
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path}: not valid YAML: {exc}", param_hint="--service") from None
    if len(docs) != 1 or not isinstance(docs[0], dict) or docs[0].get("kind") != "InferenceService":
        raise click.BadParameter(f"{path}: must be one InferenceService manifest", param_hint="--service")
    body, spec = docs[0], docs[0].get("spec") or {}
    field = "spec" if not isinstance(spec, dict) else "spec.autoscaling"
    if not isinstance(spec, dict) or not isinstance(spec.get("autoscaling") or {}, dict):
        raise click.BadParameter(f"{path}: {field}: Invalid value: must be a mapping", param_hint="--service")
    body["spec"] = spec
    return body


def _replica_model(model: Any, profile: str, overrides: tuple[str, ...], startup_seconds: float | None) -> Any:
    if profile not in model.PROFILES:
        raise click.BadParameter(f"{profile!r} is not one of {', '.join(model.PROFILES)}", param_hint="--profile")
    pairs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--set")
        pairs[key.strip()] = value.strip()
    if startup_seconds is not None:
        pairs["startup_seconds"] = str(startup_seconds)
    try:
        return model.PROFILES[profile].with_overrides(pairs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
