"""A real S3-compatible server process on loopback for the store tests: moto's server mode (``moto_server``).

moto[server] is a Flask/Werkzeug HTTP server that implements the S3 REST API, conditional writes
(If-None-Match / If-Match) included; boto3 talks to it over a socket exactly as to AWS S3 or MinIO.
No MinIO or SeaweedFS binary is packaged on PyPI or Debian, so this is the S3 server the registries offer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from engines.processes import free_port

ACCESS_KEY = "tensorfleet-test"
SECRET_KEY = "tensorfleet-test-secret"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port; yield its endpoint URL; stop it afterwards."""
    port = free_port()
    binary = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if binary is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (make install does)")
    process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
