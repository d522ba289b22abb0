"""Scraping the gateways' ``/metrics`` on their admin port: concurrent, time-bounded, failures tolerated.

A pod that does not answer in full within its budget (the scrape timeout, from connect to the last
byte), answers with an error, answers with something that is not Prometheus text, or whose text has
none of the gateway's metrics with a finite value (a gateway always reports
``tensorfleet_gateway_ready``) is left out of that observation (the policy
extrapolates from the pods that did answer, and holds when none did); the failure is counted and
logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import httpx

from tensorfleet.autoscale import signals
from tensorfleet.autoscale.signals import PodMetrics, PodTarget

logger = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 2 * 1024 * 1024  # a gateway's exposition is a few KiB; anything this large is wrong


class ScrapeError(Exception):
    """A gateway answered, but not with its metrics."""


class Scraper:
    def __init__(self, timeout_seconds: float = 1.0, concurrency: int = 64) -> None:
        # trust_env=False: pod IPs are reached directly, never through an HTTP proxy from the environment.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_seconds), trust_env=False,
                                       follow_redirects=False,
                                       limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=16))
        self._slots = asyncio.Semaphore(concurrency)
        self.timeout_seconds = timeout_seconds  # each pod's budget, from its turn to its last byte
        self.failures = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def scrape(self, targets: Sequence[PodTarget]) -> dict[str, PodMetrics]:
        """Metrics of every ready pod that answered, by pod name."""
        ready = [t for t in targets if t.phase == "ready" and t.metrics_url]
        results = await asyncio.gather(*(self._fetch(t) for t in ready))
        return {t.name: m for t, m in zip(ready, results, strict=True) if m is not None}

    async def _fetch(self, target: PodTarget) -> PodMetrics | None:
        try:
            async with self._slots:
                # The budget is the whole scrape: httpx's timeout bounds each read, so a pod dribbling its
                # answer would hold the service's decision for as long as it dribbles.
                async with asyncio.timeout(self.timeout_seconds):
                    text = await self._get(str(target.metrics_url))
            metrics = signals.parse_metrics(text)
            if metrics == PodMetrics():
                raise ScrapeError("none of the gateway's metrics has a finite value")
            return metrics
        except TimeoutError:
            self._failed(target, f"no complete answer within {self.timeout_seconds:g}s")
        except (httpx.HTTPError, signals.MetricsError, ScrapeError) as exc:
            self._failed(target, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # one pod's bytes must never cost the other pods their metrics
            logger.warning("metrics of %s (%s) could not be read, leaving the pod out", target.name,
                           target.metrics_url, exc_info=True)
            self._failed(target, f"{type(exc).__name__}: {exc}")
        return None

    async def _get(self, url: str) -> str:
        async with self._http.stream("GET", url) as response:
            if response.status_code != 200:
                raise ScrapeError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ScrapeError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        return body.decode("utf-8", errors="replace")

    def _failed(self, target: PodTarget, why: str) -> None:
        self.failures += 1
        logger.debug("scraping %s (%s) failed: %s", target.name, target.metrics_url, why)
