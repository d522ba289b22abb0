from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import pytest

from builders import inference_service, triton_service
from gateway_support import pod_gateway_files
from tensorfleet.api.schema import InvalidSpecError
from tensorfleet.api.types import InferenceService
from tensorfleet.gateway import config as gwconfig
from tensorfleet.reconcile import desired_objects, eligible_products, split_replicas
from tensorfleet.render import labels
from tensorfleet.render.context import RenderContext
from tensorfleet.render.gateway import gateway_config
from tensorfleet.render.workload import render_deployment, render_pdb, render_service

CTX = RenderContext(gateway_image="gw:1", vllm_image="vllm:1", triton_image_template="triton:1")


def isvc(**spec: Any) -> InferenceService:
    body = inference_service(**spec)
    body["metadata"]["uid"] = "uid-1"
    return InferenceService.from_body(body)


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_vllm_arguments_come_from_the_spec() -> None:
    deployment = render_deployment(isvc(model={"servedName": "llama3", "maxModelLen": 4096}, gpu={"count": 2}), CTX, 3)
    engine = containers(deployment)["engine"]
    args = engine["args"]
    assert args[:3] == ["vllm", "serve", "meta-llama/Meta-Llama-3-8B-Instruct"]
    assert args[args.index("--revision") + 1] == "main"
    assert args[args.index("--served-model-name") + 1] == "llama3"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[args.index("--host") + 1] == "127.0.0.1"  # only the gateway reaches the engine
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert deployment["spec"]["replicas"] == 3
    assert "--enable-prompt-tokens-details" in args  # cached prompt tokens reach metering


def test_extra_args_may_turn_prompt_token_details_off() -> None:
    engine = containers(render_deployment(isvc(runtime={"extraArgs": ["--no-enable-prompt-tokens-details"]}),
                                          CTX, 1))["engine"]
    assert "--enable-prompt-tokens-details" not in engine["args"]
    assert engine["args"][-1] == "--no-enable-prompt-tokens-details"


