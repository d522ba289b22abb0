"""A real TensorRT-LLM build, for machines that have one: runs only where ``trtllm-build`` is on PATH, a
GPU is visible and ``TENSORFLEET_TEST_CHECKPOINT`` names a local Hugging Face checkpoint folder (a
small LLaMA-family model). Skipped everywhere else, including CI here (no GPU, no TensorRT)."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from tensorfleet.api import crds
from tensorfleet.engines import models
from tensorfleet.engines.ensure import TensorRTLLMBuilder, ensure
from tensorfleet.engines.fetch import fetch_engine
from tensorfleet.engines.store import FilesystemStore

CHECKPOINT = os.environ.get("TENSORFLEET_TEST_CHECKPOINT", "")
pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("trtllm-build") is None, reason="needs TensorRT-LLM (trtllm-build on PATH)"),
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not CHECKPOINT, reason="set TENSORFLEET_TEST_CHECKPOINT to a local checkpoint folder"),
]


def test_a_real_engine_builds_then_is_a_verified_cache_hit(tmp_path: pathlib.Path) -> None:
    checkpoint = pathlib.Path(CHECKPOINT).resolve()
    body = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine", "metadata": {"name": "x"}, "spec": {
        "model": {"uri": f"pvc://local/{checkpoint.name}"},
        "gpu": {"product": "local", "computeCapability": "0.0"},
        "maxBatchSize": 4, "maxInputLen": 256, "maxSeqLen": 512}}
    spec = crds.default(body)["spec"]
    builder = TensorRTLLMBuilder(timeout_seconds=3600, download=models.RetryPolicy(timeout_seconds=60),
                                 examples_dir=os.environ.get("TRTLLM_EXAMPLES", "/app/tensorrt_llm/examples"),
                                 pvc_mount=str(checkpoint.parent))
    store = FilesystemStore(tmp_path / "store")
    built = ensure(spec, store, builder, tmp_path / "work")
    assert built.result == "build"
    assert ensure(spec, store, builder, tmp_path / "work2").result == "cache"
    engine_dir = fetch_engine(store, built.fingerprint, str(built.sha256), tmp_path / "engines", 4)
    assert any(p.suffix == ".engine" for p in (engine_dir / "engine").iterdir())
