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
