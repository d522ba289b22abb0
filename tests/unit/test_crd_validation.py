"""Bad input is rejected by the CRD's OpenAPI schema and CEL rules, with a message naming the field.

The validator is a real OpenAPI 3.0 validator (openapi-schema-validator) plus a real CEL interpreter
(cel-python) evaluating the CRD's x-kubernetes-validations, after the CRD's defaults are applied,
in the API server's order. The same table of invalid objects must fail for the right field.
"""

from __future__ import annotations

from typing import Any

import pytest

from builders import deep_merge, inference_service, triton_service
from tensorfleet.api import crds, schema
from tensorfleet.gateway import config as gateway_config

LONG = "x" * 600
POD_NAME = {"fieldRef": {"fieldPath": "metadata.name"}}


def with_spec(**spec: Any) -> dict[str, Any]:
    return inference_service(**spec)


def set_path(obj: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    patch: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        patch = {part: patch}
    return deep_merge(obj, patch)


def without(obj: dict[str, Any], dotted: str) -> dict[str, Any]:
    out = deep_merge(obj, {})
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


# (case id, invalid object, field path that must be named, text the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("model missing", without(inference_service(), "spec.model"), "spec.model", "Required value"),
    ("uri scheme", with_spec(model={"uri": "http://example.com/model"}), "spec.model.uri", "must be hf://ORG/NAME"),
    ("uri without repo name", with_spec(model={"uri": "hf://meta-llama"}), "spec.model.uri", "must be hf://"),
    ("uri too long", with_spec(model={"uri": "hf://a/" + LONG}), "spec.model.uri", "Too long"),
    ("digest format", with_spec(model={"digest": "sha256:abc"}), "spec.model.digest", "64 lower-case hex"),
    ("served name chars", with_spec(model={"servedName": "my model"}), "spec.model.servedName", "may contain"),
    ("max model len too small", with_spec(model={"maxModelLen": 8}), "spec.model.maxModelLen",
     "greater than or equal to 16"),
    ("runtime enum", with_spec(runtime={"name": "tgi"}), "spec.runtime.name", 'supported values: "vllm", "triton"'),
    ("gpu count zero", with_spec(gpu={"count": 0}), "spec.gpu.count", "greater than or equal to 1"),
    ("gpu count too high", with_spec(gpu={"count": 32}), "spec.gpu.count", "less than or equal to 16"),
    ("gpu count type", with_spec(gpu={"count": "two"}), "spec.gpu.count", "must be of type integer"),
    ("gpu product label", with_spec(gpu={"products": ["NVIDIA H100"]}), "spec.gpu.products[0]", "valid label values"),
    ("gpu product duplicate", with_spec(gpu={"products": ["NVIDIA-L4", "NVIDIA-L4"]}), "spec.gpu.products",
     "Duplicate value"),
    ("replicas negative", with_spec(replicas=-1), "spec.replicas", "greater than or equal to 0"),
    ("autoscaling bounds", with_spec(autoscaling={"mode": "tensorfleet", "minReplicas": 5, "maxReplicas": 2},
                                     replicas=5),
     "spec.autoscaling.minReplicas", "less than or equal to spec.autoscaling.maxReplicas"),
    ("autoscaling mode", with_spec(autoscaling={"mode": "aggressive"}), "spec.autoscaling.mode", "Unsupported value"),
    ("scale-up rate 1", with_spec(autoscaling={"mode": "tensorfleet", "maxScaleUpRate": 1}),
     "spec.autoscaling.maxScaleUpRate", "must be at least 2: with 1 (at most 1x the ready replicas) a scale-up would"),
    ("triton needs engine", with_spec(runtime={"name": "triton"}, model={"uri": "hf://a/b@rev"}), "spec.engine",
     "spec.engine is required when spec.runtime.name is triton"),
    ("triton needs pinned model", triton_service(model={"uri": "hf://meta-llama/Llama-3"}), "spec.model.uri",
     "must pin a revision"),
    ("tensor parallel mismatch", triton_service(engine={"tensorParallelSize": 2}), "spec.engine.tensorParallelSize",
     "must equal spec.gpu.count"),
    ("input longer than sequence", triton_service(engine={"maxInputLen": 9000, "maxSeqLen": 8192}),
     "spec.engine.maxInputLen", "must not exceed spec.engine.maxSeqLen"),
    ("precision enum", triton_service(engine={"precision": "fp4"}), "spec.engine.precision", "Unsupported value"),
    ("engine store both", triton_service(engine={"storeRef": {"pvc": {"claimName": "a"}, "s3": {"bucket": "b"}}}),
     "spec.engine.storeRef", "exactly one of pvc or s3"),
    ("gpu in resources", with_spec(resources={"limits": {"nvidia.com/gpu": 1}}), "spec.resources",
     "must not set nvidia.com/gpu"),
    ("quantity syntax", with_spec(resources={"requests": {"memory": "lots"}}), "spec.resources.requests.memory",
     "should match"),
    ("request negative", with_spec(resources={"requests": {"cpu": "-1"}}), "spec.resources.requests.cpu",
     "spec.resources.requests quantities must not be negative"),
    ("limit negative integer", with_spec(resources={"limits": {"memory": -5}}), "spec.resources.limits.memory",
     "spec.resources.limits quantities must not be negative"),
    ("shm size negative", with_spec(shmSize="-16Gi"), "spec.shmSize", "spec.shmSize must not be negative"),
    ("shm size negative integer", with_spec(shmSize=-1), "spec.shmSize", "spec.shmSize must not be negative"),
    ("cache size negative", with_spec(modelCache={"sizeLimit": "-1Gi"}), "spec.modelCache.sizeLimit",
     "spec.modelCache.sizeLimit must not be negative"),
    ("hpa scale-down window over the HPA limit",
     with_spec(autoscaling={"mode": "hpa", "scaleDownStabilizationSeconds": 3601}),
     "spec.autoscaling.scaleDownStabilizationSeconds", "must be at most 3600 with mode hpa or keda"),
    ("keda panic window over the HPA period limit", with_spec(autoscaling={"mode": "keda", "panicWindowSeconds": 1801}),
     "spec.autoscaling.panicWindowSeconds", "must be at most 1800 with mode hpa or keda"),
    ("managed engine flag", with_spec(runtime={"extraArgs": ["--port", "9000"]}), "spec.runtime.extraArgs[0]",
     "must not set or abbreviate a flag the operator manages: --port"),
    ("env names unique", with_spec(runtime={"env": [{"name": "LOG", "value": "INFO"}, {"name": "LOG", "value": "x"}]}),
     "spec.runtime.env[1]", "Duplicate value"),
    ("unknown field", with_spec(replica=2), "spec.replica", 'unknown field "spec.replica"'),
    ("name not DNS-1035", inference_service(name="Llama_3"), "", "metadata.name must be a DNS-1035 label"),
    ("name too long", inference_service(name="a" * 50), "", "metadata.name must be at most 45 characters"),
    ("toleration exists with value",
     with_spec(tolerations=[{"key": "gpu", "operator": "Exists", "value": "yes"}]), "spec.tolerations[0]",
     "operator Exists must not have a value"),
    # Pod fields passed through to the Deployment: the rules of core/v1 Pod validation, so that kubectl apply
    # refuses what the Deployment would be refused for (Degraded/ApplyFailed with the Deployment's field paths).
    ("toleration seconds without NoExecute",
     with_spec(tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 300}]),
     "spec.tolerations[0].effect", "with tolerationSeconds must have effect NoExecute"),
    ("toleration without a key", with_spec(tolerations=[{}]), "spec.tolerations[0].operator",
     "without a key must have operator Exists"),
    ("toleration key chars", with_spec(tolerations=[{"key": "gpu type", "operator": "Exists"}]),
     "spec.tolerations[0].key", "must be a taint key"),
    ("toleration value chars", with_spec(tolerations=[{"key": "pool", "operator": "Equal", "value": "a b"}]),
     "spec.tolerations[0].value", "must be a label value"),
    ("node selector key chars", with_spec(nodeSelector={"pool name": "gpu"}), "spec.nodeSelector",
     "keys must be label keys"),
    ("node selector key prefix too long", with_spec(nodeSelector={"a" * 254 + "/pool": "gpu"}), "spec.nodeSelector",
     "prefix of at most 253 characters"),
    ("node selector value chars", with_spec(nodeSelector={"pool": "gpu nodes"}), "spec.nodeSelector.pool",
     "values must be label values"),
    ("pod annotation key chars", with_spec(podAnnotations={"not a key!": "x"}), "spec.podAnnotations",
     "keys must be qualified names"),
    ("service account name", with_spec(serviceAccountName="Inference_SA"), "spec.serviceAccountName",
     "must be a DNS subdomain"),
    ("priority class name", with_spec(priorityClassName="High Priority"), "spec.priorityClassName",
     "must be a DNS subdomain"),
    ("env value and valueFrom",
     with_spec(runtime={"env": [{"name": "POD", "value": "x", "valueFrom": POD_NAME}]}),
     "spec.runtime.env[0].valueFrom", "must not have a non-empty value"),
    ("env name empty", with_spec(runtime={"env": [{"name": ""}]}), "spec.runtime.env[0].name",
     "must be an environment variable name"),
    ("env name starts with a digit", with_spec(runtime={"env": [{"name": "1X", "value": "x"}]}),
     "spec.runtime.env[0].name", "not starting with a digit"),
    ("credentials secret name", with_spec(model={"credentialsSecretRef": {"name": "HF Token"}}),
     "spec.model.credentialsSecretRef.name", "must be a DNS subdomain"),
    ("api keys secret name", with_spec(auth={"apiKeysSecretRef": {"name": "Keys"}}), "spec.auth.apiKeysSecretRef.name",
     "must be a DNS subdomain"),
    ("engine store secret name",
     triton_service(engine={"storeRef": {"s3": {"bucket": "b", "credentialsSecretRef": {"name": "S3_Keys"}}}}),
     "spec.engine.storeRef.s3.credentialsSecretRef.name", "must be a DNS subdomain"),
    ("resource name not standard", with_spec(resources={"requests": {"gpu-memory": "10Gi"}}), "spec.resources.requests",
     "keys must be cpu, memory, ephemeral-storage, hugepages-* (e.g. hugepages-2Mi) or an extended resource"),
    ("resource name without a name", with_spec(resources={"limits": {"example.com/": 1}}), "spec.resources.limits",
     "keys must be cpu, memory"),
    ("warmup prompt and tokens", with_spec(warmup={"requests": [{"prompt": "hi", "promptTokens": 10}]}),
     "spec.warmup.requests[0]", "exactly one of prompt or promptTokens"),
    ("context strategy enum", with_spec(tokenPolicy={"contextStrategy": "drop"}), "spec.tokenPolicy.contextStrategy",
     "Unsupported value"),
    ("price not decimal", with_spec(billing={"pricePerResourceUnit": "-0.1"}), "spec.billing.pricePerResourceUnit",
     "non-negative decimal"),
    ("trusted header without proxies", with_spec(auth={"trustedTenantHeader": "X-Tenant"}), "spec.auth.trustedProxies",
     "must list at least one CIDR"),
    ("trusted header is authorization", with_spec(auth={"trustedTenantHeader": "Authorization",
                                                        "trustedProxies": ["10.0.0.0/8"]}),
     "spec.auth.trustedTenantHeader", "other than Authorization"),
    ("trusted proxy not a CIDR", with_spec(auth={"trustedTenantHeader": "X-Tenant", "trustedProxies": ["gateway"]}),
     "spec.auth.trustedProxies[0]", "IPv4 or IPv6 addresses or CIDRs"),
    ("trusted proxy prefix over 32", with_spec(auth={"trustedTenantHeader": "X-Tenant",
                                                     "trustedProxies": ["10.0.0.0/8", "10.0.0.0/99"]}),
     "spec.auth.trustedProxies[1]", "prefix lengths at most 32 (IPv4) or 128 (IPv6)"),
    ("trusted proxy octet over 255", with_spec(auth={"trustedProxies": ["300.1.2.3"]}), "spec.auth.trustedProxies[0]",
     "IPv4 octets at most 255"),
    ("trusted proxy colons only", with_spec(auth={"trustedProxies": ["::::::::::::"]}), "spec.auth.trustedProxies[0]",
     "IPv4 or IPv6 addresses or CIDRs"),
    ("trusted proxy IPv6 prefix over 128", with_spec(auth={"trustedProxies": ["fe80::1/200"]}),
     "spec.auth.trustedProxies[0]", "IPv4 or IPv6 addresses or CIDRs"),
    ("anonymous tenant chars", with_spec(auth={"anonymousTenant": "team a"}), "spec.auth.anonymousTenant",
     "must be a tenant name"),
    ("tenant name chars", with_spec(tokenPolicy={"tenants": [{"name": "team/a"}]}), "spec.tokenPolicy.tenants[0].name",
     "must be a tenant name"),
    ("tenant names unique", with_spec(tokenPolicy={"tenants": [{"name": "a"}, {"name": "a"}]}),
     "spec.tokenPolicy.tenants[1]", "Duplicate value"),
    ("context strategy enum", with_spec(tokenPolicy={"contextStrategy": "truncate-newest"}),
     "spec.tokenPolicy.contextStrategy", 'supported values: "reject", "truncate-oldest"'),
    ("runaway repeats", with_spec(tokenPolicy={"runaway": {"maxRepeats": 1}}), "spec.tokenPolicy.runaway.maxRepeats",
     "greater than or equal to 2"),
    ("runaway ngram over window", with_spec(tokenPolicy={"runaway": {"ngramSize": 32, "windowTokens": 16}}),
     "spec.tokenPolicy.runaway.ngramSize", "must not exceed spec.tokenPolicy.runaway.windowTokens"),
]


