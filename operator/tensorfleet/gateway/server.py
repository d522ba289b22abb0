"""The gateway process: the client and admin HTTP servers, background tasks, reloads and the drain.

``Gateway`` wires the parts together around an injected metering sink, so tests and the CLI build the
same thing. The CLI runs ``serve``: start, wait for SIGTERM/SIGINT, drain (not-ready first, then let
in-flight requests finish within the grace period), flush the sink, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from tensorfleet.gateway import config as gwconfig
from tensorfleet.gateway.auth import KeyStore, TenantResolver
from tensorfleet.gateway.cache import ResponseCache
from tensorfleet.gateway.context import ContextWindowPolicy
from tensorfleet.gateway.engine import EngineClient, engine_for
from tensorfleet.gateway.frontend import HTTPServer, Limits
from tensorfleet.gateway.hooks import RequestHook, ResponseHook
from tensorfleet.gateway.messages import Request, Response, Router, json_response
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.proxy import Proxy, Services
from tensorfleet.gateway.ratelimit import TokenRateLimiter
from tensorfleet.gateway.runaway_hook import RunawayHook
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.gateway.state import ActiveRequests, Admission, GatewayState
from tensorfleet.gateway.upstream import EngineConnections
from tensorfleet.gateway.warmup import EngineMonitor, WarmupGate
from tensorfleet.metering.events import EventSink

log = logging.getLogger(__name__)

_SESSION_CONNECTIONS = 100  # aiohttp's default: bounds the file descriptors of the calls beside the proxied ones


class MeteringSink(EventSink, Protocol):
    """What the metering module's sink offers the gateway process (see tensorfleet.metering.sink)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def gpu_utilization(self) -> float | None: ...


