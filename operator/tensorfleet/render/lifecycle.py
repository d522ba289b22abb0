"""How long a serving pod's containers may take to start and to stop, in one place for both containers.

On pod deletion the kubelet sends SIGTERM to every container at once, unless a preStop hook holds it back.
The gateway drains (not ready at once, serving on for DRAIN_DELAY_SECONDS while endpoints update, then up
to DRAIN_TIMEOUT_SECONDS for in-flight requests), which needs the engine beside it serving throughout: the
engine's preStop hook waits until the gateway has exited (its admin port refuses connections), at most the
length of the drain, so the engine gets SIGTERM with nothing in flight. The grace period covers the drain,
then the gateway's metering flush and the engine's exit.
"""

from __future__ import annotations

import math
from typing import Any

from tensorfleet.api.types import InferenceServiceSpec
from tensorfleet.render import context as c

DRAIN_DELAY_SECONDS = 5  # the gateway serves on, not ready, while the Service's endpoints update
DRAIN_TIMEOUT_SECONDS = 110  # then it waits at most this long for in-flight requests
_STOP_SECONDS = 5  # after the drain: the gateway flushes metering, the engine exits
GRACE_PERIOD_SECONDS = DRAIN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + _STOP_SECONDS
# A failed engine probe restarts the engine alone: the gateway does not exit, so the hook would wait out the
# whole drain. The probes' own grace period bounds it (and the engine's stop) instead.
ENGINE_RESTART_GRACE_SECONDS = 10

# python3 is in every engine image already: the engine's probes run it.
_AWAIT_GATEWAY_EXIT = """\
import socket, sys, time
port, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        break
    except OSError:
        pass
    time.sleep(1)
"""


def startup_failure_threshold(spec: InferenceServiceSpec, period_seconds: int) -> int:
    """A startupProbe's failureThreshold that outlasts ``spec.warmup.timeoutSeconds`` by one period.

    The kubelet restarts a container at its failureThreshold-th failed probe and may run the first one as
    the container starts, so it is sure to wait only (failureThreshold - 1) periods. One period more than
    the timeout lets the gateway's own deadline (counted from its start, a little after the engine's) fire
    first, so its reason, naming warmup.timeoutSeconds, reaches its log and /readyz before the restart."""
    return math.ceil(int(spec.warmup["timeoutSeconds"]) / period_seconds) + 2


def engine_lifecycle() -> dict[str, Any]:
    """The engine's preStop hook: wait until the gateway has drained and exited, at most the drain's length."""
    drain = DRAIN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS
    command = ["python3", "-c", _AWAIT_GATEWAY_EXIT, str(c.ADMIN_PORT), str(drain)]
    return {"preStop": {"exec": {"command": command}}}


def gateway_drain_env() -> list[dict[str, Any]]:
    """The gateway's drain settings, which the engine's hook and the grace period are sized by."""
    return [{"name": "TENSORFLEET_GATEWAY_DRAIN_DELAY_SECONDS", "value": str(DRAIN_DELAY_SECONDS)},
            {"name": "TENSORFLEET_GATEWAY_DRAIN_TIMEOUT_SECONDS", "value": str(DRAIN_TIMEOUT_SECONDS)}]