@pytest.mark.parametrize(("obj", "path", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(obj: dict[str, Any], path: str, text: str) -> None:
    errors = crds.validate(obj)
    assert errors, "the schema accepted an invalid object"
    matching = [e for e in errors if e.path == path and text in e.message]
    assert matching, f"expected an error at {path!r} containing {text!r}, got: {[str(e) for e in errors]}"


def test_the_table_is_large_enough() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("obj", [
    inference_service(), triton_service(model={"uri": "hf://a/b@v1"}),
    with_spec(shmSize=0, modelCache={"sizeLimit": "+1Gi"}, resources={"requests": {"cpu": "500m", "memory": 0}}),
    with_spec(autoscaling={"mode": "hpa", "scaleDownStabilizationSeconds": 3600, "panicWindowSeconds": 1800}),
    with_spec(autoscaling={"mode": "tensorfleet", "scaleDownStabilizationSeconds": 7200, "panicWindowSeconds": 3600}),
    with_spec(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                           {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300},
                           {"operator": "Exists"}, {"key": "pool", "operator": "Equal", "value": ""}],
              nodeSelector={"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "", "Tier_2": "a.b-c"},
              podAnnotations={"prometheus.io/scrape": "true", "Example.COM/Owner": "team a", "note": ""},
              serviceAccountName="inference-sa", priorityClassName="gpu.high",
              model={"credentialsSecretRef": {"name": "hf-token"}}, auth={"apiKeysSecretRef": {"name": "api.keys"}},
              runtime={"env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "_x.y-z", "value": ""},
                               {"name": "POD", "value": "", "valueFrom": POD_NAME}]},
              resources={"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "1Gi", "hugepages-2Mi": "1Gi",
                                      "example.com/fpga": 1}, "limits": {"example.com/fpga": 1}}),
], ids=["vllm", "triton", "zero and positive quantities", "hpa at the HPA limits", "tensorfleet beyond the HPA limits",
        "pod fields as core/v1 accepts them"])
