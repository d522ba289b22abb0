"""The gateway's live state: start-up phase, engine health, readiness, and admission to the engine."""

from __future__ import annotations

import asyncio
import collections
import time

from tensorfleet.gateway.errors import GatewayError
from tensorfleet.gateway.metrics import GatewayMetrics


class GatewayState:
    """Ready means: serving (warmed up, not failed), the engine answers its health check, and no drain has begun."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.started_at = time.time()
        self.engine_up = False
        self.warm = False
        self.draining = False
        self.failed: str | None = None
        self.ready_since: float | None = None
        self.phase = "waiting_for_engine"
        metrics.warmup_state.state(self.phase)
        metrics.ready.set(0)

    @property
    def serving(self) -> bool:
        """This pod's warm-up passed and nothing failed since: what the engine serves a client is billed.

        A drain does not change it: the pod serves on while its endpoints update, and that work is billed too.
        """
        return self.warm and self.failed is None

    @property
    def ready(self) -> bool:
        return self.serving and self.engine_up and not self.draining

    def set_phase(self, phase: str) -> None:
        self.phase = "draining" if self.draining and phase != "failed" else phase  # a drain is never undone
        self.metrics.warmup_state.state(self.phase)
        self.refresh()

    def set_engine_up(self, up: bool) -> None:
        if up != self.engine_up:
            self.engine_up = up
            self.refresh()

    def begin_start(self, started_at: float) -> None:
        """An engine start began at wall-clock ``started_at``: the pod is cold until ``mark_warm``."""
        self.metrics.start_began.set(started_at)

    def mark_warm(self) -> None:
        self.warm = True
        self.ready_since = time.monotonic()
        self.metrics.start_began.set(0)
        self.set_phase("ready")

    def lose_engine(self) -> None:
        """The engine process is gone (its container restarts): nothing is served until its successor is warm."""
        self.warm = False
        self.engine_up = False
        self.ready_since = None
        self.set_phase("waiting_for_engine")

    def fail(self, reason: str) -> None:
        self.failed = reason
        self.set_phase("failed")

    def start_drain(self) -> None:
        self.draining = True
        self.set_phase("draining")

    def refresh(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)


class Admission:
    """At most ``max_in_flight`` requests at the engine (0: no limit), a bounded FIFO queue for the rest.

    A finishing request hands its slot straight to the first waiter, so arrivals cannot jump the queue.
    """

    def __init__(self, metrics: GatewayMetrics, max_in_flight: int = 0, max_queue: int = 1024) -> None:
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self.max_in_flight or self.in_flight < self.max_in_flight:
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            return
        if len(self._waiters) >= self.max_queue:
            raise GatewayError(503, f"the gateway queue is full ({self.max_queue} waiting)", "queue_full",
                               headers={"Retry-After": "1"})
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # woken by release() with its slot already counted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.release()  # woken and cancelled at once: pass the slot on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)


class ActiveRequests:
    """Requests received and not yet finished, so a drain can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True
