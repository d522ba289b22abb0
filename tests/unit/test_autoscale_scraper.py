"""The scraper leaves out a pod whose gateway does not answer with its metrics, and only that pod."""

from __future__ import annotations

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
