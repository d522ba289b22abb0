"""Model weights: download into a local folder with a timeout and retries, and verify their digest.

Used by the engine build Job (the checkpoint to convert) and by vLLM pods' ``model-fetch`` init
container. The digest (``spec.model.digest``) is the artifact digest of the folder (see
``store.digest_directory``; ``tensorfleet engine digest DIR`` prints it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tensorfleet.api.types import ModelSource
from tensorfleet.engines.store import StoreError, digest_directory

logger = logging.getLogger(__name__)
T = TypeVar("T")
PVC_MOUNT = "/mnt/model"


class DigestMismatch(Exception):
    """The bytes are not the ones the spec pinned: never retried, never served."""


class DownloadTimeout(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    timeout_seconds: float = 3600.0
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (0.5 + random.random() / 2)


def with_retries(what: str, action: Callable[[], T], policy: RetryPolicy,
                 retried: tuple[type[BaseException], ...] = (StoreError, OSError)) -> T:
    """Run ``action`` until it succeeds or ``policy.timeout_seconds`` pass; retried errors back off."""
    deadline = time.monotonic() + policy.timeout_seconds
    attempt = 0
    while True:
        try:
            return action()
        except retried as exc:
            wait = policy.delay(attempt)
            if time.monotonic() + wait >= deadline:
                raise DownloadTimeout(f"{what}: gave up after {attempt + 1} attempts in "
                                      f"{policy.timeout_seconds:.0f} s: {exc}") from exc
            logger.warning("%s failed (attempt %d), retrying in %.1f s: %s", what, attempt + 1, wait, exc)
            time.sleep(wait)
            attempt += 1


def _download_s3(source: ModelSource, dest: pathlib.Path, endpoint: str | None) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(s3={"addressing_style": "path" if endpoint else "auto"})
    client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
    prefix = source.path.strip("/")
    try:
        paginator = client.get_paginator("list_objects_v2")
        keys = [item["Key"] for page in paginator.paginate(Bucket=source.location, Prefix=prefix)
                for item in page.get("Contents", ())]
        if not keys:
            raise StoreError(f"s3://{source.location}/{prefix} has no objects")
        for key in keys:
            relative = key[len(prefix):].lstrip("/") if prefix else key
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(source.location, key, str(target))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise StoreError(f"downloading s3://{source.location}/{prefix}: {exc}") from exc


def _download_hf(source: ModelSource, dest: pathlib.Path) -> None:
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - the image installs tensorfleet[engines]
        raise RuntimeError("hf:// models need huggingface_hub (pip install 'tensorfleet[engines]')") from exc
    try:
        huggingface_hub.snapshot_download(repo_id=source.location, revision=source.revision, local_dir=str(dest),
                                          token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # huggingface_hub raises many transport and HTTP error types
        errors = huggingface_hub.errors
        if isinstance(exc, errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
            raise
        raise StoreError(f"downloading hf://{source.location}@{source.revision}: {exc}") from exc


def fetch_model(uri: str, dest: pathlib.Path, digest: str | None, policy: RetryPolicy,
                s3_endpoint: str | None = None, pvc_mount: str = PVC_MOUNT) -> pathlib.Path:
    """The local folder holding the model's files, downloaded when needed and verified against ``digest``."""
    source = ModelSource.parse(uri)
    if source.scheme == "pvc":
        local = pathlib.Path(pvc_mount) / source.path
    else:
        local = dest
        marker = dest / ".tensorfleet-verified"
        if digest and marker.is_file() and marker.read_text().strip() == digest:
            logger.info("model %s already in the cache, verified as %s", uri, digest)
            return local
        local.mkdir(parents=True, exist_ok=True)
        download: Callable[[], Any] = ((lambda: _download_s3(source, local, s3_endpoint)) if source.scheme == "s3"
                                       else (lambda: _download_hf(source, local)))
        with_retries(f"downloading {uri}", download, policy)
    if digest:
        verify_model(local, digest, uri)
        if source.scheme != "pvc":
            (local / ".tensorfleet-verified").write_text(digest)
    return local


def verify_model(local: pathlib.Path, digest: str, uri: str) -> None:
    found, _ = digest_directory(local, exclude=(".tensorfleet-verified", ".cache"))
    if found != digest:
        raise DigestMismatch(f"{uri}: the downloaded weights have digest {found}, spec.model.digest is {digest}")
