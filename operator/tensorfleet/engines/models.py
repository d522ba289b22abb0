"""Model weights: download into a local folder with a timeout and retries, and verify their digest.

Used by the engine build Job (the checkpoint to convert) and by vLLM pods' ``model-fetch`` init
container. The digest (``spec.model.digest``) is the artifact digest of the folder (see
``store.digest_directory``; ``tensorfleet engine digest DIR`` prints it).

Only transient errors are retried (throttling, 5xx, dropped connections, and OSErrors that are not
one of ``PERMANENT_ERRNOS``); a missing bucket, refused access or a read-only or full destination
raises ``DownloadFailed`` at once, with the reason. Downloads go into a fresh staging folder inside
the destination and are moved into place only after they verified, so the leftovers of a killed run
(partial files, another model's files) never reach the verified copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pathlib
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tensorfleet.api.types import ModelSource
from tensorfleet.engines.store import StoreError, digest_directory, flock_within

logger = logging.getLogger(__name__)
T = TypeVar("T")
PVC_MOUNT = "/mnt/model"
VERIFIED_MARKER = ".tensorfleet-verified"
STAGING_PREFIX = ".partial-"
NOT_HASHED = (VERIFIED_MARKER, ".cache")  # bookkeeping, not weights: outside the digest

# OSErrors that waiting does not fix: the destination (or the store) refuses writes or is full.
PERMANENT_ERRNOS = {
    errno.EROFS: "the destination is on a read-only file system",
    errno.ENOSPC: "no space left on the destination volume: raise its size (the model-cache volume or the "
                  "build Job's work volume)",
    errno.EDQUOT: "the destination's disk quota is exhausted",
    errno.EFBIG: "a file is larger than the destination file system allows",
    errno.EACCES: "permission denied: the container's user cannot write there",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "a folder is in the way of a file",
    errno.ENAMETOOLONG: "a file name is too long for the destination file system",
}
# S3 error codes that are worth waiting for (besides any 5xx, 408 and 429).
_S3_TRANSIENT = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                           "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable",
                           "BandwidthLimitExceeded", "NoSuchKey", "404"})  # a key listed, then replaced: list again
_S3_HINTS = {
    "NoSuchBucket": "the bucket in spec.model.uri does not exist (check the name and the S3 endpoint)",
    "AccessDenied": "check the keys in spec.model.credentialsSecretRef and the bucket's policy",
    "403": "check the keys in spec.model.credentialsSecretRef and the bucket's policy",
    "InvalidAccessKeyId": "the access key in spec.model.credentialsSecretRef is unknown to the server",
    "SignatureDoesNotMatch": "the secret key in spec.model.credentialsSecretRef is wrong",
}


class DigestMismatch(Exception):
    """The bytes are not the ones the spec pinned: never retried, never served."""


class DownloadTimeout(Exception):
    """Transient errors went on until the retry budget (``RetryPolicy.timeout_seconds``) was spent."""


class DownloadFailed(Exception):
    """An error that retrying cannot fix (no such bucket, access denied, read-only or full destination).

    ``reason`` is a short code for status and termination messages (``NoSuchBucket``, ``AccessDenied``,
    ``EROFS``, ``NoObjects``, …); the message says what to change."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    timeout_seconds: float = 3600.0
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (0.5 + random.random() / 2)


def permanent_os_error(what: str, exc: OSError) -> DownloadFailed | None:
    """``DownloadFailed`` for an OSError that waiting cannot fix, None for one worth retrying."""
    code = exc.errno
    hint = PERMANENT_ERRNOS.get(code) if code is not None else None
    if code is None or hint is None:
        return None
    return DownloadFailed(errno.errorcode.get(code, "OSError"), f"{what}: {exc} (not retried: {hint})")


@contextlib.contextmanager
def _refusing_permanent_os_errors(what: str) -> Iterator[None]:
    """Work on the destination: an OSError of ``PERMANENT_ERRNOS`` becomes ``DownloadFailed``."""
    try:
        yield
    except OSError as exc:
        failed = permanent_os_error(what, exc)
        if failed is None:
            raise
        raise failed from exc


