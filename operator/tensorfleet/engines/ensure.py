"""``tensorfleet engine ensure``: the build Job's one command. Use the stored engine, or build and store it.

1. If the store has a committed artifact for the fingerprint whose ``engine.json`` describes the same
   fingerprint document and whose every byte verifies, report ``cache``.
2. Otherwise take the fingerprint's lock (one builder at a time), look again (someone may have just
   finished), drop a corrupt marker if there is one, download and verify the checkpoint, convert it,
   run ``trtllm-build``, upload the result into a fresh ``builds/<id>/`` folder, write ``engine.json``
   last, and report ``build``.

The outcome goes to the pod's termination message (JSON, well under the kubelet's 4 KiB), so the Job
needs no Kubernetes API rights: the operator reads it from the Pod's terminated state.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from tensorfleet.engines import models, trtllm
from tensorfleet.engines.fetch import ENGINE_SUBDIR, CorruptArtifact, fetch_engine, verify_artifact
from tensorfleet.engines.fingerprint import EngineKey, key_of
from tensorfleet.engines.store import EngineStore, LeaseLost, LockTimeout, Manifest, StoreError, artifact_digest

logger = logging.getLogger(__name__)
TERMINATION_LIMIT = 3800  # the kubelet keeps at most 4096 bytes of a termination message
LOG_TAIL_BYTES = 2000


class BuildFailed(Exception):
    def __init__(self, reason: str, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.reason, self.message, self.log_tail = reason, message, log_tail


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the Job reports. ``result`` is cache, build or failed."""

    result: str
    fingerprint: str
    sha256: str | None = None
    size_bytes: int | None = None
    uri: str | None = None
    built_at: str | None = None
    build_seconds: float | None = None
    reason: str | None = None
    message: str | None = None
    log_tail: str | None = None

    def termination_message(self) -> str:
        data: dict[str, Any] = {k: v for k, v in {
            "result": self.result, "fingerprint": self.fingerprint, "sha256": self.sha256,
            "sizeBytes": self.size_bytes, "uri": self.uri, "builtAt": self.built_at,
            "buildSeconds": self.build_seconds, "reason": self.reason, "message": self.message,
            "logTail": self.log_tail}.items() if v is not None}
        text = json.dumps(data, sort_keys=True)
        while len(text.encode()) > TERMINATION_LIMIT and data.get("logTail"):
            data["logTail"] = data["logTail"][len(data["logTail"]) // 4:]
            text = json.dumps(data, sort_keys=True)
        if len(text.encode()) > TERMINATION_LIMIT:
            data["message"] = str(data.get("message", ""))[:1000]
            text = json.dumps(data, sort_keys=True)
        return text

    @property
    def exit_code(self) -> int:
        return 0 if self.result in ("cache", "build") else 1


class Builder(Protocol):
    def build(self, spec: Mapping[str, Any], workdir: pathlib.Path) -> pathlib.Path:
        """Build the engine for ``spec`` under ``workdir``; the folder to store (engine/ and tokenizer/)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_manifest(store: EngineStore, manifest: Manifest, result: str) -> Outcome:
    return Outcome(result=result, fingerprint=manifest.fingerprint, sha256=manifest.sha256,
                   size_bytes=manifest.size_bytes, uri=store.artifact_uri(manifest.fingerprint),
                   built_at=manifest.built_at, build_seconds=manifest.build_seconds)


def missing_engine_files(output: pathlib.Path, tensor_parallel_size: int) -> list[str]:
    """The files of a TensorRT-LLM engine that ``output`` lacks (or holds empty): trtllm-build writes
    ``config.json`` and one ``rank<N>.engine`` per tensor-parallel rank into ``engine/``."""
    required = [f"{ENGINE_SUBDIR}/config.json",
                *(f"{ENGINE_SUBDIR}/rank{rank}.engine" for rank in range(tensor_parallel_size))]
    return [name for name in required
            if not (output / name).is_file() or (output / name).is_symlink() or (output / name).stat().st_size == 0]


def _require_engine_files(output: pathlib.Path, tensor_parallel_size: int) -> None:
    missing = missing_engine_files(output, tensor_parallel_size)
    if missing:
        raise BuildFailed("IncompleteEngine", f"the build output lacks {', '.join(missing)} (missing or empty): "
                          f"a TensorRT-LLM engine needs {ENGINE_SUBDIR}/config.json and one "
                          f"{ENGINE_SUBDIR}/rank<N>.engine per tensor-parallel rank "
                          f"(spec.tensorParallelSize {tensor_parallel_size}); nothing was stored")


def lookup(store: EngineStore, key: EngineKey) -> tuple[Manifest | None, bytes | None, str | None]:
    """(verified manifest, raw marker, why it is unusable) for the fingerprint."""
    raw = store.read_marker(key.sha256)
    if raw is None:
        return None, None, None
    try:
        manifest = Manifest.from_json(raw)
        if manifest.fingerprint != key.sha256 or manifest.document != dict(key.document):
            raise CorruptArtifact("engine.json describes other inputs than its fingerprint")
        verify_artifact(store, key.sha256, manifest, None)
    except (ValueError, CorruptArtifact) as exc:
        logger.warning("stored engine %s is unusable: %s", key.sha256, exc)
        return None, raw, str(exc)
    return manifest, raw, None


def ensure(spec: Mapping[str, Any], store: EngineStore, builder: Builder, workdir: pathlib.Path,
           holder: str | None = None, lock_timeout: float = 7200.0,
           clock: Callable[[], float] = time.monotonic) -> Outcome:
    key = key_of(spec)
    manifest, _, _ = lookup(store, key)
    if manifest is not None:
        return _from_manifest(store, manifest, "cache")
    holder = holder or f"{os.environ.get('POD_NAME', os.uname().nodename)}/{uuid.uuid4().hex[:8]}"
    with store.lock(key.sha256, holder, lock_timeout) as lease:
        manifest, raw, problem = lookup(store, key)
        if manifest is not None:  # built by whoever held the lock before us
            return _from_manifest(store, manifest, "cache")
        if raw is not None:
            logger.warning("discarding the corrupt stored engine %s: %s", key.sha256, problem)
            store.discard(key.sha256, raw)
        build_id = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        started = clock()
        output = builder.build(spec, workdir / build_id)
        _require_engine_files(output, int(spec.get("tensorParallelSize") or 1))
        files = store.upload(key.sha256, build_id, output)
        manifest = Manifest(fingerprint=key.sha256, build_id=build_id, files=tuple(files),
                            sha256=artifact_digest(files), built_at=_now(),
                            build_seconds=round(clock() - started, 3), document=dict(key.document))
        lease.check()
        if not store.commit(key.sha256, manifest):  # only possible if the lock was bypassed
            theirs, _, _ = lookup(store, key)
            if theirs is None:
                raise StoreError(f"another builder committed {key.sha256} and it does not verify")
            store.remove_builds(key.sha256, keep=theirs.build_id)
            return _from_manifest(store, theirs, "cache")
        store.remove_builds(key.sha256, keep=build_id)
        shutil.rmtree(workdir / build_id, ignore_errors=True)
        return _from_manifest(store, manifest, "build")


# Why a build failed, by exception type (first match wins; subclasses before their bases).
_FAILURE_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (models.DigestMismatch, "ModelDigestMismatch"),
    (models.DownloadTimeout, "ModelDownloadTimeout"),
    (LockTimeout, "LockTimeout"),
    (LeaseLost, "LeaseLost"),
    (StoreError, "StoreError"),
    (ValueError, "InvalidSpec"),  # e.g. build_plan's unknown buildOptions, an unparsable model URI
)


def _hub_not_found_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's errors for a repository or revision that does not exist (never retried by models)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        return ()
    return (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)


def failure_reason(exc: Exception) -> str:
    """The Outcome reason for an exception that ended ``ensure``."""
    if isinstance(exc, _hub_not_found_errors()):
        return "ModelNotFound"
    if isinstance(exc, models.DownloadFailed):  # no such bucket, access denied, a full disk: not retried
        return f"Model{exc.reason}"
    return next((reason for kind, reason in _FAILURE_REASONS if isinstance(exc, kind)), "InternalError")


def run_ensure(spec: Mapping[str, Any], store: EngineStore, builder: Builder, workdir: pathlib.Path,
               termination_log: pathlib.Path | None, lock_timeout: float) -> Outcome:
    """``ensure`` with every failure turned into an Outcome, written to the termination log.

    The Job reports through its termination message only, so nothing may end it without one: an
    unexpected error is reported as ``InternalError`` (its traceback goes to the log)."""
    fingerprint = ""
    try:
        fingerprint = key_of(spec).sha256
        outcome = ensure(spec, store, builder, workdir, lock_timeout=lock_timeout)
    except BuildFailed as exc:
        outcome = Outcome("failed", fingerprint, reason=exc.reason, message=exc.message, log_tail=exc.log_tail)
    except Exception as exc:  # every failure is reported, see the docstring
        reason, message = failure_reason(exc), str(exc)
        if reason == "InternalError":
            logger.exception("ensure failed unexpectedly")
            message = f"{type(exc).__name__}: {exc}"
        outcome = Outcome("failed", fingerprint, reason=reason, message=message)
    if termination_log is not None:
        termination_log.write_text(outcome.termination_message())
    return outcome


# ---- the real builder: TensorRT-LLM in the builder image -----------------------------------------------


def run_logged(command: Sequence[str], timeout: float, what: str, tail_lines: int = 60) -> None:
    """Run ``command``, streaming its output to our stdout; BuildFailed with the log tail on failure."""
    logger.info("running: %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    try:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", start_new_session=True)
    except OSError as exc:
        raise BuildFailed(f"{what}NotRunnable", f"{command[0]}: {exc}") from exc
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        tail.append(line)
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise BuildFailed(f"{what}Timeout", f"{command[0]} ran longer than {timeout:.0f} s",
                              "".join(tail)[-LOG_TAIL_BYTES:])
    code = process.wait()
    if code != 0:
        raise BuildFailed(f"{what}Failed", f"{' '.join(command[:2])} exited with status {code}",
                          "".join(tail)[-LOG_TAIL_BYTES:])


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "generation_config.json", "config.json", "vocab.json", "merges.txt")


@dataclasses.dataclass
class TensorRTLLMBuilder:
    """Downloads and verifies the checkpoint, converts it and runs trtllm-build (TensorRT-LLM 0.21 CLI)."""

    timeout_seconds: float
    download: models.RetryPolicy
    s3_endpoint: str | None = None
    examples_dir: str = trtllm.EXAMPLES_DIR
    pvc_mount: str = models.PVC_MOUNT  # where a pvc:// model's claim is mounted

    def build(self, spec: Mapping[str, Any], workdir: pathlib.Path) -> pathlib.Path:
        deadline = time.monotonic() + self.timeout_seconds
        model = spec["model"]
        model_dir = models.fetch_model(model["uri"], workdir / "model", model.get("digest"), self.download,
                                       s3_endpoint=self.s3_endpoint, pvc_mount=self.pvc_mount)
        output = workdir / "artifact"
        plan = trtllm.build_plan(spec, str(model_dir), str(workdir / "checkpoint"),
                                 str(output / "engine"), examples=self.examples_dir)
        run_logged(plan.convert, max(1.0, deadline - time.monotonic()), "Convert")
        run_logged(plan.build, max(1.0, deadline - time.monotonic()), "Build")
        tokenizer = output / "tokenizer"
        tokenizer.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tokenizer / name)
        shutil.rmtree(workdir / "checkpoint", ignore_errors=True)
        return output


__all__ = ["BuildFailed", "Builder", "Outcome", "TensorRTLLMBuilder", "ensure", "fetch_engine", "run_ensure"]
