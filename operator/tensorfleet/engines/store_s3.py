"""The engine store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...), through boto3.

Credentials come from the standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the
Secret named in ``storeRef.s3.credentialsSecretRef``, or the pod's IAM role). With an ``endpoint``
path-style addressing is used, which every S3-compatible server accepts.

Atomicity comes from S3 conditional writes: the commit marker is created with ``If-None-Match: *``
(exactly one of two commits wins), and the build lock is a lease object created the same way, renewed
by a heartbeat with ``If-Match: <etag>`` and taken over, once expired, with ``If-Match`` too, so two
builders can never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from tensorfleet.engines.store import (
    BUILDS,
    CHUNK,
    MARKER,
    EngineStore,
    FileEntry,
    Lease,
    LeaseLost,
    LockTimeout,
    Manifest,
    ObjectMissing,
    StoreError,
    hash_file,
    list_files,
)

LEASE = ".lease"
LEASE_SECONDS = 60.0
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024,
                           max_concurrency=8)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _S3Lease(Lease):
    """A lease object renewed by a heartbeat thread until released."""

    def __init__(self, store: S3Store, key: str, holder: str, etag: str, seconds: float) -> None:
        self.store, self.key, self.holder, self.etag, self.seconds = store, key, holder, etag, seconds
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="engine-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.etag = self.store._put_lease(self.key, self.holder, self.seconds, if_match=self.etag)
            except botocore.exceptions.ClientError as exc:
                if _status(exc) == 412:
                    self.lost = f"the lease on {self.key} was taken over (it expired while we held it)"
                    return
            except botocore.exceptions.BotoCoreError:
                continue  # transient: the next beat retries well before expiry

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.lost is None:
            with contextlib.suppress(botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key, IfMatch=self.etag)


class S3Store(EngineStore):
    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None, region: str | None = None,
                 lease_seconds: float = LEASE_SECONDS, client: Any = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.lease_seconds = lease_seconds
        config = botocore.config.Config(
            s3={"addressing_style": "path" if endpoint else "auto"},
            retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        self.client = client or boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None,
                                             config=config)

    def _key(self, fingerprint: str, relative: str) -> str:
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise StoreError(f"invalid fingerprint {fingerprint!r}")
        return "/".join(p for p in (self.prefix, fingerprint, relative) if p)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise StoreError(f"{what}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"{what}: {exc}") from exc

    def read_marker(self, fingerprint: str) -> bytes | None:
        key = self._key(fingerprint, MARKER)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(response["Body"].read())
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                return None
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc

    def upload(self, fingerprint: str, build_id: str, source: pathlib.Path) -> list[FileEntry]:
        entries = []
        for path in list_files(source):
            relative = path.relative_to(source).as_posix()
            sha, size = hash_file(path)
            key = self._key(fingerprint, f"{BUILDS}/{build_id}/{relative}")
            try:
                self.client.upload_file(str(path), self.bucket, key, Config=_TRANSFER,
                                        ExtraArgs={"Metadata": {"sha256": sha}})
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
                    boto3.exceptions.S3UploadFailedError) as exc:
                raise StoreError(f"uploading {path} to s3://{self.bucket}/{key}: {exc}") from exc
            entries.append(FileEntry(relative, sha, size))
        return entries

    def commit(self, fingerprint: str, manifest: Manifest) -> bool:
        key = self._key(fingerprint, MARKER)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=manifest.to_json(), IfNoneMatch="*",
                                   ContentType="application/json")
            return True
        except botocore.exceptions.ClientError as exc:
            if _status(exc) in (409, 412):  # 409: a concurrent conditional write is still in progress
                return False
            raise StoreError(f"committing s3://{self.bucket}/{key}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"committing s3://{self.bucket}/{key}: {exc}") from exc

    @contextlib.contextmanager
    def open(self, fingerprint: str, relative: str) -> Iterator[IO[bytes]]:
        key = self._key(fingerprint, relative)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchKey" or (_status(exc) == 404 and _code(exc) != "NoSuchBucket"):
                raise ObjectMissing(f"reading s3://{self.bucket}/{key}: {exc}") from exc
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc
        body = response["Body"]
        try:
            yield body
        except botocore.exceptions.BotoCoreError as exc:  # the stream broke mid-read: transient
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc
        finally:
            body.close()

    def download(self, fingerprint: str, relative: str, destination: pathlib.Path) -> None:
        """A plain download (no hashing): the baseline of the fetch benchmark."""
        key = self._key(fingerprint, relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, key, str(destination), Config=_TRANSFER)

    def discard(self, fingerprint: str, expected_marker: bytes) -> None:
        key = self._key(fingerprint, MARKER)
        try:
            head = self.client.get_object(Bucket=self.bucket, Key=key)
            if head["Body"].read() != expected_marker:
                return
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=head["ETag"])
        except botocore.exceptions.ClientError as exc:
            if _status(exc) not in (404, 412):
                raise StoreError(f"discarding s3://{self.bucket}/{key}: {exc}") from exc

    def remove_builds(self, fingerprint: str, keep: str | None) -> None:
        prefix = self._key(fingerprint, BUILDS) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        stale = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                attempt = item["Key"][len(prefix):].split("/", 1)[0]
                if attempt != keep:
                    stale.append({"Key": item["Key"]})
        for start in range(0, len(stale), 1000):
            self._call("removing stale uploads", self.client.delete_objects,
                       Delete={"Objects": stale[start:start + 1000], "Quiet": True})

    # ---- the build lock: a lease object ------------------------------------------------------------

    def _put_lease(self, key: str, holder: str, seconds: float, if_match: str | None = None,
                   if_none_match: bool = False) -> str:
        body = json.dumps({"holder": holder, "expiresAt": time.time() + seconds}).encode()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if if_match:
            kwargs["IfMatch"] = if_match
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        return str(self.client.put_object(**kwargs)["ETag"])

    def _try_acquire(self, key: str, holder: str) -> str | None:
        try:
            return self._put_lease(key, holder, self.lease_seconds, if_none_match=True)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) not in (409, 412):
                raise StoreError(f"locking s3://{self.bucket}/{key}: {exc}") from exc
        try:
            current = self.client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                return None  # released meanwhile: try again
            raise StoreError(f"reading s3://{self.bucket}/{key}: {exc}") from exc
        try:
            expires = float(json.loads(current["Body"].read())["expiresAt"])
        except (ValueError, KeyError, TypeError):
            expires = 0.0  # unreadable lease: treat as expired
        if expires > time.time():
            return None
        try:  # take over the expired lease, unless someone else renewed or took it first
            return self._put_lease(key, holder, self.lease_seconds, if_match=current["ETag"])
        except botocore.exceptions.ClientError as exc:
            if _status(exc) in (404, 409, 412):
                return None
            raise StoreError(f"locking s3://{self.bucket}/{key}: {exc}") from exc

    @contextlib.contextmanager
    def lock(self, fingerprint: str, holder: str, timeout: float) -> Iterator[Lease]:
        key = self._key(fingerprint, LEASE)
        deadline = time.monotonic() + timeout
        while (etag := self._try_acquire(key, holder)) is None:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{fingerprint} is being built by another builder (waited {timeout:.0f} s)")
            time.sleep(min(1.0, max(0.1, self.lease_seconds / 20)))
        lease = _S3Lease(self, key, holder, etag, self.lease_seconds)
        try:
            yield lease
        finally:
            lease.release()


__all__ = ["CHUNK", "S3Store"]
