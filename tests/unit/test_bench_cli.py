"""Every benchmark that `python -m bench` lists answers `python -m bench.NAME --help` without running."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not installed: `python -m bench` runs from the checkout's root
    sys.path.insert(0, str(ROOT))
bench_main = importlib.import_module("bench.__main__")
DOCS = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]  # the CHANGELOG quotes what was wrong


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


def test_every_documented_make_bench_names_a_benchmark() -> None:
    """A bare `make bench` only lists the benchmarks: a doc that means one must say `make bench BENCH=NAME`."""
    found = [(path.name, match.group(1)) for path in DOCS
             for match in re.finditer(r"make\s+bench\b(?:\s+BENCH=(\w+))?", path.read_text())]
    assert len(found) >= 5
    assert [(doc, name) for doc, name in found if name not in bench_main.available()] == []
