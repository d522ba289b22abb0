"""The quickstart's example manifest: shipped in the package, and a bad --example named in one line."""

from __future__ import annotations

import pathlib

import click
import pytest
import yaml

from tensorfleet.sandbox import quickstart

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_without_example_the_packaged_copy_of_the_repositorys_example_is_used(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default was the relative examples/inferenceservice.yaml: `tensorfleet run` worked only from the root."""
    monkeypatch.chdir(tmp_path)
    expected = [d for d in yaml.safe_load_all((ROOT / "examples" / "inferenceservice.yaml").read_text()) if d]
    assert quickstart.example_manifests(None) == expected


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
    with pytest.raises(click.BadParameter) as raised:
        quickstart.example_manifests(str(path))
    assert raised.value.param_hint == "--example (TENSORFLEET_EXAMPLE)"
    assert f"{path}: {named}" in raised.value.message


def test_dates_in_the_example_stay_strings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text("kind: InferenceService\nspec:\n  model:\n    servedName: 2020-01-01\n")
    assert quickstart.example_manifests(str(path))[0]["spec"]["model"]["servedName"] == "2020-01-01"
