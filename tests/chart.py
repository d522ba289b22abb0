"""The real helm, kubectl and promtool binaries (unpacked by `make tools` into .tools/bin) and chart rendering."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tensorfleet"
RELEASE = "tf"
NAMESPACE = "tensorfleet-system"
# Kubernetes versions the rendered manifests are validated against: the chart's minimum (kubeVersion)
# and the version of the kubectl that `make tools` unpacks.
KUBERNETES_VERSIONS = ("1.30", "1.33")


def tool(name: str) -> str:
    """Path of helm, kubectl or promtool: .tools/bin first, then PATH. Fails (never skips) when missing."""
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: run `make tools`")
    return found


def run(args: list[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # A private HOME keeps helm from reading or writing the user's configuration and caches.
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/tensorfleet-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/tensorfleet-helm/config", "HELM_DATA_HOME": "/tmp/tensorfleet-helm/data"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, input=stdin, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _values_args(values: Mapping[str, Any] | None, folder: str) -> list[str]:
    if not values:
        return []
    path = pathlib.Path(folder) / "values.yaml"
    path.write_text(json.dumps(values))
    return ["--values", str(path)]


def helm(command: str, values: Mapping[str, Any] | None = None, *extra: str,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm lint` or `helm template` of the chart with ``values`` (a values file, as users pass them)."""
    with tempfile.TemporaryDirectory() as folder:
        args = [tool("helm"), command]
        if command == "template":
            args += [RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
        else:
            args += [str(CHART), "--strict", "--namespace", NAMESPACE]
        return run([*args, *_values_args(values, folder), *extra], check=check)


def render(values: Mapping[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    """The chart's manifests, as `helm template` renders them (CRDs included)."""
    text = helm("template", values, *extra).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def alert_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The PrometheusRule's groups, annotations left out (alert tests compare what fires and its labels)."""
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    return [{**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]}
            for group in groups]


def promtool_test_rules(groups: list[dict[str, Any]], tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` (unpacked by `make tools`) of ``tests``, in promtool's unit-test format, over
    ``groups``: Prometheus itself evaluates the rules over the input series."""
    with tempfile.TemporaryDirectory() as folder:
        (pathlib.Path(folder) / "rules.yaml").write_text(json.dumps({"groups": groups}))
        (pathlib.Path(folder) / "tests.yaml").write_text(json.dumps(
            {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
        return run([tool("promtool"), "test", "rules", str(pathlib.Path(folder) / "tests.yaml")], check=False)