def test_valid_specs_pass(obj: dict[str, Any]) -> None:
    assert crds.validate(obj) == []


def test_defaults_are_applied_like_the_api_server() -> None:
    defaulted = crds.default(inference_service())
    spec = defaulted["spec"]
    assert spec["runtime"] == {"name": "vllm", "imagePullPolicy": "IfNotPresent"}
    assert spec["autoscaling"]["mode"] == "none"
    assert spec["tokenPolicy"]["contextStrategy"] == "reject"
    assert spec["tokenPolicy"]["runaway"]["enabled"] is False
    assert spec["shmSize"] == "16Gi"
    assert "engine" not in spec  # no default: its presence means something


def test_cel_transition_rules_see_old_self() -> None:
    rules = {"type": "object", "x-kubernetes-validations": [
        {"rule": "self.precision == oldSelf.precision", "message": "precision is immutable"}],
        "properties": {"precision": {"type": "string"}}}
    assert schema.validate(rules, {"precision": "fp8"}) == []  # create: transition rules skipped
    errors = schema.validate(rules, {"precision": "fp8"}, old={"precision": "fp16"})
    assert [e.message for e in errors] == ['Invalid value: "object": precision is immutable']


def _ipv6_spellings(groups: tuple[int, ...]) -> list[str]:
    """Every way to write these IPv6 groups: in full, and with each run of zero groups as '::'."""
    hexes = [format(g, "x") for g in groups]
    spellings = [":".join(hexes)]
    for start in range(len(groups)):
        for end in range(start + 1, len(groups) + 1):
            if not any(groups[start:end]):
                spellings.append(":".join(hexes[:start]) + "::" + ":".join(hexes[end:]))
    return spellings


