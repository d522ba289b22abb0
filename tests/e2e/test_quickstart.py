"""The README's main job: `tensorfleet run` with no cluster runs the operator end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_run_without_a_cluster_converges_and_then_writes_nothing(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "TENSORFLEET_"))}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    result = subprocess.run([sys.executable, "-m", "tensorfleet", "run"], cwd=tmp_path, env=env,  # any folder
                            capture_output=True, text=True, timeout=180)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "embedded Kubernetes API emulator" in out
    for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget"):
        assert f"{kind} default/llama3-8b" in out
    assert "Ready=True (Available)" in out
    assert "API writes in the next 5 s (must be 0)       0" in out
    assert "Traceback" not in result.stderr


def test_explicit_cluster_mode_without_credentials_fails_clearly(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "TENSORFLEET_"))}
    env["HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "tensorfleet", "run", "--cluster", "kubeconfig"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"--cluster=kubeconfig: the default kubeconfig {tmp_path}/.kube/config: no such file" in result.stderr
    assert "Traceback" not in result.stderr
