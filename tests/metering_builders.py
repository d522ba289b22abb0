"""Builders for metering tests: request events, a gateway config, and exact batched-GPU timelines."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from tensorfleet.metering.attribution import Attributor, Placement, Settled, work_spans
from tensorfleet.metering.events import RequestEvent, TokenChunk

CONFIG: dict[str, Any] = {
    "service": {"namespace": "team-a", "name": "llama"},
    "model": {"servedName": "llama3", "uri": "hf://org/llama@main", "digest": None, "maxModelLen": 8192},
    "runtime": "vllm",
    "gpusPerReplica": 1,
    "engine": {"precision": "fp16", "fingerprint": "sha256:abc"},
    "billing": {"tier": "standard", "currency": "USD", "pricePerResourceUnit": "0.000002",
                "pricePerMillionInputTokens": "0.1", "pricePerMillionOutputTokens": "0.4"},
}


def request(request_id: str = "r1", *, admitted: float | None = 0.0, first_token: float | None = None,
            chunks: tuple[tuple[float, int], ...] = (), done: float | None = None, prompt: int = 100,
            completion: int | None = None, cached: int = 0, billable: bool = True, tenant: str = "acme",
            cache_hit: bool = False, received: float | None = None, received_at: float = 1_700_000_000.0,
            status: int = 200) -> RequestEvent:
    token_chunks = tuple(TokenChunk(at, n) for at, n in chunks)
    end = done if done is not None else max([c.at for c in token_chunks] + [admitted or 0.0, first_token or 0.0])
    return RequestEvent(
        request_id=request_id, tenant=tenant, model="llama3", endpoint="/v1/chat/completions",
        received_at=received_at, received=received if received is not None else (admitted or 0.0),
        admitted=admitted, first_token=first_token, done=end, chunks=token_chunks, prompt_tokens=prompt,
        completion_tokens=completion if completion is not None else sum(n for _, n in chunks),
        cached_tokens=cached, status=status, streaming=True, billable=billable, cache_hit=cache_hit)


@dataclasses.dataclass
class Timeline:
    """A batched GPU run with known truth: back-to-back steps, each split by the tokens it processed."""

    events: list[RequestEvent]
    truth_ms: dict[str, float]
    steps: list[tuple[float, float]]  # (start, end) of each step, seconds


def batched_timeline(seed: int, requests: int = 12, max_batch: int = 6) -> Timeline:
    """Requests join a continuous batch: a prefill step (all prompt tokens), then one token per step.

    The GPU is busy for the whole of every step and steps follow each other while any request is in
    flight, so token-work attribution with exact intervals must reproduce the truth.
    """
    rng = random.Random(seed)
    waiting = [(f"r{i}", rng.randint(20, 400), rng.randint(1, 12)) for i in range(requests)]
    running: dict[str, dict[str, Any]] = {}
    truth: dict[str, float] = {}
    events: list[RequestEvent] = []
    steps: list[tuple[float, float]] = []
    clock = 1.0
    while waiting or running:
        while waiting and len(running) < max_batch:
            key, prompt, out = waiting.pop(0)
            running[key] = {"prompt": prompt, "left": out, "out": out, "admitted": clock, "chunks": [],
                            "first": None, "prefilled": False}
        # The prefill step processes the prompt and yields the first token; later steps one token each.
        work = {k: (r["prompt"] + 1 if not r["prefilled"] else 1) for k, r in running.items()}
        duration = 0.004 + 0.00005 * sum(work.values())
        end = clock + duration
        steps.append((clock, end))
        for key, tokens in work.items():
            truth[key] = truth.get(key, 0.0) + duration * 1000.0 * tokens / sum(work.values())
            item = running[key]
            if not item["prefilled"]:
                item["prefilled"], item["first"] = True, end
            item["chunks"].append((end, 1))
            item["left"] -= 1
            if item["left"] == 0:
                events.append(request(key, admitted=item["admitted"], first_token=item["first"],
                                      chunks=tuple(item["chunks"]), done=end, prompt=item["prompt"],
                                      completion=item["out"]))
                del running[key]
        clock = end
        if not running and waiting:
            clock += rng.uniform(0.0, 0.3)  # idle: nothing in flight
    return Timeline(events, truth, steps)


def engine_timeline(seed: int, requests: int = 80, budget: int = 600, max_batch: int = 16) -> Timeline:
    """A vLLM-like engine (a test double of the benchmark's): requests reach it at random moments and wait,
    first come first served; each step decodes one token per running request and prefills the rest of a
    ``budget`` of tokens, chunking a long prompt; the GPU idles 0.8 ms between steps; the gateway sees each
    token 0.2-1.0 ms after its step. Twenty requests arrive per second. Truth: a step's kernel time split by
    the tokens each request had in it."""
    rng = random.Random(seed)
    arrivals = sorted((rng.uniform(0.0, requests / 20), rng.choice([rng.randint(5, 120), rng.randint(200, 1500)]),
                       rng.randint(1, 40)) for _ in range(requests))
    waiting: list[dict[str, Any]] = []
    running: list[dict[str, Any]] = []
    truth: dict[str, float] = {}
    events: list[RequestEvent] = []
    steps: list[tuple[float, float]] = []
    clock, n = 0.0, 0
    while arrivals or waiting or running:
        while arrivals and arrivals[0][0] <= clock:
            at, prompt, out = arrivals.pop(0)
            n += 1
            waiting.append({"key": f"r{n}", "admitted": at, "prompt": prompt, "done": 0, "out": out, "chunks": [],
                            "first": None})
        if not waiting and not running:
            clock = arrivals[0][0]
            continue
        batch = [(r, 1) for r in running if r["done"] == r["prompt"]]
        room = budget - len(batch)
        for r in [r for r in running if r["done"] < r["prompt"]] + waiting[:]:
            if room <= 0 or (r in waiting and len(running) >= max_batch):
                break
            if r in waiting:
                waiting.remove(r)
                running.append(r)
            take = min(room, r["prompt"] - r["done"])
            batch.append((r, take))
            room -= take
        tokens = sum(t for _, t in batch)
        end = clock + 0.002 + 0.00002 * tokens
        steps.append((clock, end))
        for r, take in batch:
            truth[r["key"]] = truth.get(r["key"], 0.0) + (end - clock) * 1000.0 * take / tokens
            if r["done"] < r["prompt"]:
                r["done"] += take
                if r["done"] < r["prompt"]:
                    continue
            seen = end + rng.uniform(0.0002, 0.001)
            r["first"] = r["first"] or seen
            r["chunks"].append((seen, 1))
            if len(r["chunks"]) == r["out"]:
                running.remove(r)
                events.append(request(r["key"], admitted=r["admitted"], first_token=r["first"],
                                      chunks=tuple(r["chunks"]), done=seen, prompt=r["prompt"]))
        clock = end + 0.0008
    return Timeline(events, truth, steps)


def exact_intervals(steps: list[tuple[float, float]], start: float, end: float,
                    period: float) -> list[tuple[float, float, float]]:
    """(start, end, busy_ms) per sampling period, busy being the step time inside it (what GPM reports)."""
    out = []
    t = start
    while t < end:
        u = min(end, t + period)
        busy = sum(max(0.0, min(u, b) - max(t, a)) for a, b in steps)
        out.append((t, u, busy * 1000.0))
        t = u
    return out


def attribute(events: list[RequestEvent], intervals: list[tuple[float, float, float]],
              gpus: int = 1, placement: Placement = "steps",
              step_tokens: int | None = None) -> tuple[dict[str, Settled], Attributor, list[Any]]:
    attributor = Attributor(gpus, placement=placement, step_tokens=step_tokens)
    for start, end, busy in intervals:
        attributor.add_interval(start, end, busy, None, "gpm")
    for event in events:
        attributor.add_request(event.request_id, work_spans(event), event.billable)
    attributor.place_all()  # closing down: work past the last interval is left uncovered
    finalised = attributor.finalise(float("inf"))
    return {s.key: s for s in attributor.settle()}, attributor, finalised


def attribute_online(events: list[RequestEvent], intervals: list[tuple[float, float, float]],
                     placement: Placement = "steps",
                     step_tokens: int | None = None) -> tuple[dict[str, Settled], Attributor, list[Any]]:
    """As the writer does it: each interval when it ends, each request when it is done, finalising as far as
    the admission hints allow (nothing admitted earlier is still in flight)."""
    attributor = Attributor(1, placement=placement, step_tokens=step_tokens)
    pending = sorted(events, key=lambda e: e.done)
    finalised: list[Any] = []
    settled: dict[str, Settled] = {}
    for start, end, busy in intervals:
        attributor.add_interval(start, end, busy, None, "gpm")
        while pending and pending[0].done <= end:
            event = pending.pop(0)
            attributor.add_request(event.request_id, work_spans(event), event.billable)
        in_flight = [e.admitted for e in pending if e.admitted is not None]
        finalised += attributor.finalise(min([end, *in_flight]))
        settled.update({s.key: s for s in attributor.settle()})
    for event in pending:
        attributor.add_request(event.request_id, work_spans(event), event.billable)
    attributor.place_all()
    finalised += attributor.finalise(float("inf"))
    settled.update({s.key: s for s in attributor.settle()})
    return settled, attributor, finalised
