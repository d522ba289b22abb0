"""The one entry point: `tensorfleet <command>` for the operator, the sidecar, engine Jobs and tools.

Each command imports what it needs when it runs, so the gateway sidecar never loads kopf.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from tensorfleet import __version__, cli_files, config
from tensorfleet.autoscale.simulator import command as simulate_command
from tensorfleet.gateway import command as gateway_command
from tensorfleet.render.context import RenderContext
from tensorfleet.settings import OperatorSettings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tensorfleet")
def main() -> None:
    """tensorfleet: metered, autoscaled GPU inference of LLMs on Kubernetes."""


@main.command()
@config.click_options(OperatorSettings)
def run(**options: Any) -> None:
    """Run the operator. Without a cluster, run it end to end against an embedded API emulator."""
    from tensorfleet import runner

    settings, _ = _settings(options)  # the startup handler builds its own context from the same settings
    try:
        connection = runner.resolve_connection(settings)
        runner.check_ports(settings)
    except ValueError as exc:  # a kubeconfig, context or --cluster that cannot be used, a busy port
        raise click.ClickException(str(exc)) from None
    except runner.NoClusterError:  # --cluster auto with nothing named and nothing found, or emulator
        from tensorfleet.sandbox import quickstart

        quiet = config.from_click(OperatorSettings, {**options, "log_level": options.get("log_level") or "warning",
                                                       "log_format": options.get("log_format") or "plain"})
        runner.configure_logging(quiet)
        sys.exit(quickstart.run(quiet))
    from tensorfleet import kube

    kube.check_crds(connection)  # before logging is set up, so that a failure is its one line
    runner.configure_logging(settings)
    runner.run_operator(settings)


def _settings(options: dict[str, Any]) -> tuple[OperatorSettings, RenderContext]:
    """The operator's settings from the flags, and the render context with the resource-unit file they name:
    bad ones are a usage error naming the variable, before anything connects or starts."""
    settings = config.checked_from_click(OperatorSettings, options)
    try:
        return settings, settings.render_context()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@click.option("-f", "--filename", "filename", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="InferenceService manifest(s); - reads standard input.")
@click.option("--gpu-product", "gpu_product", default=None,
              help="Render as if this GPU product (nvidia.com/gpu.product) were the one in the cluster.")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@config.click_options(OperatorSettings)
def render(filename: str, gpu_product: str | None, output: str, **options: Any) -> None:
    """Print the objects the operator would create for FILE, without a cluster.

    The manifests are validated first with the CRD's schema and CEL rules, exactly as the API server
    would; invalid input exits with status 1 and one line per invalid field.
    """
    from tensorfleet import manifests

    _, ctx = _settings(options)
    text = cli_files.read_text(filename, "'-f' / '--filename'")
    result = manifests.render_text(text, ctx, gpu_product=gpu_product,
                                   source="<stdin>" if filename == "-" else filename)
    for problem in [*result.warnings, *result.errors]:
        click.echo(problem, err=True)
    if result.objects:
        if output == "json":
            click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": result.objects}, indent=2))
        else:
            click.echo(manifests.to_yaml(result.objects), nl=False)
    sys.exit(1 if result.errors else 0)


main.add_command(gateway_command.gateway)
main.add_command(config.lazy_group("usage", "tensorfleet.metering.cli:usage", "Verify, report on and sign usage."))
main.add_command(config.lazy_group("engine", "tensorfleet.engines.cli:engine",
                                   "TensorRT-LLM engines: fingerprint keys, build or fetch, verify."))
main.add_command(config.lazy_group("model", "tensorfleet.engines.cli:model", "Fetch and verify model weights."))
main.add_command(simulate_command.simulate)  # `tensorfleet simulate`: loads the simulator only when it runs
