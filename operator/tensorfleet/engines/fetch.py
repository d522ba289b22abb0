"""Fetch an engine from the store into a pod's local volume, verifying every byte, then lay out Triton's
model repository. Run by the serving pods' ``engine-fetch`` init container (``tensorfleet engine fetch``).

Verification is done while copying (one pass over the bytes): each file's sha256 must match
``engine.json``, and the digest over that file list must equal the sha256 the Engine recorded, which
the operator renders into the init container's arguments. A store whose ``engine.json`` or files
were changed after the build, or that lost a file ``engine.json`` lists, therefore fails here, fast,
with ``CorruptArtifact`` (never retried).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import pathlib
import shutil
from collections.abc import Iterator
from typing import IO

from tensorfleet.engines.store import CHUNK, EngineStore, FileEntry, Manifest, ObjectMissing, artifact_digest
from tensorfleet.render import context as c

ENGINE_SUBDIR = "engine"
PARALLEL_FILES = 4
TOKENIZER_SUBDIR = "tokenizer"


class CorruptArtifact(Exception):
    """The stored artifact does not match its recorded digest: it must be rebuilt, not retried."""


class MissingArtifact(Exception):
    """The store has no committed artifact for the fingerprint (yet, or any more)."""


@contextlib.contextmanager
def _sink(destination: pathlib.Path | None, entry: FileEntry) -> Iterator[IO[bytes] | None]:
    if destination is None:
        yield None
        return
    target = destination / entry.path
    if ".." in pathlib.PurePosixPath(entry.path).parts or entry.path.startswith("/"):
        raise CorruptArtifact(f"engine.json names a file outside the artifact: {entry.path!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as stream:
        yield stream


def verify_artifact(store: EngineStore, fingerprint: str, manifest: Manifest, expected_sha256: str | None,
                    destination: pathlib.Path | None = None) -> None:
    """Stream every file of the artifact, hash it (and copy it to ``destination``); raise on any mismatch."""
    listed = artifact_digest(manifest.files)
    if listed != manifest.sha256:
        raise CorruptArtifact(f"engine.json of {fingerprint} lists files whose digest is {listed}, "
                              f"not the {manifest.sha256} it records")
    if expected_sha256 and manifest.sha256 != expected_sha256:
        raise CorruptArtifact(f"the store holds artifact {manifest.sha256} for {fingerprint}, "
                              f"but the Engine recorded {expected_sha256}")
    # Files (one per tensor-parallel rank, plus small ones) are fetched concurrently.
    workers = max(1, min(PARALLEL_FILES, len(manifest.files)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
        for future in [pool.submit(_verify_file, store, fingerprint, manifest, e, destination) for e in manifest.files]:
            future.result()  # the first mismatch raises CorruptArtifact


def _verify_file(store: EngineStore, fingerprint: str, manifest: Manifest, entry: FileEntry,
                 destination: pathlib.Path | None) -> None:
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher, \
                store.open(fingerprint, manifest.object_path(entry)) as source, _sink(destination, entry) as sink:
            sha, size = _copy_and_hash(source, sink, hasher)
    except ObjectMissing as exc:
        # engine.json is written after every file it lists, so a listed file that is gone was lost for
        # good (a lifecycle rule, a cleanup, a partial restore): retrying cannot help, rebuilding does.
        raise CorruptArtifact(f"{manifest.object_path(entry)} of {fingerprint}, listed in engine.json, "
                              f"is missing from the store: {exc}") from exc
    if size != entry.size or sha != entry.sha256:
        raise CorruptArtifact(f"{manifest.object_path(entry)} of {fingerprint}: expected sha256 "
                              f"{entry.sha256} ({entry.size} bytes), found {sha} ({size} bytes)")


def _copy_and_hash(source: IO[bytes], sink: IO[bytes] | None,
                   hasher: concurrent.futures.ThreadPoolExecutor) -> tuple[str, int]:
    """One pass over the bytes: chunk k is hashed (hashlib releases the GIL) while chunk k is written and
    chunk k+1 is read, so verification costs little more than the copy itself."""
    digest, size = hashlib.sha256(), 0
    pending: concurrent.futures.Future[None] | None = None
    while chunk := source.read(CHUNK):
        if pending is not None:
            pending.result()
        pending = hasher.submit(digest.update, chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    if pending is not None:
        pending.result()
    return digest.hexdigest(), size


def read_manifest(store: EngineStore, fingerprint: str) -> Manifest:
    raw = store.read_marker(fingerprint)
    if raw is None:
        raise MissingArtifact(f"the store {store.uri} has no committed engine {fingerprint}")
    try:
        return Manifest.from_json(raw)
    except ValueError as exc:
        raise CorruptArtifact(f"{fingerprint}: {exc}") from None


def fetch_engine(store: EngineStore, fingerprint: str, expected_sha256: str, dest: pathlib.Path,
                 max_batch_size: int) -> pathlib.Path:
    """Copy and verify the artifact into ``dest/<fingerprint>``; write ``dest/repository``. The engine folder."""
    manifest = read_manifest(store, fingerprint)
    target = dest / fingerprint
    staging = dest / f".{fingerprint}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    verify_artifact(store, fingerprint, manifest, expected_sha256, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    write_triton_repository(dest / "repository", target, max_batch_size)
    return target


def write_triton_repository(repository: pathlib.Path, artifact: pathlib.Path, max_batch_size: int) -> None:
    """The ``tensorrt_llm`` model of Triton's TensorRT-LLM backend (inflight batching), pointing at the engine."""
    model = repository / "tensorrt_llm"
    (model / "1").mkdir(parents=True, exist_ok=True)
    engine_dir = artifact / ENGINE_SUBDIR
    tokenizer_dir = artifact / TOKENIZER_SUBDIR
    (model / "config.pbtxt").write_text(_TRITON_CONFIG.format(
        max_batch_size=max_batch_size, engine_dir=engine_dir, tokenizer_dir=tokenizer_dir))