def _proxy_candidates() -> list[str]:
    addresses = ["10.0.0.0", "192.168.1.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4"]
    for groups in [(0,) * 8, (0xfe80, 0, 0, 0, 0, 0, 0, 1), (0x2001, 0xdb8, 0, 0, 8, 0, 0, 0), (1, 2, 3, 4, 5, 6, 7, 8),
                   (0, 0, 0, 0, 0, 0xffff, 0, 0)]:
        addresses += _ipv6_spellings(groups)
    addresses += [spelling[:-3] + "1.2.3.4" for spelling in _ipv6_spellings((0, 0, 0, 0, 0, 0xffff, 0, 0))
                  if spelling.endswith(":0:0")]  # the last 32 bits as dotted IPv4
    addresses += ["::ffff:1.2.3.4", "1::2::3", ":::", ":", "1:2:3:4:5:6:7:8:9", "12345::", "fe80::1%eth0", "::1.2.3"]
    prefixes = ["", "/0", "/8", "/24", "/32", "/33", "/64", "/128", "/129", "/08", "/", "/-1"]
    return [address + prefix for address in addresses for prefix in prefixes]


def test_the_trusted_proxies_rule_accepts_only_what_the_gateway_parses() -> None:
    """What the API server lets through reaches the gateway's config parser (ipaddress.ip_network), which
    refuses to start on anything else. The rule may be stricter (leading zeros, zone ids), never looser."""
    item = crds.version_schema("InferenceService", "v1alpha1")["properties"]["spec"]["properties"]["auth"][
        "properties"]["trustedProxies"]["items"]
    for candidate in _proxy_candidates():
        accepted = schema.validate(item, candidate) == []
        try:
            gateway_config.parse({"model": {"servedName": "m"}, "auth": {"trustedProxies": [candidate]}})
            parsed = True
        except gateway_config.ConfigError:
            parsed = False
        assert parsed or not accepted, f"the CRD accepts {candidate!r}, which the gateway refuses"
        written_oddly = candidate.startswith("01.") or candidate.endswith("/08") or "%" in candidate
        assert accepted or not parsed or written_oddly, f"the CRD refuses {candidate!r}, which is a network"


