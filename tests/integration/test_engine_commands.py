"""`tensorfleet engine ensure/fetch` and `tensorfleet model fetch` as the Job and init containers run them:
weights from a real S3 server process (moto_server), the engine store on it too, and TensorRT-LLM's
tools replaced by process-level test doubles on PATH (no machine here has TensorRT)."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import sys
import textwrap
import uuid

import boto3
import pytest
from click.testing import CliRunner

from tensorfleet.cli import main
from tensorfleet.engines import models
from tensorfleet.engines.ensure import BuildFailed, run_logged
from tensorfleet.engines.store import digest_directory

pytestmark = pytest.mark.integration

_FAKE_CONVERT = """\
import argparse, json, os
p = argparse.ArgumentParser(); p.add_argument("--model_dir"); p.add_argument("--output_dir")
p.add_argument("--dtype"); p.add_argument("--tp_size"); p.add_argument("--qformat")
args, _ = p.parse_known_args()
assert os.path.isfile(os.path.join(args.model_dir, "config.json")), "no checkpoint"
os.makedirs(args.output_dir, exist_ok=True)
json.dump({"dtype": args.dtype, "tp": args.tp_size}, open(os.path.join(args.output_dir, "config.json"), "w"))
print("converted", args.model_dir)
"""
_FAKE_BUILD = """\
#!{python}
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--checkpoint_dir"); p.add_argument("--output_dir")
p.add_argument("--max_batch_size"); p.add_argument("--workers")
args, _ = p.parse_known_args()
if os.environ.get("FAKE_TRTLLM_FAIL"):
    print("[TRT] [E] out of memory"); sys.exit(2)
os.makedirs(args.output_dir, exist_ok=True)
open(os.path.join(args.output_dir, "config.json"), "w").write('{{"pretrained_config": {{}}}}')
for rank in range(int(args.workers)):  # trtllm-build writes one engine file per tensor-parallel rank
    open(os.path.join(args.output_dir, "rank%d.engine" % rank), "wb").write(b"engine:" + " ".join(sys.argv).encode())
