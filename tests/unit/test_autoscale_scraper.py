"""The scraper leaves out a pod whose gateway does not answer with its metrics, and only that pod."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx

from tensorfleet import telemetry
from tensorfleet.autoscale.scraper import Scraper
from tensorfleet.autoscale.signals import PodMetrics, PodTarget

GOOD = f"{telemetry.QUEUE_DEPTH} 1\n{telemetry.READY} 1\n"
PAGES = {
    "good": (200, GOOD),
    "garbage-ratio": (200, f'{telemetry.KV_CACHE_USAGE}{{gpu="0"}} +Inf\n{telemetry.KV_CACHE_USAGE}{{gpu="1"}} -Inf\n'),
    "garbage-queue": (200, f"{telemetry.QUEUE_DEPTH} +Inf\n{telemetry.READY} 1\n"),
    "another-exporter": (200, "process_cpu_seconds_total 12\n"),
    "not-exposition": (200, f'{telemetry.QUEUE_DEPTH}{{gpu="0" 3\n'),
    "error": (500, "oops"),
}


def fake_gateways(request: httpx.Request) -> httpx.Response:
    """Test double for the pods' gateways: the page named by the host."""
    status, text = PAGES[request.url.host]
    return httpx.Response(status, text=text)


async def test_one_pods_bad_metrics_leave_only_that_pod_out() -> None:
    scraper = Scraper()
    await scraper.aclose()
    scraper._http = httpx.AsyncClient(transport=httpx.MockTransport(fake_gateways))
    targets = [PodTarget(name, "ready", f"http://{name}/metrics") for name in PAGES]
    try:
        scraped = await scraper.scrape(targets)
    finally:
        await scraper.aclose()
    # A garbage sample is missing; a pod with no gateway metric left is not one whose load is known.
    assert scraped == {"good": PodMetrics(gateway_queue=1.0, ready=True), "garbage-queue": PodMetrics(ready=True)}
    assert scraper.failures == 4


async def test_an_unexpected_error_reading_one_pod_leaves_only_that_pod_out() -> None:
    scraper = Scraper()

    async def get(url: str) -> str:
        if "broken" in url:
            raise RuntimeError("a bug in reading, not in the pod")
        return GOOD

    scraper._get = get  # type: ignore[method-assign]
    try:
        scraped = await scraper.scrape([PodTarget(n, "ready", f"http://{n}/metrics") for n in ("good", "broken")])
    finally:
        await scraper.aclose()
    assert set(scraped) == {"good"}
    assert scraper.failures == 1


async def test_a_pod_dribbling_its_answer_is_left_out_after_its_budget() -> None:
    """httpx's timeout bounds each read: one byte every 0.2 s is never a timeout, yet the answer takes 2.4 s."""
    async def dribble() -> AsyncIterator[bytes]:
        for byte in GOOD.encode()[:12]:
            await asyncio.sleep(0.2)
            yield bytes([byte])

    def gateways(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=dribble() if request.url.host == "slow" else GOOD.encode())

    scraper = Scraper(timeout_seconds=0.5)
    await scraper.aclose()
    scraper._http = httpx.AsyncClient(transport=httpx.MockTransport(gateways))
    start = time.monotonic()
    try:
        scraped = await scraper.scrape([PodTarget(n, "ready", f"http://{n}/metrics") for n in ("good", "slow")])
    finally:
        await scraper.aclose()
    assert time.monotonic() - start < 1.5
    assert set(scraped) == {"good"}
    assert scraper.failures == 1
