"""The replica model: how fast one serving replica prefills and decodes, how much it holds, how long it starts.

A replica is one engine (vLLM-like continuous batching with chunked prefill) on ``gpus`` GPUs. One
engine step decodes one token for every running sequence and, while prompts wait to be prefilled,
also prefills up to ``step_token_budget - running`` prompt tokens (vLLM's ``max_num_batched_tokens``).
Its duration is a roofline model:

    step = decode_step_seconds + decode_step_seconds_per_sequence x running + prefill tokens / prefill rate

* ``decode_step_seconds``: reading the weights once per step (decode is memory-bound);
* ``decode_step_seconds_per_sequence``: reading one sequence's KV cache per step;
* ``prefill_tokens_per_second``: prompt processing, compute-bound (2 x parameters FLOPs per token);
* ``kv_cache_tokens``: tokens of KV cache that fit next to the weights; a request reserves its prompt
  plus its output when admitted (TensorRT-LLM's guaranteed-no-evict scheduling, so nothing is preempted);
* ``max_batch``: running sequences at most (vLLM's ``max_num_seqs``);
* ``startup_seconds``: from the pod being scheduled to ready: engine load plus the gateway's warm-up.
  GPU time is billed from the start of it.

Every number in a profile is derived from public datasheets and model configurations, not measured
here (this machine has no GPU); see each profile's ``source``. ``--set FIELD=VALUE`` on the command
line overrides any field, so measured values can replace them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

NUMBERS = ("gpus", "prefill_tokens_per_second", "decode_step_seconds", "decode_step_seconds_per_sequence",
           "max_batch", "kv_cache_tokens", "step_token_budget", "startup_seconds")
_MAY_BE_ZERO = ("decode_step_seconds_per_sequence", "startup_seconds")


@dataclasses.dataclass(frozen=True)
class ReplicaModel:
    name: str
    gpus: int
    prefill_tokens_per_second: float
    decode_step_seconds: float
    decode_step_seconds_per_sequence: float
    max_batch: int
    kv_cache_tokens: int
    step_token_budget: int
    startup_seconds: float
    source: str = ""

    def __post_init__(self) -> None:
        for field in NUMBERS:
            value = getattr(self, field)
            positive = field not in _MAY_BE_ZERO
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                limit = "greater than 0" if positive else "of at least 0"
                raise ValueError(f"replica model {field} must be a finite number {limit}, got {value!r}")

    def step_seconds(self, running: int, prefill_tokens: float = 0.0) -> float:
        return (self.decode_step_seconds + self.decode_step_seconds_per_sequence * running
                + prefill_tokens / self.prefill_tokens_per_second)

    def with_overrides(self, overrides: Mapping[str, str]) -> ReplicaModel:
        """A copy with fields replaced from ``FIELD=VALUE`` strings (as the command line gives them)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for key, raw in overrides.items():
            name = key.replace("-", "_")
            if name not in fields or name in ("name", "source"):
                known = ", ".join(n for n in fields if n not in ("name", "source"))
                raise ValueError(f"--set {key}: not a replica model field (one of {known})")
            kind = int if name in ("gpus", "max_batch", "kv_cache_tokens", "step_token_budget") else float
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"--set {key}={raw!r}: expected {'a whole number' if kind is int else 'a number'}")\
                    from None
            if not math.isfinite(values[name]):
                raise ValueError(f"--set {key}={raw!r}: expected a finite number")
        return dataclasses.replace(self, **values) if values else self


# Meta-Llama-3-8B-Instruct (config.json): 8.03e9 parameters, 32 layers, 8 KV heads of 128 dims, fp16.
# Weights 16.06 GB; KV cache 2 (K, V) x 32 x 8 x 128 x 2 bytes = 128 KiB per token; prefill 2 x 8.03e9 =
# 16.1 GFLOP per token. vLLM defaults: gpu_memory_utilization 0.9, max_num_seqs 256, chunked prefill.
_LLAMA3_8B = "Meta-Llama-3-8B fp16 (16.06 GB weights, 128 KiB KV per token, 16.1 GFLOP per prompt token)"

PROFILES: dict[str, ReplicaModel] = {
    "a10g-llama3-8b": ReplicaModel(
        name="a10g-llama3-8b", gpus=1,
        # NVIDIA A10 datasheet: 125 TFLOPS dense FP16 tensor, 600 GB/s GDDR6, 24 GB (A10G is the AWS part).
        prefill_tokens_per_second=3900.0,  # 125 TFLOPS x 50% model FLOPs utilization / 16.1 GFLOP
        decode_step_seconds=0.0335,  # 16.06 GB / (600 GB/s x 80% achievable bandwidth)
        decode_step_seconds_per_sequence=0.00034,  # ~1,260 tokens x 128 KiB / 480 GB/s
        max_batch=256,
        kv_cache_tokens=32_000,  # 0.9 x 22.5 GiB - 16.06 GB weights - ~1.5 GB activations, / 128 KiB
        step_token_budget=2048,
        startup_seconds=120.0,
        source=f"{_LLAMA3_8B} on one NVIDIA A10G (A10 datasheet: 125 TFLOPS FP16, 600 GB/s, 24 GB)",
    ),
    "l4-llama3-8b": ReplicaModel(
        name="l4-llama3-8b", gpus=1,
        # NVIDIA L4 datasheet: 121 TFLOPS dense FP16 tensor, 300 GB/s GDDR6, 24 GB.
        prefill_tokens_per_second=3750.0,  # 121 TFLOPS x 50% / 16.1 GFLOP
        decode_step_seconds=0.067,  # 16.06 GB / (300 GB/s x 80%)
        decode_step_seconds_per_sequence=0.00069,  # ~1,260 tokens x 128 KiB / 240 GB/s
        max_batch=256,
        kv_cache_tokens=32_000,
        step_token_budget=2048,
        startup_seconds=120.0,
        source=f"{_LLAMA3_8B} on one NVIDIA L4 (datasheet: 121 TFLOPS FP16, 300 GB/s, 24 GB)",
    ),
}
DEFAULT_PROFILE = "a10g-llama3-8b"
