"""TensorRT-LLM command lines derived from an Engine spec (pure; nothing is run here).

Written against TensorRT-LLM 0.21's documented CLI:

* ``examples/models/core/llama/convert_checkpoint.py`` (``--model_dir --output_dir --dtype {float16,bfloat16}
  --tp_size`` and, for weight-only INT8, ``--use_weight_only --weight_only_precision int8``);
* ``examples/quantization/quantize.py`` for the calibrated formats (``--qformat {fp8,int4_awq}``,
  ``--kv_cache_dtype fp8``, ``--awq_block_size``, ``--calib_size``, ``--tp_size``);
* ``trtllm-build`` (``tensorrt_llm/commands/build.py``): ``--checkpoint_dir --output_dir --max_batch_size
  --max_input_len --max_seq_len --workers`` plus the plugin switches (``--gemm_plugin`` takes a dtype
  or ``auto``/``disable``; feature switches such as ``--context_fmha`` take ``enable``/``disable``).

The examples live under ``/app/tensorrt_llm/examples`` in NVIDIA's TensorRT-LLM release images
(override with ``TRTLLM_EXAMPLES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tensorfleet.api.schema import FieldError

EXAMPLES_DIR = "/app/tensorrt_llm/examples"
AWQ_BLOCK_SIZE = 128

# (checkpoint dtype, convert kind, --gemm_plugin)
_PRECISIONS: dict[str, tuple[str, str, str]] = {
    "fp16": ("float16", "convert", "float16"),
    "bf16": ("bfloat16", "convert", "bfloat16"),
    "int8": ("float16", "convert-weight-only-int8", "float16"),
    "fp8": ("float16", "quantize-fp8", "auto"),
    "int4-awq": ("float16", "quantize-int4-awq", "auto"),
}

# trtllm-build flags (0.21) a user may set in buildOptions, by value kind.
_SWITCHES = frozenset({  # enable | disable
    "context_fmha", "remove_input_padding", "use_paged_context_fmha", "use_fp8_context_fmha", "multiple_profiles",
    "paged_state", "streamingllm", "reduce_fusion", "user_buffer", "use_fused_mlp", "norm_quant_fusion",
    "bert_context_fmha_fp32_acc", "pp_reduce_scatter",
})
_PLUGINS = frozenset({  # a dtype, auto or disable
    "gemm_plugin", "gpt_attention_plugin", "gemm_swiglu_plugin", "fp8_rowwise_gemm_plugin", "lora_plugin",
    "moe_plugin", "nccl_plugin", "low_latency_gemm_plugin", "low_latency_gemm_swiglu_plugin",
    "gemm_allreduce_plugin", "mamba_conv1d_plugin",
})
_PLUGIN_VALUES = frozenset({"auto", "disable", "float16", "bfloat16", "float32", "fp8", "int32", "nvfp4"})
_INTEGERS = frozenset({"max_beam_width", "max_num_tokens", "opt_num_tokens", "max_prompt_embedding_table_size",
                       "tokens_per_block", "max_draft_len", "max_lora_rank", "max_encoder_input_len"})
_CHOICES = {
    "kv_cache_type": frozenset({"continuous", "paged", "disabled"}),
    "logits_dtype": frozenset({"float16", "float32"}),
    "profiling_verbosity": frozenset({"layer_names_only", "detailed", "none"}),
    "speculative_decoding_mode": frozenset({"draft_tokens_external", "lookahead_decoding", "medusa",
                                            "explicit_draft_tokens", "eagle"}),
}
_BARE_FLAGS = frozenset({"strip_plan", "weight_sparsity", "weight_streaming", "fast_build", "gather_context_logits",
                         "gather_generation_logits", "gather_all_token_logits"})
MANAGED = frozenset({"checkpoint_dir", "output_dir", "max_batch_size", "max_input_len", "max_seq_len",
                     "max_decoder_seq_len", "workers", "model_config", "build_config", "auto_parallel",
                     "log_level", "dry_run", "visualize_network"})


def build_option_errors(options: Mapping[str, str], path: str = "spec.buildOptions") -> list[FieldError]:
    """Reject unknown, managed and malformed trtllm-build options before a GPU is spent on them."""
    errors = []
    for flag, value in sorted(options.items()):
        where = f"{path}.{flag}"
        if flag in MANAGED:
            errors.append(FieldError(where, f"Forbidden: --{flag} is derived from the Engine spec"))
        elif flag in _SWITCHES and value not in ("enable", "disable"):
            errors.append(FieldError(where, f"Unsupported value: {value!r}: supported values: enable, disable"))
        elif flag in _PLUGINS and value not in _PLUGIN_VALUES:
            shown = ", ".join(sorted(_PLUGIN_VALUES))
            errors.append(FieldError(where, f"Unsupported value: {value!r}: supported values: {shown}"))
        elif flag in _INTEGERS and not value.isdigit():
            errors.append(FieldError(where, f"Invalid value: {value!r}: must be a non-negative integer"))
        elif flag in _CHOICES and value not in _CHOICES[flag]:
            shown = ", ".join(sorted(_CHOICES[flag]))
            errors.append(FieldError(where, f"Unsupported value: {value!r}: supported values: {shown}"))
        elif flag in _BARE_FLAGS and value not in ("true", "false"):
            errors.append(FieldError(where, f"Invalid value: {value!r}: must be true or false"))
        elif not ({flag} & (_SWITCHES | _PLUGINS | _INTEGERS | _CHOICES.keys() | _BARE_FLAGS)):
            errors.append(FieldError(where, f"Unsupported value: {flag!r}: not a trtllm-build option of "
                                     "TensorRT-LLM 0.21 that tensorfleet passes through"))
    return errors


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """The commands that turn a downloaded checkpoint into engine files, in order."""

    convert: tuple[str, ...]
    build: tuple[str, ...]


def _convert(spec: Mapping[str, Any], model_dir: str, checkpoint_dir: str, examples: str) -> tuple[str, ...]:
    dtype, kind, _ = _PRECISIONS[spec["precision"]]
    tp = str(spec["tensorParallelSize"])
    if kind.startswith("quantize"):
        qformat = "fp8" if kind == "quantize-fp8" else "int4_awq"
        cmd = ["python3", f"{examples}/quantization/quantize.py", "--model_dir", model_dir, "--output_dir",
               checkpoint_dir, "--dtype", dtype, "--qformat", qformat, "--tp_size", tp, "--calib_size", "512"]
        if qformat == "fp8":
            cmd += ["--kv_cache_dtype", "fp8"]
        else:
            cmd += ["--awq_block_size", str(AWQ_BLOCK_SIZE)]
        return tuple(cmd)
    cmd = ["python3", f"{examples}/models/core/llama/convert_checkpoint.py", "--model_dir", model_dir,
           "--output_dir", checkpoint_dir, "--dtype", dtype, "--tp_size", tp]
    if kind == "convert-weight-only-int8":
        cmd += ["--use_weight_only", "--weight_only_precision", "int8"]
    return tuple(cmd)


def default_options(precision: str) -> dict[str, str]:
    """The trtllm-build options tensorfleet passes for ``precision`` unless buildOptions says otherwise.

    They are not in the fingerprint (see ``fingerprint``): changing one changes the engine every key of that
    precision names, so it must come with a ``FINGERPRINT_VERSION`` bump.
    """
    defaults = {
        "gemm_plugin": _PRECISIONS[precision][2],
        "kv_cache_type": "paged",
        "remove_input_padding": "enable",
        "context_fmha": "enable",
        "use_paged_context_fmha": "enable",
    }
    if precision == "fp8":
        defaults["use_fp8_context_fmha"] = "enable"
    return defaults


def distinct_options(precision: str, options: Mapping[str, Any]) -> dict[str, str]:
    """The buildOptions that change the build command: a value equal to the default, or a bare flag set
    to ``false``, builds the same engine as leaving the option out. (A precision the schema refuses has no
    defaults: its spec is still keyed, to name the Engine that reports it invalid.)"""
    defaults = default_options(precision) if precision in _PRECISIONS else {}
    return {str(flag): str(value) for flag, value in options.items()
            if defaults.get(str(flag)) != str(value) and not (flag in _BARE_FLAGS and str(value) == "false")}


def _build(spec: Mapping[str, Any], checkpoint_dir: str, engine_dir: str) -> tuple[str, ...]:
    options = {**default_options(spec["precision"]),
               **{str(k): str(v) for k, v in (spec.get("buildOptions") or {}).items()}}
    cmd = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", engine_dir,
           "--max_batch_size", str(spec["maxBatchSize"]), "--max_input_len", str(spec["maxInputLen"]),
           "--max_seq_len", str(spec["maxSeqLen"]), "--workers", str(spec["tensorParallelSize"])]
    for flag, value in sorted(options.items()):
        if flag in _BARE_FLAGS:
            if value == "true":
                cmd.append(f"--{flag}")
        else:
            cmd += [f"--{flag}", value]
    return tuple(cmd)


def build_plan(spec: Mapping[str, Any], model_dir: str, checkpoint_dir: str, engine_dir: str,
               examples: str = EXAMPLES_DIR) -> BuildPlan:
    """Commands for an Engine spec (defaulted by the CRD schema); buildOptions must be valid."""
    errors = build_option_errors(spec.get("buildOptions") or {})
    if errors:
        raise ValueError("; ".join(str(e) for e in errors))
    return BuildPlan(convert=_convert(spec, model_dir, checkpoint_dir, examples),
                     build=_build(spec, checkpoint_dir, engine_dir))
