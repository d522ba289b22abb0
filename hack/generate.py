"""Regenerate every file derived from crds/ (CI fails when they drift: `make verify`).

* charts/tensorfleet/crds/*.yaml: byte copies of crds/*.yaml and of kopf's peering CRDs in crds/kopf/;
* docs/api.md: the API reference, one table per object, from the CRDs' OpenAPI schemas;
* charts/tensorfleet/files/grafana/tensorfleet.json: the Grafana dashboard, from hack/dashboard.py;
* examples/gitops/argocd-cm-health.yaml: the Argo CD health checks, from the chart's Lua script.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import dashboard
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
KOPF_CRDS = CRDS / "kopf"  # kopf's peering CRDs: the chart installs them, docs/api.md leaves them out
CHART = ROOT / "charts" / "tensorfleet"
CHART_CRDS = CHART / "crds"
DASHBOARD = CHART / "files" / "grafana" / "tensorfleet.json"
HEALTH_LUA = CHART / "files" / "argocd" / "health.lua"
ARGOCD_HEALTH = ROOT / "examples" / "gitops" / "argocd-cm-health.yaml"
API_DOC = ROOT / "docs" / "api.md"
HEALTH_KINDS = ("InferenceService", "Engine")


def copy_chart_crds() -> None:
    if not CHART.exists():
        return
    CHART_CRDS.mkdir(exist_ok=True)
    sources = {crd.name: crd for crd in [*CRDS.glob("*.yaml"), *KOPF_CRDS.glob("*.yaml")]}
    for stale in CHART_CRDS.glob("*.yaml"):
        if stale.name not in sources:
            stale.unlink()
    for name, crd in sorted(sources.items()):
        shutil.copyfile(crd, CHART_CRDS / name)


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the Lua script) as readable literal blocks."""


_LiteralDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                                       style="|" if "\n" in value else None))


def argocd_health_config() -> str:
    """The argocd-cm entries that register the chart's Lua health check for tensorfleet's kinds."""
    script = HEALTH_LUA.read_text()
    data = {f"resource.customizations.health.tensorfleet.io_{kind}": script for kind in HEALTH_KINDS}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "argocd-cm", "namespace": "argocd",
                               "labels": {"app.kubernetes.io/part-of": "argocd"}},
                  "data": data}
    header = ("# Generated from charts/tensorfleet/files/argocd/health.lua by `make generate`; do not edit.\n"
              "# Merge into Argo CD's argocd-cm (e.g. as a kustomize patch of your Argo CD install) so Argo CD\n"
              "# reports InferenceService and Engine health from their conditions (docs/gitops.md).\n")
    return header + yaml.dump(config_map, Dumper=_LiteralDumper, sort_keys=False, width=120)


def write_chart_files() -> None:
    if not CHART.exists():
        return
    DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD.write_text(dashboard.render())
    ARGOCD_HEALTH.parent.mkdir(parents=True, exist_ok=True)
    ARGOCD_HEALTH.write_text(argocd_health_config())


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind = node.get("type", "object" if node.get("x-kubernetes-preserve-unknown-fields") else "")
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type(node['additionalProperties'])}"
    return str(kind)


def _limits(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, label in (("minimum", "min"), ("maximum", "max"), ("maxLength", "max length"), ("maxItems", "max items"),
                       ("maxProperties", "max entries"), ("pattern", "pattern")):
        if key in node:
            parts.append(f"{label} `{node[key]}`")
    if "default" in node and node["default"] != {}:
        parts.append(f"default `{node['default']}`")
    for rule in node.get("x-kubernetes-validations", ()):
        parts.append(f"rule: {rule.get('message', rule['rule'])}")
    return "; ".join(parts)


def _rows(node: dict[str, Any], path: str, required: set[str]) -> Iterator[str]:
    for name, sub in node.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        description = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        flag = " (required)" if name in required else ""
        limits = _limits(sub).replace("|", "\\|")
        yield f"| `{here}`{flag} | {_type(sub)} | {description} | {limits} |"
        target = sub.get("items", sub) if sub.get("type") == "array" else sub
        yield from _rows(target, here + ("[]" if sub.get("type") == "array" else ""), set(target.get("required", ())))


def api_reference() -> str:
    out = ["# API reference", "",
           "Generated from `crds/` by `make generate`; do not edit by hand. CI fails when it is stale.", ""]
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in (d for d in yaml.safe_load_all(path.read_text()) if d):
            names = crd["spec"]["names"]
            for version in crd["spec"]["versions"]:
                root = version["schema"]["openAPIV3Schema"]
                out += [f"## {names['kind']} ({crd['spec']['group']}/{version['name']})", "",
                        " ".join(str(root.get("description", "")).split()), "",
                        f"Short names: {', '.join(names.get('shortNames', [])) or 'none'}. "
                        f"Scope: {crd['spec']['scope']}.", ""]
                for rule in root.get("x-kubernetes-validations", ()):
                    out.append(f"- {rule['message']}")
                out += ["", "| Field | Type | Description | Limits and rules |", "| --- | --- | --- | --- |"]
                for section in ("spec", "status"):
                    node = root["properties"].get(section)
                    if node:
                        out.append(f"| `{section}` | object | {' '.join(str(node.get('description', '')).split())} | "
                                   f"{_limits(node)} |")
                        out.extend(_rows(node, section, set(node.get("required", ()))))
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    copy_chart_crds()
    write_chart_files()
    API_DOC.parent.mkdir(exist_ok=True)
    API_DOC.write_text(api_reference())


if __name__ == "__main__":
    main()
