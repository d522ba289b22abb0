"""Level-based reconcile loops, one per object, woken by pokes from the watch streams.

Both the InferenceService and the Engine controllers run a kopf daemon per object: it reconciles at
start, whenever an index sees a change that concerns the object (a poke), and every resync period;
a failure backs off exponentially. Pokes arriving while a reconcile runs are kept and coalesced.

The daemons run without kopf's finalizer (``tensorfleet.handlers``), so an object may vanish without
kopf stopping its daemons: its DELETED event ends them instead (``Triggers.deleted``, ``Stop``), or, where
the watch missed that event (a relist after "410 Gone" reports no deletions), the first write they try
(``kube.KubeClient.acting_for`` finds the object gone before that write).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

MAX_BACKOFF_SECONDS = 60.0


class Triggers:
    """Pokes by (namespace, name), to an ``asyncio.Event`` of each daemon serving an object of that name: one,
    or briefly two when an object is deleted and created again under its name while the old daemon ends."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], list[asyncio.Event]] = {}
        self._deletions: dict[str, tuple[asyncio.Event, int]] = {}  # by uid: the event and its daemons

    @contextlib.contextmanager
    def listening(self, namespace: str, name: str) -> Iterator[asyncio.Event]:
        """The trigger of one daemon of the object ``namespace/name``; leaving takes away only this one, never
        the trigger of a new object's daemon (keyed by the name as the pokes are: children name their owner)."""
        event, key = asyncio.Event(), (namespace, name)
        self._events.setdefault(key, []).append(event)
        try:
            yield event
        finally:
            self._events[key].remove(event)
            if not self._events[key]:
                del self._events[key]

    def listened(self, namespace: str, name: str) -> bool:
        """Whether a daemon serves an object of that name (then what is kept by name is still its)."""
        return (namespace, name) in self._events

    def poke(self, namespace: str | None, name: str | None) -> None:
        if namespace and name:
            for event in self._events.get((namespace, name), ()):
                event.set()

    def poke_all(self, namespace: str | None = None) -> None:
        """Every object with a daemon, or every one in ``namespace``."""
        for (ns, _), events in self._events.items():
            if namespace is None or ns == namespace:
                for event in events:
                    event.set()

    def deleted(self, uid: str | None) -> None:
        """The object with ``uid`` is gone: end its daemons (a DELETED event; a new object has a new uid)."""
        if uid in self._deletions:
            self._deletions[uid][0].set()

    @contextlib.contextmanager
    def until_deleted(self, stopped: Any, uid: str) -> Iterator[Stop]:
        """For one daemon of the object ``uid``: kopf's ``stopped``, or that object's deletion."""
        deletion, daemons = self._deletions.get(uid, (asyncio.Event(), 0))
        self._deletions[uid] = (deletion, daemons + 1)
        try:
            yield Stop(stopped, deletion)
        finally:
            deletion, daemons = self._deletions.pop(uid)
            if daemons > 1:
                self._deletions[uid] = (deletion, daemons - 1)


class Stop:
    """Whether a daemon must end, as kopf's ``stopped`` flag reads: kopf stopped it (pause, shutdown, a
    deletion in progress) or its object was deleted."""

    def __init__(self, stopped: Any, deletion: asyncio.Event) -> None:
        self._stopped = stopped
        self._deletion = deletion

    def __bool__(self) -> bool:
        return bool(self._stopped) or self._deletion.is_set()

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109  (kopf's stopped.wait)
        """Until stopped or ``timeout`` seconds have passed; whether it is stopped."""
        waits = {asyncio.ensure_future(self._stopped.wait()), asyncio.ensure_future(self._deletion.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return bool(self)


async def reconcile_loop(trigger: asyncio.Event, stopped: Any, reconcile: Callable[[], Awaitable[bool]], *,
                         resync_seconds: float, debounce_seconds: float) -> None:
    """Reconcile now, then on every poke (after ``debounce_seconds``, to coalesce bursts) or resync,
    until ``stopped``. ``reconcile`` returns False on failure: the next attempt waits 2, 4, 8 ... s."""
    trigger.set()  # at once on create, resume and operator restart
    failures = 0
    while not stopped:
        delay = resync_seconds if failures == 0 else min(MAX_BACKOFF_SECONDS, 2.0**failures)
        if await _wait_for_trigger(trigger, stopped, delay):
            await asyncio.sleep(debounce_seconds)
        trigger.clear()
        if stopped:
            break
        failures = 0 if await reconcile() else failures + 1


async def _wait_for_trigger(trigger: asyncio.Event, stopped: Any, delay: float) -> bool:
    """Wait for a poke, the daemon's stop, or ``delay`` seconds (the resync). True when poked."""
    poked = asyncio.ensure_future(trigger.wait())
    halted = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({poked, halted}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        poked.cancel()
        halted.cancel()
    return trigger.is_set() and not stopped
