"""Fetch-and-verify throughput from each engine store, as a ratio to a plain copy of the same bytes.

    python -m bench.engine_fetch [--mib 256] [--repeat 5]

Filesystem store: ``fetch_engine`` (stream, sha256 every file, check the artifact digest, write the
Triton repository) against ``shutil.copyfile`` of the same files. S3 store (a real moto_server process
on loopback): ``fetch_engine`` against boto3's ``download_file`` of the same objects. Runs alternate
between the two so that page cache and server warm-up favour neither; the medians are compared.
Writes ``bench/results/engine_fetch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import boto3

from tensorfleet.engines.ensure import ensure
from tensorfleet.engines.fetch import fetch_engine
from tensorfleet.engines.store import EngineStore, FilesystemStore
from tensorfleet.engines.store_s3 import S3Store

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

SPEC = {"model": {"uri": "hf://bench/model@v1"},
        "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "computeCapability": "9.0"}, "precision": "fp16",
        "maxBatchSize": 64, "maxInputLen": 4096, "maxSeqLen": 8192, "tensorParallelSize": 1,
        "trtllmVersion": "0.21.0", "buildTimeoutSeconds": 7200}


class RandomEngineBytes:
    """Stands in for trtllm-build in this benchmark: two rank files of random bytes (incompressible)."""

    def __init__(self, mib: int) -> None:
        self.mib = mib

    def build(self, spec: object, workdir: pathlib.Path) -> pathlib.Path:
        out = workdir / "artifact" / "engine"
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # ensure refuses an engine without its config.json
        half = self.mib * 1024 * 1024 // 2
        for rank in range(2):
            with (out / f"rank{rank}.engine").open("wb") as stream:
                for _ in range(half // (4 << 20)):
                    stream.write(os.urandom(4 << 20))
        return workdir / "artifact"


def _time(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(store: EngineStore, plain_copy: Callable[[pathlib.Path], None], mib: int, repeat: int,
            scratch: pathlib.Path) -> dict[str, float]:
    outcome = ensure(SPEC, store, RandomEngineBytes(mib), scratch / "build")
    verified, plain = [], []
    for i in range(repeat):
        dest_a, dest_b = scratch / f"verified-{i}", scratch / f"plain-{i}"
        runs = [("verified", lambda d=dest_a: fetch_engine(store, outcome.fingerprint, str(outcome.sha256), d, 64)),
                ("plain", lambda d=dest_b: plain_copy(d))]
        if i % 2:
            runs.reverse()
        for kind, action in runs:
            (verified if kind == "verified" else plain).append(_time(action))
        shutil.rmtree(dest_a, ignore_errors=True)
        shutil.rmtree(dest_b, ignore_errors=True)
    size = mib * 1024 * 1024
    v, p = statistics.median(verified), statistics.median(plain)
    return {"mib": mib, "verified_seconds": round(v, 4), "plain_seconds": round(p, 4),
            "verified_mib_per_s": round(size / v / 2**20, 1), "plain_mib_per_s": round(size / p / 2**20, 1),
            "throughput_ratio_verified_to_plain": round(p / v, 3)}


def bench_filesystem(mib: int, repeat: int, scratch: pathlib.Path) -> dict[str, float]:
    store = FilesystemStore(scratch / "store")

    def plain(dest: pathlib.Path) -> None:
        manifest = store.manifest(next(p.name for p in store.root.iterdir()))
        assert manifest is not None
        for entry in manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store.root / manifest.fingerprint / manifest.object_path(entry), target)

    return measure(store, plain, mib, repeat, scratch)


def bench_s3(mib: int, repeat: int, scratch: pathlib.Path) -> dict[str, float]:
    from s3server import ACCESS_KEY, SECRET_KEY, s3_server

    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        store = S3Store(bucket, "engines", endpoint=endpoint)

        def plain(dest: pathlib.Path) -> None:
            fingerprint = next(iter(store.client.list_objects_v2(Bucket=bucket, Prefix="engines/")["Contents"]))[
                "Key"].split("/")[1]
            manifest = store.manifest(fingerprint)
            assert manifest is not None
            for entry in manifest.files:
                store.download(fingerprint, manifest.object_path(entry), dest / entry.path)

        return measure(store, plain, mib, repeat, scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="artifact size in MiB")
    parser.add_argument("--s3-mib", type=int, default=128, help="artifact size for the S3 store")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as fs_dir:
        results["filesystem"] = bench_filesystem(args.mib, args.repeat, pathlib.Path(fs_dir))
    with tempfile.TemporaryDirectory() as s3_dir:
        results["s3"] = bench_s3(args.s3_mib, args.repeat, pathlib.Path(s3_dir))
    out = pathlib.Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "engine_fetch.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
