"""How long a serving pod's containers may take to start, in one place for the engine and the gateway."""

from __future__ import annotations

import math

from tensorfleet.api.types import InferenceServiceSpec


def startup_failure_threshold(spec: InferenceServiceSpec, period_seconds: int) -> int:
    """A startupProbe's failureThreshold that outlasts ``spec.warmup.timeoutSeconds`` by one period.

    The kubelet restarts a container at its failureThreshold-th failed probe and may run the first one as
    the container starts, so it is sure to wait only (failureThreshold - 1) periods. One period more than
    the timeout lets the gateway's own deadline (counted from its start, a little after the engine's) fire
    first, so its reason, naming warmup.timeoutSeconds, reaches its log and /readyz before the restart."""
    return math.ceil(int(spec.warmup["timeoutSeconds"]) / period_seconds) + 2
