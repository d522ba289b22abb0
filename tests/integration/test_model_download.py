"""`models.fetch_model` from a real S3 server process (moto_server): only the model's own objects, a
destination that holds nothing but the verified files (whatever a killed run left there), and errors
that waiting cannot fix reported at once instead of retried for the whole timeout."""

from __future__ import annotations

import fcntl
import os
import pathlib
import time
import uuid

import boto3
import pytest

from tensorfleet.engines import models
from tensorfleet.engines.store import digest_directory

pytestmark = pytest.mark.integration
QUICK = models.RetryPolicy(timeout_seconds=20, base_delay=0.05, max_delay=0.1)


def bucket_with(endpoint: str, objects: dict[str, bytes]) -> str:
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def files_in(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def digest_of(tmp_path: pathlib.Path, files: dict[str, bytes]) -> str:
    folder = tmp_path / f"reference-{uuid.uuid4().hex[:6]}"
    for name, body in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
    return digest_directory(folder)[0]


def test_a_prefix_takes_only_its_own_objects_not_a_sibling_model_nor_folder_markers(
        s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    bucket = bucket_with(s3_endpoint, {
        "models/llama/config.json": b"{}", "models/llama/sub/w.safetensors": b"weights",
        "models/llama/": b"", "models/llama/sub/": b"",  # 'folders' some consoles create
        "models/llama-2/w.safetensors": b"another model", "models/llama.txt": b"a note"})
    dest = tmp_path / "dest"
    models.fetch_model(f"s3://{bucket}/models/llama/", dest, None, QUICK, s3_endpoint)
    assert files_in(dest) == {"config.json": b"{}", "sub/w.safetensors": b"weights"}


def test_a_uri_naming_one_object_downloads_that_object(s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    bucket = bucket_with(s3_endpoint, {"gguf/tiny.gguf": b"gguf", "gguf/tiny.gguf.sha": b"other"})
    dest = tmp_path / "dest"
    models.fetch_model(f"s3://{bucket}/gguf/tiny.gguf", dest, None, QUICK, s3_endpoint)
    assert files_in(dest) == {"tiny.gguf": b"gguf"}


def test_leftovers_of_a_killed_run_never_reach_the_verified_copy(s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    model = {"w.safetensors": b"weights", "config.json": b"{}"}
    bucket = bucket_with(s3_endpoint, {f"m/{name}": body for name, body in model.items()})
    digest = digest_of(tmp_path, model)
    dest = tmp_path / "dest"
    (dest / ".partial-0123").mkdir(parents=True)  # a staging folder of a run killed mid-download
    (dest / ".partial-0123" / "w.safetensors").write_bytes(b"wei")
    (dest / "w.safetensors.8aF3c2b1").write_bytes(b"wei")  # boto3's temporary name, from before staging
    (dest / "config.json").write_bytes(b"{\"old\": 1}")  # a copy that was never verified
    assert models.fetch_model(f"s3://{bucket}/m", dest, digest, QUICK, s3_endpoint) == dest
    assert files_in(dest) == {**model, models.VERIFIED_MARKER: digest.encode()}


def test_a_mismatching_download_leaves_no_verified_marker_and_no_files(
        s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    bucket = bucket_with(s3_endpoint, {"m/w.safetensors": b"tampered"})
    dest = tmp_path / "dest"
    with pytest.raises(models.DigestMismatch):
        models.fetch_model(f"s3://{bucket}/m", dest, digest_of(tmp_path, {"w.safetensors": b"weights"}), QUICK,
                           s3_endpoint)
    assert files_in(dest) == {}


def test_a_missing_bucket_or_an_empty_prefix_fails_at_once_with_the_reason(
        s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    slow = models.RetryPolicy(timeout_seconds=60, base_delay=5, max_delay=5)
    started = time.monotonic()
    with pytest.raises(models.DownloadFailed, match="NoSuchBucket") as missing:
        models.fetch_model(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/m", tmp_path / "a", None, slow, s3_endpoint)
    assert missing.value.reason == "NoSuchBucket"
    bucket = bucket_with(s3_endpoint, {"other/w.safetensors": b"weights"})
    with pytest.raises(models.DownloadFailed, match="no objects under") as empty:
        models.fetch_model(f"s3://{bucket}/m", tmp_path / "b", None, slow, s3_endpoint)
    assert empty.value.reason == "NoObjects"
    assert time.monotonic() - started < 4  # not one backoff of 5 s


def test_a_key_that_would_leave_the_destination_is_refused(s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    bucket = bucket_with(s3_endpoint, {"m/config.json": b"{}", "m/../../escape": b"x", "m//root": b"x"})
    with pytest.raises(models.DownloadFailed, match="not a plain relative path") as refused:
        models.fetch_model(f"s3://{bucket}/m", tmp_path / "deep" / "dest", None, QUICK, s3_endpoint)
    assert refused.value.reason == "UnsafeKey"
    assert not (tmp_path / "escape").exists()


def test_one_download_per_destination_at_a_time(s3_endpoint: str, tmp_path: pathlib.Path) -> None:
    bucket = bucket_with(s3_endpoint, {"m/w.safetensors": b"weights"})
    digest = digest_of(tmp_path, {"w.safetensors": b"weights"})
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(tmp_path / ".dest.tensorfleet-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another replica sharing the cache volume is downloading
        with pytest.raises(models.DownloadTimeout, match="another process kept downloading"):
            models.fetch_model(f"s3://{bucket}/m", dest, digest, models.RetryPolicy(timeout_seconds=1), s3_endpoint)
        (dest / "w.safetensors").write_bytes(b"weights")  # ... and finished
        (dest / models.VERIFIED_MARKER).write_text(digest)
        assert models.fetch_model(f"s3://{bucket}/m", dest, digest, QUICK, s3_endpoint) == dest  # no lock needed
    finally:
        os.close(fd)