def with_extra_args(runtime: str, args: list[str]) -> dict[str, Any]:
    if runtime == "vllm":
        return with_spec(runtime={"extraArgs": args})
    return triton_service(model={"uri": "hf://a/b@v1"}, runtime={"extraArgs": args})


MANAGED_FLAGS = {
    "vllm host abbreviated": ("vllm", ["--enforce-eager", "--hos", "0.0.0.0"], 1),
    "vllm host with a value": ("vllm", ["--host=0.0.0.0"], 0),
    "vllm host as a JSON key": ("vllm", ["--host.x", "0.0.0.0"], 0),
    "vllm tensor parallel alias": ("vllm", ["-tp", "4"], 0),
    "vllm tensor parallel alias abbreviated": ("vllm", ["-t", "4"], 0),
    "vllm tensor parallel with underscores": ("vllm", ["--tensor_parallel_size", "4"], 0),
    "vllm unix socket": ("vllm", ["--uds", "/tmp/engine.sock"], 0),
    "triton http address": ("triton", ["--http-address=0.0.0.0"], 0),
    "triton grpc on": ("triton", ["--allow-grpc=true", "--grpc-address=0.0.0.0"], 0),
    "triton http address abbreviated": ("triton", ["--http-addr=0.0.0.0"], 0),
    "triton sagemaker endpoint": ("triton", ["--allow-sagemaker=true"], 0),
    "triton model store alias": ("triton", ["--model-store=/tmp"], 0),
}


@pytest.mark.parametrize(("runtime", "args", "index"), MANAGED_FLAGS.values(), ids=MANAGED_FLAGS.keys())
def test_extra_args_cannot_reach_a_flag_the_operator_manages(runtime: str, args: list[str], index: int) -> None:
    """The operator's flags come first and both engines take the last value: an extra argument that names a
    managed flag, in any spelling the engine's parser accepts, would expose the engine past the gateway or
    break the GPU count. The error names the entry."""
    errors = crds.validate(with_extra_args(runtime, args))
    assert [e.path for e in errors] == [f"spec.runtime.extraArgs[{index}]"], [str(e) for e in errors]
    assert "must not set or abbreviate a flag the operator manages" in errors[0].message


