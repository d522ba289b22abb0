"""What the gateway's metering half needs in the pod: sink URL, the Secret with the signing key, the
engine fingerprint, the engine's step budget where the service sets it, and the resource-unit overrides.
Pure builders; the operator never reads the Secret.

The Secret (``RenderContext.metering_secret``, default ``tensorfleet-metering``) lives in the service's
namespace with the keys ``signing-key`` (Ed25519 private key, PEM) and optionally ``sink-token``. It is
mounted ``optional``: without it the gateway serves and signs with a pod-local key (and says so in
``tensorfleet_metering_signing_key_configured``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tensorfleet.api import vllm_args
from tensorfleet.api.types import InferenceService
from tensorfleet.config import env_name
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.render import context as c
from tensorfleet.render.engine_container import engine_image

VOLUME = "metering-secret"
MOUNT_DIR = f"{c.CONFIG_DIR}/metering"
SIGNING_KEY = "signing-key"
SINK_TOKEN = "sink-token"


def engine_fingerprint(isvc: InferenceService, ctx: c.RenderContext) -> str:
    """sha256 over what decides the engine's speed and output: runtime, image, weights, precision, shape."""
    spec = isvc.spec
    engine = spec.engine
    facts = {
        "runtime": spec.runtime.name, "image": engine_image(spec, ctx), "model": spec.model.uri,
        "digest": spec.model.digest, "gpus": spec.gpu.count, "extraArgs": list(spec.runtime.extra_args),
        "engine": None if engine is None else {
            "precision": engine.precision, "maxBatchSize": engine.max_batch_size,
            "maxInputLen": engine.max_input_len, "maxSeqLen": engine.max_seq_len,
            "trtllmVersion": engine.trtllm_version, "buildOptions": dict(engine.build_options)},
    }
    canonical = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def metering_config(ctx: c.RenderContext) -> dict[str, Any]:
    """The gateway.json section metering reads (it follows ConfigMap updates without a restart)."""
    return {"resourceUnits": dict(ctx.resource_units)} if ctx.resource_units else {}


def engine_step_tokens(isvc: InferenceService) -> int | None:
    """The engine's step budget where the service sets it: vLLM's ``--max-num-batched-tokens`` in
    ``spec.runtime.extraArgs`` (``N`` as the next argument or after ``=``, ``8k`` as vLLM reads it). None
    otherwise: the gateway learns it (vLLM's own default depends on the GPU and the entry point, so it is not
    guessed here)."""
    if isvc.spec.runtime.name != "vllm":
        return None
    value = vllm_args.flag_value(isvc.spec.runtime.extra_args, vllm_args.STEP_TOKENS)
    tokens = None if value is None else vllm_args.human_int(value)
    if tokens is None or tokens <= 0:
        return None  # vLLM refuses it itself; metering then learns
    return tokens


def metered_precision(isvc: InferenceService) -> str:
    """The precision records are priced at: what the engine is told. For vLLM that is what its flags in
    ``spec.runtime.extraArgs`` say (:func:`vllm_args.precision`), never ``spec.engine.precision``
    (TensorRT-LLM's build setting, not passed to vLLM)."""
    spec = isvc.spec
    if spec.runtime.name != "vllm":
        return spec.engine.precision if spec.engine else "fp16"
    return vllm_args.precision(spec.runtime.extra_args)


def metering_env(ctx: c.RenderContext, isvc: InferenceService | None = None) -> list[dict[str, Any]]:
    def name(field: str) -> str:
        return env_name(MeteringSettings, field)

    env = []
    if isvc is not None and (step_tokens := engine_step_tokens(isvc)) is not None:
        env.append({"name": name("engine_step_tokens"), "value": str(step_tokens)})
    if ctx.metering_sink_url:
        env.append({"name": name("sink_url"), "value": ctx.metering_sink_url})
    if ctx.metering_secret:
        env += [{"name": name("signing_key_file"), "value": f"{MOUNT_DIR}/{SIGNING_KEY}"},
                {"name": name("sink_token_file"), "value": f"{MOUNT_DIR}/{SINK_TOKEN}"}]
    return env


def metering_volumes(ctx: c.RenderContext) -> list[dict[str, Any]]:
    if not ctx.metering_secret:
        return []
    return [{"name": VOLUME, "secret": {"secretName": ctx.metering_secret, "optional": True, "defaultMode": 0o440}}]


def metering_mounts(ctx: c.RenderContext) -> list[dict[str, Any]]:
    return [{"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True}] if ctx.metering_secret else []
