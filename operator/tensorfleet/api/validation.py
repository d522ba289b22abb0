"""Cross-field checks the CRD schema cannot express, as pure functions returning field errors.

The API server already enforces structure, enums, ranges and the CEL rules. What is left here needs
values the schema does not hold (defaults computed in Python, the model's context window as vLLM
will derive it, token budgets across sections). A failure sets the ``Degraded`` condition with
reason ``InvalidSpec`` and the field path; nothing is rendered until it is fixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tensorfleet.api import crds
from tensorfleet.api.schema import FieldError
from tensorfleet.api.types import InferenceServiceSpec


def validate_body(body: Mapping[str, Any]) -> list[FieldError]:
    """Everything that makes a body unusable: schema and CEL errors first, then cross-field ones."""
    errors = crds.validate(body)
    if errors:
        return errors
    from tensorfleet.api.types import InferenceService

    try:
        isvc = InferenceService.from_body(body)
    except (KeyError, TypeError, ValueError) as exc:  # defensive: the schema should have caught it
        return [FieldError("spec", f"Invalid value: {exc}")]
    return sorted(cross_field_errors(isvc.spec))


def cross_field_errors(spec: InferenceServiceSpec) -> Iterator[FieldError]:
    yield from _context_window(spec)
    yield from _warmup(spec)


def _context_window(spec: InferenceServiceSpec) -> Iterator[FieldError]:
    max_input = spec.token_policy.get("maxInputTokens")
    max_output = spec.token_policy.get("maxOutputTokens")
    if max_input is not None:
        yield from _within_window(spec, "spec.tokenPolicy.maxInputTokens", max_input,
                                  "so that at least one token can be generated")
    if spec.engine is not None and max_input is not None and max_input > spec.engine.max_input_len:
        yield FieldError(
            "spec.tokenPolicy.maxInputTokens",
            f"Invalid value: {max_input}: exceeds spec.engine.maxInputLen {spec.engine.max_input_len}; "
            "the engine would reject such prompts",
        )
    if max_output is not None:  # the gateway sets max_tokens to it on every request that has none
        yield from _within_window(spec, "spec.tokenPolicy.maxOutputTokens", max_output,
                                  "so that a request without max_tokens leaves room for its prompt")
    if (
        spec.engine is not None
        and spec.model.max_model_len is not None
        and spec.model.max_model_len > spec.engine.max_seq_len
    ):
        yield FieldError(
            "spec.model.maxModelLen",
            f"Invalid value: {spec.model.max_model_len}: exceeds spec.engine.maxSeqLen {spec.engine.max_seq_len}, "
            "the longest sequence the engine is built for",
        )


def _warmup(spec: InferenceServiceSpec) -> Iterator[FieldError]:
    window = _context_limit(spec)
    max_input = spec.token_policy.get("maxInputTokens")
    for index, request in enumerate(spec.warmup.get("requests", ())):
        tokens = request.get("promptTokens")
        path = f"spec.warmup.requests[{index}]"
        if tokens is None:  # a text prompt: its length is unknown, but it is at least one token
            yield from _within_window(spec, f"{path}.maxTokens", request.get("maxTokens", 16),
                                      "so that the prompt has room; the engine would refuse the warm-up request")
        elif max_input is not None and tokens > max_input:
            yield FieldError(
                f"{path}.promptTokens",
                f"Invalid value: {tokens}: exceeds spec.tokenPolicy.maxInputTokens {max_input}; "
                "the gateway would reject its own warm-up request",
            )
        elif window is not None and tokens + request.get("maxTokens", 16) > window:
            yield FieldError(
                f"{path}.promptTokens",
                f"Invalid value: {tokens}: promptTokens plus maxTokens exceeds the context window {window}",
            )
        concurrency = request.get("concurrency", 1)
        if spec.engine is not None and concurrency > spec.engine.max_batch_size:
            yield FieldError(
                f"{path}.concurrency",
                f"Invalid value: {concurrency}: exceeds spec.engine.maxBatchSize {spec.engine.max_batch_size}",
            )


def _within_window(spec: InferenceServiceSpec, path: str, tokens: int, why: str) -> Iterator[FieldError]:
    """``tokens`` must leave at least one token of the context window free, when the window is known."""
    window = _context_limit(spec)
    if window is not None and tokens >= window:
        yield FieldError(path, f"Invalid value: {tokens}: must be less than the context window {window} "
                               f"({_context_source(spec)}) {why}")


def _context_limit(spec: InferenceServiceSpec) -> int | None:
    if spec.model.max_model_len is not None:
        return spec.model.max_model_len
    if spec.engine is not None:
        return spec.engine.max_seq_len
    return None


def _context_source(spec: InferenceServiceSpec) -> str:
    return "spec.model.maxModelLen" if spec.model.max_model_len is not None else "spec.engine.maxSeqLen"