def container_paths(fingerprint: str) -> tuple[str, str]:
    """(engine folder, repository) as the engine container sees them."""
    return f"{c.ENGINE_DIR}/{fingerprint}/{ENGINE_SUBDIR}", f"{c.ENGINE_DIR}/repository"


_TRITON_CONFIG = """\
name: "tensorrt_llm"
backend: "tensorrtllm"
max_batch_size: {max_batch_size}
model_transaction_policy {{ decoupled: true }}
dynamic_batching {{ }}
input [
  {{ name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] allow_ragged_batch: true }},
  {{ name: "input_lengths" data_type: TYPE_INT32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "request_output_len" data_type: TYPE_INT32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "end_id" data_type: TYPE_INT32 dims: [ 1 ] reshape: {{ shape: [ ] }} optional: true }},
  {{ name: "pad_id" data_type: TYPE_INT32 dims: [ 1 ] reshape: {{ shape: [ ] }} optional: true }},
  {{ name: "streaming" data_type: TYPE_BOOL dims: [ 1 ] reshape: {{ shape: [ ] }} optional: true }}
]
output [
  {{ name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] }},
  {{ name: "sequence_length" data_type: TYPE_INT32 dims: [ -1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters: {{ key: "gpt_model_type" value: {{ string_value: "inflight_fused_batching" }} }}
parameters: {{ key: "gpt_model_path" value: {{ string_value: "{engine_dir}" }} }}
parameters: {{ key: "tokenizer_dir" value: {{ string_value: "{tokenizer_dir}" }} }}
parameters: {{ key: "batch_scheduler_policy" value: {{ string_value: "guaranteed_no_evict" }} }}
parameters: {{ key: "kv_cache_free_gpu_mem_fraction" value: {{ string_value: "0.9" }} }}
parameters: {{ key: "enable_chunked_context" value: {{ string_value: "true" }} }}
"""
