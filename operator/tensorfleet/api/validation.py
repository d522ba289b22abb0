"""Cross-field checks the CRD schema cannot express, as pure functions returning field errors.

The API server already enforces structure, enums, ranges and the CEL rules. What is left here needs
values the schema does not hold (defaults computed in Python, the model's context window as vLLM
will derive it, token budgets across sections), and the structure of ``spec.affinity.nodeAffinity``,
which the CRD leaves open. A failure sets the ``Degraded`` condition with reason ``InvalidSpec`` and
the field path; nothing is rendered until it is fixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tensorfleet.api import crds, schema, vllm_args
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
    yield from _affinity(spec)


def advisories(spec: InferenceServiceSpec) -> list[FieldError]:
    """What in a valid spec does not do what it seems to, without stopping the service: reported in
    ``status.warnings`` and as a Warning event, never blocking a reconcile (a spec an earlier version accepted
    keeps running and scaling after an upgrade)."""
    notes = []
    if spec.runtime.name == "vllm":
        metered = vllm_args.precision(spec.runtime.extra_args)
        if spec.engine is not None and spec.engine.precision not in ("fp16", metered):  # fp16: also the default
            notes.append(FieldError(
                "spec.engine.precision",
                f"{spec.engine.precision!r} is not passed to vLLM (TensorRT-LLM only): vLLM runs, and records are "
                f"priced at, {metered!r} from spec.runtime.extraArgs (--quantization, --dtype)",
            ))
        index = vllm_args.config_file_index(spec.runtime.extra_args)
        if index is not None:
            notes.append(FieldError(
                f"spec.runtime.extraArgs[{index}]",
                f"flags in vLLM's --config file are not read by the operator: records are priced at {metered!r} "
                "from the other extraArgs, and the engine's step budget is learned; put --quantization, --dtype "
                "and --max-num-batched-tokens in extraArgs",
            ))
    return notes


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


# core/v1 NodeAffinity with the rules of Kubernetes' ValidateNodeSelector (pkg/apis/core/validation). The CRD
# keeps spec.affinity open (x-kubernetes-preserve-unknown-fields); the operator ANDs its GPU-product
# requirement into the nodeAffinity part, so that part is checked here: a mistake is InvalidSpec naming the
# field, not a failed render or a Deployment the API server refuses. Pod (anti-)affinity passes through.
_LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
              r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_STRINGS = {"type": "array", "items": {"type": "string"}}
_EXPRESSION = {
    "type": "object", "required": ["key", "operator"],
    "properties": {"key": {"type": "string", "maxLength": 317, "pattern": _LABEL_KEY},
                   "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]},
                   "values": _STRINGS},
    "x-kubernetes-validations": [
        {"rule": "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
         "message": "values must be non-empty when operator is In or NotIn"},
        {"rule": "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
         "message": "values must be empty when operator is Exists or DoesNotExist"},
        {"rule": "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1)",
         "message": "values must have exactly one item when operator is Gt or Lt"}],
}
_FIELD_EXPRESSION = {
    "type": "object", "required": ["key", "operator", "values"],
    "properties": {"key": {"type": "string", "enum": ["metadata.name"]},
                   "operator": {"type": "string", "enum": ["In", "NotIn"]},
                   "values": {**_STRINGS, "minItems": 1, "maxItems": 1}},
}
_TERM = {"type": "object", "properties": {"matchExpressions": {"type": "array", "items": _EXPRESSION},
                                          "matchFields": {"type": "array", "items": _FIELD_EXPRESSION}}}
_AFFINITY = {"type": "object", "properties": {
    "nodeAffinity": {"type": "object", "properties": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "type": "object", "required": ["nodeSelectorTerms"],
            "properties": {"nodeSelectorTerms": {"type": "array", "minItems": 1, "items": _TERM}}},
        "preferredDuringSchedulingIgnoredDuringExecution": {"type": "array", "items": {
            "type": "object", "required": ["weight", "preference"],
            "properties": {"weight": {"type": "integer", "minimum": 1, "maximum": 100}, "preference": _TERM}}}}},
    "podAffinity": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    "podAntiAffinity": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
}}


def _affinity(spec: InferenceServiceSpec) -> Iterator[FieldError]:
    yield from schema.validate(_AFFINITY, _without_null_fields(_AFFINITY, spec.affinity), root_path="spec.affinity")


def _without_null_fields(node: Mapping[str, Any], value: Any) -> Any:
    """Declared fields that are null dropped, as Kubernetes decodes them (absent); unknown ones kept, to be named."""
    if isinstance(value, Mapping):
        fields = node.get("properties", {})
        return {k: _without_null_fields(fields.get(k, {}), v) for k, v in value.items()
                if v is not None or k not in fields}
    if isinstance(value, list):
        return [_without_null_fields(node.get("items", {}), v) for v in value]
    return value


def _within_window(spec: InferenceServiceSpec, path: str, tokens: int, why: str) -> Iterator[FieldError]:
    """``tokens`` must leave at least one token of the context window free, when the window is known."""
    window = _context_limit(spec)
    if window is not None and tokens >= window:
        yield FieldError(path, f"Invalid value: {tokens}: must be less than the context window {window} "
                               f"({_context_source(spec)}) {why}")


def model_max_len(spec: InferenceServiceSpec) -> tuple[int | None, str | None]:
    """The max model length the engine is told and the field it comes from: a vLLM ``--max-model-len`` in
    ``spec.runtime.extraArgs`` (they follow the operator's arguments, so vLLM takes it over
    ``spec.model.maxModelLen``; ``auto`` or ``-1`` leave it to vLLM: None), else ``spec.model.maxModelLen``."""
    if spec.runtime.name == "vllm":
        found = vllm_args.flag(spec.runtime.extra_args, vllm_args.MAX_MODEL_LEN)
        if found is not None:
            tokens = vllm_args.human_int(found[1])  # None for "auto", -1 for vLLM's other spelling of it
            return (tokens if tokens is not None and tokens > 0 else None), f"spec.runtime.extraArgs[{found[0]}]"
    if spec.model.max_model_len is not None:
        return spec.model.max_model_len, "spec.model.maxModelLen"
    return None, None


def _context_limit(spec: InferenceServiceSpec) -> int | None:
    tokens, source = model_max_len(spec)
    if source is not None:
        return tokens
    return spec.engine.max_seq_len if spec.engine is not None else None


def _context_source(spec: InferenceServiceSpec) -> str:
    return model_max_len(spec)[1] or "spec.engine.maxSeqLen"
