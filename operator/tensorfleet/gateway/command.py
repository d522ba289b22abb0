"""`tensorfleet gateway`: the sidecar's entry point (registered in tensorfleet.cli)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import click

from tensorfleet import cli_ports, config
from tensorfleet.gateway.settings import GatewaySettings

METERING_MISSING = (
    "the gateway needs tensorfleet.metering.sink (open_sink) to record usage, and this build does not have it; "
    "install a tensorfleet build that includes the metering module"
)


def _open_sink(settings: GatewaySettings) -> Any:
    from tensorfleet.gateway import config as gwconfig

    try:
        from tensorfleet.metering.sink import open_sink  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise click.ClickException(f"{METERING_MISSING} ({exc})") from None
    document = gwconfig.read_configuration(settings.config, settings.revision_config)
    return open_sink(document, settings.usage_dir, settings.gpu_product or None, settings.devices_file or None)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@click.command()
@config.click_options(GatewaySettings)
def gateway(**options: Any) -> None:
    """Run the gateway sidecar: the only door to the engine in a serving pod.

    Waits for the engine, warms it up, then reports ready on the admin port (/readyz); proxies the
    OpenAI API (vLLM) or Triton's generate endpoints with the token policy, tenant auth and metering.
    """
    from tensorfleet.gateway import config as gwconfig
    from tensorfleet.gateway import server

    settings = config.checked_from_click(GatewaySettings, options)
    try:
        cli_ports.check_listenable(settings.host, (("--port", settings.port), ("--admin-port", settings.admin_port)),
                                   "choose a free port or 0 for any")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Fail fast, naming the field.
        gwconfig.load(settings.config, bool(settings.api_keys_dir), settings.revision_config)
        sink = _open_sink(settings)
    except (gwconfig.ConfigError, ValueError) as exc:  # open_sink: ValueError names a bad TENSORFLEET_METERING_*
        raise click.ClickException(str(exc)) from None
    _use_uvloop()
    sys.exit(asyncio.run(server.serve(settings, sink, pod=os.environ.get("POD_NAME", ""))))
