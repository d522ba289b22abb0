"""Every file in examples/ is run: InferenceServices are validated against the CRD (schema, CEL and
cross-field rules) and rendered by `tensorfleet render`, and what that renders is validated against
the Kubernetes OpenAPI schemas; the kustomize overlay is built with the real kubectl; the GitOps
files install the chart with values that pass its values.schema.json."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from kopf.testing import KopfRunner

from builders import deep_merge
from chart import CHART, KUBERNETES_VERSIONS, ROOT, helm, run, tool
from cluster import Cluster, registry_from_env, wait_for
from tensorfleet.api import crds
from tensorfleet.api.validation import validate_body
from tensorfleet.cli import main
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
SERVICE_FILES = [p for p in EXAMPLE_FILES if "kind: InferenceService" in p.read_text()]
ENGINE_FILES = [p for p in EXAMPLE_FILES if p not in SERVICE_FILES]
KUSTOMIZE_BASES = [EXAMPLES / "kustomize" / "base"]
KUSTOMIZE_OVERLAYS = sorted((EXAMPLES / "kustomize" / "overlays").iterdir())
GITOPS = EXAMPLES / "gitops"


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _render(text: str, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["render", "-f", "-", *args], input=text)
    assert result.exit_code == 0, result.output
    return _docs(result.stdout)


def _check_services(text: str) -> list[dict[str, Any]]:
    services = [d for d in _docs(text) if d["kind"] == "InferenceService"]
    assert services, "no InferenceService in the example"
    for service in services:
        assert validate_body(service) == [], service["metadata"]["name"]
    rendered = _render(text)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {o["kind"] for o in rendered}
    for obj in rendered:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    return rendered


def test_every_example_is_covered_here() -> None:
    covered = {*SERVICE_FILES, *ENGINE_FILES, *GITOPS.glob("*.yaml")}
    for folder in [*KUSTOMIZE_BASES, *KUSTOMIZE_OVERLAYS]:
        covered |= set(folder.glob("*.yaml"))
    assert set(EXAMPLES.rglob("*.yaml")) == covered


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: p.name)
def test_engine_example_is_valid_and_named_by_its_fingerprint(path: pathlib.Path) -> None:
    engines = [d for d in _docs(path.read_text()) if d["kind"] == "Engine"]
    assert engines
    for engine in engines:
        assert crds.validate(engine) == [], engine["metadata"]["name"]
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [e["metadata"]["name"] for e in engines]


@pytest.mark.parametrize("path", SERVICE_FILES, ids=lambda p: p.name)
def test_inferenceservice_example_validates_and_renders(path: pathlib.Path) -> None:
    _check_services(path.read_text())


def test_quickstart_is_vllm_serving_a_llama3_8b_class_model() -> None:
    service = _docs((EXAMPLES / "inferenceservice.yaml").read_text())[0]
    assert service["spec"]["runtime"]["name"] == "vllm"
    assert "Llama-3-8B" in service["spec"]["model"]["uri"]


def test_triton_tiers_build_one_engine_deployment_per_gpu_product() -> None:
    text = (EXAMPLES / "triton-trtllm-tiers.yaml").read_text()
    services = {s["metadata"]["name"]: s["spec"] for s in _docs(text)}
    assert {s["billing"]["tier"] for s in services.values()} == {"premium", "economy"}
    assert {p for s in services.values() for p in s["gpu"]["products"]} == {
        "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"}
    deployments = [o for o in _render(text) if o["kind"] == "Deployment"]
    products = {(d["metadata"]["labels"]["tensorfleet.io/inferenceservice"],
                 d["metadata"]["labels"]["tensorfleet.io/gpu-product"]) for d in deployments}
    assert products == {("llama3-8b-trt-premium", "NVIDIA-H100-80GB-HBM3"),
                        ("llama3-8b-trt-premium", "NVIDIA-A100-SXM4-80GB"),
                        ("llama3-8b-trt-economy", "NVIDIA-A100-SXM4-80GB")}
    # Rendering for one product (what the operator does when the cluster has only H100s).
    only_h100 = _render(text.split("---")[0], "--gpu-product", "NVIDIA-H100-80GB-HBM3")
    assert len([o for o in only_h100 if o["kind"] == "Deployment"]) == 1


def test_tuned_autoscaling_leaves_replicas_to_the_autoscaler() -> None:
    service = _docs((EXAMPLES / "autoscaling-tuned.yaml").read_text())[0]
    assert "replicas" not in service["spec"]
    assert service["spec"]["autoscaling"]["mode"] == "tensorfleet"
    deployment = next(o for o in _check_services((EXAMPLES / "autoscaling-tuned.yaml").read_text())
                      if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == service["spec"]["autoscaling"]["minReplicas"]


def _kustomize(folder: pathlib.Path) -> str:
    return run([tool("kubectl"), "kustomize", str(folder)]).stdout


@pytest.mark.parametrize("folder", KUSTOMIZE_BASES + KUSTOMIZE_OVERLAYS, ids=lambda p: p.name)
def test_kustomize_builds_valid_services(folder: pathlib.Path) -> None:
    _check_services(_kustomize(folder))


def test_production_overlay_changes_what_it_says() -> None:
    base = _docs(_kustomize(EXAMPLES / "kustomize" / "base"))[0]
    prod = _docs(_kustomize(EXAMPLES / "kustomize" / "overlays" / "production"))[0]
    assert prod["metadata"]["namespace"] == "chat-prod"
    assert prod["spec"]["billing"]["tier"] == "premium" != base["spec"]["billing"]["tier"]
    assert "replicas" in base["spec"]
    assert "replicas" not in prod["spec"]
    assert prod["spec"]["model"] == base["spec"]["model"]


def _values_schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def _install_values(values: dict[str, Any]) -> None:
    # As helm does: the user's values over the chart's defaults, then the schema.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(_values_schema()).validate(deep_merge(defaults, values))
    helm("template", values)  # the chart renders with exactly these values


def test_argocd_application_installs_the_chart_and_the_overlay() -> None:
    apps = {a["metadata"]["name"]: a for a in _docs((GITOPS / "argocd-application.yaml").read_text())}
    chart_app, services_app = apps["tensorfleet"], apps["chat-production"]
    assert (ROOT / chart_app["spec"]["source"]["path"]) == CHART
    _install_values(chart_app["spec"]["source"]["helm"]["valuesObject"])
    assert (ROOT / services_app["spec"]["source"]["path"]).is_dir()
    for app in apps.values():
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    waves = {name: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for name, app in apps.items()}
    assert waves["tensorfleet"] < waves["chat-production"]  # CRDs and operator first


def test_flux_helmrelease_installs_the_chart_and_upgrades_its_crds() -> None:
    docs = {d["kind"]: d for d in _docs((GITOPS / "flux-helmrelease.yaml").read_text())}
    release = docs["HelmRelease"]
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]) == CHART
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "CreateReplace"
    _install_values(release["spec"]["values"])
    assert (ROOT / docs["Kustomization"]["spec"]["path"]).is_dir()


def test_invalid_values_in_a_gitops_file_would_be_caught() -> None:
    values = json.loads(json.dumps(_docs((GITOPS / "flux-helmrelease.yaml").read_text())[1]["spec"]["values"]))
    values["operator"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        _install_values(values)


def test_every_example_converges_with_the_operator(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example InferenceService, applied to the emulator, is reconciled to Ready by the operator
    (on simulated H100 and A100 nodes, with engine builds that find their artifacts in the store)."""
    monkeypatch.setenv("TENSORFLEET_SERVER", emulator.url)
    monkeypatch.setenv("TENSORFLEET_RESYNC_SECONDS", "1")
    cluster = Cluster(emulator)
    cluster.add_gpu_node("gpu-h100", "NVIDIA-H100-80GB-HBM3", 9, 0)
    cluster.add_gpu_node("gpu-a100", "NVIDIA-A100-SXM4-80GB", 8, 0)
    services = [d for path in SERVICE_FILES for d in _docs(path.read_text()) if d["kind"] == "InferenceService"]
    with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry_from_env(), timeout=60):
        for service in services:
            cluster.namespace = service["metadata"].get("namespace", "default")
            response = cluster.create(service)
            assert response.status_code == 201, response.text
        for service in services:
            name = service["metadata"]["name"]
            cluster.namespace = service["metadata"].get("namespace", "default")

            def serving(n: str = name) -> bool:
                cluster.complete_engine_builds()
                cluster.mark_deployments_ready(n)
                return (cluster.condition(n, "Ready") or {}).get("status") == "True"

            wait_for(serving, timeout=60, interval=0.3, what=f"{name} Ready")
    cluster.close()
