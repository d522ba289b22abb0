"""Bad input to `tensorfleet engine ensure/fetch` is refused at once, naming the field, and errors a retry
cannot cure are reported instead of being retried until the timeout."""

from __future__ import annotations

import errno
import json
import pathlib
import time
from typing import Any

import pytest
from click.testing import CliRunner

from builders import engine_spec
from tensorfleet.cli import main
from tensorfleet.engines import fetch, models


def _ensure(spec_json: str, tmp_path: pathlib.Path) -> Any:
    return CliRunner().invoke(main, ["engine", "ensure", "--spec", spec_json, "--store", f"file://{tmp_path}/store",
                                     "--workdir", str(tmp_path / "work"), "--timeout", "5",
                                     "--termination-log", str(tmp_path / "termination-log")])


def _spec(**overrides: Any) -> str:
    spec = engine_spec(model={"uri": "s3://no-such-bucket/llama"}, **overrides)
    spec.pop("storeRef", None)
    return json.dumps(spec)


@pytest.mark.parametrize(("spec_json", "named"), [
    ("{}", "spec.model: Required value"),
    ("[]", "spec: Invalid value: must be a JSON object"),
    ("{not json", "--spec is not JSON"),
    (_spec(precision="fp4"), "spec.precision: Unsupported value"),
    (_spec(buildOptions={"nosuchflag": "1"}), "spec.buildOptions.nosuchflag: Unsupported value"),
    (_spec(buildOptions={"max_batch_size": "8"}), "spec.buildOptions.max_batch_size: Forbidden"),
], ids=["empty", "not-an-object", "not-json", "crd-schema", "unknown-build-option", "managed-build-option"])
def test_ensure_refuses_a_bad_spec_before_downloading_or_locking(spec_json: str, named: str,
                                                                 tmp_path: pathlib.Path) -> None:
    result = _ensure(spec_json, tmp_path)
    assert result.exit_code == 2, (result.output, result.exception)
    assert named in result.output
    report = json.loads((tmp_path / "termination-log").read_text())
    assert (report["result"], report["reason"]) == ("failed", "InvalidSpec")
    assert named in report["message"]
    assert not (tmp_path / "store").exists()  # no lock taken
    assert not (tmp_path / "work").exists()  # nothing downloaded


def _fetch(tmp_path: pathlib.Path, fingerprint: str = "f" * 64, sha256: str = "sha256:" + "0" * 64) -> Any:
    return CliRunner().invoke(main, ["engine", "fetch", "--fingerprint", fingerprint, "--sha256", sha256,
                                     "--store", f"file://{tmp_path}/store", "--dest", str(tmp_path / "dest"),
                                     "--timeout", "30", "--termination-log", str(tmp_path / "termination-log")])


@pytest.mark.parametrize(("option", "value"), [
    ("fingerprint", "a/b"), ("fingerprint", "F" * 64), ("fingerprint", "f" * 63),
    ("sha256", "0" * 64), ("sha256", "sha256:" + "g" * 64),
])
def test_fetch_refuses_a_malformed_fingerprint_or_digest(option: str, value: str, tmp_path: pathlib.Path) -> None:
    started = time.monotonic()
    result = _fetch(tmp_path, **{option: value})
    assert result.exit_code == 2, result.output
    assert f"--{option}" in result.output
    assert "hex digits" in result.output
    assert time.monotonic() - started < 10  # not retried until --timeout


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC, errno.EROFS, errno.ENOTDIR])
def test_fetch_reports_a_permanent_os_error_without_retrying(code: int, tmp_path: pathlib.Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fails(*args: Any) -> None:
        calls.append(args)
        raise OSError(code, "simulated", str(tmp_path / "dest"))

    monkeypatch.setattr(fetch, "fetch_engine", fails)
    result = _fetch(tmp_path)
    assert (result.exit_code, len(calls)) == (1, 1), result.output
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["result"] == "failed"
    assert "simulated" in report["message"]


def test_fetch_retries_a_transient_os_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "stale NFS file handle")

    monkeypatch.setattr(fetch, "fetch_engine", flaky)
    monkeypatch.setattr(models.time, "sleep", lambda seconds: None)
    result = _fetch(tmp_path)
    assert (result.exit_code, len(calls)) == (0, 2), result.output
    assert json.loads((tmp_path / "termination-log").read_text())["result"] == "verified"


def test_a_model_download_that_retrying_cannot_fix_is_reported_with_its_reason(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise models.DownloadFailed("NoSuchBucket", "s3://no-such-bucket/llama: the bucket does not exist")

    monkeypatch.setattr(models, "fetch_model", refused)
    log = tmp_path / "termination-log"
    result = CliRunner().invoke(main, ["model", "fetch", "--uri", "s3://no-such-bucket/llama", "--dest",
                                       str(tmp_path / "model"), "--termination-log", str(log)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert json.loads(log.read_text())["reason"] == "NoSuchBucket"
    assert "the bucket does not exist" in result.stderr


def test_a_build_job_reports_a_model_download_that_retrying_cannot_fix_by_its_reason() -> None:
    from tensorfleet.engines.ensure import failure_reason

    assert failure_reason(models.DownloadFailed("AccessDenied", "denied")) == "ModelAccessDenied"


def test_a_model_uri_of_no_supported_scheme_is_reported_not_a_traceback(tmp_path: pathlib.Path) -> None:
    """`model fetch --uri ftp://a/b` raised ValueError as a traceback and left no termination message."""
    log = tmp_path / "termination-log"
    result = CliRunner().invoke(main, ["model", "fetch", "--uri", "ftp://a/b", "--dest", str(tmp_path / "model"),
                                       "--termination-log", str(log)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "model-fetch: --uri: spec.model.uri 'ftp://a/b' is not hf://" in result.stderr
    assert json.loads(log.read_text())["reason"] == "InvalidURI"
    assert not (tmp_path / "model").exists()


def test_digest_of_a_folder_with_symbolic_links_is_a_one_line_error_naming_the_argument(
        tmp_path: pathlib.Path) -> None:
    """A Hugging Face cache snapshot (every file a link into ../../blobs), where a user usually has the weights."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_text("{}")
    snapshot = repo / "snapshots" / "5f0b02c7"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/0123abcd")
    result = CliRunner().invoke(main, ["engine", "digest", str(snapshot)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: DIRECTORY: {snapshot / 'config.json'}: symbolic links are not allowed")
    assert "--local-dir" in lines[0]