@pytest.mark.parametrize(("runtime", "args"), [
    ("vllm", ["--model-impl", "transformers", "--model-loader-extra-config", "{}", "--max-num-seqs=64"]),
    ("vllm", ["--grpc-port", "50051", "-pp", "1", "-O3", "--seed", "-1", "--enable-prefix-caching"]),
    ("vllm", ["--compilation-config.level", "3", "--no-enable-prompt-tokens-details", "-", "--", "-.5"]),
    ("triton", ["--model-load-thread-count=8", "--model-load-retry-count=2", "--log-verbose=1"]),
    ("triton", ["--http-thread-count", "16", "--host-policy=numa0,numa-node=0", "--exit-timeout-secs=30"]),
], ids=["vllm model flags", "vllm other flags", "vllm odd tokens", "triton model flags", "triton other flags"])
def test_extra_args_that_only_share_a_prefix_with_a_managed_flag_pass(runtime: str, args: list[str]) -> None:
    assert crds.validate(with_extra_args(runtime, args)) == []


@pytest.mark.parametrize(("rule", "value"), [
    ("self.split('=') == ['--a', 'b', 'c']", "--a=b=c"), ("self.split('=', 2) == ['--a', 'b=c']", "--a=b=c"),
    ("self.split('') == ['a', 'b']", "ab"), ("self.split('', 2) == ['a', 'bc']", "abc"),
    ("self.split('=', 0) == []", "a"), ("self.split(',') == ['']", ""),
    ("self.replace('_', '-') == 'a-b-c'", "a_b_c"), ("self.replace('_', '-', 1) == 'a-b_c'", "a_b_c"),
    ("self.replace('', '-') == '-a-b-'", "ab"),
])
def test_the_kubernetes_string_functions_behave_like_go(rule: str, value: str) -> None:
    """split and replace of Kubernetes' CEL strings library (Go's strings.SplitN and strings.Replace)."""
    assert schema.validate({"type": "string", "x-kubernetes-validations": [{"rule": rule}]}, value) == []


def autoscaled(replicas: int, min_replicas: int = 1, max_replicas: int = 10,
               mode: str = "tensorfleet") -> dict[str, Any]:
    bounds = {"mode": mode, "minReplicas": min_replicas, "maxReplicas": max_replicas}
    return with_spec(replicas=replicas, autoscaling=bounds)


@pytest.mark.parametrize(("old", "new"), [
    (autoscaled(8, max_replicas=10), autoscaled(8, max_replicas=5)),
    (autoscaled(2, min_replicas=1), autoscaled(2, min_replicas=4)),
    (autoscaled(8, max_replicas=10, mode="hpa"), autoscaled(8, max_replicas=5, mode="hpa")),
    (autoscaled(3), autoscaled(6)),
    (autoscaled(12, mode="none"), autoscaled(40, mode="none")),
], ids=["lower max under load", "raise min", "hpa", "scale within the bounds", "no autoscaling"])
def test_bounds_may_change_under_the_autoscalers_replicas(old: dict[str, Any], new: dict[str, Any]) -> None:
    """The autoscaler writes spec.replicas through /scale and GitOps manifests leave it out, so an update of
    the bounds keeps the stored replicas: it must not be refused for them (the autoscaler moves them)."""
    assert crds.validate(old) == []
    assert crds.validate(new, old=old) == []


@pytest.mark.parametrize("new", [autoscaled(12), autoscaled(0, min_replicas=2), autoscaled(20, max_replicas=5)],
                         ids=["above max", "below min", "replicas and bounds change together"])
def test_scaling_outside_the_bounds_is_refused(new: dict[str, Any]) -> None:
    old = autoscaled(3)
    errors = crds.validate(new, old=old)
    assert [e.path for e in errors] == ["spec.replicas"]
    assert "must lie within [spec.autoscaling.minReplicas, spec.autoscaling.maxReplicas]" in errors[0].message


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key in ("properties", "additionalProperties", "items"):
            child = node.get(key)
            if key == "properties" and isinstance(child, dict):
                for name, sub in child.items():
                    yield from _walk(sub, f"{path}.{name}")
            elif isinstance(child, dict):
                yield from _walk(child, f"{path}[{key}]")


