from __future__ import annotations

from collections.abc import Iterator

import pytest

from engines import processes


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real vLLM per test session (it takes ~50 s to start on 2 cores)."""
    with processes.vllm_server(tmp_path_factory.mktemp("vllm")) as url:
        yield url


@pytest.fixture(scope="session")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real tritonserver per test session (~5 s to start)."""
    with processes.triton_server(tmp_path_factory.mktemp("triton")) as url:
        yield url
