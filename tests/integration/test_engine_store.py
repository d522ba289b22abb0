"""The engine store, ensure and fetch, run against BOTH backends: a local filesystem and a real
S3-compatible server process (moto_server) on loopback. Only the TensorRT-LLM build itself is a test
double (``BuilderDouble``); hashing, uploads, the commit marker, locks and verification are real.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import boto3
import botocore.exceptions
import pytest

from builders import engine_spec
from tensorfleet.api import crds
from tensorfleet.engines.ensure import BuildFailed, ensure, run_ensure
from tensorfleet.engines.fetch import CorruptArtifact, MissingArtifact, fetch_engine, verify_artifact
from tensorfleet.engines.fingerprint import key_of
from tensorfleet.engines.store import (
    MARKER,
    EngineStore,
    FilesystemStore,
    LeaseLost,
    LockTimeout,
    Manifest,
    StoreError,
    artifact_digest,
)
from tensorfleet.engines.store_s3 import S3Store, _S3Lease

pytestmark = pytest.mark.integration


class BuilderDouble:
    """Test double of TensorRTLLMBuilder: writes deterministic test bytes instead of running trtllm-build."""

    def __init__(self, delay: float = 0.0, size: int = 256 * 1024, fail: bool = False,
                 ranks: int | None = None, config: bool = True) -> None:
        self.delay, self.size, self.fail = delay, size, fail
        self.ranks, self.config = ranks, config  # like trtllm-build by default: one rank file per TP rank
        self.builds = 0
        self._lock = threading.Lock()

    def build(self, spec: Mapping[str, Any], workdir: pathlib.Path) -> pathlib.Path:
        with self._lock:
            self.builds += 1
        time.sleep(self.delay)
        if self.fail:
            raise BuildFailed("BuildFailed", "trtllm-build exited with status 1", "[TRT] out of memory\n")
        out = workdir / "artifact"
        (out / "engine").mkdir(parents=True)
        (out / "tokenizer").mkdir()
        seed = key_of(spec).sha256.encode()
        for rank in range(spec["tensorParallelSize"] if self.ranks is None else self.ranks):
            (out / "engine" / f"rank{rank}.engine").write_bytes((seed * (self.size // len(seed) + 1))[: self.size])
        if self.config:
            (out / "engine" / "config.json").write_text(json.dumps({"precision": spec["precision"]}))
        (out / "tokenizer" / "tokenizer.json").write_text("{}")
        return out


def defaulted(**overrides: Any) -> dict[str, Any]:
    body = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine", "metadata": {"name": "x"},
            "spec": engine_spec(**overrides)}
    return dict(crds.default(body)["spec"])


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[EngineStore]:
    if request.param == "filesystem":
        yield FilesystemStore(tmp_path / "store")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"engines-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield S3Store(bucket, "prefix/engines", endpoint=endpoint, lease_seconds=3.0)


def test_build_then_cache(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec, builder = defaulted(), BuilderDouble()
    first = ensure(spec, store, builder, tmp_path / "w1")
    assert (first.result, builder.builds) == ("build", 1)
    assert first.fingerprint == key_of(spec).sha256
    assert first.sha256
    assert first.sha256.startswith("sha256:")
    assert first.size_bytes == 256 * 1024 + len(json.dumps({"precision": "fp16"})) + 2
    assert first.uri == f"{store.uri}/{first.fingerprint}"
    second = ensure(spec, store, builder, tmp_path / "w2")
    assert (second.result, second.sha256, builder.builds) == ("cache", first.sha256, 1)


def test_other_inputs_are_another_artifact(store: EngineStore, tmp_path: pathlib.Path) -> None:
    builder = BuilderDouble()
    a = ensure(defaulted(), store, builder, tmp_path / "a")
    b = ensure(defaulted(precision="bf16"), store, builder, tmp_path / "b")
    assert a.fingerprint != b.fingerprint
    assert (a.result, b.result, builder.builds) == ("build", "build", 2)


def test_an_upload_without_its_marker_is_never_taken_as_present(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec = defaulted()
    fingerprint = key_of(spec).sha256
    partial = BuilderDouble().build(spec, tmp_path / "crashed")
    store.upload(fingerprint, "crashed-attempt", partial)  # the builder died before writing engine.json
    assert store.read_marker(fingerprint) is None
    with pytest.raises(MissingArtifact):
        fetch_engine(store, fingerprint, "sha256:" + "0" * 64, tmp_path / "dest", 8)
    builder = BuilderDouble()
    outcome = ensure(spec, store, builder, tmp_path / "w")
    assert (outcome.result, builder.builds) == ("build", 1)


def test_concurrent_builders_of_one_fingerprint_build_once(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec, builder = defaulted(), BuilderDouble(delay=1.0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: ensure(spec, store, builder, tmp_path / f"w{i}", lock_timeout=60),
                                 range(4)))
    assert builder.builds == 1
    assert sorted(o.result for o in outcomes) == ["build", "cache", "cache", "cache"]
    assert len({o.sha256 for o in outcomes}) == 1
    manifest = store.manifest(key_of(spec).sha256)
    assert manifest is not None
    verify_artifact(store, manifest.fingerprint, manifest, outcomes[0].sha256)


def test_of_two_commits_exactly_one_wins(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec = defaulted()
    fingerprint = key_of(spec).sha256
    source = BuilderDouble().build(spec, tmp_path / "src")
    manifests = []
    for build_id in ("one", "two"):
        files = tuple(store.upload(fingerprint, build_id, source))
        manifests.append(Manifest(fingerprint, build_id, files, artifact_digest(files), "2026-01-01T00:00:00Z", 1.0,
                                  dict(key_of(spec).document)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        won = list(pool.map(lambda m: store.commit(fingerprint, m), manifests))
    assert sorted(won) == [False, True]


def test_a_second_builder_waits_for_the_lock_and_times_out(store: EngineStore) -> None:
    fingerprint = "f" * 64
    with store.lock(fingerprint, "first", timeout=5), pytest.raises(LockTimeout), \
            store.lock(fingerprint, "second", timeout=0.5):
        pass
    with store.lock(fingerprint, "third", timeout=5) as lease:  # released: free again
        lease.check()


def test_fetch_verifies_and_writes_the_triton_repository(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec = defaulted()
    outcome = ensure(spec, store, BuilderDouble(), tmp_path / "w")
    dest = tmp_path / "engines"
    engine_dir = fetch_engine(store, outcome.fingerprint, str(outcome.sha256), dest, max_batch_size=32)
    assert (engine_dir / "engine" / "rank0.engine").stat().st_size == 256 * 1024
    config = (dest / "repository" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert f'string_value: "{engine_dir}/engine"' in config
    assert "max_batch_size: 32" in config


def _tamper(store: EngineStore, fingerprint: str, relative: str, data: bytes) -> None:
    if isinstance(store, FilesystemStore):
        (store.root / fingerprint / relative).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        store.client.put_object(Bucket=store.bucket, Key=store._key(fingerprint, relative), Body=data)


def test_a_tampered_file_fails_fetch_fast_and_is_rebuilt(store: EngineStore, tmp_path: pathlib.Path) -> None:
    spec, builder = defaulted(), BuilderDouble()
    outcome = ensure(spec, store, builder, tmp_path / "w")
    manifest = store.manifest(outcome.fingerprint)
    assert manifest is not None
    _tamper(store, outcome.fingerprint, f"builds/{manifest.build_id}/engine/rank0.engine", b"evil" * 100)
    started = time.monotonic()
    with pytest.raises(CorruptArtifact, match=r"rank0\.engine"):
        fetch_engine(store, outcome.fingerprint, str(outcome.sha256), tmp_path / "dest", 8)
    assert time.monotonic() - started < 5
    again = ensure(spec, store, builder, tmp_path / "w2")  # ensure re-verifies: the corrupt copy is not reused
    assert (again.result, builder.builds) == ("build", 2)
    fetch_engine(store, again.fingerprint, str(again.sha256), tmp_path / "dest2", 8)


def _delete(store: EngineStore, fingerprint: str, relative: str) -> None:
    if isinstance(store, FilesystemStore):
        (store.root / fingerprint / relative).unlink()
    else:
        assert isinstance(store, S3Store)
        store.client.delete_object(Bucket=store.bucket, Key=store._key(fingerprint, relative))


def test_a_lost_file_is_corrupt_for_fetch_and_rebuilt_by_ensure(store: EngineStore, tmp_path: pathlib.Path) -> None:
    """A file engine.json lists but the store lost (a lifecycle rule, a cleanup, a partial restore) is gone
    for good: fetch reports corrupt at once (so the operator rebuilds) and ensure discards and rebuilds."""
    spec, builder = defaulted(), BuilderDouble()
    outcome = ensure(spec, store, builder, tmp_path / "w")
    manifest = store.manifest(outcome.fingerprint)
    assert manifest is not None
    _delete(store, outcome.fingerprint, f"builds/{manifest.build_id}/engine/rank0.engine")
    started = time.monotonic()
    with pytest.raises(CorruptArtifact, match=r"rank0\.engine.*listed in engine\.json, is missing"):
        fetch_engine(store, outcome.fingerprint, str(outcome.sha256), tmp_path / "dest", 8)
    assert time.monotonic() - started < 5
    again = run_ensure(spec, store, builder, tmp_path / "w2", None, lock_timeout=10)
    assert (again.result, builder.builds) == ("build", 2)
    fetch_engine(store, again.fingerprint, str(again.sha256), tmp_path / "dest2", 8)


def test_a_rewritten_manifest_does_not_match_the_recorded_digest(store: EngineStore, tmp_path: pathlib.Path) -> None:
    outcome = ensure(defaulted(), store, BuilderDouble(), tmp_path / "w")
    manifest = store.manifest(outcome.fingerprint)
    assert manifest is not None
    forged = json.loads(manifest.to_json())
    forged["sha256"] = "sha256:" + "1" * 64
    _tamper(store, outcome.fingerprint, MARKER, json.dumps(forged).encode())
    with pytest.raises(CorruptArtifact):
        fetch_engine(store, outcome.fingerprint, str(outcome.sha256), tmp_path / "dest", 8)


def test_a_failed_build_reports_reason_and_log_tail(store: EngineStore, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "termination-log"
    outcome = run_ensure(defaulted(), store, BuilderDouble(fail=True), tmp_path / "w", log, lock_timeout=10)
    report = json.loads(log.read_text())
    assert (outcome.exit_code, report["result"], report["reason"]) == (1, "failed", "BuildFailed")
    assert "out of memory" in report["logTail"]
    assert store.read_marker(outcome.fingerprint) is None


@pytest.mark.parametrize(("spec_overrides", "builder", "missing"), [
    ({}, BuilderDouble(ranks=0, config=False), "engine/config.json, engine/rank0.engine"),
    ({"tensorParallelSize": 2}, BuilderDouble(ranks=1), "engine/rank1.engine"),
    ({}, BuilderDouble(size=0), "engine/rank0.engine"),
    ({}, BuilderDouble(config=False), "engine/config.json"),
], ids=["empty", "a-rank-short", "empty-rank-file", "no-config"])
def test_an_incomplete_engine_is_never_committed(store: EngineStore, tmp_path: pathlib.Path,
                                                 spec_overrides: dict[str, Any], builder: BuilderDouble,
                                                 missing: str) -> None:
    """trtllm-build may exit 0 having written nothing usable: committing that would fail only later, in Triton."""
    log = tmp_path / "termination-log"
    outcome = run_ensure(defaulted(**spec_overrides), store, builder, tmp_path / "w", log, lock_timeout=10)
    report = json.loads(log.read_text())
    assert (outcome.exit_code, report["result"], report["reason"]) == (1, "failed", "IncompleteEngine")
    assert f"lacks {missing} (missing or empty)" in report["message"]
    assert store.read_marker(outcome.fingerprint) is None


class _RepositoryNotFoundError(Exception):
    """Stands in for huggingface_hub.errors.RepositoryNotFoundError (huggingface_hub is not installed here)."""


class _RevisionNotFoundError(Exception):
    """Stands in for huggingface_hub.errors.RevisionNotFoundError."""


class RaisingBuilder:
    """Test double of a builder that fails with ``error`` (after the lock was taken, as a download would)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def build(self, spec: Mapping[str, Any], workdir: pathlib.Path) -> pathlib.Path:
        raise self.error