def with_retries(what: str, action: Callable[[], T], policy: RetryPolicy,
                 retried: tuple[type[BaseException], ...] = (StoreError, OSError)) -> T:
    """Run ``action`` until it succeeds or ``policy.timeout_seconds`` pass; retried errors back off.

    ``DownloadFailed`` and the OSErrors of ``PERMANENT_ERRNOS`` (as ``DownloadFailed``) end it at once."""
    deadline = time.monotonic() + policy.timeout_seconds
    attempt = 0
    while True:
        try:
            return action()
        except DownloadFailed:
            raise
        except retried as exc:
            if isinstance(exc, OSError) and (failed := permanent_os_error(what, exc)) is not None:
                raise failed from exc
            wait = policy.delay(attempt)
            if time.monotonic() + wait >= deadline:
                raise DownloadTimeout(f"{what}: gave up after {attempt + 1} attempts in "
                                      f"{policy.timeout_seconds:.0f} s: {exc}") from exc
            logger.warning("%s failed (attempt %d), retrying in %.1f s: %s", what, attempt + 1, wait, exc)
            time.sleep(wait)
            attempt += 1


# ---- S3 ------------------------------------------------------------------------------------------------


def _s3_error(where: str, exc: Exception) -> Exception:
    """StoreError (retried) for a transient S3 or connection error, DownloadFailed for the rest."""
    import boto3.exceptions
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        text = f"{where}: {code or status}: {error.get('Message') or exc} (HTTP {status})"
        if status >= 500 or status in (408, 429) or code in _S3_TRANSIENT:
            return StoreError(text)
        hint = _S3_HINTS.get(code, "the request is refused as it is")
        return DownloadFailed(code or f"HTTP{status}", f"{text}; not retried: {hint}")
    transient = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                 botocore.exceptions.IncompleteReadError, boto3.exceptions.RetriesExceededError)
    if isinstance(exc, transient):
        return StoreError(f"{where}: {exc}")
    return DownloadFailed(type(exc).__name__, f"{where}: {exc} (not retried)")


def _relative_key(key: str, prefix: str, uri: str) -> str:
    """``key`` below ``prefix/`` as a safe relative path; a key that would leave the folder is refused."""
    relative = key[len(prefix) + 1:] if prefix else key
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == VERIFIED_MARKER:
        raise DownloadFailed("UnsafeKey", f"{uri}: object key {key!r} is not a plain relative path under "
                                          f"the model's prefix; refusing to write it")
    return relative


def _s3_listing(client: Any, source: ModelSource, uri: str) -> dict[str, str]:
    """Relative path -> key of the model's objects: the keys under ``prefix/`` (a key equal to the prefix
    is a one-file model, saved under its base name). 'Folder' placeholders (keys ending in '/') are skipped."""
    import botocore.exceptions

    prefix = source.path.strip("/")
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=source.location, Prefix=f"{prefix}/" if prefix else "")
    keys = [item["Key"] for page in pages for item in page.get("Contents", ()) if not item["Key"].endswith("/")]
    if keys:
        return {_relative_key(key, prefix, uri): key for key in keys}
    if prefix:
        try:
            client.head_object(Bucket=source.location, Key=prefix)
            return {prefix.rsplit("/", 1)[-1]: prefix}
        except botocore.exceptions.ClientError as exc:  # a 404: no such object either
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
    raise DownloadFailed("NoObjects", f"{uri}: no objects under s3://{source.location}/{prefix}"
                                      f"{'/' if prefix else ''} (check the path in spec.model.uri)")


def _download_s3(source: ModelSource, dest: pathlib.Path, endpoint: str | None) -> None:
    import boto3
    import boto3.exceptions
    import botocore.config
    import botocore.exceptions

    uri = f"s3://{source.location}/{source.path.strip('/')}"
    config = botocore.config.Config(s3={"addressing_style": "path" if endpoint else "auto"})
    try:
        client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
        listing = _s3_listing(client, source, uri)
        for stale in _leftovers(dest, set(listing)):  # an earlier attempt's files the listing dropped
            stale.unlink()
        for relative, key in sorted(listing.items()):
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(source.location, key, str(target))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
            boto3.exceptions.RetriesExceededError) as exc:
        raise _s3_error(f"downloading {uri}", exc) from exc


def _leftovers(folder: pathlib.Path, wanted: set[str]) -> list[pathlib.Path]:
    return [p for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
            and p.relative_to(folder).as_posix() not in wanted]


# ---- Hugging Face ---------------------------------------------------------------------------------------


