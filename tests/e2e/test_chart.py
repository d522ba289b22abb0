"""The Helm chart, with the real helm binary: lint, template, Kubernetes OpenAPI validation, contracts."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from chart import CHART, KUBERNETES_VERSIONS, NAMESPACE, ROOT, helm, of_kind, one, render, run, tool
from tensorfleet import __version__, config
from tensorfleet.engines.controller import engine_context
from tensorfleet.render import labels
from tensorfleet.render.context import RenderContext
from tensorfleet.render.workload import render_deployment
from tensorfleet.settings import OperatorSettings

pytestmark = pytest.mark.e2e

MONITORING = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
              "prometheusRule": {"enabled": True, "runbookBaseURL": "https://docs.example.com/operations.md"},
              "dashboard": {"enabled": True}}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "everything": {
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": ["registry"],
        "operator": {"extraEnv": [{"name": "EXTRA", "value": "1"}], "priorityClassName": "system-cluster-critical"},
        "engines": {"builderImage": "nvcr.io/nvidia/tensorrt-llm/release:{trtllm_version}", "buildRetries": 4,
                    "buildResources": {"cpu": "500m", "memory": "256Gi", "ephemeralStorage": 800},
                    "retryBaseSeconds": 60, "retryMaxSeconds": 900, "fetchTimeoutSeconds": 600,
                    "store": {"type": "s3", "s3": {"bucket": "engines", "endpoint": "https://s3.example.com",
                                                   "region": "eu-west-1", "credentialsSecret": "engine-store"}}},
        "runtimes": {"modelFetchTimeoutSeconds": 1200},
        "metering": {"sinkUrl": "https://billing.example.com/events", "secretName": "billing-keys",
                     "resourceUnits": {"NVIDIA-H100-80GB-HBM3": {"fp16": 2.0, "fp8": 3.6},
                                       "NVIDIA-A100-SXM4-80GB": {"fp16": 1.0},
                                       "tiers": {"economy": {"pricePerResourceUnit": "0.0000012",
                                                             "pricePerMillionInputTokens": 0.5}}}},
        "autoscaling": {"hpa": True, "keda": True, "intervalSeconds": 5, "scrapeTimeoutSeconds": 0.5,
                        "prometheusUrl": "http://prometheus.monitoring:9090"},
        "metrics": MONITORING,
    },
    "pvc-store": {"engines": {"store": {"type": "pvc", "pvc": {"claimName": "engines", "path": "/trt"}}}},
}
# Kinds of the prometheus-operator: their schemas do not ship with Kubernetes (checked separately below).
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.mark.parametrize("value_set", ["defaults", "everything", "namespaced"])
def test_helm_lint_is_clean(value_set: str) -> None:
    result = helm("lint", VALUE_SETS[value_set])
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(("values", "complaint"), [
    ({"operator": {"replicas": 0}}, "/operator/replicas"),
    ({"operatr": {"replicas": 2}}, "'operatr' not allowed"),
    ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
    ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    ({"engines": {"store": {"type": "s3"}}}, "/engines/store/s3/bucket"),
    ({"engines": {"store": {"type": "gcs"}}}, "/engines/store/type"),
    ({"engines": {"store": {"type": "pvc"}}}, "/engines/store/pvc/claimName"),
    ({"engines": {"builderImage": "registry/builder:{version}"}}, "/engines/builderImage"),
    ({"engines": {"buildRetries": -1}}, "/engines/buildRetries"),
    ({"engines": {"buildResources": {"memory": "0Gi"}}}, "/engines/buildResources/memory"),
    ({"engines": {"buildResources": {"cpu": 0}}}, "/engines/buildResources/cpu"),
    ({"autoscaling": {"intervalSeconds": 0}}, "/autoscaling/intervalSeconds"),
    ({"autoscaling": {"keda": "yes"}}, "/autoscaling/keda"),
    ({"autoscaling": {"prometheusUrl": "prometheus:9090"}}, "/autoscaling/prometheusUrl"),
    ({"metering": {"sinkUrl": "ftp://billing"}}, "/metering/sinkUrl"),
    ({"metering": {"resourceUnits": {"NVIDIA-H100-80GB-HBM3": -1}}}, "/metering/resourceUnits/NVIDIA-H100-80GB-HBM3"),
    ({"metering": {"resourceUnits": {"NVIDIA-H100-80GB-HBM3": {"fp16": 0}}}},
     "/metering/resourceUnits/NVIDIA-H100-80GB-HBM3/fp16"),
    # --set gives text: "2.9" is refused here rather than by the operator at start (it would crash-loop).
    ({"metering": {"resourceUnits": {"NVIDIA-H100-80GB-HBM3": {"fp16": "2.9"}}}},
     "/metering/resourceUnits/NVIDIA-H100-80GB-HBM3/fp16"),
    ({"metering": {"resourceUnits": {"NVIDIA-H100-80GB-HBM3": {"FP16": 3}}}},
     "/metering/resourceUnits/NVIDIA-H100-80GB-HBM3"),
    ({"metering": {"resourceUnits": {"NVIDIA-H100-80GB-HBM3": {"fp16": {"x": 1}}}}},
     "/metering/resourceUnits/NVIDIA-H100-80GB-HBM3/fp16"),
    ({"metering": {"resourceUnits": {"tiers": {"economy": {"pricePerRU": "1"}}}}},
     "/metering/resourceUnits/tiers/economy"),
    ({"metering": {"resourceUnits": {"tiers": {"economy": {"pricePerResourceUnit": "-1"}}}}},
     "/metering/resourceUnits/tiers/economy/pricePerResourceUnit"),
    ({"metering": {"resourceUnits": {"tiers": {"gold": {}}}}}, "/metering/resourceUnits/tiers"),
    ({"metrics": {"podMonitor": {"interval": "fast"}}}, "/metrics/podMonitor/interval"),
])
def test_invalid_values_are_rejected_naming_the_field(values: dict[str, Any], complaint: str) -> None:
    for command in ("lint", "template"):
        result = helm(command, values, check=False)
        assert result.returncode != 0, f"helm {command} accepted {values}"
        assert complaint in result.stdout + result.stderr


def test_one_port_for_metrics_and_liveness_is_refused() -> None:
    """Each port is in the schema's range, but the operator refuses to start on one port for both (a crash loop).
    The schema cannot compare two values: the template refuses them (helm lint only logs a template's fail)."""
    result = helm("template", {"operator": {"livenessPort": 9090}}, check=False)
    assert result.returncode != 0
    assert "operator.livenessPort: Invalid value: 9090: must differ from operator.metricsPort (9090)" in result.stderr


@pytest.mark.parametrize("release", ["inference-platform-prod-eu-west-1-gpu-serving-cluster",  # 53, Helm's most
                                     "platform-tensorfleet-prod-eu-west-1-gpu-serving-teams"])  # contains the name
def test_object_names_are_valid_for_any_release_name_helm_accepts(release: str) -> None:
    assert len(release) == 53
    text = run([tool("helm"), "template", release, str(CHART), "--namespace", NAMESPACE]).stdout
    names = {doc["kind"]: doc["metadata"]["name"] for doc in yaml.safe_load_all(text) if doc}
    # A Service's name is a DNS-1035 label: 63 characters at most (the rest: DNS subdomains, 253).
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", names["Service"]), names["Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_manifests_validate_against_the_kubernetes_openapi_schema(
        rendered: dict[str, list[dict[str, Any]]], value_set: str, version: str) -> None:
    kinds = set()
    for doc in rendered[value_set]:
        kinds.add(doc["kind"])
        if doc["kind"] in MONITORING_KINDS:
            continue
        if doc["apiVersion"] == "kopf.dev/v1":
            _validate_against_crd(doc)
            continue
        # strict: unknown fields are errors, as `kubectl apply --validate=strict` makes them.
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= kinds
    helm("template", VALUE_SETS[value_set], "--kube-version", f"{version}.0")  # the chart's kubeVersion allows it


def test_kube_version_below_the_minimum_is_refused() -> None:
    result = helm("template", None, "--kube-version", "1.29.0", check=False)
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "incompatible" in result.stderr


def _validate_against_crd(doc: dict[str, Any]) -> None:
    crd = yaml.safe_load((CHART / "crds" / f"{doc['kind'].lower()}s.kopf.dev.yaml").read_text())
    OAS30Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(doc)


def test_chart_crds_are_generated_from_crds() -> None:
    canonical = {p.name: p.read_text() for p in [*(ROOT / "crds").glob("*.yaml"), *(ROOT / "crds/kopf").glob("*.yaml")]}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert chart == canonical


def test_peering_crds_have_no_status_subresource() -> None:
    # kopf patches status through the main resource: a status subresource would drop its keep-alives.
    for name in ("clusterkopfpeerings.kopf.dev.yaml", "kopfpeerings.kopf.dev.yaml"):
        crd = yaml.safe_load((CHART / "crds" / name).read_text())
        assert "subresources" not in crd["spec"]["versions"][0]


# ---- values.yaml and values.schema.json ------------------------------------------------------------


def _schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        paths |= _schema_paths(sub, path)
    return paths


def _values_paths_with_comments() -> tuple[set[str], set[str]]:
    """(paths of keys in values.yaml, paths of those with a comment line right above them)."""
    stack: list[tuple[int, str]] = []
    keys, commented = set(), set()
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if match and not line.lstrip().startswith("-"):
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([p for _, p in stack] + [match.group(2)])
            stack.append((indent, match.group(2)))
            keys.add(path)
            if previous.lstrip().startswith("#"):
                commented.add(path)
        if line.strip():
            previous = line
    return keys, commented


def test_every_value_is_commented_and_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    declared = _schema_paths(schema) - {"global"}
    keys, commented = _values_paths_with_comments()
    chart_values = {k for k in keys if k in declared}
    assert declared == chart_values, f"schema and values.yaml disagree: {sorted(declared ^ chart_values)}"
    # Keys inside free-form objects (resources, security contexts) are Kubernetes fields, not chart values.
    missing = sorted(chart_values - commented)
    assert missing == [], f"values without a comment: {missing}"


# ---- the operator Deployment --------------------------------------------------------------------


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment", "-operator")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_operator_runs_two_peered_replicas_as_non_root_on_a_read_only_filesystem(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    deployment = one(docs, "Deployment", "-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(docs)
    env = _env(container)
    assert deployment["spec"]["replicas"] == 2
    assert env["TENSORFLEET_PEERING"] == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    assert "TENSORFLEET_STANDALONE" not in env
    assert "TENSORFLEET_PRIORITY" not in env
    assert env["TENSORFLEET_CLUSTER"] == "incluster"  # never the quickstart emulator in a pod
    assert any(e["name"] == "POD_ID" for e in container["env"])  # kopf's peer identity
    assert container["args"] == ["run"]
    assert container["image"] == f"ghcr.io/tensorfleet/tensorfleet:{__version__}"
    assert env["TENSORFLEET_GATEWAY_IMAGE"] == container["image"]  # one image for operator and gateway
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": OperatorSettings.metrics_port, "liveness": OperatorSettings.liveness_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def _dockerfile_user() -> int:
    users = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert len(users) == 1
    return int(users[0][0])


def test_gateway_containers_run_as_the_image_user() -> None:
    from builders import inference_service
    from tensorfleet.api.types import InferenceService

    isvc = InferenceService.from_body({**inference_service(), "metadata": {"name": "x", "namespace": "d", "uid": "u"}})
    pod = render_deployment(isvc, RenderContext(), 1)["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    assert gateway["securityContext"]["runAsUser"] == _dockerfile_user()
    assert gateway["args"] == ["gateway"]  # the image's entrypoint supplies `tensorfleet`
    assert re.search(r'^ENTRYPOINT \["tensorfleet"\]$', (ROOT / "Dockerfile").read_text(), flags=re.M)


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_operator_environment_is_exactly_operator_settings(
        rendered: dict[str, list[dict[str, Any]]], value_set: str, tmp_path: pathlib.Path) -> None:
    docs = rendered[value_set]
    env = _env(_container(docs))
    known = {config.env_name(OperatorSettings, name) for name in OperatorSettings.__dataclass_fields__}
    ours = {name for name in env if name.startswith("TENSORFLEET_")}
    assert ours - known == set(), "the chart sets a variable the operator does not read"
    if "TENSORFLEET_METERING_RU_TABLE_FILE" in env:  # the mounted ConfigMap, where the operator reads it
        table = next(o for o in docs if o["kind"] == "ConfigMap" and "resource-units" in o["metadata"]["name"])
        (path := tmp_path / "resource-units.yaml").write_text(next(iter(table["data"].values())))
        env["TENSORFLEET_METERING_RU_TABLE_FILE"] = str(path)
    settings = config.from_env(OperatorSettings, env)  # every value parses as the operator reads it
    settings.render_context()  # what the operator does at startup: validates the RU table
    engine_context(settings)  # and parses the default engine store


def test_changing_the_resource_unit_table_rolls_the_operator() -> None:
    """The operator reads the table once, at start: only a new pod template (a rollout) makes it read a new one."""
    def template(units: dict[str, Any]) -> dict[str, Any]:
        values = {"metering": {"resourceUnits": units}, "operator": {"podAnnotations": {"team": "ml"}}}
        return dict(one(render(values), "Deployment", "-operator")["spec"]["template"])

    tables = [{"NVIDIA-H100-80GB-HBM3": {"fp16": 2.0}}, {"NVIDIA-H100-80GB-HBM3": {"fp16": 3.5}}, {}]
    templates = [template(units) for units in tables]
    checksums = {t["metadata"]["annotations"]["checksum/resource-units"] for t in templates}
    assert len(checksums) == 3  # a changed table, and a table removed
    assert all(t["metadata"]["annotations"]["team"] == "ml" for t in templates)
    assert template(tables[0]) == templates[0]  # the same values: no rollout


def _settings(docs: list[dict[str, Any]]) -> OperatorSettings:
    return config.from_env(OperatorSettings, _env(_container(docs)))


def test_defaults_leave_the_operators_own_defaults_alone(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Where values.yaml repeats a default of the operator, both agree; what the chart turns off is named."""
    chart, code = _settings(rendered["defaults"]), OperatorSettings()
    differ = {f for f in OperatorSettings.__dataclass_fields__ if getattr(chart, f) != getattr(code, f)}
    assert differ == {"cluster", "autoscale_hpa", "autoscale_keda"}
    assert (chart.cluster, chart.autoscale_hpa, chart.autoscale_keda) == ("incluster", False, False)


def test_engine_and_autoscaling_values_become_the_operators_settings(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    s3, pvc = _settings(rendered["everything"]), _settings(rendered["pvc-store"])
    assert (s3.engine_store, s3.engine_store_endpoint, s3.engine_store_region, s3.engine_store_secret) == (
        "s3://engines/engines", "https://s3.example.com", "eu-west-1", "engine-store")
    assert s3.engine_builder_image == "nvcr.io/nvidia/tensorrt-llm/release:{trtllm_version}"
    assert (s3.engine_build_retries, s3.engine_retry_base_seconds, s3.engine_retry_max_seconds) == (4, 60.0, 900.0)
    assert (s3.engine_build_cpu, s3.engine_build_memory, s3.engine_build_ephemeral_storage) == ("500m", "256Gi", "800")
    assert (s3.engine_fetch_timeout_seconds, s3.model_fetch_timeout_seconds) == (600, 1200)
    assert (s3.autoscale_interval_seconds, s3.autoscale_scrape_timeout_seconds) == (5.0, 0.5)
    assert (s3.autoscale_hpa, s3.autoscale_keda, s3.prometheus_url) == (True, True, "http://prometheus.monitoring:9090")
    default = engine_context(s3).default_store
    assert default is not None
    assert (default.kind, default.bucket, default.prefix, default.endpoint) == ("s3", "engines", "engines",
                                                                               "https://s3.example.com")
    assert pvc.engine_store == "pvc://engines/trt"
    store = engine_context(pvc).default_store
    assert store is not None
    assert (store.kind, store.claim, store.path) == ("pvc", "engines", "/trt")
    assert _settings(rendered["defaults"]).engine_store == ""  # type none: Engines need their own storeRef


def test_metering_values_reach_the_operator(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The sink URL and the Secret's name as settings; the RU table as a file the operator validates."""
    container = _container(rendered["everything"])
    env = _env(container)
    assert env["TENSORFLEET_METERING_SINK_URL"] == "https://billing.example.com/events"
    assert env["TENSORFLEET_METERING_SECRET"] == "billing-keys"
    path = env["TENSORFLEET_METERING_RU_TABLE_FILE"]
    table = next(o for o in rendered["everything"]
                 if o["kind"] == "ConfigMap" and "resource-units" in o["metadata"]["name"])
    units = VALUE_SETS["everything"]["metering"]["resourceUnits"]  # factors and tiers, as given
    assert yaml.safe_load(table["data"][path.rsplit("/", 1)[1]]) == units
    assert any(m["mountPath"] == path.rsplit("/", 1)[0] for m in container["volumeMounts"])
    defaults = _env(_container(rendered["defaults"]))
    assert "TENSORFLEET_METERING_RU_TABLE_FILE" not in defaults
    assert defaults["TENSORFLEET_METERING_SECRET"] == "tensorfleet-metering"


# ---- RBAC shape (exactness against the code: tests/integration/test_rbac.py) ----------------------


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for doc in of_kind(docs, kind) for rule in doc.get("rules", ())]


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_no_access_to_secrets_and_no_wildcards(rendered: dict[str, list[dict[str, Any]]], value_set: str) -> None:
    for rule in _rules(rendered[value_set], "ClusterRole") + _rules(rendered[value_set], "Role"):
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]


AGGREGATED = ("-aggregate-edit", "-aggregate-view")


def test_namespace_users_read_and_manage_every_tensorfleet_kind(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The built-in view, edit and admin roles cover InferenceServices and Engines (docs send users to both)."""
    plurals = [yaml.safe_load(p.read_text())["spec"]["names"]["plural"] for p in (ROOT / "crds").glob("*.yaml")]
    assert sorted(plurals) == ["engines", "inferenceservices"]
    needs = {"view": ("get", "list", "watch"), "edit": ("get", "list", "watch", "create", "update", "patch", "delete"),
             "admin": ("get", "list", "watch", "create", "update", "patch", "delete")}
    for role, verbs in needs.items():
        label = f"rbac.authorization.k8s.io/aggregate-to-{role}"
        rules = [rule for d in of_kind(rendered["defaults"], "ClusterRole")
                 if d["metadata"].get("labels", {}).get(label) == "true" for rule in d["rules"]]
        missing = [f"{verb} {resource}" for resource in plurals + [f"{p}/status" for p in plurals]
                   for verb in (verbs if "/" not in resource else ("get",))
                   if not any("tensorfleet.io" in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                              for r in rules)]
        assert missing == [], f"{role}: {missing}"


def test_namespaced_mode_writes_nothing_cluster_wide(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["namespaced"]
    operator_roles = [d for d in of_kind(docs, "ClusterRole") if not d["metadata"]["name"].endswith(AGGREGATED)]
    assert [verb for rule in _rules(operator_roles, "ClusterRole") for verb in rule["verbs"]
            if verb not in ("list", "watch")] == []
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == ["team-a", "team-b"]
    assert sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")) == ["team-a", "team-b"]
    assert of_kind(docs, "ClusterKopfPeering") == []
    assert _env(_container(docs))["TENSORFLEET_NAMESPACES"] == "team-a,team-b"
    for binding in of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tf-tensorfleet", "namespace": NAMESPACE}]


# ---- monitoring ------------------------------------------------------------------------------------


def _queries(docs: list[dict[str, Any]]) -> list[str]:
    rules = one(docs, "PrometheusRule")["spec"]["groups"]
    exprs = [rule["expr"] for group in rules for rule in group["rules"]]
    board = json.loads(one(docs, "ConfigMap", "-dashboard")["data"]["tensorfleet.json"])
    exprs += [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    return exprs


def _concrete(expr: str) -> str:
    """Grafana's variables are not PromQL: substitute what Grafana would."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "6h")
            .replace("$namespace", ".*").replace("$inferenceservice", ".*"))


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()
    promql_parser.walk(promql_parser.parse(_concrete(expr)),
                       lambda node: names.add(node.name) if isinstance(node, promql_parser.VectorSelector) else None)
    return names


# Labels Prometheus adds to every scraped series (the prometheus-operator's target labels), per monitor; the
# PodMonitor also copies the pod's InferenceService and GPU product (templates/podmonitor.yaml).
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
GATEWAY_TARGET_LABELS = TARGET_LABELS | {"inferenceservice", "gpu_product"}
OPERATOR_TARGET_LABELS = TARGET_LABELS | {"service"}


def _labels_by_series(registry: Any) -> dict[str, set[str]]:
    """Every series name a registry exports (with _total, _bucket, ... suffixes) and its own label names."""
    found: dict[str, set[str]] = {}
    for collector, names in list(registry._collector_to_names.items()):  # a test may look inside prometheus_client
        labels = set(getattr(collector, "_labelnames", ()))
        for name in names:
            found[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    for collector in list(registry._collector_to_names):
        if not registry._collector_to_names[collector]:  # a custom collector without describe(): what it yields
            for family in collector.collect():
                for sample in family.samples:
                    found.setdefault(sample.name, set()).update(sample.labels)
    return found


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Series name -> labels available in Prometheus: what the gateway's /metrics serves (its registry, metering's
    and the process collector in the default one) through the PodMonitor, and the operator's through the
    ServiceMonitor (honorLabels keeps its own namespace label)."""
    from prometheus_client import REGISTRY

    from tensorfleet.gateway.metrics import GatewayMetrics
    from tensorfleet.metrics import OperatorMetrics

    gateway = GatewayMetrics()
    gateway.watch_gpu(lambda: 0.5)  # exported only while NVML reads a GPU
    own = {name: labels for registry in (gateway.registry, REGISTRY)
           for name, labels in _labels_by_series(registry).items()}
    # The gateway's own `endpoint` label (the API path) wins over the target's (the PodMonitor honors labels);
    # any other target label carried by a series itself would override where the series came from.
    reserved = GATEWAY_TARGET_LABELS - {"endpoint"}
    clashing = {name: labels & reserved for name, labels in own.items()
                if name.startswith("tensorfleet_") and labels & reserved}
    assert clashing == {}, "gateway series must not carry target labels themselves"
    series = {name: labels | GATEWAY_TARGET_LABELS for name, labels in own.items()}
    series.update({name: labels | OPERATOR_TARGET_LABELS
                   for name, labels in _labels_by_series(OperatorMetrics().registry).items()})
    return series


def _labels_of(node: Any, exported: dict[str, set[str]], problems: list[str]) -> set[str] | None:
    """The labels an expression's result can have (None for a scalar), noting every label used but unavailable."""
    p = promql_parser
    if isinstance(node, p.VectorSelector):
        available = exported.get(node.name, set())
        problems += [f"{node.name} has no label {m.name}" for m in node.matchers.matchers if m.name not in available]
        return available
    if isinstance(node, p.MatrixSelector):
        return _labels_of(node.vector_selector, exported, problems)
    if isinstance(node, p.ParenExpr | p.UnaryExpr | p.SubqueryExpr):
        return _labels_of(node.expr, exported, problems)
    if isinstance(node, p.NumberLiteral | p.StringLiteral):
        return None
    if isinstance(node, p.AggregateExpr):
        inner = _labels_of(node.expr, exported, problems) or set()
        grouping = set(node.modifier.labels) if node.modifier else set()
        problems += [f"{node.op} by {label}: not a label of {node.expr}" for label in grouping - inner]
        by = node.modifier is not None and node.modifier.type == p.AggModifierType.By
        return grouping if by else inner - grouping
    if isinstance(node, p.Call):
        vectors = [labels for arg in node.args if (labels := _labels_of(arg, exported, problems)) is not None]
        if not vectors:
            return None
        return vectors[0] - {"le"} if node.func.name == "histogram_quantile" else vectors[0]
    if isinstance(node, p.BinaryExpr):
        lhs, rhs = _labels_of(node.lhs, exported, problems), _labels_of(node.rhs, exported, problems)
        matching = node.modifier.matching if node.modifier else None
        for side in (lhs, rhs):
            if matching is not None and side is not None:
                problems += [f"on/ignoring {label}: not a label of a side" for label in set(matching.labels) - side]
        if lhs is None or rhs is None:
            return lhs if rhs is None else rhs
        return lhs & rhs if str(node.op) == "or" else lhs
    raise AssertionError(f"unexpected PromQL node {type(node).__name__}: {node}")


def test_alerts_and_dashboard_are_valid_promql_over_exported_metrics_and_labels(
        rendered: dict[str, list[dict[str, Any]]], exported: dict[str, set[str]]) -> None:
    queries = _queries(rendered["everything"])
    assert len(queries) > 20
    unknown = {name for expr in queries for name in _metric_names(expr)} - set(exported)
    assert unknown == set(), "the dashboard or an alert reads a metric nothing exports"
    for expr in queries:
        problems: list[str] = []
        _labels_of(promql_parser.parse(_concrete(expr)), exported, problems)
        assert problems == [], f"{expr}: {problems}"


def test_the_label_check_catches_what_it_should(exported: dict[str, set[str]]) -> None:
    for expr in ("sum by (tenant) (tensorfleet_gateway_requests_total)",  # requests carry no tenant
                 'tensorfleet_engine_builds_total{inferenceservice="x"}',  # builds are per product, not service
                 "histogram_quantile(0.9, sum by (pod, le) (rate(tensorfleet_gateway_tokenize_seconds_bucket[1m])))"
                 " and on (tenant) tensorfleet_gateway_ready"):
        problems: list[str] = []
        _labels_of(promql_parser.parse(expr), exported, problems)
        assert problems, expr


def test_alerts_cover_billing_engines_and_cold_starts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = one(rendered["everything"], "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {"TensorfleetUsageExportBacklog", "TensorfleetEngineBuildFailures", "TensorfleetSlowColdStart",
            "TensorfleetFrequentColdStarts", "TensorfleetLedgerVerificationFailed"} <= set(alerts)
    assert "> 600" in alerts["TensorfleetSlowColdStart"]["expr"]  # the chart's threshold
    assert alerts["TensorfleetLedgerVerificationFailed"]["labels"]["severity"] == "critical"
    for alert in alerts.values():
        assert alert["annotations"]["runbook_url"].startswith("https://docs.example.com/operations.md#")
        anchor = alert["annotations"]["runbook_url"].split("#")[1]
        assert anchor in _anchors(ROOT / "docs" / "operations.md"), f"docs/operations.md has no section #{anchor}"


def _anchors(path: pathlib.Path) -> set[str]:
    return {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in path.read_text().splitlines() if line.startswith("#")}


def test_dashboard_shows_what_platform_teams_bill_and_watch(rendered: dict[str, list[dict[str, Any]]]) -> None:
    board = json.loads(one(rendered["everything"], "ConfigMap", "-dashboard")["data"]["tensorfleet.json"])
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for needed in ("tokens/s by tenant", "gpu-ms", "resource units", "queue depth", "ready and desired",
                   "cold start", "engine builds"):
        assert needed in titles
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in board["panels"])
    assert one(rendered["everything"], "ConfigMap", "-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_podmonitor_selects_the_serving_pods_on_the_gateway_admin_port(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    from builders import triton_service
    from tensorfleet.api.types import InferenceService

    monitor = one(rendered["everything"], "PodMonitor")
    isvc = InferenceService.from_body({**triton_service(), "metadata": {"name": "x", "namespace": "d", "uid": "u"}})
    pod = render_deployment(isvc, RenderContext(), 1, variant="h100", gpu_product="NVIDIA-H100-80GB-HBM3")
    template = pod["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    gateway = next(c for c in template["spec"]["containers"] if c["name"] == "gateway")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in gateway["ports"]}
    assert endpoint["honorLabels"] is True  # requests_total{endpoint="/v1/..."} stays endpoint, not exported_endpoint
    # The relabelling reads the pod labels the renderer sets (Prometheus maps . and / to _).
    sources = {r["sourceLabels"][0] for r in endpoint["relabelings"]}
    for label in (labels.ISVC_LABEL, labels.GPU_PRODUCT_LABEL):
        assert "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label) in sources


def _relabel(rules: list[dict[str, Any]], target: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabelling (its defaults: regex (.*), replacement $1; an empty result drops)."""
    labels_ = dict(target)
    for rule in rules:
        value = ";".join(labels_.get(name, "") for name in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            labels_[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
    return {name: value for name, value in labels_.items() if value}


@pytest.mark.parametrize("gpu_product", [None, "NVIDIA-H100-80GB-HBM3"])
def test_podmonitor_labels_every_serving_pod_with_its_gpu_product(
        rendered: dict[str, list[dict[str, Any]]], gpu_product: str | None) -> None:
    """vLLM's one Deployment (no product of its own) runs on nodes of several products: the node's
    nvidia.com/gpu.product (GPU feature discovery) names the product of each pod, as the dashboard expects."""
    from builders import inference_service
    from tensorfleet.api.types import InferenceService

    monitor = one(rendered["everything"], "PodMonitor")
    assert monitor["spec"]["attachMetadata"] == {"node": True}
    isvc = InferenceService.from_body(inference_service("x", "d"))
    pod = render_deployment(isvc, RenderContext(), 1, gpu_product=gpu_product)["spec"]["template"]["metadata"]
    meta = {f"__meta_kubernetes_pod_label_{k}": v for k, v in pod["labels"].items()}
    meta[f"__meta_kubernetes_node_label_{labels.NODE_GPU_PRODUCT}"] = "NVIDIA-H100-80GB-HBM3"
    target = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in meta.items()}  # as Prometheus names them
    relabelled = _relabel(monitor["spec"]["podMetricsEndpoints"][0]["relabelings"], target)
    assert relabelled["gpu_product"] == "NVIDIA-H100-80GB-HBM3"
    assert relabelled["inferenceservice"] == "x"


def test_servicemonitor_scrapes_the_operator_metrics_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["everything"]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    deployment = one(docs, "Deployment", "-operator")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_notes_tell_how_to_check_peering_and_upgrade_crds() -> None:
    result = run([tool("helm"), "install", "tf", str(CHART), "--dry-run=client", "--namespace", NAMESPACE])
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl get clusterkopfpeering tensorfleet" in notes
    assert "kubectl apply --server-side -R -f" in notes  # recursive, as every doc says (crds/kopf/ in the repo)
    assert "spec.engine.storeRef" in notes  # no default engine store by default: say what that means


@pytest.mark.parametrize("value_set", ["defaults", "namespaced"])
def test_two_replicas_from_the_chart_peer_with_distinct_priorities(
        rendered: dict[str, list[dict[str, Any]]], value_set: str) -> None:
    """What each replica's `tensorfleet run` hands to kopf, from the environment the chart gives it."""
    from tensorfleet import runner

    docs = rendered[value_set]
    env = _env(_container(docs))
    replicas = [runner.operator_kwargs(config.from_env(OperatorSettings, env))
                for _ in range(one(docs, "Deployment", "-operator")["spec"]["replicas"])]
    peering_objects = of_kind(docs, "ClusterKopfPeering") + of_kind(docs, "KopfPeering")
    for kwargs in replicas:
        assert kwargs["standalone"] is False
        assert {kwargs["peering_name"]} == {p["metadata"]["name"] for p in peering_objects}
        assert kwargs["clusterwide"] is (value_set == "defaults")
        served = sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering"))
        assert sorted(kwargs["namespaces"]) == served
    # Equal priorities would freeze both replicas; random ones let exactly one act.
    assert len({kwargs["priority"] for kwargs in replicas}) == len(replicas) == 2


def test_every_crd_install_line_applies_recursively() -> None:
    """kopf's peering CRDs live in crds/kopf/: `kubectl apply -f crds/` would miss them, and a peered operator
    would wait for them forever. Every doc, the chart's notes and the operator's own hint say -R."""
    sources = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), CHART / "README.md",
               CHART / "templates" / "NOTES.txt", ROOT / "operator" / "tensorfleet" / "kube.py"]
    lines = [(path.name, line) for path in sources for line in path.read_text().splitlines()
             if "kubectl apply" in line and "crds/" in line]
    assert len(lines) >= 5
    assert [(name, line) for name, line in lines if " -R " not in line] == []