class Gateway:
    def __init__(self, settings: GatewaySettings, sink: EventSink, *,
                 gpu_utilization: Callable[[], float | None] | None = None,
                 config: gwconfig.GatewayConfig | None = None, pod: str = "",
                 request_hooks: Sequence[RequestHook] = (), response_hooks: Sequence[ResponseHook] = ()) -> None:
        self.settings = settings
        self.pod = pod
        self._config_version = gwconfig.file_version(settings.config)
        document = gwconfig.read_configuration(settings.config, settings.revision_config)
        self.config = config or gwconfig.parse(document, api_keys_mounted=bool(settings.api_keys_dir))
        # What this pod's engine is (model, runtime, engine, warm-up): fixed for the life of the process.
        self._revision = gwconfig.revision_part(document)
        self._pending_revision: dict[str, Any] | None = None  # a newer one, waiting for the pods of its revision
        self.metrics = GatewayMetrics(CollectorRegistry(), settings.max_tenant_labels)
        if gpu_utilization is not None:
            self.metrics.watch_gpu(gpu_utilization)
        self.state = GatewayState(self.metrics)
        self.keys = KeyStore(settings.api_keys_dir)
        self.keys.reload()
        self.engine = engine_for(settings.runtime, self.config.served_model, settings.triton_tokenizer_model,
                                 settings.max_batch_prompts)
        self.sink = sink
        # The token policy's own hooks read the live configuration, so reloads apply to the next request;
        # hooks passed in run before them (the context policy counts the body as it will be sent).
        self._request_hooks = [*request_hooks, ContextWindowPolicy(lambda: self.config, self.metrics)]
        self._response_hooks = [*response_hooks, RunawayHook(lambda: self.config, self.metrics)]
        self.services: Services | None = None
        self._servers: list[HTTPServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.ports: dict[str, int] = {}

    # ---- building ------------------------------------------------------------------------------

    def _services(self, session: aiohttp.ClientSession, connections: EngineConnections) -> Services:
        limiter = TokenRateLimiter(lambda tenant: self.config.token_policy.tokens_per_minute(tenant))
        return Services(
            settings=self.settings, config=self.config, engine=self.engine,
            client=EngineClient(session, self.settings.upstream, connections),
            resolver=TenantResolver(self.config.auth, self.keys), limiter=limiter,
            cache=ResponseCache(self.config.token_policy.cache), metrics=self.metrics, sink=self.sink,
            state=self.state, admission=Admission(self.metrics, self.settings.max_in_flight, self.settings.max_queue),
            active=ActiveRequests(), request_hooks=self._request_hooks, response_hooks=self._response_hooks)

    def client_routes(self, services: Services) -> Router:
        proxy = Proxy(services)
        router = Router()
        for route in self.engine.routes:
            router.add(route.method, route.path, proxy.generate if route.generates else proxy.passthrough)
        return router

    def admin_routes(self) -> Router:
        router = Router()
        router.add("GET", "/metrics", self._metrics)
        router.add("GET", "/readyz", self._readyz)
        router.add("GET", "/livez", self._livez)
        return router

    async def _metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    async def _readyz(self, request: Request) -> Response:
        state = self.state
        body = {"ready": state.ready, "phase": state.phase, "engineUp": state.engine_up}
        if state.failed:
            body["reason"] = state.failed
        return json_response(body, 200 if state.ready else 503)

    async def _livez(self, request: Request) -> Response:
        failed = self.state.failed
        return json_response({"alive": failed is None, **({"reason": failed} if failed else {})},
                             503 if failed else 200)

    # ---- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.upstream_connect_timeout_seconds,
                                        sock_read=s.upstream_idle_timeout_seconds)
        # Health, warm-up, /tokenize, model lists, metrics: at most this many sockets; further calls wait.
        connector = aiohttp.TCPConnector(limit=_SESSION_CONNECTIONS, ttl_dns_cache=None, keepalive_timeout=60)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))
        connections = EngineConnections(s.upstream, s.upstream_connect_timeout_seconds, s.upstream_idle_timeout_seconds)
        self.services = self._services(session, connections)
        self._session = session
        limits = Limits(s.max_body_bytes, s.max_header_bytes, s.max_headers, s.idle_timeout_seconds)
        access_log = logging.getLogger("tensorfleet.gateway.access") if s.access_log else None
        for name, router, port in (("admin", self.admin_routes(), s.admin_port),
                                   ("client", self.client_routes(self.services), s.port)):
            # Every answer ends its connection while draining, so keep-alive clients move to another replica.
            server = HTTPServer(router, limits, lambda: self.state.draining, access_log)
            self.ports[name] = await server.start(s.host, port)
            self._servers.append(server)
        monitor = EngineMonitor(self.engine, self.services.client, self.state, self.metrics, s.metrics_url,
                                s.engine_poll_seconds)
        self._spawn(self._warm_up(monitor), "warm-up")
        self._spawn(monitor.run(), "engine monitor")
        self._spawn(self._reload_forever(), "reload")
        log.info("gateway listening on %s:%d (admin %d), engine %s (%s)", s.host, self.ports["client"],
                 self.ports["admin"], s.upstream, s.runtime)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.append(task)

    async def _warm_up(self, monitor: EngineMonitor) -> None:
        """Warm the engine up before the pod serves, and each engine process after it that the monitor sees."""
        assert self.services is not None
        since: float | None = None  # the first start is this container's
        while True:
            gate = WarmupGate(self.config, self.engine, self.services.client, self.state, self.metrics, self.sink,
                              self.pod, self.settings.health_interval_seconds, since)
            try:
                await gate.run()
            except Exception as exc:
                if self.state.failed is None:
                    log.exception("warm-up failed")
                    self.state.fail(f"warm-up failed: {exc}")
                return
            since = await monitor.engine_lost()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            self.reload()

    def reload(self) -> bool:
        """Apply a changed gateway.json and API keys; a broken file keeps the previous configuration.

        Only the policy sections apply (``gwconfig.POLICY_SECTIONS``); the revision-bound ones stay as the
        gateway started with them, since they describe the engine beside it, which does not change.
        """
        self.keys.reload()
        version = gwconfig.file_version(self.settings.config)
        if version is None or version == self._config_version:
            return False
        self._config_version = version
        try:
            document, new = self._read_policy()
        except gwconfig.ConfigError as exc:
            log.error("configuration change ignored: %s", exc)
            self.metrics.config_reloads.labels("error").inc()
            return False
        self.apply(new)
        try:
            self.sink.reconfigure(document)
        except ValueError as exc:  # prices or resource units the metering half cannot use
            log.error("metering keeps its previous prices and resource units: %s", exc)
        self.metrics.config_reloads.labels("ok").inc()
        return True

    def _read_policy(self) -> tuple[dict[str, Any], gwconfig.GatewayConfig]:
        """gateway.json with this pod's revision-bound sections in place of any in the file.

        Without a revision file (``settings.revision_config``), gateway.json holds them too: it is checked
        whole (a broken section is an error, whichever it is) and a change to them is noted."""
        api_keys = bool(self.settings.api_keys_dir)
        document = gwconfig.read_document(self.settings.config)
        if self.settings.revision_config is None:
            gwconfig.parse(document, api_keys_mounted=api_keys)
            self._note_revision(gwconfig.revision_part(document))
        pinned = gwconfig.pin_revision(document, self._revision)
        return pinned, gwconfig.parse(pinned, api_keys_mounted=api_keys)

    def _note_revision(self, revision: dict[str, Any]) -> None:
        """Log once that the revision-bound sections changed: new pods will have them, this one does not."""
        logged = self._pending_revision
        self._pending_revision = None if revision == self._revision else revision
        if self._pending_revision is None or self._pending_revision == logged:
            return
        changed = sorted(key for key in revision.keys() | self._revision.keys()
                         if revision.get(key) != self._revision.get(key))
        log.info("gateway.json: %s changed; these describe the engine, so they take effect in the pods of the "
                 "new revision and this pod keeps the ones it started with", ", ".join(changed))

    def apply(self, new: gwconfig.GatewayConfig) -> None:
        old, self.config = self.config, new
        if self.services is not None:
            self.services.config = new
            self.services.resolver.config = new.auth
            if new.token_policy != old.token_policy:
                self.services.cache.config = new.token_policy.cache
                self.services.cache.clear()  # answers cached under another policy may no longer be allowed
        log.info("configuration reloaded")

    async def drain(self) -> bool:
        """Turn not-ready, keep serving while endpoints update, then wait for in-flight requests."""
        assert self.services is not None
        self.state.start_drain()
        log.info("draining: not ready; %d request(s) in flight", self.services.active.count)
        await asyncio.sleep(self.settings.drain_delay_seconds)
        started = time.monotonic()
        finished = await self.services.active.wait_idle(self.settings.drain_timeout_seconds)
        log.info("drain %s after %.1f s", "complete" if finished else "timed out; aborting the rest",
                 time.monotonic() - started)
        return finished

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in reversed(self._servers):
            await server.close()
        if self.services is not None:
            self.services.client.connections.close()
            await self._session.close()


async def serve(settings: GatewaySettings, sink: MeteringSink, pod: str = "",
                stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``), drain, flush metering; the exit status."""
    await sink.start()
    gateway = Gateway(settings, sink, gpu_utilization=sink.gpu_utilization, pod=pod)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()
        await stop.wait()
        log.info("stop signal received")
        await gateway.drain()
    finally:
        await gateway.close()
        await sink.close()
    return 0