def test_user_env_replaces_the_operators_variable_of_the_same_name() -> None:
    """env is keyed by name (server-side apply refuses repeats): HF_HOME and the credentials may be overridden."""
    token = {"secretKeyRef": {"name": "other", "key": "token"}}
    user = [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "HF_HOME", "value": "/data/hf"},
            {"name": "HF_TOKEN", "valueFrom": token}]
    service = isvc(model={"credentialsSecretRef": {"name": "hf"}}, runtime={"env": user})
    env = containers(render_deployment(service, CTX, 1))["engine"]["env"]
    assert env == [{"name": "HF_HOME", "value": "/data/hf"}, {"name": "HF_TOKEN", "valueFrom": token},
                   {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]


def test_pod_has_shm_model_cache_and_gateway_sidecar() -> None:
    deployment = render_deployment(isvc(shmSize="8Gi", modelCache={"sizeLimit": "50Gi"}), CTX, 1)
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
    mounts = {m["name"]: m["mountPath"] for m in containers(deployment)["engine"]["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm"
    assert mounts["model-cache"] == "/models"
    gateway = containers(deployment)["gateway"]
    assert gateway["image"] == "gw:1"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("timeout", [10, 60, 1800])  # 10: the CRD's minimum
@pytest.mark.parametrize("container", ["engine", "gateway"])
def test_startup_probes_outlast_the_warmup_timeout(timeout: int, container: str) -> None:
    """The kubelet kills a container at its failureThreshold-th failed startup probe, and the first probe may
    run at once: the time it is sure to get is (failureThreshold - 1) periods. That must outlast
    warmup.timeoutSeconds, so the gateway's own deadline fires first and its reason is what the user sees."""
    probe = containers(render_deployment(isvc(warmup={"timeoutSeconds": timeout}), CTX, 1))[container]["startupProbe"]
    assert (probe["failureThreshold"] - 1) * probe["periodSeconds"] > timeout


@pytest.mark.parametrize("body", [inference_service(), triton_service()], ids=["vllm", "triton"])
def test_the_engine_is_stopped_only_once_the_gateway_has_drained(body: dict[str, Any]) -> None:
    """On pod deletion the kubelet sends SIGTERM to every container at once unless a preStop hook holds it
    back. The engine's hook waits for the gateway to exit (its admin port), at most the gateway's whole drain;
    the grace period covers that and the engine's exit. A failed engine probe, which restarts the engine
    alone (the gateway does not exit), bounds the hook by a short grace period of its own."""
    body["metadata"]["uid"] = "uid-1"
    deployment = render_deployment(InferenceService.from_body(body), CTX, 1)
    engine, gateway = containers(deployment)["engine"], containers(deployment)["gateway"]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    drain = int(env["TENSORFLEET_GATEWAY_DRAIN_DELAY_SECONDS"]) + int(env["TENSORFLEET_GATEWAY_DRAIN_TIMEOUT_SECONDS"])
    hook = engine["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == engine["livenessProbe"]["exec"]["command"][0] == "python3"  # what the image already needs
    assert hook[-2:] == [env["TENSORFLEET_GATEWAY_ADMIN_PORT"], str(drain)]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 5
    for probe in ("startupProbe", "livenessProbe"):
        assert engine[probe]["terminationGracePeriodSeconds"] <= 15


def template(service: InferenceService, ctx: RenderContext = CTX) -> dict[str, Any]:
    return render_deployment(service, ctx, 1)["spec"]["template"]


def revision_config_map(pod_template: dict[str, Any]) -> str:
    """The name of the ConfigMap of the gateway's revision-bound configuration that the pods mount."""
    (volume,) = [v for v in pod_template["spec"]["volumes"] if v["name"] == "gateway-config"]
    policy, revision = (source["configMap"]["name"] for source in volume["projected"]["sources"])
    assert policy == "llama-gateway"
    return str(revision)


def config_maps(service: InferenceService) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in desired_objects(service, CTX) if o["kind"] == "ConfigMap"}


def test_the_policy_is_shared_and_the_revision_bound_part_is_named_by_its_hash() -> None:
    service = isvc(podAnnotations={"team": "a"})
    maps = config_maps(service)
    name = revision_config_map(template(service))
    assert set(maps) == {"llama-gateway", name}
    policy = json.loads(maps["llama-gateway"]["data"]["gateway.json"])
    revision = json.loads(maps[name]["data"]["gateway-revision.json"])
    assert set(policy) == gwconfig.POLICY_SECTIONS
    assert {**policy, **revision} == gateway_config(service, CTX)
    assert name == f"llama-gateway-{gwconfig.revision_hash(revision)}"
    assert maps[name]["metadata"]["labels"][labels.COMPONENT_LABEL] == labels.GATEWAY_REVISION_COMPONENT
    assert template(service)["metadata"]["annotations"] == {"team": "a"}


def test_policy_changes_reach_running_pods_without_rolling_them() -> None:
    """tokenPolicy, auth, billing and the resource units are reloaded by the gateways in place."""
    before = template(isvc())
    assert template(isvc(tokenPolicy={"maxOutputTokens": 64, "tenantTokensPerMinute": 1000})) == before
    assert template(isvc(auth={"trustedTenantHeader": "X-Tenant", "trustedProxies": ["10.0.0.0/8"]})) == before
    assert template(isvc(billing={"tier": "premium", "pricePerResourceUnit": "0.5"})) == before
    assert template(isvc(), dataclasses.replace(CTX, resource_units={"NVIDIA-L4": {"fp16": 0.4}})) == before


@pytest.mark.parametrize(("old", "new"), [
    (inference_service(model={"servedName": "old"}), inference_service(model={"servedName": "new"})),
    (triton_service("llama", engine={"precision": "fp16"}), triton_service("llama", engine={"precision": "fp8"})),
])
def test_an_old_revision_pod_that_starts_during_the_rollout_reads_its_own_engine(
        old: dict[str, Any], new: dict[str, Any], tmp_path: pathlib.Path) -> None:
    """Once the new revision is applied, a pod of the old one that starts (its gateway restarts, or it is
    rescheduled on another node) reads the new policy and the old revision's model and engine."""
    old["metadata"]["uid"] = new["metadata"]["uid"] = "uid-1"
    new["spec"]["tokenPolicy"] = {"maxOutputTokens": 64}
    before, after = InferenceService.from_body(old), InferenceService.from_body(new)
    cluster = {**config_maps(before), **config_maps(after)}  # the old revision's ConfigMap is not pruned yet
    (deployment, *_) = [o for o in desired_objects(before, CTX) if o["kind"] == "Deployment"]
    files = pod_gateway_files(deployment, cluster, tmp_path)
    read = [json.loads(pathlib.Path(path).read_text()) for path in files.values()]
    engine_facts = [gwconfig.revision_part(document) for document in read if gwconfig.revision_part(document)]
    assert engine_facts == [gwconfig.revision_part(gateway_config(before, CTX))]
    document = gwconfig.read_configuration(files["config"], files["revision_config"])
    assert document == {**gateway_config(before, CTX), "tokenPolicy": gateway_config(after, CTX)["tokenPolicy"]}


@pytest.mark.parametrize("change", [
    {"model": {"servedName": "llama3-new"}},
    {"model": {"maxModelLen": 4096}},
    {"warmup": {"requests": [{"prompt": "hello", "maxTokens": 4}]}},  # nowhere else in the pod template
    {"warmup": {"enabled": False}},
])
def test_a_revision_bound_change_rolls_the_pods(change: dict[str, Any]) -> None:
    """The gateways keep the model, engine and warm-up they started with: only new pods get a new one."""
    before, after = template(isvc()), template(isvc(**change))
    assert after != before
    assert revision_config_map(after) != revision_config_map(before)


def test_a_triton_precision_change_rolls_the_pods_of_every_product() -> None:
    def revisions(precision: str) -> list[str]:
        body = triton_service("llama", engine={"precision": precision})
        body["metadata"]["uid"] = "u"
        objects = desired_objects(InferenceService.from_body(body), CTX)
        return [revision_config_map(o["spec"]["template"]) for o in objects if o["kind"] == "Deployment"]

    fp16, fp8 = revisions("fp16"), revisions("fp8")
    assert fp16
    assert len(fp16) == len(fp8)
    assert not set(fp16) & set(fp8)


def test_model_cache_can_be_a_claim() -> None:
    pod = render_deployment(isvc(modelCache={"claimName": "weights"}), CTX, 1)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "weights"}}


def test_pvc_model_is_mounted_read_only() -> None:
    deployment = render_deployment(isvc(model={"uri": "pvc://models/llama3"}), CTX, 1)
    assert containers(deployment)["engine"]["args"][2] == "/mnt/model/llama3"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_products_become_required_and_preferred_node_affinity() -> None:
    user_affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    products = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB")
    service = isvc(gpu={"products": list(products)}, affinity=user_affinity)
    pod = render_deployment(service, CTX, 1, products=products)["spec"]["template"]["spec"]
    node = pod["affinity"]["nodeAffinity"]
    (term,) = node["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "zone", "operator": "In", "values": ["a"]} in term["matchExpressions"]  # the user's, kept
    assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": list(products)} in term["matchExpressions"]
    weights = [p["weight"] for p in node["preferredDuringSchedulingIgnoredDuringExecution"]]
    assert weights == sorted(weights, reverse=True)  # earlier products preferred


REQUIRED = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"


@pytest.mark.parametrize(("affinity", "field", "shown"), [
    ({"nodeAffinity": []}, "spec.affinity.nodeAffinity", 'Invalid value: "array": must be of type object'),
    ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []}}, REQUIRED, "must be of type object"),
    ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": {}}}},
     f"{REQUIRED}.nodeSelectorTerms", 'Invalid value: "object": must be of type array'),
    ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": ["x"]}}},
     f"{REQUIRED}.nodeSelectorTerms[0]", 'Invalid value: "x": must be of type object'),
    ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": 7}]}}}, f"{REQUIRED}.nodeSelectorTerms[0].matchExpressions", "Invalid value: 7"),
    ({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": {"weight": 1}}},
     "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution", "must be of type array"),
], ids=["node affinity", "required", "terms", "term", "expressions", "preferred"])
def test_an_affinity_the_products_cannot_be_added_to_is_an_invalid_spec_naming_the_field(
        affinity: dict[str, Any], field: str, shown: str) -> None:
    """Rendering does not rely on validation having run: a wrong shape is an InvalidSpecError, not a crash."""
    products = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB")
    with pytest.raises(InvalidSpecError) as raised:
        render_deployment(isvc(gpu={"products": list(products)}, affinity=affinity), CTX, 1, products=products)
    assert [e.path for e in raised.value.errors] == [field]
    assert shown in raised.value.errors[0].message


