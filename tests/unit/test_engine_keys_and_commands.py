"""The fingerprint, GPU discovery and the TensorRT-LLM command lines (checked against the 0.21 CLI)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from builders import engine, engine_spec, inference_service, triton_service
from tensorfleet.api import crds
from tensorfleet.api.types import InferenceService
from tensorfleet.cli import main
from tensorfleet.engines import discovery, fingerprint, trtllm


def defaulted(**overrides: Any) -> dict[str, Any]:
    return dict(crds.default(engine(engine_spec(**overrides)))["spec"])


def test_same_inputs_same_name_and_the_name_is_a_valid_engine_name() -> None:
    a, b = engine(engine_spec()), engine(engine_spec())
    assert a["metadata"]["name"] == b["metadata"]["name"]
    assert a["metadata"]["name"].startswith("engine-")
    assert len(a["metadata"]["name"]) == 39
    assert crds.validate(a) == []


@pytest.mark.parametrize("change", [
    {"model": {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct@other"}},
    {"model": {"digest": "sha256:" + "a" * 64}},
    {"gpu": {"product": "NVIDIA-A100-SXM4-80GB"}},
    {"gpu": {"computeCapability": "8.0"}},
    {"precision": "fp8"}, {"maxBatchSize": 64}, {"maxInputLen": 2048}, {"maxSeqLen": 4096},
    {"tensorParallelSize": 2}, {"trtllmVersion": "0.20.0"}, {"builderImage": "example.com/builder:1"},
    {"buildOptions": {"max_num_tokens": "8192"}},
], ids=lambda c: next(iter(c)))
def test_every_build_input_changes_the_name(change: dict[str, Any]) -> None:
    assert fingerprint.key_of(defaulted(**change)).name != fingerprint.key_of(defaulted()).name


def test_where_it_is_stored_and_how_long_a_build_may_take_are_not_inputs() -> None:
    base = fingerprint.key_of(defaulted())
    other_store = {**defaulted(buildTimeoutSeconds=600), "storeRef": {"pvc": {"claimName": "other"}}}
    assert fingerprint.key_of(other_store) == base
    assert fingerprint.key_of(defaulted(model={"credentialsSecretRef": {"name": "token"}})) == base


def test_the_fingerprint_document_is_versioned_and_canonical() -> None:
    key = fingerprint.key_of(defaulted())
    doc = json.loads(key.canonical)
    assert doc["fingerprintVersion"] == 1
    assert doc["model"] == {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct", "revision": "5f0b02c7", "digest": None}
    assert key.canonical == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def test_an_inference_service_keys_one_engine_per_product() -> None:
    isvc = InferenceService.from_body(triton_service(model={"uri": "hf://a/b@v1"}))
    h100 = fingerprint.engine_manifest(fingerprint.engine_spec(isvc, "NVIDIA-H100-80GB-HBM3", "9.0"), "default")
    a100 = fingerprint.engine_manifest(fingerprint.engine_spec(isvc, "NVIDIA-A100-SXM4-80GB", "8.0"), "default")
    assert h100["metadata"]["name"] != a100["metadata"]["name"]
    assert crds.validate(h100) == []
    assert h100["spec"]["maxBatchSize"] == 32
    assert h100["spec"]["tensorParallelSize"] == 1


def test_engine_key_command_prints_the_name(tmp_path: Any) -> None:
    manifest = tmp_path / "engine.yaml"
    body = engine(engine_spec())
    import yaml

    manifest.write_text(yaml.safe_dump({**body, "metadata": {"name": "anything"}}))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(manifest)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == body["metadata"]["name"]
    isvc = tmp_path / "isvc.yaml"
    isvc.write_text(yaml.safe_dump(triton_service(model={"uri": "hf://a/b@v1"})))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(isvc)])
    assert result.exit_code != 0
    assert "--gpu-product" in result.output
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(isvc), "--gpu-product", "NVIDIA-L4",
                                       "--compute-capability", "8.9", "-o", "fingerprint"])
    assert result.exit_code == 0
    assert len(result.output.strip()) == 64


def test_engine_key_rejects_bad_input_naming_the_field(tmp_path: Any) -> None:
    import yaml

    manifest = tmp_path / "engine.yaml"
    manifest.write_text(yaml.safe_dump(engine(engine_spec(precision="fp4"))))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(manifest)])
    assert result.exit_code == 1
    assert "spec.precision" in result.output
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine",
                                     "metadata": {"name": "e"}}))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(empty)])
    assert result.exit_code == 1
    assert "spec.model: Required value" in result.output
    vllm = tmp_path / "vllm.yaml"
    vllm.write_text(yaml.safe_dump(inference_service()))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(vllm), "--gpu-product", "NVIDIA-L4",
                                       "--compute-capability", "8.9"])
    assert result.exit_code == 1
    assert "spec.engine: Required value" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(triton_service(gpu={"count": 0})))
    result = CliRunner().invoke(main, ["engine", "key", "-f", str(broken), "--gpu-product", "NVIDIA-L4",
                                       "--compute-capability", "8.9"])
    assert result.exit_code == 1
    assert "spec.gpu.count" in result.output


# ---- discovery ------------------------------------------------------------------------------------------


def node(name: str, product: str | None, count: int = 8, major: int = 9, minor: int = 0,
         unschedulable: bool = False) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if product:
        labels.update({discovery.PRODUCT: product, discovery.COUNT: str(count), discovery.MEMORY: "81559",
                       discovery.COMPUTE_MAJOR: str(major), discovery.COMPUTE_MINOR: str(minor)})
    return {"metadata": {"name": name, "labels": labels}, "spec": {"unschedulable": unschedulable}}


def test_inventory_of_products_from_gfd_labels() -> None:
    nodes = [node("a", "NVIDIA-H100-80GB-HBM3"), node("b", "NVIDIA-H100-80GB-HBM3"),
             node("c", "NVIDIA-L4", count=1, major=8, minor=9), node("cpu", None),
             node("d", "NVIDIA-A100-SXM4-80GB", unschedulable=True)]
    inventory = discovery.Inventory.from_nodes(g for n in nodes if (g := discovery.node_gpus(n)))
    # a cordoned product is still present (its pods still run), marked as taking no new pods
    assert inventory.names == ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L4")
    assert inventory.cordoned_products() == ("NVIDIA-A100-SXM4-80GB",)
    h100 = inventory.products[0]
    assert (h100.nodes, h100.gpus, h100.memory_mib, h100.compute_capability) == (2, 16, 81559, "9.0")
    assert inventory.compute_capabilities() == {"NVIDIA-H100-80GB-HBM3": "9.0", "NVIDIA-A100-SXM4-80GB": "9.0",
                                                "NVIDIA-L4": "8.9"}
    assert discovery.Inventory.from_nodes([]).names is None  # no GFD labels at all: unknown


# ---- TensorRT-LLM command lines -------------------------------------------------------------------------


def plan(**overrides: Any) -> trtllm.BuildPlan:
    return trtllm.build_plan(defaulted(**overrides), "/work/model", "/work/ckpt", "/work/out/engine")


def flags(cmd: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, part in enumerate(cmd):
        if part.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else None
            out[part] = None if nxt is None or nxt.startswith("--") else nxt
    return out


CONVERT = "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"
QUANTIZE = "/app/tensorrt_llm/examples/quantization/quantize.py"


@pytest.mark.parametrize(("precision", "script", "expected", "gemm"), [
    ("fp16", CONVERT, {"--dtype": "float16"}, "float16"),
    ("bf16", CONVERT, {"--dtype": "bfloat16"}, "bfloat16"),
    ("int8", CONVERT, {"--dtype": "float16", "--use_weight_only": None, "--weight_only_precision": "int8"}, "float16"),
    ("fp8", QUANTIZE, {"--qformat": "fp8", "--kv_cache_dtype": "fp8", "--calib_size": "512"}, "auto"),
    ("int4-awq", QUANTIZE, {"--qformat": "int4_awq", "--awq_block_size": "128"}, "auto"),
])
def test_each_precision_converts_and_builds_with_documented_flags(precision: str, script: str,
                                                                  expected: dict[str, str | None], gemm: str) -> None:
    result = plan(precision=precision, tensorParallelSize=2)
    assert result.convert[:2] == ("python3", script)
    convert = flags(result.convert)
    assert convert["--model_dir"] == "/work/model"
    assert convert["--output_dir"] == "/work/ckpt"
    assert convert["--tp_size"] == "2"
    for flag, value in expected.items():
        assert convert[flag] == value, flag
    build = flags(result.build)
    assert result.build[0] == "trtllm-build"
    assert build["--checkpoint_dir"] == "/work/ckpt"
    assert build["--output_dir"] == "/work/out/engine"
    assert (build["--max_batch_size"], build["--max_input_len"], build["--max_seq_len"]) == ("32", "4096", "8192")
    assert build["--workers"] == "2"
    assert build["--gemm_plugin"] == gemm
    assert build["--kv_cache_type"] == "paged"
    assert build["--remove_input_padding"] == "enable"
    assert build["--context_fmha"] == "enable"
    assert ("--use_fp8_context_fmha" in build) == (precision == "fp8")


def test_build_options_pass_through_and_override_defaults() -> None:
    result = plan(buildOptions={"max_num_tokens": "8192", "gemm_plugin": "disable", "strip_plan": "true",
                                "multiple_profiles": "enable", "weight_streaming": "false"})
    build = flags(result.build)
    assert build["--max_num_tokens"] == "8192"
    assert build["--gemm_plugin"] == "disable"
    assert "--strip_plan" in build
    assert build["--strip_plan"] is None
    assert build["--multiple_profiles"] == "enable"
    assert "--weight_streaming" not in build


@pytest.mark.parametrize(("options", "path", "text"), [
    ({"output_dir": "/tmp"}, "spec.buildOptions.output_dir", "derived from the Engine spec"),
    ({"max_seq_len": "9"}, "spec.buildOptions.max_seq_len", "derived from the Engine spec"),
    ({"context_fmha": "on"}, "spec.buildOptions.context_fmha", "enable, disable"),
    ({"gemm_plugin": "fp64"}, "spec.buildOptions.gemm_plugin", "supported values"),
    ({"max_num_tokens": "lots"}, "spec.buildOptions.max_num_tokens", "non-negative integer"),
    ({"kv_cache_type": "ring"}, "spec.buildOptions.kv_cache_type", "continuous, disabled, paged"),
    ({"strip_plan": "yes"}, "spec.buildOptions.strip_plan", "true or false"),
    ({"frobnicate": "1"}, "spec.buildOptions.frobnicate", "not a trtllm-build option"),
])
def test_bad_build_options_are_rejected_naming_the_field(options: dict[str, str], path: str, text: str) -> None:
    errors = trtllm.build_option_errors(options)
    assert [e.path for e in errors] == [path]
    assert text in errors[0].message
    with pytest.raises(ValueError, match=path.rsplit(".", 1)[1]):
        plan(buildOptions=options)


def test_the_example_engine_is_named_by_its_fingerprint() -> None:
    import pathlib

    import yaml

    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "engine.yaml"
    body = yaml.safe_load(example.read_text())
    assert crds.validate(body) == []
    assert body["metadata"]["name"] == fingerprint.key_of_body(body).name


@pytest.mark.parametrize("spelled", [
    {"builderImage": ""},
    {"buildOptions": {"kv_cache_type": "paged", "context_fmha": "enable"}},
    {"buildOptions": {"gemm_plugin": "float16"}},  # fp16's own default
    {"buildOptions": {"strip_plan": "false"}},  # a bare flag left off
], ids=lambda c: json.dumps(c))
def test_a_spec_that_spells_out_a_default_names_the_same_engine(spelled: dict[str, Any]) -> None:
    """An engine takes minutes of GPU time to build: writing a default out (as GitOps templates do) must not
    name, and build, a second engine with the same bytes."""
    assert fingerprint.key_of(defaulted(**spelled)) == fingerprint.key_of(defaulted())
    assert plan(**spelled).build == plan().build


def test_an_option_set_away_from_its_default_still_names_another_engine() -> None:
    assert fingerprint.key_of(defaulted(buildOptions={"gemm_plugin": "float16"}, precision="fp8")) != \
        fingerprint.key_of(defaulted(precision="fp8"))
    assert fingerprint.key_of(defaulted(buildOptions={"strip_plan": "true"})) != fingerprint.key_of(defaulted())
