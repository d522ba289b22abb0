"""Every InferenceService in examples/ is valid, renders, and converges with the operator running."""

from __future__ import annotations

import pathlib
from typing import Any

import kopf
import pytest
import yaml
from click.testing import CliRunner
from kopf.testing import KopfRunner

import tensorfleet.controller  # noqa: F401  (registers the handlers)
from cluster import Cluster, wait_for
from tensorfleet.api import crds
from tensorfleet.cli import main
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.e2e
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def example_files() -> list[pathlib.Path]:
    return sorted(p for p in EXAMPLES.rglob("*.yaml") if any(_services(p)))


def _services(path: pathlib.Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return [d for d in docs
            if str(d.get("apiVersion", "")).startswith("tensorfleet.io/") and d.get("kind") == "InferenceService"]


def test_there_are_examples() -> None:
    assert example_files()


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_is_valid_and_renders(path: pathlib.Path) -> None:
    for service in _services(path):
        assert crds.validate(service) == [], service["metadata"]["name"]
    result = CliRunner().invoke(main, ["render", "-f", str(path)])
    assert result.exit_code == 0, result.output
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {"ConfigMap", "Service", "PodDisruptionBudget"} <= {d["kind"] for d in rendered}
    assert any(d["kind"] == "Deployment" for d in rendered)


def test_every_example_converges_with_the_operator(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", "1")
    cluster = Cluster(emulator)
    services = [s for path in example_files() for s in _services(path)]
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=kopf.get_default_registry(), timeout=60):
        for service in services:
            cluster.namespace = service["metadata"].get("namespace", "default")
            response = cluster.create(service)
            assert response.status_code == 201, response.text
        for service in services:
            name = service["metadata"]["name"]
            cluster.namespace = service["metadata"].get("namespace", "default")
            wait_for(lambda n=name: any(c["kind"] == "Deployment" for c in cluster.children(n)), what=f"{name}")
            cluster.mark_deployments_ready(name)
            wait_for(lambda n=name: (cluster.condition(n, "Ready") or {}).get("status") == "True", what=f"{name} Ready")
    cluster.close()