def test_gpu_toleration_is_always_added() -> None:
    pod = render_deployment(isvc(tolerations=[{"key": "team", "operator": "Equal", "value": "a"}]), CTX, 1)
    tolerations = pod["spec"]["template"]["spec"]["tolerations"]
    assert tolerations[0]["key"] == "team"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_service_and_pdb_select_all_serving_pods() -> None:
    service = isvc()
    assert render_service(service)["spec"]["selector"] == {labels.ISVC_LABEL: "llama"}
    assert render_pdb(service)["spec"]["selector"]["matchLabels"] == {labels.ISVC_LABEL: "llama"}
    assert render_pdb(service)["spec"]["maxUnavailable"] == 1


def test_every_child_has_a_controller_owner_reference() -> None:
    for obj in desired_objects(isvc(), CTX):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "InferenceService", "name": "llama",
                       "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}


def test_triton_renders_one_deployment_per_product() -> None:
    body = triton_service(gpu={"products": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]}, replicas=3)
    body["metadata"]["uid"] = "u"
    service = InferenceService.from_body(body)
    deployments = [o for o in desired_objects(service, CTX) if o["kind"] == "Deployment"]
    assert [d["spec"]["replicas"] for d in deployments] == [2, 1]
    selectors = [d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"] for d in deployments]
    pinned = [s["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]
              for s in selectors]
    assert [p["values"] for p in pinned] == [["NVIDIA-H100-80GB-HBM3"], ["NVIDIA-A100-SXM4-80GB"]]
    assert containers(deployments[0])["engine"]["args"][0] == "tritonserver"
    assert all(len(d["metadata"]["name"]) <= 63 for d in deployments)


@pytest.mark.parametrize(("replicas", "mode", "rendered"), [
    (8, "tensorfleet", 5), (1, "tensorfleet", 2), (None, "hpa", 2), (3, "keda", 3), (8, "none", 8)])
def test_autoscaled_replicas_are_rendered_within_the_bounds(replicas: int | None, mode: str, rendered: int) -> None:
    """Bounds just tightened under replicas the autoscaler set: the Deployment follows the bounds at once."""
    body = inference_service(replicas=replicas, autoscaling={"mode": mode, "minReplicas": 2, "maxReplicas": 5})
    if replicas is None:
        del body["spec"]["replicas"]
    body["metadata"]["uid"] = "uid-1"
    (deployment,) = [o for o in desired_objects(InferenceService.from_body(body), CTX) if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == rendered


def test_eligible_products_follow_the_allow_list_order() -> None:
    service = isvc(gpu={"products": ["B", "A"]})
    assert eligible_products(service, ("A", "B", "C")) == ("B", "A")
    assert eligible_products(service, ("A",)) == ("A",)
    assert eligible_products(service, None) == ("B", "A")
    assert eligible_products(isvc(), ("A", "C")) == ("A", "C")


def test_split_replicas_puts_the_remainder_on_preferred_products() -> None:
    assert split_replicas(5, ("a", "b")) == {"a": 3, "b": 2}
    assert split_replicas(0, ("a",)) == {"a": 0}
    assert split_replicas(3, ()) == {}


def test_product_slug_is_short_stable_and_distinct() -> None:
    slugs = {labels.product_slug(p) for p in ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-PCIe", "NVIDIA-L4")}
    assert len(slugs) == 3
    assert all(len(s) <= 17 for s in slugs)
    assert labels.product_slug("NVIDIA-L4") == labels.product_slug("NVIDIA-L4")
