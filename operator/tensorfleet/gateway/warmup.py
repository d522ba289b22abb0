"""Start-up: wait for the engine, warm it up, then turn ready; and keep watching the engine afterwards.

Cold start is measured from the container start (this process's start time, read from /proc) through
engine healthy and warmed up to ready, exported as metrics and submitted as a ``ColdStartEvent``.
Warm-up requests go straight to the engine and are recorded as non-billable events. When the engine
container restarts on its own (OOM, its liveness probe), the monitor sees it gone and the gateway runs
the same gate again for the new engine process, measured from when it was seen gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
import uuid
from typing import Any

import aiohttp

from tensorfleet.gateway.config import GatewayConfig, WarmupRequest
from tensorfleet.gateway.engine import Engine, EngineClient, TritonEngine
from tensorfleet.gateway.errors import GatewayError, engine_error_message
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.state import GatewayState
from tensorfleet.metering.events import ColdStartEvent, EventSink, RequestEvent, TokenChunk

log = logging.getLogger(__name__)

WARMUP_TENANT = "tensorfleet:warmup"
SHORT_PROMPT = "Hello! Please introduce yourself in one sentence."
DEFAULT_BATCH = 8
LOST_AFTER_FAILURES = 3  # failed health checks in a row (one poll apart) that mean the engine process is gone


def process_age_seconds() -> float:
    """How long ago this process (so, near enough, its container) started; 0 when /proc cannot tell."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as stream:
            uptime = float(stream.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclasses.dataclass(frozen=True)
class WarmupResult:
    ok: bool
    detail: str
    final: bool = False  # it can never pass: another round would only repeat it


NamedRequest = tuple[str, WarmupRequest]  # a warm-up request and what names it to the user (its field path)


@dataclasses.dataclass(frozen=True)
class EngineAnswer:
    status: int
    seconds: float
    message: str | None  # the engine's error message, when it gave one

    def said(self) -> str:
        return f" ({self.message})" if self.message else ""


def engine_message(answer: Any) -> str | None:
    """The error message in an engine's answer (:func:`engine_error_message`, or an older vLLM's top-level
    ``message``), at most 500 characters."""
    message = engine_error_message(answer) or (answer.get("message") if isinstance(answer, dict) else None)
    return str(message)[:500] if message else None


def over_window(requests: list[NamedRequest], window: int | None) -> str | None:
    """The first warm-up request the engine's context window cannot hold (every round would be refused)."""
    if window is None:
        return None
    for name, item in requests:
        if item.prompt_tokens is not None and item.prompt_tokens + item.max_tokens > window:
            return (f"{name}.promptTokens: Invalid value: {item.prompt_tokens}: promptTokens plus maxTokens "
                    f"({item.max_tokens}) exceeds the engine's context window {window}")
        if item.prompt is not None and item.max_tokens >= window:
            return (f"{name}.maxTokens: Invalid value: {item.max_tokens}: must be less than the engine's context "
                    f"window {window}, so that the prompt has room")
    return None


def refused(name: str, item: WarmupRequest, answer: EngineAnswer, window: int | None) -> WarmupResult | None:
    """A final result when the engine refused the request itself (a 4xx but 408 and 429): it always will."""
    if not 400 <= answer.status < 500 or answer.status in (408, 429):
        return None
    size = f"promptTokens {item.prompt_tokens}" if item.prompt is None else f"a prompt of {len(item.prompt)} chars"
    limit = f"; the engine's context window is {window}" if window is not None else ""
    return WarmupResult(False, f"{name}: the engine refuses it ({size}, maxTokens {item.max_tokens}{limit}) with "
                               f"status {answer.status}{answer.said()}", final=True)


class WarmupGate:
    """One engine process's way to ready: healthy, warmed up, one cold-start record.

    ``since`` (monotonic) is when that start began: None for this container's start (its process's start
    time), else when the previous engine process was seen gone.
    """

    def __init__(self, config: GatewayConfig, engine: Engine, client: EngineClient, state: GatewayState,
                 metrics: GatewayMetrics, sink: EventSink, pod: str, health_interval: float = 0.5,
                 since: float | None = None) -> None:
        self.config = config
        self.engine = engine
        self.client = client
        self.state = state
        self.metrics = metrics
        self.sink = sink
        self.pod = pod
        self.health_interval = health_interval
        self.created = time.monotonic()
        self.started = self.created - process_age_seconds() if since is None else since
        self.start_event = "the container started" if since is None else "the previous engine process was seen gone"
        self.started_at = time.time() - (time.monotonic() - self.started)

    async def run(self) -> None:
        # The deadline runs from this gate's start; the cold-start record below measures from ``started``: the
        # container's (the process's) start, or when the previous engine process was seen gone. For the first
        # start the two differ only when the gateway runs inside a longer-lived process, as in tests.
        deadline = self.created + self.config.warmup.timeout_seconds
        self.state.begin_start(self.started_at)
        await self._wait_healthy(deadline)
        healthy = time.monotonic()
        self.state.set_engine_up(True)
        self.state.set_phase("warming_up")
        await self._warm_up(deadline)
        warm = time.monotonic()
        self.state.mark_warm()
        ready = time.monotonic()
        self._report({"engine_healthy": healthy - self.started, "warmed_up": warm - healthy,
                      "ready": ready - warm}, ready - self.started)

    async def _wait_healthy(self, deadline: float) -> None:
        log.info("waiting for the engine at %s%s", self.client.base_url, self.engine.health_path)
        while True:
            if await engine_health(self.client, self.engine.health_path) is Health.OK:
                log.info("the engine is healthy")
                return
            if time.monotonic() > deadline:
                self._fail(f"the engine was not healthy within warmup.timeoutSeconds "
                           f"({self.config.warmup.timeout_seconds:g} s)")
            await asyncio.sleep(self.health_interval)

    async def _warm_up(self, deadline: float) -> None:
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt()
            if result.ok:
                log.info("warm-up done (%d round(s)): %s", attempt, result.detail)
                return
            log.warning("warm-up round %d did not pass: %s", attempt, result.detail)
            if result.final:
                self._fail(f"warm-up cannot pass: {result.detail}")
            if time.monotonic() > deadline:
                self._fail(f"warm-up did not pass within warmup.timeoutSeconds: {result.detail}")
            await asyncio.sleep(1.0)

    async def _attempt(self) -> WarmupResult:
        """One round, with every call it makes to the engine: one the engine drops or does not answer in time (a
        restart between its health check and the warm-up, a flap) fails this round, which is tried again."""
        try:
            if isinstance(self.engine, TritonEngine):
                await self.engine.load_models(self.client)
            if not self.config.warmup.enabled:
                return WarmupResult(True, "warmup.enabled is false: no warm-up requests")
            window = self.config.max_model_len or await self.engine.context_window(self.client)
            requests = self._requests(window)
            refusal = over_window(requests, window)
            if refusal is not None:
                return WarmupResult(False, refusal, final=True)
            return await self._round(requests, window)
        except GatewayError as exc:
            return WarmupResult(False, exc.message)

    def _fail(self, reason: str) -> None:
        log.error("%s", reason)
        self.state.fail(reason)
        raise GatewayError(503, reason, "warmup_failed")

    def _requests(self, window: int | None) -> list[NamedRequest]:
        """spec.warmup.requests, each with its field path; else the defaults, named as such."""
        if self.config.warmup.requests:
            return [(f"spec.warmup.requests[{index}]", item) for index, item in enumerate(self.config.warmup.requests)]
        batch = min(DEFAULT_BATCH, self.config.engine_max_batch_size or DEFAULT_BATCH)
        defaults = [("the default warm-up request (a short prompt)", WarmupRequest(SHORT_PROMPT, None, 16, 1))]
        longest = self._longest_prompt(window)
        if longest:
            defaults.append((f"the default warm-up request (a prompt of {longest} tokens)",
                             WarmupRequest(None, longest, 16, 1)))
        defaults.append((f"the default warm-up request (a batch of {batch})",
                         WarmupRequest(SHORT_PROMPT, None, 16, batch)))
        return defaults

    def _longest_prompt(self, window: int | None) -> int | None:
        """A prompt near the max input length: maxInputTokens, else the context window less the output."""
        limit = self.config.token_policy.max_input_tokens
        if window is not None:
            limit = min(limit or window, window - 16 - 1)
        if not limit or limit < 2:
            log.info("no max input length known: the long warm-up prompt is skipped")
            return None
        return limit

    async def _round(self, requests: list[NamedRequest], window: int | None) -> WarmupResult:
        needs_padding = any(item.prompt is None for _, item in requests)
        padding = await self.engine.token_for_padding(self.client) if needs_padding else 0
        # Its own pool, as wide as the widest batch (the shared session's holds 100 sockets): a batch reaches
        # the engine at once, and the latency measured is the engine's, not time queued in the gateway.
        width = max((item.concurrency for _, item in requests), default=1)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=width)) as session:
            client = EngineClient(session, self.client.base_url, self.client.connections)
            return await self._batches(client, requests, window, padding)

    async def _batches(self, client: EngineClient, requests: list[NamedRequest], window: int | None,
                       padding: int) -> WarmupResult:
        bound = self.config.warmup.max_latency_ms
        details = []
        for name, item in requests:
            prompt: str | list[int] = item.prompt if item.prompt is not None else [padding] * (item.prompt_tokens or 1)
            results = await asyncio.gather(*(self._one(client, prompt, item.max_tokens)
                                             for _ in range(item.concurrency)))
            slowest = max(answer.seconds for answer in results)
            size = f"{len(prompt)} tokens" if isinstance(prompt, list) else f"{len(prompt)} chars"
            details.append(f"{item.concurrency}x {size}: {slowest * 1000:.0f} ms")
            failed = [answer for answer in results if answer.status != 200]
            if failed:
                return refused(name, item, failed[0], window) or WarmupResult(
                    False, f"{len(failed)} of {item.concurrency} request(s) of {size} failed with status "
                           f"{failed[0].status}{failed[0].said()}")
            if bound is not None and slowest * 1000 > bound:
                return WarmupResult(False, f"{size} took {slowest * 1000:.0f} ms, over warmup.maxLatencyMs {bound}")
        return WarmupResult(True, "; ".join(details))

    async def _one(self, client: EngineClient, prompt: str | list[int], max_tokens: int) -> EngineAnswer:
        path, body = self.engine.warmup_request(prompt, max_tokens)
        received, received_at = time.monotonic(), time.time()
        try:
            status, answer = await client.post_json(path, body, seconds=self.config.warmup.timeout_seconds)
        except GatewayError as exc:
            status, answer = exc.status, None
        done = time.monotonic()
        self._record(path, received, received_at, done, status, answer)
        return EngineAnswer(status, done - received, engine_message(answer))

    def _record(self, path: str, received: float, received_at: float, done: float, status: int, answer: Any) -> None:
        usage = self.engine.usage_from_body(answer)
        completion = usage.completion_tokens if usage else 0
        self.sink.submit(RequestEvent(
            request_id=f"tf-warmup-{uuid.uuid4().hex}", tenant=WARMUP_TENANT, model=self.config.served_model,
            endpoint=path, received_at=received_at, received=received, admitted=received,
            first_token=done if completion else None, done=done,
            chunks=(TokenChunk(done, completion),) if completion else (),
            prompt_tokens=usage.prompt_tokens if usage else 0, completion_tokens=completion,
            cached_tokens=usage.cached_tokens if usage else 0, status=status, streaming=False, billable=False,
            error=None if status == 200 else "warmup_failed"))

    def _report(self, stages: dict[str, float], total: float) -> None:
        for stage, seconds in stages.items():
            self.metrics.cold_start.labels(stage).observe(seconds)
        self.metrics.startup_seconds.set(total)
        log.info("ready %.1f s after %s (%s)", total, self.start_event,
                 ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
        self.sink.submit(ColdStartEvent(pod=self.pod, started_at=self.started_at,
                                        stages=tuple(stages.items()), total_seconds=total))


class Health(enum.Enum):
    OK = "ok"
    FAILING = "failing"  # another status, or no answer in time: the engine may only be busy
    GONE = "gone"  # no connection could be made: nothing listens, the engine process is not running


async def engine_health(client: EngineClient, path: str, seconds: float = 5.0) -> Health:
    try:
        async with client.session.get(client.base_url + path, timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
            await resp.read()
            return Health.OK if resp.status == 200 else Health.FAILING
    except aiohttp.ClientConnectorDNSError:
        return Health.FAILING
    except aiohttp.ClientConnectorError:  # refused (a connect timeout is not one of these)
        return Health.GONE
    except (aiohttp.ClientError, OSError, TimeoutError):
        return Health.FAILING


def scrape_sum(text: str, name: str, label: str = "") -> float | None:
    """The sum of a metric's samples (optionally only those whose labels contain ``label``) in Prometheus text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " ") or (label and label not in rest):
            continue
        fields = rest.rsplit("}", 1)[-1].split()
        try:
            total += float(fields[0])
            found = True
        except (IndexError, ValueError):
            continue
    return total if found else None


class EngineMonitor:
    """Polls the engine's health and re-exports its queue and KV-cache gauges.

    While the pod is warm, a failed check turns it not-ready until a check passes again. A refused
    connection (nothing listens: the engine container is restarting) or ``lost_after`` failed checks in a
    row mean the engine process is gone: the pod stops serving (``GatewayState.lose_engine``) and
    ``engine_lost`` returns, so that the next engine process is warmed up before the pod serves again.
    """

    def __init__(self, engine: Engine, client: EngineClient, state: GatewayState, metrics: GatewayMetrics,
                 metrics_url: str, interval: float, lost_after: int = LOST_AFTER_FAILURES) -> None:
        self.engine = engine
        self.client = client
        self.state = state
        self.metrics = metrics
        self.metrics_url = metrics_url
        self.interval = interval
        self.lost_after = lost_after
        self.failures = 0
        self._lost = asyncio.Event()
        self._lost_at = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.state.warm:
                health = await engine_health(self.client, self.engine.health_path)
                if self.state.warm:
                    self.observe(health)
            await self.scrape()

    def observe(self, health: Health) -> None:
        """One health check of the warm engine: up, down for now, or gone."""
        self.failures = 0 if health is Health.OK else self.failures + 1
        if health is not Health.GONE and self.failures < self.lost_after:
            self.state.set_engine_up(health is Health.OK)
            return
        log.warning("the engine is gone (%s): not serving until its next process is warmed up",
                    "connection refused" if health is Health.GONE else f"{self.failures} failed health checks")
        self.failures = 0
        self._lost_at = time.monotonic()
        self.state.lose_engine()
        self._lost.set()

    async def engine_lost(self) -> float:
        """Wait until the warm engine is found gone; returns when it was (monotonic)."""
        await self._lost.wait()
        self._lost.clear()
        return self._lost_at

    async def scrape(self) -> None:
        try:
            async with self.client.session.get(self.metrics_url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError):
            return
        self.export(text)

    def export(self, text: str) -> None:
        if self.engine.runtime == "vllm":
            waiting = scrape_sum(text, "vllm:num_requests_waiting")
            kv = scrape_sum(text, "vllm:kv_cache_usage_perc")
            if kv is None:
                kv = scrape_sum(text, "vllm:gpu_cache_usage_perc")
        else:
            waiting = scrape_sum(text, "nv_inference_pending_request_count")
            used = scrape_sum(text, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"')
            total = scrape_sum(text, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="max"')
            kv = used / total if used is not None and total else None
        if waiting is not None:
            self.metrics.engine_waiting.set(waiting)
        if kv is not None:
            self.metrics.kv_cache.set(kv)