print("built", args.output_dir)
"""


@pytest.fixture
def fake_trtllm(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Test doubles of TensorRT-LLM's convert_checkpoint.py, quantize.py and trtllm-build."""
    examples = tmp_path / "examples"
    for script in ("models/core/llama/convert_checkpoint.py", "quantization/quantize.py"):
        (examples / script).parent.mkdir(parents=True, exist_ok=True)
        (examples / script).write_text(_FAKE_CONVERT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    build = bin_dir / "trtllm-build"
    build.write_text(_FAKE_BUILD.format(python=sys.executable))
    build.chmod(build.stat().st_mode | stat.S_IEXEC)
    python3 = bin_dir / "python3"
    python3.symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TRTLLM_EXAMPLES", str(examples))
    return examples


@pytest.fixture
def model_bucket(s3_endpoint: str, tmp_path: pathlib.Path) -> tuple[str, str]:
    """A tiny 'checkpoint' in S3 and its digest."""
    local = tmp_path / "weights"
    local.mkdir()
    (local / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (local / "tokenizer.json").write_text('{"model": {}}')
    (local / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    digest, _ = digest_directory(local)
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    for path in local.iterdir():
        client.upload_file(str(path), bucket, f"llama/{path.name}")
    return f"s3://{bucket}/llama", digest


def engine_bucket(s3_endpoint: str) -> str:
    bucket = f"engines-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def ensure_args(spec: dict, store: str, endpoint: str, tmp_path: pathlib.Path, examples: pathlib.Path) -> list[str]:
    return ["engine", "ensure", "--spec", json.dumps(spec), "--store", store, "--s3-endpoint", endpoint,
            "--workdir", str(tmp_path / "work"), "--timeout", "120",
            "--termination-log", str(tmp_path / "termination-log")]


def test_ensure_builds_once_then_fetch_verifies_and_refuses_a_tampered_engine(
        s3_endpoint: str, model_bucket: tuple[str, str], fake_trtllm: pathlib.Path, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri, digest = model_bucket
    spec = {"model": {"uri": uri, "digest": digest},
            "gpu": {"product": "NVIDIA-L4", "computeCapability": "8.9"}, "precision": "int8"}
    store = f"s3://{engine_bucket(s3_endpoint)}/engines"
    runner = CliRunner()
    first = runner.invoke(main, ensure_args(spec, store, s3_endpoint, tmp_path, fake_trtllm))
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["result"] == "build"
    second = runner.invoke(main, ensure_args(spec, store, s3_endpoint, tmp_path, fake_trtllm))
    assert second.exit_code == 0, second.output
    assert json.loads((tmp_path / "termination-log").read_text())["result"] == "cache"

    log = tmp_path / "fetch-log"
    fetch = ["engine", "fetch", "--fingerprint", report["fingerprint"], "--sha256", report["sha256"],
             "--store", store, "--s3-endpoint", s3_endpoint, "--dest", str(tmp_path / "engines"),
             "--termination-log", str(log), "--timeout", "10"]
    fetched = runner.invoke(main, fetch)
    assert fetched.exit_code == 0, fetched.output
    engine_file = tmp_path / "engines" / report["fingerprint"] / "engine" / "rank0.engine"
    assert b"--max_batch_size 64" in engine_file.read_bytes()  # built with the spec's (defaulted) limits
    assert (tmp_path / "engines" / report["fingerprint"] / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "engines" / "repository" / "tensorrt_llm" / "config.pbtxt").is_file()

    bucket, _, prefix = store[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    victim = next(k for k in keys if k.endswith("rank0.engine"))
    client.put_object(Bucket=bucket, Key=victim, Body=b"tampered")
    refused = runner.invoke(main, fetch)
    assert refused.exit_code == 3
    assert "CORRUPT ARTIFACT" in refused.output
    message = json.loads(log.read_text())
    assert (message["result"], message["sha256"]) == ("corrupt", report["sha256"])
    assert "rank0.engine" in message["message"]


def test_a_failing_trtllm_build_reports_its_log_tail(
        s3_endpoint: str, model_bucket: tuple[str, str], fake_trtllm: pathlib.Path, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    uri, digest = model_bucket
    spec = {"model": {"uri": uri, "digest": digest}, "gpu": {"product": "NVIDIA-L4", "computeCapability": "8.9"}}
    result = CliRunner().invoke(main, ensure_args(spec, f"s3://{engine_bucket(s3_endpoint)}/e", s3_endpoint,
                                                  tmp_path, fake_trtllm))
    assert result.exit_code == 1
    report = json.loads((tmp_path / "termination-log").read_text())
    assert (report["result"], report["reason"]) == ("failed", "BuildFailed")
    assert "out of memory" in report["logTail"]


def test_model_fetch_verifies_the_digest_and_refuses_other_bytes(
        s3_endpoint: str, model_bucket: tuple[str, str], tmp_path: pathlib.Path) -> None:
    uri, digest = model_bucket
    runner = CliRunner()
    args = ["model", "fetch", "--uri", uri, "--dest", str(tmp_path / "m"), "--s3-endpoint", s3_endpoint,
            "--termination-log", str(tmp_path / "log"), "--timeout", "30"]
    ok = runner.invoke(main, [*args, "--digest", digest])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m" / "model.safetensors").stat().st_size == 64 * 1024
    again = runner.invoke(main, [*args, "--digest", digest])  # cached and verified: no download
    assert again.exit_code == 0
    wrong = runner.invoke(main, [*args[:5], str(tmp_path / "m2"), *args[6:], "--digest", "sha256:" + "0" * 64])
    assert wrong.exit_code == 3
    assert json.loads((tmp_path / "log").read_text())["result"] == "corrupt"


def test_downloads_retry_with_backoff_until_their_timeout(tmp_path: pathlib.Path) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "done"

    policy = models.RetryPolicy(timeout_seconds=10, base_delay=0.01, max_delay=0.02)
    assert models.with_retries("download", flaky, policy) == "done"
    assert len(calls) == 3

    def down() -> None:
        raise OSError("unreachable")

    with pytest.raises(models.DownloadTimeout, match="unreachable"):
        models.with_retries("download", down, models.RetryPolicy(timeout_seconds=0.2, base_delay=0.05,
                                                                  max_delay=0.05))


def test_a_build_step_past_its_timeout_is_killed_with_its_log_tail() -> None:
    script = textwrap.dedent("""
        import time
        print("starting", flush=True)
        for i in range(100):
            print("tick", i, flush=True); time.sleep(0.05)
    """)
    with pytest.raises(BuildFailed) as info:
        run_logged([sys.executable, "-c", script], timeout=0.5, what="Build")
    assert info.value.reason == "BuildTimeout"
    assert "tick" in info.value.log_tail
    with pytest.raises(BuildFailed) as failed:
        run_logged([sys.executable, "-c", "import sys; print('bad'); sys.exit(7)"], timeout=10, what="Convert")
    assert failed.value.reason == "ConvertFailed"
    assert "status 7" in failed.value.message
