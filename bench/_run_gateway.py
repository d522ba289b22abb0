"""Run the real gateway (tensorfleet.gateway.server.serve) for the benchmark, with an in-memory event queue.

The metering module (another issue) provides the production sink; its contract is "queue and return",
which is what this harness's sink does, so the measured path is the production path.
"""

from __future__ import annotations

import argparse
import asyncio
import collections

from tensorfleet.gateway import server
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.metering.events import ColdStartEvent, RequestEvent


class QueueSinkForBench:
    def __init__(self) -> None:
        self.events: collections.deque[RequestEvent | ColdStartEvent] = collections.deque(maxlen=100_000)

    def submit(self, event: RequestEvent | ColdStartEvent) -> None:
        self.events.append(event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def gpu_utilization(self) -> float | None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    settings = GatewaySettings(config=args.config, upstream=args.upstream, host="127.0.0.1", port=args.port,
                               admin_port=args.admin_port, drain_delay_seconds=0, drain_timeout_seconds=5,
                               log_level="warning")
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(server.serve(settings, QueueSinkForBench()))


if __name__ == "__main__":
    main()
