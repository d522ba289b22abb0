"""The operator process: logging, metrics endpoint, liveness endpoint, peering, then kopf."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import kopf
from prometheus_client import start_http_server

from tensorfleet import cli_ports, controller, kube
from tensorfleet.metrics import OperatorMetrics
from tensorfleet.settings import OperatorSettings

logger = logging.getLogger(__name__)


class NoClusterError(RuntimeError):
    """Neither an in-cluster account nor a kubeconfig: the caller may fall back to the emulator."""


def configure_logging(settings: OperatorSettings) -> None:
    formats = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(debug=settings.log_level == "debug", verbose=settings.log_level in ("debug", "info"),
                   quiet=settings.log_level in ("warning", "error"), log_format=formats[settings.log_format])


def resolve_connection(settings: OperatorSettings) -> kube.Connection:
    if settings.cluster == "emulator" and not settings.server:
        raise NoClusterError("the emulator was asked for")
    found = controller.find_connection(settings)
    if found is None:
        raise NoClusterError("no in-cluster service account and no kubeconfig found")
    return found


def check_ports(settings: OperatorSettings) -> None:
    """Fail before starting, naming the flag, when the metrics or liveness port cannot be listened on
    (kopf's liveness server would end in a traceback deep in the operator)."""
    cli_ports.check_listenable("0.0.0.0", (("--metrics-port", settings.metrics_port),
                                           ("--liveness-port", settings.liveness_port)),
                               "choose a free port or 0 to disable it")


def operator_kwargs(settings: OperatorSettings) -> dict[str, Any]:
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    return {
        "clusterwide": not settings.namespaces,
        "namespaces": list(settings.namespaces),
        "standalone": settings.standalone,
        "peering_name": None if settings.standalone else settings.peering,
        # Equal priorities make kopf freeze every replica; a random one lets exactly one act.
        "priority": settings.priority if settings.priority is not None else random.randint(1, 2**30),
        "liveness_endpoint": liveness,
    }


def run_operator(settings: OperatorSettings, stop_flag: threading.Event | None = None,
                 ready_flag: threading.Event | None = None, metrics: OperatorMetrics | None = None) -> None:
    """Run the real operator until stopped (SIGINT/SIGTERM, or ``stop_flag``)."""
    metrics = metrics or OperatorMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    memo = kopf.Memo(settings=settings, metrics=metrics)
    registry = controller.operator_registry(settings)
    asyncio.run(kopf.operator(registry=registry, memo=memo, stop_flag=stop_flag, ready_flag=ready_flag,
                              **operator_kwargs(settings)))

