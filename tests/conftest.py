from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tensorfleet.sandbox.apiserver import EmulatorThread


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    """A fresh embedded Kubernetes API on a loopback port, one per test."""
    with EmulatorThread() as emu:
        yield emu


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One real S3-compatible server process (moto_server) on loopback for the session."""
    from s3server import ACCESS_KEY, SECRET_KEY, s3_server

    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server() as endpoint:
        yield endpoint
