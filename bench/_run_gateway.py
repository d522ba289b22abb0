"""Run the real gateway (tensorfleet.gateway.server.serve) for the benchmark.

By default its metering events go to an in-memory queue: the sink's contract is "queue and return", so the
request path is the production one, but the production sink's writer thread (journal, attribution, signed
ledger) also runs in the gateway's process and shares its CPU and its GIL. ``--usage-dir`` meters into that
production sink instead (target ``gateway-metered``), so that its cost is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from collections.abc import Callable
from typing import Any

from tensorfleet.gateway import server
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.metering.events import ColdStartEvent, RequestEvent


class QueueSinkForBench:
    def __init__(self) -> None:
        self.events: collections.deque[RequestEvent | ColdStartEvent] = collections.deque(maxlen=100_000)

    def submit(self, event: RequestEvent | ColdStartEvent) -> None:
        self.events.append(event)

    def admitted(self, request_id: str, at: float) -> None:
        return None

    def reconfigure(self, config: Any) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def gpu_utilization(self) -> float | None:
        return None


def _timed(function: Callable[..., Any], totals: dict[str, Any]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return function(*args)
        finally:
            totals["ns"] += time.thread_time_ns() - started
            totals["calls"] += 1

    return timed


def time_runaway_guards() -> dict[str, Any]:
    """Add up the thread CPU time of the runaway checks (``RunawayGuard.check``, one per batch of events)
    and count the events they were given; the timer's own cost per check is measured here too (the same
    wrapper around a function that does nothing) so that it can be taken off."""
    from tensorfleet.gateway import runaway_hook

    bias: dict[str, Any] = {"calls": 0, "ns": 0}
    empty = _timed(lambda guard, events: None, bias)
    for _ in range(50000):
        empty(None, [])
    totals: dict[str, Any] = {"calls": 0, "ns": 0, "events": 0, "timer_ns_per_call": bias["ns"] / bias["calls"]}
    guard = runaway_hook.RunawayGuard
    guard.check = _timed(guard.check, totals)  # type: ignore[method-assign]
    on_event = guard.on_event

    def counted(self: Any, payload: bytes) -> Any:
        totals["events"] += 1
        return on_event(self, payload)

    guard.on_event = counted  # type: ignore[method-assign]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--time-guards", help="write the CPU time spent in runaway checks to this JSON file at exit")
    parser.add_argument("--check-every", type=int, help="stream events per runaway check (default: the gateway's)")
    parser.add_argument("--usage-dir", help="meter into the production sink (ledger, journal, writer thread) here, "
                                            "instead of the in-memory queue")
    args = parser.parse_args()
    if args.check_every:
        from tensorfleet.gateway import runaway_hook

        runaway_hook.CHECK_EVERY = args.check_every
    guards = time_runaway_guards() if args.time_guards else None
    settings = GatewaySettings(config=args.config, upstream=args.upstream, host="127.0.0.1", port=args.port,
                               admin_port=args.admin_port, drain_delay_seconds=0, drain_timeout_seconds=5,
                               log_level="warning", usage_dir=args.usage_dir or GatewaySettings.usage_dir)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sink: Any = QueueSinkForBench()
    if args.usage_dir:  # built as `tensorfleet gateway` builds it (a private name, but --baseline trees have it)
        from tensorfleet.gateway.command import _open_sink

        sink = _open_sink(settings)
    asyncio.run(server.serve(settings, sink))
    if guards is not None:
        with open(args.time_guards, "w", encoding="utf-8") as stream:
            json.dump(guards, stream)


if __name__ == "__main__":
    main()
