"""The engine store: one interface, two backends (a filesystem path on a PVC, and S3-compatible storage).

Layout under the store's root (``<prefix>``)::

    <prefix>/<fingerprint>/builds/<build-id>/<files...>   uploaded by one build attempt
    <prefix>/<fingerprint>/engine.json                    the commit marker, written LAST, create-only
    <prefix>/<fingerprint>/.lock (filesystem) or .lease (S3)   one builder per fingerprint at a time

``engine.json`` lists every file with its sha256 and size, and the artifact digest over that list.
A fingerprint without ``engine.json`` is absent, whatever else lies there: an interrupted upload is
never taken as present. Each attempt writes into its own ``builds/<build-id>/`` folder, so even a
builder that lost its lock (paused past its lease) cannot overwrite a committed artifact, and the
marker is created with create-if-absent semantics (``link(2)`` here, ``If-None-Match: *`` on S3), so of
two commits exactly one wins.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

MARKER = "engine.json"
BUILDS = "builds"
CHUNK = 4 * 1024 * 1024
MANIFEST_VERSION = 1


def flock_within(fd: int, timeout: float, poll: float) -> bool:
    """Take an exclusive flock(2) on ``fd``, waiting up to ``timeout`` seconds; False when another holder kept it
    that long. Other OSErrors propagate (EACCES counts as held: some NFS clients say "held" so)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


class StoreError(Exception):
    """The store could not be read or written (often transient: retried by callers)."""


class LockTimeout(StoreError):
    """Another builder held the fingerprint's lock for longer than we were willing to wait."""


class LeaseLost(StoreError):
    """Our lock expired and someone else took it: this build must not commit."""


class ObjectMissing(StoreError):
    """The object does not exist in the store. For a file that a committed ``engine.json`` lists this is
    not transient: the marker is written after every file, so the file was lost (see fetch.verify_artifact)."""


# OS errors a retry can cure (a flaky network filesystem or connection). Others, such as EACCES, EROFS,
# ENOSPC or ENOTDIR, stay until someone fixes the volume: retrying them only delays the report.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
                              errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH})


def is_transient(exc: OSError) -> bool:
    return exc.errno in TRANSIENT_ERRNOS


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


