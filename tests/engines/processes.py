"""Real engine processes for the gateway's integration tests: vLLM (CPU) and Triton (from nvidia-pytriton).

Both live in their own virtualenvs made by ``hack/install-engines.sh`` (``make test`` runs it). Without
them the tests are skipped, unless TENSORFLEET_REQUIRE_ENGINES=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
TINY_LLAMA = ROOT / ".cache" / "tiny-llama"
SERVED = "tiny"
MAX_MODEL_LEN = 1024


def require(python: pathlib.Path, what: str) -> None:
    if python.exists():
        return
    message = f"{what} is not installed: run hack/install-engines.sh (make test does)"
    if os.environ.get("TENSORFLEET_REQUIRE_ENGINES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port_block(count: int) -> int:
    """A port P such that P .. P+count-1 are all free on loopback now (for an engine that takes consecutive ports)."""
    while True:
        base = free_port()
        if base + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as probes:
            try:
                for offset in range(1, count):
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", base + offset))
            except OSError:
                continue
        return base


class PortTaken(RuntimeError):
    """The engine could not bind a port that was free when it was chosen (another process took it since)."""


def wait_http(url: str, seconds: float, process: subprocess.Popen[bytes], log: pathlib.Path,
              port_taken: str | None = None) -> None:
    """Wait until ``url`` answers 200; ``port_taken`` is the engine's log line for a port already in use."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the engine exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if port_taken is not None and port_taken in log.read_text(errors="replace"):
            raise PortTaken(log.read_text(errors="replace")[-4000:])
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {seconds:g} s:\n{log.read_text()[-4000:]}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the engine and the workers it started (its own process group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def make_tiny_llama() -> pathlib.Path:
    subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "engines" / "make_tiny_llama.py"), str(TINY_LLAMA)],
                   check=True, capture_output=True, timeout=300)
    return TINY_LLAMA


@contextlib.contextmanager
def vllm_server(log_dir: pathlib.Path) -> Iterator[str]:
    """vLLM's OpenAI server on CPU with the tiny Llama, on a free loopback port; yields its URL."""
    reuse = os.environ.get("TENSORFLEET_TEST_VLLM_URL")  # a developer's already running engine
    if reuse:
        yield reuse
        return
    require(VLLM_PYTHON, "vLLM")
    model = make_tiny_llama()
    port = free_port()
    log = log_dir / "vllm.log"
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED, "--enforce-eager", "--max-num-seqs", "2", "--dtype", "float32",
               "--max-model-len", str(MAX_MODEL_LEN), "--enable-prompt-tokens-details",  # as the operator renders
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=log_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process)


@contextlib.contextmanager
def triton_server(log_dir: pathlib.Path) -> Iterator[str]:
    """tritonserver (from nvidia-pytriton) with the test models, on free loopback ports; yields its URL."""
    require(TRITON_PYTHON, "Triton (nvidia-pytriton)")
    libdir = subprocess.run([str(TRITON_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    # Triton's Python-backend stub links libpython3.11 dynamically: give it the one the virtualenv's
    # standard library belongs to, not an older system copy.
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}
    log = log_dir / "triton.log"
    for attempt in range(3):  # HTTP, gRPC and metrics on three consecutive ports: another process may take one
        port = free_port_block(3)
        with open(log, "wb") as output:
            process = subprocess.Popen([str(TRITON_PYTHON), str(ROOT / "tests" / "engines" / "triton_models.py"),
                                        str(port)], stdout=output, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=log_dir)
        try:
            # Both models: pytriton loads them one after the other, and the tokenizer model can come up
            # seconds after the first on a busy machine (a test then saw 404 and counted no tokens).
            for model in ("tiny", "preprocessing"):
                wait_http(f"http://127.0.0.1:{port}/v2/models/{model}/ready", 120, process, log,
                          port_taken="already in use")
        except PortTaken:
            stop_group(process)
            if attempt == 2:
                raise
            continue
        break
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process)
