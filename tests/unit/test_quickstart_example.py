"""The quickstart's example manifest: shipped in the package, and a bad --example named in one line."""

from __future__ import annotations

import pathlib

import click
import pytest
import yaml
from click.testing import CliRunner

from tensorfleet import cli
from tensorfleet.sandbox import quickstart

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE_HEAD = "apiVersion: tensorfleet.io/v1alpha1\nkind: InferenceService\nmetadata:\n  name: a\n"


def test_without_example_the_packaged_copy_of_the_repositorys_example_is_used(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default was the relative examples/inferenceservice.yaml: `tensorfleet run` worked only from the root."""
    monkeypatch.chdir(tmp_path)
    expected = [d for d in yaml.safe_load_all((ROOT / "examples" / "inferenceservice.yaml").read_text()) if d]
    assert quickstart.example_manifests(None) == expected


def _refused_example(path: pathlib.Path) -> str:
    """The message of the usage error ``--example path`` gets, which names the flag."""
    with pytest.raises(click.BadParameter) as raised:
        quickstart.example_manifests(str(path))
    assert raised.value.param_hint == "--example (TENSORFLEET_EXAMPLE)"
    return raised.value.message


@pytest.mark.parametrize(("content", "named"), [
    (None, "No such file or directory"),
    (b"\xff\xfekind: InferenceService\n", "not UTF-8 text"),
    (b"kind: [\n", "not valid YAML"),
], ids=["missing", "not-utf8", "not-yaml"])
def test_an_example_that_cannot_be_read_names_the_flag(tmp_path: pathlib.Path, content: bytes | None,
                                                       named: str) -> None:
    """A non-UTF-8 file was a UnicodeDecodeError traceback; a missing one said 'cannot read' naming no flag."""
    path = tmp_path / "svc.yaml"
    if content is not None:
        path.write_bytes(content)
    assert f"{path}: {named}" in _refused_example(path)


def test_dates_in_the_example_stay_strings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(EXAMPLE_HEAD + "spec:\n  model:\n    servedName: 2020-01-01\n")
    assert quickstart.example_manifests(str(path))[0]["spec"]["model"]["servedName"] == "2020-01-01"


@pytest.mark.parametrize(("content", "named"), [
    ("- a\n- b\n", "document 0: a list, expected a Kubernetes object"),
    ("hello\n", "document 0: the scalar 'hello', expected a Kubernetes object"),
    ("kind: InferenceService\nmetadata:\n  name: a\n", "document 0: expected a Kubernetes object (a mapping "
                                                          "with apiVersion, kind and metadata.name)"),
    ("apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: a\n",
     "document 0: tensorfleet does not manage Widget of example.com/v1"),
    (EXAMPLE_HEAD + "---\nmetadata: 5\n", "document 1: expected a Kubernetes object"),
], ids=["list", "scalar", "no-apiVersion", "unknown-kind", "second-document"])
def test_an_example_document_that_is_not_an_object_names_the_flag(tmp_path: pathlib.Path, content: str,
                                                                  named: str) -> None:
    """A list or scalar document was an AttributeError traceback after the emulator and operator had started."""
    path = tmp_path / "svc.yaml"
    path.write_text(content)
    assert f"{path}: {named}" in _refused_example(path)


def test_tensorfleet_run_with_a_list_example_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    result = CliRunner().invoke(cli.main, ["run", "--cluster", "emulator", "--example", str(path)])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for --example (TENSORFLEET_EXAMPLE): {path}: document 0: a list" in result.output
    assert "emulator at" not in result.output  # refused before anything started
