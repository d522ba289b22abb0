"""The per-object reconcile loop: reconciles at start, coalesces pokes, resyncs, backs off, stops."""

from __future__ import annotations

import asyncio

import pytest

from tensorfleet import triggers
from tensorfleet.triggers import Triggers, reconcile_loop


class StopFlag:
    """kopf's daemon ``stopped`` flag, as the loop uses it: truthiness and ``wait()``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __bool__(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        self._event.set()


async def test_pokes_during_a_reconcile_are_coalesced_into_one_more() -> None:
    registry, stopped, calls = Triggers(), StopFlag(), []
    release = asyncio.Event()

    async def reconcile() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            await release.wait()
        return True

    with registry.listening("ns", "a") as trigger:
        loop = asyncio.create_task(reconcile_loop(trigger, stopped, reconcile, resync_seconds=3600,
                                                  debounce_seconds=0.01))
        await asyncio.sleep(0.05)
        for _ in range(5):
            registry.poke("ns", "a")
        release.set()
        await asyncio.sleep(0.2)
        stopped.set()
        await asyncio.wait_for(loop, 1)
    assert calls == [0, 1]  # the start, then one for all five pokes


async def test_resync_reconciles_without_pokes_and_stop_ends_the_loop() -> None:
    stopped, calls = StopFlag(), []

    async def reconcile() -> bool:
        calls.append(1)
        return True

    loop = asyncio.create_task(reconcile_loop(asyncio.Event(), stopped, reconcile,
                                              resync_seconds=0.05, debounce_seconds=0))
    await asyncio.sleep(0.3)
    stopped.set()
    await asyncio.wait_for(loop, 1)
    assert 3 <= len(calls) <= 8


async def test_failures_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triggers, "MAX_BACKOFF_SECONDS", 0.1)
    stopped, calls = StopFlag(), []

    async def failing() -> bool:
        calls.append(1)
        return False

    loop = asyncio.create_task(reconcile_loop(asyncio.Event(), stopped, failing, resync_seconds=0.001,
                                              debounce_seconds=0))
    await asyncio.sleep(0.35)
    stopped.set()
    await asyncio.wait_for(loop, 1)
    assert 2 <= len(calls) <= 5  # every 0.1 s at most, not every resync (0.001 s)


async def test_poke_all_wakes_every_object_or_one_namespace() -> None:
    registry = Triggers()
    with registry.listening("x", "a") as a, registry.listening("x", "b") as b, registry.listening("y", "c") as c:
        registry.poke_all("x")
        assert (a.is_set(), b.is_set(), c.is_set()) == (True, True, False)
        registry.poke_all()
        assert c.is_set()
        registry.poke(None, "a")  # an object without a namespace has no daemon: ignored
    assert not registry.listened("x", "a")


async def test_a_daemon_that_ends_leaves_a_new_object_of_its_name_poked() -> None:
    """kubectl replace --force: the old object's daemon ends after the new one's started. Ending, it took the
    name's trigger (and metrics) away, and the new daemon heard no poke until its resync."""
    registry, calls = Triggers(), []
    old_stop, new_stop = StopFlag(), StopFlag()

    async def daemon(stopped: StopFlag, which: str) -> None:
        async def reconcile() -> bool:
            calls.append(which)
            return True

        with registry.listening("ns", "a") as trigger:
            await reconcile_loop(trigger, stopped, reconcile, resync_seconds=3600, debounce_seconds=0.01)

    old = asyncio.create_task(daemon(old_stop, "old"))
    new = asyncio.create_task(daemon(new_stop, "new"))
    await asyncio.sleep(0.05)
    old_stop.set()
    await asyncio.wait_for(old, 1)
    assert registry.listened("ns", "a")  # the name's series stay: they are the new object's
    calls.clear()
    registry.poke("ns", "a")
    await asyncio.sleep(0.1)
    assert calls == ["new"]
    new_stop.set()
    await asyncio.wait_for(new, 1)
    assert not registry.listened("ns", "a")
