"""Every benchmark that `python -m bench` lists answers `python -m bench.NAME --help` without running."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

bench_main = importlib.import_module("bench.__main__")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", bench_main.available())
def test_every_listed_benchmark_answers_help_and_writes_nothing(name: str, tmp_path: pathlib.Path) -> None:
    # A missing trace makes a benchmark that ignores --help return at once instead of running for minutes.
    env = {**os.environ, "TENSORFLEET_TRACE": str(tmp_path / "no-such-trace.csv")}
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*")}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*")} == before