def _download_hf(source: ModelSource, dest: pathlib.Path) -> None:
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - the image installs tensorfleet[engines]
        raise RuntimeError("hf:// models need huggingface_hub (pip install 'tensorfleet[engines]')") from exc
    where = f"downloading hf://{source.location}@{source.revision}"
    try:
        huggingface_hub.snapshot_download(repo_id=source.location, revision=source.revision, local_dir=str(dest),
                                          token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # huggingface_hub raises many transport and HTTP error types
        raise _hf_error(where, exc, huggingface_hub.errors) from exc


def _hf_error(where: str, exc: Exception, errors: Any) -> Exception:
    """DownloadFailed for a missing (or gated) repository or revision and other 4xx; StoreError otherwise."""
    if isinstance(exc, errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
        return DownloadFailed(type(exc).__name__, f"{where}: {exc} (not retried: check spec.model.uri and the "
                                                  "HF_TOKEN in spec.model.credentialsSecretRef)")
    if isinstance(exc, OSError) and (failed := permanent_os_error(where, exc)) is not None:
        return failed
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return DownloadFailed(f"HTTP{status}", f"{where}: {exc} (not retried)")
    return StoreError(f"{where}: {exc}")


# ---- fetch and verify -----------------------------------------------------------------------------------


def fetch_model(uri: str, dest: pathlib.Path, digest: str | None, policy: RetryPolicy,
                s3_endpoint: str | None = None, pvc_mount: str = PVC_MOUNT) -> pathlib.Path:
    """The local folder holding the model's files, downloaded when needed and verified against ``digest``.

    ``dest`` is the model's folder: after a download it holds the model's files and nothing else."""
    source = ModelSource.parse(uri)
    if source.scheme == "pvc":
        local = pathlib.Path(pvc_mount) / source.path
        if digest:
            verify_model(local, digest, uri)
        return local
    if _verified(dest, digest, uri):  # without the lock: a read-only cache that holds the model is fine
        return dest
    with _dest_lock(dest, uri, policy.timeout_seconds):  # replicas sharing a cache volume download once
        if _verified(dest, digest, uri):
            return dest
        staging = _fresh_staging(dest, uri)
        download: Callable[[], Any] = ((lambda: _download_s3(source, staging, s3_endpoint))
                                       if source.scheme == "s3" else (lambda: _download_hf(source, staging)))
        try:
            with_retries(f"downloading {uri}", download, policy)
            if digest:
                verify_model(staging, digest, uri)
            _move_into_place(staging, dest, uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if digest:
            with _refusing_permanent_os_errors(f"marking {dest} verified"):
                _write_marker(dest, digest)
    return dest


def _verified(dest: pathlib.Path, digest: str | None, uri: str) -> bool:
    marker = dest / VERIFIED_MARKER
    if digest and marker.is_file() and marker.read_text().strip() == digest:
        logger.info("model %s already in the cache, verified as %s", uri, digest)
        return True
    return False


@contextlib.contextmanager
def _dest_lock(dest: pathlib.Path, uri: str, timeout: float) -> Iterator[None]:
    """flock(2) on ``.<dest name>.tensorfleet-lock`` next to ``dest`` (outside it: not part of the model)."""
    with _refusing_permanent_os_errors(f"locking {dest} for {uri}"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.parent / f".{dest.name}.tensorfleet-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not flock_within(fd, timeout, poll=0.5):
            raise DownloadTimeout(f"downloading {uri}: another process kept downloading into {dest} "
                                  f"for {timeout:.0f} s")
        yield
    finally:
        os.close(fd)  # releases the lock


def _fresh_staging(dest: pathlib.Path, uri: str) -> pathlib.Path:
    """An empty folder inside ``dest`` for this run's download; earlier runs' staging folders are removed."""
    with _refusing_permanent_os_errors(f"preparing {dest} for {uri}"):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / VERIFIED_MARKER).unlink(missing_ok=True)  # what follows changes dest: it is not verified
        for old in dest.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
        staging = dest / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
    return staging


def _move_into_place(staging: pathlib.Path, dest: pathlib.Path, uri: str) -> None:
    """Replace everything in ``dest`` (but ``staging``) with ``staging``'s entries: renames on one file system."""
    with _refusing_permanent_os_errors(f"moving {uri} into {dest}"):
        for old in dest.iterdir():
            if old == staging:
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        for entry in staging.iterdir():
            entry.rename(dest / entry.name)


def _write_marker(dest: pathlib.Path, digest: str) -> None:
    temporary = dest / f"{VERIFIED_MARKER}.{uuid.uuid4().hex}"
    temporary.write_text(digest)
    os.replace(temporary, dest / VERIFIED_MARKER)  # the marker is whole or absent


def verify_model(local: pathlib.Path, digest: str, uri: str) -> None:
    found, _ = digest_directory(local, exclude=NOT_HASHED)
    if found != digest:
        raise DigestMismatch(f"{uri}: the downloaded weights have digest {found}, spec.model.digest is {digest}")
