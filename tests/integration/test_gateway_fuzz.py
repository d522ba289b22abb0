"""Random request bodies never get a 500 or a crash: always a JSON 4xx (or a real answer)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.standin import StandinEngine
from gateway_support import running_gateway, serving, url

pytestmark = pytest.mark.integration

SCALARS = st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False) | st.text(max_size=8)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                           inner, max_size=3),
                      max_leaves=8)
KEYS = st.sampled_from(["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "n",
                        "temperature", "stream_options", "best_of", "logprobs"])
BODIES = st.dictionaries(KEYS, VALUES, max_size=6).map(lambda d: {"model": "tiny", **d} if "model" not in d else d)


@pytest.fixture
def gateway_url(tmp_path: pathlib.Path) -> Iterator[str]:
    """The gateway and a stand-in engine on an event loop in a background thread."""
    loop = asyncio.new_event_loop()
    started: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with serving(StandinEngine().app()) as upstream, running_gateway(tmp_path, upstream) as gw:
            started.set_result(url(gw, ""))
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(started), 30), loop).result(35)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_random_bodies_never_get_a_server_error(gateway_url: str) -> None:
    with httpx.Client(base_url=gateway_url, timeout=10) as client:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=BODIES, chat=st.booleans())
        def check(body: dict[str, Any], chat: bool) -> None:
            response = client.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert "error" in response.json(), response.text

        check()
