"""The simulated service: replicas of the replica model behind one queue, stepped in small ticks.

Requests wait in one FIFO queue (the gateways' queues, with least-loaded routing) until a ready
replica has a free batch slot and room in its KV cache for the prompt and the output; the one with
the most free KV cache takes the request. That moment is the end of the request's *queue wait*. Its
first token comes when its prompt is prefilled, its last when it has decoded every output token.

Within a tick a replica runs engine steps as ``model.ReplicaModel`` describes (a fluid approximation:
fractional steps), so its GPU is busy whenever it holds a request: exactly how NVML utilization pins
at 100% once an engine batches. A replica asked for is billed from that moment, serves after its
startup delay, and when removed it stops taking requests and is billed until it has finished them.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Protocol

from tensorfleet.autoscale.signals import PodMetrics, PodTarget
from tensorfleet.autoscale.simulator.model import ReplicaModel
from tensorfleet.autoscale.simulator.trace import Trace


class Recorder(Protocol):
    def admitted(self, request: int, time: float) -> None: ...
    def first_token(self, request: int, time: float) -> None: ...
    def finished(self, request: int, time: float) -> None: ...
    def rejected(self, request: int, time: float) -> None: ...


class RequestLog:
    """When each request of the trace was admitted, got its first token and finished (NaN: never)."""

    def __init__(self, size: int) -> None:
        self.admit = [math.nan] * size
        self.first = [math.nan] * size
        self.finish = [math.nan] * size
        self.rejects: list[int] = []

    def admitted(self, request: int, time: float) -> None:
        self.admit[request] = time

    def first_token(self, request: int, time: float) -> None:
        self.first[request] = time

    def finished(self, request: int, time: float) -> None:
        self.finish[request] = time

    def rejected(self, request: int, time: float) -> None:
        self.rejects.append(request)


@dataclasses.dataclass
class Replica:
    id: int
    billed_from: float
    ready_at: float
    draining: bool = False
    prefill: list[list[float]] = dataclasses.field(default_factory=list)  # FIFO of [request, prompt left]
    decode_ids: list[int] = dataclasses.field(default_factory=list)
    decode_left: list[float] = dataclasses.field(default_factory=list)
    kv_reserved: int = 0
    busy_seconds: float = 0.0  # since the last scrape

    @property
    def in_flight(self) -> int:
        return len(self.prefill) + len(self.decode_ids)

    def ready(self, now: float) -> bool:
        return self.ready_at <= now + 1e-9


@dataclasses.dataclass
class Sample:
    """One second of the run, for the report and the plot."""

    time: float
    arrivals: int
    queue: int
    in_flight: int
    serving: int
    billed: int


class Cluster:
    def __init__(self, trace: Trace, model: ReplicaModel, recorder: Recorder, tick: float = 0.1) -> None:
        self.trace = trace
        self.model = model
        self.recorder = recorder
        self.tick = tick
        self.now = 0.0
        self.next_request = 0
        self.queue: collections.deque[int] = collections.deque()
        self.replicas: list[Replica] = []
        self.billed_seconds = 0.0  # replica-seconds
        self._next_id = 0

    # ---- scaling ------------------------------------------------------------------------------------

    def active(self) -> list[Replica]:
        return [r for r in self.replicas if not r.draining]

    def scale_to(self, replicas: int, startup: float, reuse_draining: bool = False) -> None:
        """Ask for ``replicas``. Only the oracle may ``reuse_draining`` (a terminating pod cannot come back)."""
        active = self.active()
        if reuse_draining and replicas > len(active):
            for replica in [r for r in self.replicas if r.draining][:replicas - len(active)]:
                replica.draining = False
            active = self.active()
        for _ in range(replicas - len(active)):
            self.replicas.append(Replica(self._next_id, self.now, self.now + startup))
            self._next_id += 1
        surplus = len(active) - replicas
        if surplus <= 0:
            return
        # As a ReplicaSet scales down: pods that are not ready first (newest first), then the least busy.
        victims = sorted(active, key=lambda r: (r.ready(self.now), r.in_flight, -r.billed_from))[:surplus]
        for victim in victims:
            if victim.ready(self.now):
                victim.draining = True
            else:
                self.replicas.remove(victim)

    def clone(self, recorder: Recorder) -> Cluster:
        twin = copy.copy(self)
        twin.recorder = recorder
        twin.queue = collections.deque(self.queue)
        twin.replicas = [dataclasses.replace(r, prefill=[list(p) for p in r.prefill], decode_ids=list(r.decode_ids),
                                             decode_left=list(r.decode_left)) for r in self.replicas]
        return twin

    # ---- what the gateways would report ------------------------------------------------------------

    def pods(self, interval: float) -> tuple[list[PodTarget], dict[str, PodMetrics]]:
        """Every non-draining replica as a pod, with the metrics its gateway would serve; resets busy time."""
        targets, metrics = [], {}
        serving = [r for r in self.active() if r.ready(self.now)]
        share, extra = divmod(len(self.queue), len(serving)) if serving else (0, 0)
        for rank, replica in enumerate(serving):
            name = f"replica-{replica.id}"
            targets.append(PodTarget(name, "ready", f"sim://{name}"))
            kv = replica.kv_reserved / self.model.kv_cache_tokens
            metrics[name] = PodMetrics(
                gateway_queue=float(share + (1 if rank < extra else 0)), engine_waiting=0.0,
                in_flight=float(replica.in_flight), gpu_utilization=min(1.0, replica.busy_seconds / interval),
                kv_cache_usage=min(1.0, kv), ready=True, startup_seconds=self.model.startup_seconds)
            replica.busy_seconds = 0.0
        targets += [PodTarget(f"replica-{r.id}", "warming") for r in self.active() if not r.ready(self.now)]
        return targets, metrics

    def sample(self, arrivals: int) -> Sample:
        serving = sum(1 for r in self.replicas if not r.draining and r.ready(self.now))
        return Sample(self.now, arrivals, len(self.queue), sum(r.in_flight for r in self.replicas), serving,
                      len(self.replicas))

    # ---- time ---------------------------------------------------------------------------------------

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> None:
        while self.now < end - 1e-9:
            self.step()
            if stop is not None and stop():
                return

    def idle(self) -> bool:
        return self.next_request >= len(self.trace) and not self.queue and all(
            r.in_flight == 0 for r in self.replicas)

    def step(self) -> None:
        arrivals = self.trace.arrivals
        while self.next_request < len(arrivals) and arrivals[self.next_request] <= self.now:
            self.queue.append(self.next_request)
            self.next_request += 1
        self._admit()
        for replica in self.replicas:
            if replica.ready(self.now):
                self._advance(replica)
        self.billed_seconds += self.tick * len(self.replicas)
        self.replicas = [r for r in self.replicas if not (r.draining and r.in_flight == 0)]
        self.now += self.tick

    def _admit(self) -> None:
        model, trace = self.model, self.trace
        open_replicas = [r for r in self.replicas if not r.draining and r.ready(self.now)]
        while self.queue:
            request = self.queue[0]
            need = trace.context_tokens[request] + trace.generated_tokens[request]
            if need > model.kv_cache_tokens:  # can never run: the gateway would reject it as too long
                self.queue.popleft()
                self.recorder.rejected(request, self.now)
                continue
            fits = [r for r in open_replicas
                    if r.in_flight < model.max_batch and r.kv_reserved + need <= model.kv_cache_tokens]
            if not fits:
                return  # first come, first served: the head of the queue waits, and so does everyone behind it
            best = min(fits, key=lambda r: (r.kv_reserved, r.id))
            self.queue.popleft()
            best.prefill.append([float(request), float(trace.context_tokens[request])])
            best.kv_reserved += need
            self.recorder.admitted(request, self.now)

    def _advance(self, replica: Replica) -> None:
        """One tick of engine steps on one replica: chunked prefill of waiting prompts, one token per step."""
        model, tick = self.model, self.tick
        running = len(replica.decode_left)
        backlog = sum(p[1] for p in replica.prefill)
        if running == 0 and backlog == 0:
            return
        decode_step = model.step_seconds(running)
        prefilled, prefill_time, steps = 0.0, 0.0, 0.0
        if backlog > 0:
            # Full mixed steps (every running sequence decodes, prompts fill the rest of the token budget),
            # as a rate: prompt tokens cost mixed_step / chunk seconds each until the backlog is gone.
            chunk = float(max(model.step_token_budget - running, 1))
            mixed_step = model.step_seconds(running, chunk)
            prefill_time = min(tick, backlog * mixed_step / chunk)
            prefilled = prefill_time * chunk / mixed_step
            steps = prefill_time / mixed_step if running else 0.0
        if running:
            steps += (tick - prefill_time) / decode_step
        replica.busy_seconds += tick if running else prefill_time
        self._decode(replica, steps)
        self._prefill(replica, prefilled, prefill_time)

    def _decode(self, replica: Replica, steps: float) -> None:
        if steps <= 0 or not replica.decode_left:
            return
        left = [x - steps for x in replica.decode_left]
        if min(left) > 0:
            replica.decode_left = left
            return
        keep_ids, keep_left = [], []
        for request, before, after in zip(replica.decode_ids, replica.decode_left, left, strict=True):
            if after > 0:
                keep_ids.append(request)
                keep_left.append(after)
            else:
                self._finish(replica, request, self.now + self.tick * before / steps)
        replica.decode_ids, replica.decode_left = keep_ids, keep_left

    def _prefill(self, replica: Replica, tokens: float, seconds: float) -> None:
        done = 0.0
        while replica.prefill and tokens > 1e-9:
            entry = replica.prefill[0]
            if entry[1] > tokens + 1e-9:
                entry[1] -= tokens
                return
            tokens -= entry[1]
            done += entry[1]
            replica.prefill.pop(0)
            request = int(entry[0])
            at = self.now + seconds * (done / (done + tokens) if done + tokens > 0 else 1.0)
            self.recorder.first_token(request, at)
            left = self.trace.generated_tokens[request] - 1  # the prefill step emits the first token
            if left <= 0:
                self._finish(replica, request, at)
            else:
                replica.decode_ids.append(request)
                replica.decode_left.append(float(left))

    def _finish(self, replica: Replica, request: int, at: float) -> None:
        replica.kv_reserved -= self.trace.context_tokens[request] + self.trace.generated_tokens[request]
        self.recorder.finished(request, at)