@pytest.mark.parametrize(("error", "reason", "message"), [
    (_RepositoryNotFoundError("404 Client Error: Repository Not Found for url"), "ModelNotFound", "Repository Not"),
    (_RevisionNotFoundError("404 Client Error: Revision Not Found for url"), "ModelNotFound", "Revision Not"),
    (ValueError("spec.buildOptions.nosuchflag: Unsupported value"), "InvalidSpec", "spec.buildOptions.nosuchflag"),
    (RuntimeError("hf:// models need huggingface_hub"), "InternalError", "RuntimeError: hf:// models need"),
    (KeyError("model"), "InternalError", "KeyError: 'model'"),
], ids=["hub-repository", "hub-revision", "value-error", "runtime-error", "key-error"])
def test_every_build_error_is_a_reported_failure_and_frees_the_lock(
        error: Exception, reason: str, message: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = types.ModuleType("huggingface_hub")
    hub.errors = types.SimpleNamespace(  # type: ignore[attr-defined]
        RepositoryNotFoundError=_RepositoryNotFoundError, RevisionNotFoundError=_RevisionNotFoundError)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    store, log, spec = FilesystemStore(tmp_path / "store"), tmp_path / "termination-log", defaulted()
    outcome = run_ensure(spec, store, RaisingBuilder(error), tmp_path / "w", log, lock_timeout=1)
    report = json.loads(log.read_text())
    assert (outcome.exit_code, report["result"], report["reason"]) == (1, "failed", reason)
    assert message in report["message"]
    assert report["fingerprint"] == key_of(spec).sha256
    assert run_ensure(spec, store, BuilderDouble(), tmp_path / "w2", None, lock_timeout=1).result == "build"


def test_a_broken_s3_stream_is_a_transient_store_error() -> None:
    class Body:
        def read(self, size: int = -1) -> bytes:
            raise botocore.exceptions.ResponseStreamingError(error="connection reset by peer")

        def close(self) -> None:
            pass

    class Client:
        def get_object(self, **kwargs: Any) -> dict[str, Any]:
            return {"Body": Body()}

    store = S3Store("bucket", "prefix", client=Client())
    with pytest.raises(StoreError, match="connection reset by peer"), store.open("f" * 64, "builds/b/x") as stream:
        stream.read()


def test_an_expired_s3_lease_is_taken_over_and_its_holder_cannot_renew(s3_endpoint: str) -> None:
    bucket = f"engines-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    store = S3Store(bucket, "p", endpoint=s3_endpoint, lease_seconds=1.5)
    fingerprint = "e" * 64
    with store.lock(fingerprint, "stalled", timeout=5) as stalled:
        assert isinstance(stalled, _S3Lease)
        stalled._stop.set()  # a paused holder: its heartbeats stop and the lease expires
        stalled._thread.join()
        time.sleep(1.8)
        with store.lock(fingerprint, "successor", timeout=5) as successor:
            successor.check()
            stalled._stop.clear()
            stalled._thread = threading.Thread(target=stalled._heartbeat, daemon=True)
            stalled._thread.start()  # the holder wakes up: its next renewal is refused (If-Match fails)
            deadline = time.monotonic() + 5
            while stalled.lost is None and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(LeaseLost):
                stalled.check()
