from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from click.testing import CliRunner

from builders import inference_service
from tensorfleet import manifests
from tensorfleet.cli import main


def write(tmp_path: pathlib.Path, *docs: object) -> str:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def test_render_prints_the_children(tmp_path: pathlib.Path) -> None:
    result = CliRunner().invoke(main, ["render", "-f", write(tmp_path, inference_service("a"))])
    assert result.exit_code == 0, result.output
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]


def test_render_json_output(tmp_path: pathlib.Path) -> None:
    result = CliRunner().invoke(main, ["render", "-o", "json", "-f", write(tmp_path, inference_service("a"))])
    assert json.loads(result.stdout)["kind"] == "List"


def test_gpu_product_pins_the_deployment(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, inference_service("a"))
    result = CliRunner().invoke(main, ["render", "-f", path, "--gpu-product", "NVIDIA-L4"])
    deployment = next(d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "Deployment")
    term = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]}]


def test_invalid_input_exits_1_naming_each_field(tmp_path: pathlib.Path) -> None:
    bad = inference_service("a", gpu={"count": 0}, runtime={"name": "tgi"})
    result = CliRunner().invoke(main, ["render", "-f", write(tmp_path, bad)])
    assert result.exit_code == 1
    assert "InferenceService a: spec.gpu.count: Invalid value: 0: must be greater than or equal to 1" in result.stderr
    assert 'InferenceService a: spec.runtime.name: Unsupported value: "tgi"' in result.stderr
    assert result.stdout == ""


def test_a_wrongly_shaped_affinity_is_one_line_naming_the_field(tmp_path: pathlib.Path) -> None:
    bad = inference_service("a", gpu={"products": ["NVIDIA-L4"]}, affinity={"nodeAffinity": []})
    result = CliRunner().invoke(main, ["render", "-f", write(tmp_path, bad)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        'InferenceService a: spec.affinity.nodeAffinity: Invalid value: "array": must be of type object']


def test_a_spec_the_renderer_cannot_use_is_an_error_not_a_traceback(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifests, "spec_errors", lambda body, ctx: [])  # a gap in the checks
    bad = inference_service("a", gpu={"products": ["NVIDIA-L4"]}, affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": ["x"]}}})
    result = CliRunner().invoke(main, ["render", "-f", write(tmp_path, bad)])
    assert result.exit_code == 1
    assert "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]: " \
           'Invalid value: "x": must be of type object' in result.stderr
    assert "Traceback" not in result.output


def test_disallowed_gpu_product_is_an_error(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, inference_service("a", gpu={"products": ["NVIDIA-L4"]}))
    result = CliRunner().invoke(main, ["render", "-f", path, "--gpu-product", "NVIDIA-A10G"])
    assert result.exit_code == 1
    assert "spec.gpu.products: Unsupported value: 'NVIDIA-A10G'" in result.stderr


def test_other_kinds_are_skipped_with_a_warning(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}, inference_service("a"))
    result = CliRunner().invoke(main, ["render", "-f", path])
    assert result.exit_code == 0
    assert "skipped Namespace" in result.stderr


def test_a_spec_warning_is_printed_and_the_service_still_renders(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, inference_service("a", engine={"precision": "fp8"}, runtime={"name": "vllm"}))
    result = CliRunner().invoke(main, ["render", "-f", path])
    assert result.exit_code == 0
    assert result.stderr == ("InferenceService a: spec.engine.precision: 'fp8' is not passed to vLLM (TensorRT-LLM "
                             "only): vLLM runs, and records are priced at, 'fp16' from spec.runtime.extraArgs "
                             "(--quantization, --dtype)\n")
    assert "Deployment" in [d["kind"] for d in yaml.safe_load_all(result.stdout)]


def test_broken_yaml_is_reported(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "in.yaml"
    path.write_text("spec: [unclosed")
    result = CliRunner().invoke(main, ["render", "-f", str(path)])
    assert result.exit_code == 1
    assert f"{path} is not valid YAML" in result.stderr
    assert f'in "{path}", line 1, column 16' in result.stderr  # where, in the user's file


@pytest.mark.parametrize("command", [["render"], ["engine", "key"]])
@pytest.mark.parametrize(("content", "named"), [
    (None, "No such file or directory"),
    (b"\xff\xfe\x00kind: InferenceService\n", "not UTF-8 text"),
], ids=["missing", "not-utf8"])
def test_a_manifest_file_that_cannot_be_read_is_one_line_naming_the_flag(tmp_path: pathlib.Path, command: list[str],
                                                                        content: bytes | None, named: str) -> None:
    """Both were a FileNotFoundError or UnicodeDecodeError traceback."""
    path = tmp_path / "svc.yaml"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, [*command, "-f", str(path)])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '-f' / '--filename': {path}: {named}" in result.output.replace("\n", " ")


def test_unquoted_dates_stay_strings_as_kubectl_keeps_them(tmp_path: pathlib.Path) -> None:
    """PyYAML made `servedName: 2020-01-01` a date, and rendering it ended in a traceback."""
    path = tmp_path / "in.yaml"
    service = yaml.safe_dump(inference_service("a")).replace("maxModelLen: 8192",
                                                             "maxModelLen: 8192\n    servedName: 2020-01-01")
    path.write_text(service)
    assert "servedName: 2020-01-01" in service
    result = CliRunner().invoke(main, ["render", "-f", str(path), "-o", "json"])
    assert result.exit_code == 0, result.output
    assert '--served-model-name' in result.stdout
    assert "2020-01-01" in result.stdout


@pytest.mark.parametrize("command", [["render"], ["engine", "key"]])
@pytest.mark.parametrize("tagged", ["!!timestamp 2020-01-01", "!!binary aGVsbG8=", "!!set {a: null}"])
def test_an_explicit_tag_json_cannot_hold_is_named_with_its_line(tmp_path: pathlib.Path, command: list[str],
                                                                 tagged: str) -> None:
    """A date, bytes or a set in a manifest ended in "ValueError: unexpected type ... in JSON structure"."""
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(inference_service("a")).replace("maxModelLen: 8192",
                                                                   f"maxModelLen: 8192\n    servedName: {tagged}"))
    line = path.read_text().splitlines().index(f"    servedName: {tagged}") + 1
    result = CliRunner().invoke(main, [*command, "-f", str(path)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    tag = tagged.split()[0]
    assert f"is not valid YAML: a {tag} value is not JSON, which is all a manifest holds; quote it" in result.output
    assert f", line {line}, column 17" in result.output


@pytest.mark.parametrize(("content", "problem"), [
    ("NVIDIA-L4: {fp16: abc}\n", "ru.yaml.NVIDIA-L4.fp16='abc': must be a number in (0, 1000]"),
    (None, "[Errno 2] No such file or directory: "),
])
def test_a_bad_resource_unit_file_is_a_usage_error(tmp_path: pathlib.Path, content: str | None, problem: str) -> None:
    if content is not None:
        (tmp_path / "ru.yaml").write_text(content)
    path = write(tmp_path, inference_service("a"))
    result = CliRunner().invoke(main, ["render", "-f", path, "--metering-ru-table-file", str(tmp_path / "ru.yaml")])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # not a traceback
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: TENSORFLEET_METERING_RU_TABLE_FILE: ")
    assert problem in last