def artifact_digest(files: list[FileEntry] | tuple[FileEntry, ...]) -> str:
    """sha256 over the sorted ``sha256sum``-style listing of the files: ``sha256:<hex>``."""
    listing = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def hash_file(path: pathlib.Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def list_files(root: pathlib.Path, exclude: tuple[str, ...] = ()) -> list[pathlib.Path]:
    """Regular files under ``root``, sorted; symlinks are refused (they could point anywhere).

    ``exclude`` names top-level entries to skip (bookkeeping such as a download tool's cache)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.relative_to(root).parts[0] in exclude:
            continue
        if path.is_symlink():
            raise StoreError(f"{path}: symbolic links are not allowed in an artifact")
        if path.is_file():
            found.append(path)
    return found


def digest_directory(root: pathlib.Path, exclude: tuple[str, ...] = ()) -> tuple[str, list[FileEntry]]:
    """The artifact digest of a directory (also the model digest of ``spec.model.digest``)."""
    entries = []
    for path in list_files(root, exclude):
        sha, size = hash_file(path)
        entries.append(FileEntry(path.relative_to(root).as_posix(), sha, size))
    return artifact_digest(entries), entries


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The content of ``engine.json``."""

    fingerprint: str
    build_id: str
    files: tuple[FileEntry, ...]
    sha256: str
    built_at: str
    build_seconds: float
    document: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps({
            "manifestVersion": MANIFEST_VERSION, "fingerprint": self.fingerprint, "buildId": self.build_id,
            "sha256": self.sha256, "builtAt": self.built_at, "buildSeconds": self.build_seconds,
            "sizeBytes": self.size_bytes, "fingerprintDocument": self.document,
            "files": [dataclasses.asdict(f) for f in self.files],
        }, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse ``engine.json``; a malformed one raises ValueError (the artifact counts as corrupt)."""
        try:
            data = json.loads(raw)
            files = tuple(FileEntry(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in data["files"])
            return cls(fingerprint=str(data["fingerprint"]), build_id=str(data["buildId"]), files=files,
                       sha256=str(data["sha256"]), built_at=str(data["builtAt"]),
                       build_seconds=float(data["buildSeconds"]), document=dict(data["fingerprintDocument"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{MARKER} is malformed: {exc}") from None

    def object_path(self, entry: FileEntry) -> str:
        """Where a file lives, relative to the fingerprint's folder."""
        return f"{BUILDS}/{self.build_id}/{entry.path}"


class Lease(abc.ABC):
    """A held lock on one fingerprint."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise LeaseLost when the lock is no longer ours."""


class EngineStore(abc.ABC):
    """Where engine artifacts live. Implementations: FilesystemStore, S3Store (tensorfleet.engines.store_s3)."""

    uri: str

    @abc.abstractmethod
    def read_marker(self, fingerprint: str) -> bytes | None:
        """The raw ``engine.json`` of a fingerprint, or None when it was never committed."""

    @abc.abstractmethod
    def upload(self, fingerprint: str, build_id: str, source: pathlib.Path) -> list[FileEntry]:
        """Upload every file under ``source`` into ``builds/<build_id>/``; their hashes and sizes."""

    @abc.abstractmethod
    def commit(self, fingerprint: str, manifest: Manifest) -> bool:
        """Create ``engine.json`` unless it exists. False when another commit won."""

    @abc.abstractmethod
    def open(self, fingerprint: str, relative: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary stream of one stored object (relative to the fingerprint's folder)."""

    @abc.abstractmethod
    def discard(self, fingerprint: str, expected_marker: bytes) -> None:
        """Remove a corrupt ``engine.json`` (only if it still has this content) so it can be rebuilt."""

    @abc.abstractmethod
    def remove_builds(self, fingerprint: str, keep: str | None) -> None:
        """Delete the upload folders of attempts other than ``keep`` (call only while holding the lock)."""

    @abc.abstractmethod
    def lock(self, fingerprint: str, holder: str, timeout: float) -> contextlib.AbstractContextManager[Lease]:
        """Hold the fingerprint's build lock; LockTimeout after ``timeout`` seconds of waiting."""

    def manifest(self, fingerprint: str) -> Manifest | None:
        raw = self.read_marker(fingerprint)
        return Manifest.from_json(raw) if raw is not None else None

    def artifact_uri(self, fingerprint: str) -> str:
        return f"{self.uri.rstrip('/')}/{fingerprint}"


# ---- filesystem (a PVC path) -----------------------------------------------------------------------


class _FlockLease(Lease):
    def check(self) -> None:
        return None  # the kernel holds flock(2) locks for as long as the process lives


class FilesystemStore(EngineStore):
    """A directory, normally a ReadWriteMany PVC mounted into the build Jobs and serving pods.

    The lock is ``flock(2)`` on ``<fingerprint>/.lock``: the kernel (or the NFS server, which Linux
    maps flock to) releases it when the holder dies, so there is no lease to expire.
    """

    def __init__(self, root: pathlib.Path | str) -> None:
        self.root = pathlib.Path(root)
        self.uri = f"file://{self.root}"

    def _dir(self, fingerprint: str) -> pathlib.Path:
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise StoreError(f"invalid fingerprint {fingerprint!r}")
        return self.root / fingerprint

    def read_marker(self, fingerprint: str) -> bytes | None:
        try:
            return (self._dir(fingerprint) / MARKER).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"reading {MARKER} of {fingerprint}: {exc}") from exc

    def upload(self, fingerprint: str, build_id: str, source: pathlib.Path) -> list[FileEntry]:
        target = self._dir(fingerprint) / BUILDS / build_id
        entries = []
        try:
            for path in list_files(source):
                relative = path.relative_to(source).as_posix()
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                digest, size = hashlib.sha256(), 0
                with path.open("rb") as src, destination.open("wb") as dst:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                entries.append(FileEntry(relative, digest.hexdigest(), size))
        except OSError as exc:
            raise StoreError(f"uploading {source} to {target}: {exc}") from exc
        return entries

    def commit(self, fingerprint: str, manifest: Manifest) -> bool:
        folder = self._dir(fingerprint)
        staged = folder / f".{MARKER}.{manifest.build_id}.tmp"
        try:
            with staged.open("wb") as stream:
                stream.write(manifest.to_json())
                stream.flush()
                os.fsync(stream.fileno())
            try:
                os.link(staged, folder / MARKER)  # atomic create-if-absent, also on NFS
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            raise StoreError(f"committing {fingerprint}: {exc}") from exc
        finally:
            staged.unlink(missing_ok=True)

    @contextlib.contextmanager
    def open(self, fingerprint: str, relative: str) -> Iterator[IO[bytes]]:
        path = self._dir(fingerprint) / relative
        try:
            stream = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(f"opening {path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"opening {path}: {exc}") from exc
        with stream:
            yield stream

    def discard(self, fingerprint: str, expected_marker: bytes) -> None:
        marker = self._dir(fingerprint) / MARKER
        if self.read_marker(fingerprint) == expected_marker:
            quarantined = marker.with_name(f".{MARKER}.corrupt.{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):
                marker.rename(quarantined)

    def remove_builds(self, fingerprint: str, keep: str | None) -> None:
        builds = self._dir(fingerprint) / BUILDS
        if not builds.is_dir():
            return
        for attempt in builds.iterdir():
            if attempt.name != keep:
                shutil.rmtree(attempt, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, fingerprint: str, holder: str, timeout: float) -> Iterator[Lease]:
        folder = self._dir(fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                taken = flock_within(fd, timeout, poll=0.2)
            except OSError as exc:
                raise StoreError(f"locking {fingerprint}: {exc}") from exc
            if not taken:
                raise LockTimeout(f"{fingerprint} is being built by another builder (waited {timeout:.0f} s)")
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
            yield _FlockLease()
        finally:
            os.close(fd)  # releases the flock


def open_store(uri: str, endpoint: str | None = None, region: str | None = None) -> EngineStore:
    """``file:///path`` (or a bare absolute path) or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        from tensorfleet.engines.store_s3 import S3Store

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"--store {uri!r}: s3:// needs a bucket")
        return S3Store(bucket, prefix.strip("/"), endpoint=endpoint, region=region)
    if uri.startswith("file://"):
        return FilesystemStore(uri[len("file://"):])
    if uri.startswith("/"):
        return FilesystemStore(uri)
    raise ValueError(f"--store {uri!r}: expected file:///PATH or s3://BUCKET/PREFIX")
