"""What the gateway's metering half needs in the pod: sink URL, the Secret with the signing key, the
engine fingerprint and the resource-unit overrides. Pure builders; the operator never reads the Secret.

The Secret (``RenderContext.metering_secret``, default ``tensorfleet-metering``) lives in the service's
namespace with the keys ``signing-key`` (Ed25519 private key, PEM) and optionally ``sink-token``. It is
mounted ``optional``: without it the gateway serves and signs with a pod-local key (and says so in
``tensorfleet_metering_signing_key_configured``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

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


def metering_env(ctx: c.RenderContext) -> list[dict[str, Any]]:
    def name(field: str) -> str:
        return env_name(MeteringSettings, field)

    env = []
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
