"""What the operator renders for metering: env, the optional Secret, fingerprint, RU overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import inference_service, triton_service
from tensorfleet.api.types import InferenceService
from tensorfleet.render import metering
from tensorfleet.render.context import RenderContext
from tensorfleet.render.gateway import gateway_config, render_config_map
from tensorfleet.render.workload import render_deployment
from tensorfleet.settings import OperatorSettings


def isvc(body: dict) -> InferenceService:
    body["metadata"]["uid"] = "uid-1"
    return InferenceService.from_body(body)


def test_gateway_gets_sink_url_and_the_optional_secret_with_the_signing_key() -> None:
    ctx = RenderContext(metering_sink_url="https://openmeter.example/api/v1/events")
    pod = render_deployment(isvc(inference_service()), ctx, 1)["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["TENSORFLEET_METERING_SINK_URL"] == "https://openmeter.example/api/v1/events"
    assert env["TENSORFLEET_METERING_SIGNING_KEY_FILE"] == "/etc/tensorfleet/metering/signing-key"
    assert env["TENSORFLEET_METERING_SINK_TOKEN_FILE"] == "/etc/tensorfleet/metering/sink-token"
    volume = next(v for v in pod["volumes"] if v["name"] == "metering-secret")
    assert volume["secret"] == {"secretName": "tensorfleet-metering", "optional": True, "defaultMode": 0o440}
    assert {"name": "metering-secret", "mountPath": "/etc/tensorfleet/metering", "readOnly": True} \
        in gateway["volumeMounts"]
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    assert all(m["name"] != "metering-secret" for m in engine.get("volumeMounts", []))  # only the gateway signs


def test_no_secret_and_no_sink_render_nothing_for_them() -> None:
    pod = render_deployment(isvc(inference_service()), RenderContext(metering_secret=""), 1)["spec"]["template"]
    names = {e["name"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
    assert not {n for n in names if n.startswith("TENSORFLEET_METERING_")}
    assert all(v["name"] != "metering-secret" for v in pod["spec"]["volumes"])


def test_engine_fingerprint_is_stable_and_follows_what_changes_the_engine() -> None:
    ctx = RenderContext()
    base = metering.engine_fingerprint(isvc(triton_service()), ctx)
    assert base == metering.engine_fingerprint(isvc(triton_service()), ctx)
    assert base.startswith("sha256:")
    assert len(base) == 7 + 64
    assert base != metering.engine_fingerprint(isvc(triton_service(engine={"precision": "int8"})), ctx)
    assert base != metering.engine_fingerprint(isvc(triton_service()), RenderContext(triton_image_template="t:2"))
    config = gateway_config(isvc(triton_service()), ctx)
    assert config["engine"]["fingerprint"] == base


def test_resource_unit_overrides_reach_the_gateway_config() -> None:
    ctx = RenderContext(resource_units={"NVIDIA-L4": {"fp16": 0.4}})
    document = json.loads(render_config_map(isvc(inference_service()), ctx)["data"]["gateway.json"])
    assert document["metering"] == {"resourceUnits": {"NVIDIA-L4": {"fp16": 0.4}}}
    assert gateway_config(isvc(inference_service()))["metering"] == {}


def test_operator_reads_the_ru_table_file_and_names_a_bad_field(tmp_path: Path) -> None:
    (tmp_path / "ru.yaml").write_text("NVIDIA-L4: {fp16: 0.4}\n")
    ctx = OperatorSettings(metering_ru_table_file=str(tmp_path / "ru.yaml")).render_context()
    assert ctx.resource_units == {"NVIDIA-L4": {"fp16": 0.4}}
    (tmp_path / "bad.yaml").write_text("NVIDIA-L4: {fp16: zero}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml\.NVIDIA-L4\.fp16='zero'"):
        OperatorSettings(metering_ru_table_file=str(tmp_path / "bad.yaml")).render_context()


def _gateway_env(body: dict) -> dict[str, str | None]:
    pod = render_deployment(isvc(body), RenderContext(), 1)["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    return {e["name"]: e.get("value") for e in gateway["env"]}


@pytest.mark.parametrize(("extra_args", "step_tokens"), [
    (["--max-num-batched-tokens", "4096"], "4096"),
    (["--enable-prefix-caching", "--max-num-batched-tokens=8192"], "8192"),
    (["--max-num-batched-tokens", "1024", "--max-num-batched-tokens", "2048"], "2048"),  # the last wins
    (["--max-num-batched-tokens", "lots"], None),  # vLLM refuses it itself; metering learns
    (["--max-num-batched-tokens", "0"], None),
    (["--max-num-batched-tokens"], None),
    (["--max_num_batched_tokens", "512"], "512"),  # vLLM reads underscores in long names as dashes
    (["--max_num_batched_tokens=768"], "768"),
    (["--max-num-batched-tokens", "8k"], "8000"), (["--max-num-batched-tokens=2K"], "2048"),  # vLLM's human ints
    (["--max-num-batched-tokens", "1.5K"], None),  # vLLM refuses decimals with binary suffixes
    (["--max-num-seqs", "64"], None),
    ([], None),
])
def test_the_step_budget_a_vllm_service_sets_reaches_the_gateways_metering(extra_args: list[str],
                                                                           step_tokens: str | None) -> None:
    env = _gateway_env(inference_service(runtime={"name": "vllm", "extraArgs": extra_args}))
    assert env.get("TENSORFLEET_METERING_ENGINE_STEP_TOKENS") == step_tokens


@pytest.mark.parametrize(("extra_args", "window"), [
    ([], 8192), (["--max-model-len", "1024"], 1024), (["--max_model_len=4k"], 4000),
    (["--max-model-len", "auto"], None),
])
def test_the_gateway_gets_the_window_vllm_is_told(extra_args: list[str], window: int | None) -> None:
    # vLLM takes --max-model-len in extraArgs (after the operator's) over spec.model.maxModelLen: the gateway's
    # warm-up sized its long prompt by the spec's window, and the engine refused it on every round.
    service = isvc(inference_service(model={"maxModelLen": 8192}, runtime={"name": "vllm", "extraArgs": extra_args}))
    assert gateway_config(service)["model"]["maxModelLen"] == window


def test_triton_services_leave_the_step_budget_to_be_learned() -> None:
    env = _gateway_env(triton_service(runtime={"name": "triton", "extraArgs": ["--max-num-batched-tokens", "4096"]}))
    assert "TENSORFLEET_METERING_ENGINE_STEP_TOKENS" not in env


@pytest.mark.parametrize(("extra_args", "precision"), [
    ([], "fp16"), (["--quantization", "fp8"], "fp8"), (["--quantization=awq_marlin"], "int4-awq"),
    (["--dtype", "bfloat16"], "bf16"), (["--dtype", "auto"], "fp16"), (["--quantization", "bitsandbytes"], "fp16"),
    (["--dtype=bfloat16"], "bf16"), (["--dtype", "half", "--quantization", "fp8"], "fp8"),
    # vLLM's short alias -q (add_argument("--quantization", "-q")) in each form argparse takes
    (["-q", "awq"], "int4-awq"), (["-q", "fp8"], "fp8"), (["-q=fp8"], "fp8"), (["-qfp8"], "fp8"),
    (["--quantization", "awq", "-q", "fp8"], "fp8"),  # the last wins, whichever spelling
])
def test_a_vllm_service_is_metered_at_the_precision_vllm_is_told(extra_args: list[str], precision: str) -> None:
    # Before, records were priced at spec.engine.precision (never passed to vLLM) and a quantisation in extraArgs
    # was not seen: an fp8 engine was billed as fp16.
    service = isvc(inference_service(runtime={"name": "vllm", "extraArgs": extra_args}))
    assert gateway_config(service)["engine"]["precision"] == precision


@pytest.mark.parametrize(("extra_args", "precision"), [
    (["--enforce-eager", "--dtyp", "bfloat16"], "bf16"),  # argparse's abbreviation, which vLLM keeps
    (["--dtyp=bfloat16"], "bf16"),
])
def test_abbreviated_vllm_flags_are_read_as_vllm_reads_them(extra_args: list[str], precision: str) -> None:
    service = isvc(inference_service(runtime={"name": "vllm", "extraArgs": extra_args}))
    assert gateway_config(service)["engine"]["precision"] == precision
    assert _gateway_env(inference_service(runtime={"name": "vllm", "extraArgs": ["--max_num_batched", "64"]}))[
        "TENSORFLEET_METERING_ENGINE_STEP_TOKENS"] == "64"


def test_what_metering_cannot_read_is_a_warning_never_an_invalid_spec() -> None:
    from tensorfleet.api import validation

    # vLLM is never told spec.engine.precision; flags in a --config file are not seen by the operator. Both are
    # advisories (status.warnings, a Warning event): a spec an earlier version accepted must keep reconciling.
    spec = inference_service(engine={"precision": "int4-awq"}, gpu={"count": 1},
                             runtime={"name": "vllm", "extraArgs": ["--config", "/etc/vllm.yaml", "-q", "fp8"]})
    assert validation.validate_body(spec) == []
    assert [(e.path, e.message) for e in validation.advisories(isvc(spec).spec)] == [
        ("spec.engine.precision", "'int4-awq' is not passed to vLLM (TensorRT-LLM only): vLLM runs, and records are "
         "priced at, 'fp8' from spec.runtime.extraArgs (--quantization, --dtype)"),
        ("spec.runtime.extraArgs[0]", "flags in vLLM's --config file are not read by the operator: records are "
         "priced at 'fp8' from the other extraArgs, and the engine's step budget is learned; put --quantization, "
         "--dtype and --max-num-batched-tokens in extraArgs"),
    ]
    matching = inference_service(engine={"precision": "fp8"}, runtime={"name": "vllm", "extraArgs": ["-q", "fp8"]})
    assert validation.advisories(isvc(matching).spec) == []
    # spec.engine.precision defaults to fp16 in the CRD: a vLLM service that uses spec.engine for its gateway
    # limits only, and runs bf16, is not warned about a field it never set
    defaulted = inference_service(engine={"precision": "fp16", "maxBatchSize": 32},
                                  runtime={"name": "vllm", "extraArgs": ["--dtype", "bfloat16"]})
    assert validation.advisories(isvc(defaulted).spec) == []
    triton = triton_service(runtime={"name": "triton", "extraArgs": ["--config", "x"]})
    assert validation.advisories(isvc(triton).spec) == []