@pytest.mark.parametrize("crd", crds.definitions(), ids=lambda c: c["metadata"]["name"])
def test_crd_schemas_are_structural(crd: dict[str, Any]) -> None:
    """What the API server checks on a CRD: every node typed, no additionalProperties beside properties,
    and every default valid against its own schema."""
    for version in crd["spec"]["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        for path, node in _walk(root):
            typed = "type" in node or node.get("x-kubernetes-int-or-string") or \
                node.get("x-kubernetes-preserve-unknown-fields")
            assert typed, f"{path} has no type"
            assert not ("properties" in node and "additionalProperties" in node), path
            if "default" in node:
                assert schema.validate(node, schema.apply_defaults(node, node["default"])) == [], path


# ---- Engine ------------------------------------------------------------------------------------------------

from builders import engine, engine_spec  # noqa: E402


def bad_engine(**spec: Any) -> dict[str, Any]:
    return engine(engine_spec(**spec), name="engine-0123456789abcdef0123456789abcdef")


ENGINE_INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("model missing", without(bad_engine(), "spec.model"), "spec.model", "Required value"),
    ("gpu missing", without(bad_engine(), "spec.gpu"), "spec.gpu", "Required value"),
    ("capability missing", without(bad_engine(), "spec.gpu.computeCapability"), "spec.gpu.computeCapability",
     "Required value"),
    ("capability format", bad_engine(gpu={"computeCapability": "hopper"}), "spec.gpu.computeCapability",
     "must be MAJOR.MINOR"),
    ("product label", bad_engine(gpu={"product": "NVIDIA H100"}), "spec.gpu.product", "valid label value"),
    ("precision enum", bad_engine(precision="fp4"), "spec.precision", "Unsupported value"),
    ("batch size zero", bad_engine(maxBatchSize=0), "spec.maxBatchSize", "greater than or equal to 1"),
    ("input longer than sequence", bad_engine(maxInputLen=9000, maxSeqLen=8192), "spec.maxInputLen",
     "must not exceed spec.maxSeqLen"),
    ("tensor parallel too high", bad_engine(tensorParallelSize=32), "spec.tensorParallelSize",
     "less than or equal to 16"),
    ("unpinned hf model", bad_engine(model={"uri": "hf://meta-llama/Llama-3"}), "spec.model.uri",
     "must pin a revision"),
    ("digest format", bad_engine(model={"digest": "md5:abc"}), "spec.model.digest", "64 lower-case hex"),
    ("store both", bad_engine(storeRef={"pvc": {"claimName": "a"}, "s3": {"bucket": "b"}}), "spec.storeRef",
     "exactly one of pvc or s3"),
    ("build timeout too short", bad_engine(buildTimeoutSeconds=5), "spec.buildTimeoutSeconds",
     "greater than or equal to 60"),
    ("version chars", bad_engine(trtllmVersion="0.21 rc"), "spec.trtllmVersion", "must be a version"),
    ("unknown field", bad_engine(maxBatch=3), "spec.maxBatch", 'unknown field "spec.maxBatch"'),
    ("name not DNS-1035", engine(engine_spec(), name="Engine_1"), "", "metadata.name must be a DNS-1035 label"),
    ("name too long", engine(engine_spec(), name="e" * 60), "", "at most 56 characters"),
]


@pytest.mark.parametrize(("obj", "path", "text"), [c[1:] for c in ENGINE_INVALID], ids=[c[0] for c in ENGINE_INVALID])
def test_invalid_engine_is_rejected_naming_the_field(obj: dict[str, Any], path: str, text: str) -> None:
    errors = crds.validate(obj)
    matching = [e for e in errors if e.path == path and text in e.message]
    assert matching, f"expected an error at {path!r} containing {text!r}, got: {[str(e) for e in errors]}"


def test_engine_spec_is_immutable() -> None:
    old = engine(engine_spec())
    assert crds.validate(old, old=old) == []
    changed = set_path(old, "spec.precision", "bf16")
    errors = crds.validate(changed, old=old)
    assert [e.path for e in errors] == ["spec"]
    assert "spec is immutable" in errors[0].message
    assert "tensorfleet engine key" in errors[0].message
    status_only = deep_merge(old, {"status": {"attempts": 1}})
    assert crds.validate(status_only, old=old) == []
