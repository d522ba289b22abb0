"""Two operator replicas with kopf peering: exactly one acts; the other takes over when it leaves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import TracebackType

import pytest

from builders import inference_service
from cluster import ISVC, Cluster, wait_for
from tensorfleet import runner
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.settings import OperatorSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread(ports=2) as emu:
        yield emu


class Replica:
    """One operator replica, started exactly as `tensorfleet run` starts it, in a thread."""

    def __init__(self, url: str, priority: int) -> None:
        self.settings = OperatorSettings(server=url, peering="tensorfleet", priority=priority, resync_seconds=1.0,
                                         debounce_seconds=0.05, liveness_port=0, metrics_port=0)
        self.stop, self.ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=runner.run_operator, args=(self.settings, self.stop, self.ready))

    def __enter__(self) -> Replica:
        self.thread.start()
        assert self.ready.wait(60), "the operator did not start"
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the operator did not stop"


def replica(url: str, priority: int) -> Replica:
    return Replica(url, priority)


def acting_writes(emulator: EmulatorThread, port: str, since: int = 0) -> list[tuple[str, str]]:
    """Writes from one replica, except its peering heartbeats and Events."""
    server = emulator.server
    pairs = list(zip(server.writes, server.write_ports, strict=True))[since:]
    return [w for w, p in pairs if str(p) == port and "kopfpeerings" not in w[1] and "/events" not in w[1]]


def test_only_the_leader_acts_and_the_other_takes_over(emulator: EmulatorThread) -> None:
    cluster = Cluster(emulator)
    response = cluster.http.post("/apis/kopf.dev/v1/clusterkopfpeerings",
                                 json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                       "metadata": {"name": "tensorfleet"}})
    assert response.status_code == 201
    leader_port, follower_port = (url.rsplit(":", 1)[1] for url in emulator.urls)
    follower = replica(emulator.urls[1], priority=100)
    with follower:
        with replica(emulator.urls[0], priority=200):
            time.sleep(3)  # both see each other's peering record; the lower priority pauses
            cluster.create(inference_service("llama"))
            wait_for(lambda: len(cluster.children("llama")) == 5, what="children")
            cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"replicas": 2}})
            wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["replicas"] == 2, what="scale")
            assert acting_writes(emulator, leader_port), "the leader did not act"
            assert acting_writes(emulator, follower_port) == [], "the paused replica wrote"
        mark = len(emulator.server.writes)
        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"replicas": 3}})
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama")["spec"]["replicas"] == 3, timeout=60,
                 what="the remaining replica takes over")
        assert acting_writes(emulator, follower_port, since=mark)
    cluster.close()


def test_replicas_get_distinct_random_priorities() -> None:
    settings = OperatorSettings()
    priorities = {runner.operator_kwargs(settings)["priority"] for _ in range(50)}
    assert len(priorities) > 45  # equal priorities would freeze every replica
    assert runner.operator_kwargs(OperatorSettings(priority=7))["priority"] == 7
