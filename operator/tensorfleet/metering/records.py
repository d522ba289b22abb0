"""Usage records: what one request (or one cold start) cost, as the JSON body the ledger signs.

Ids are deterministic (UUIDv5 of service, pod and the gateway's request id), so a record exported twice
is the same event to the sink. The chain fields (``ledger``, ``seq``, ``prevHash``) are added by the
ledger when it appends.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import json
import math
import struct
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from tensorfleet.metering import units
from tensorfleet.metering.attribution import Settled
from tensorfleet.metering.events import ColdStartEvent, RequestEvent, TokenChunk

SCHEMA = "tensorfleet.io/usage/v1"
ID_NAMESPACE = uuid.UUID("5b0d7c8e-2a52-5c1e-9a57-6e7366a1c0de")
Measurement = Literal["gpm", "utilization", "timing"]


@dataclasses.dataclass(frozen=True)
class RecordContext:
    """Where requests ran and how they are priced: captured when an event is submitted."""

    namespace: str
    service: str
    pod: str
    model: str
    runtime: str
    engine_fingerprint: str
    gpu_product: str
    gpus: int
    precision: str
    tier: str
    currency: str
    prices: Mapping[str, str]  # pricePerResourceUnit, pricePerMillionInputTokens, pricePerMillionOutputTokens
    ru_per_gpu_ms: float
    ru_source: str

    def to_json(self) -> str:
        return self._json

    @functools.cached_property
    def _json(self) -> str:  # one context serves every event until the configuration changes
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RecordContext:
        return cls(**json.loads(text))


def context_from_config(config: Mapping[str, Any], pod: str, gpu_product: str,
                        table: units.ResourceUnitTable) -> RecordContext:
    """The record context for a gateway configuration (gateway.json); ValueError names a bad field."""
    service = config.get("service", {})
    model = config.get("model", {})
    engine = config.get("engine", {}) or {}
    billing = config.get("billing", {}) or {}
    precision = str(engine.get("precision") or "fp16")
    tier = str(billing.get("tier") or "standard")
    prices = dict(table.tier_prices.get(tier, {}))
    for name in units.PRICE_FIELDS:
        if billing.get(name) is not None:
            prices[name] = str(units.parse_price(billing[name], f"spec.billing.{name}"))
    factor, source = table.factor(gpu_product, precision)
    return RecordContext(
        namespace=str(service.get("namespace", "")), service=str(service.get("name", "")), pod=pod,
        model=str(model.get("servedName", "")), runtime=str(config.get("runtime", "")),
        engine_fingerprint=str(engine.get("fingerprint") or ""), gpu_product=gpu_product,
        gpus=int(config.get("gpusPerReplica") or 1), precision=precision, tier=tier,
        currency=str(billing.get("currency") or "USD"), prices=prices, ru_per_gpu_ms=factor, ru_source=source,
    )


# CloudEvents types of what the ledger holds (the exporter sends them, verification reads them back).
EVENT_TYPES = {"request": "io.tensorfleet.usage.request.v1", "coldStart": "io.tensorfleet.usage.coldstart.v1"}
CHECKPOINT_TYPE = "io.tensorfleet.usage.checkpoint.v1"


def rfc3339(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_record_id(ctx: RecordContext, request_id: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"request/{ctx.namespace}/{ctx.service}/{ctx.pod}/{request_id}"))


def _ms(later: float | None, earlier: float) -> float | None:
    return None if later is None else round(max(0.0, later - earlier) * 1000.0, 3)


def request_record(event: RequestEvent, ctx: RecordContext, settled: Settled | None,
                   measurement: Measurement, record_id: str | None = None) -> dict[str, Any]:
    """The body of a billable request's record (without chain fields); ``record_id`` when the caller has it
    already (``request_record_id(ctx, event.request_id)``, a UUIDv5: it need not be hashed twice)."""
    gpu_ms = round(settled.share.gpu_ms, units.GPU_MS_DECIMALS) if settled else 0.0
    ru = round(gpu_ms * ctx.ru_per_gpu_ms, units.RU_DECIMALS)
    measured_energy = settled.share.energy_mj if settled and measurement != "timing" else None
    energy = None if measured_energy is None else round(measured_energy, 3)  # None: no counter measured it
    if not math.isfinite(ru + (energy or 0.0) + (settled.coverage if settled else 0.0)):  # NaN or inf in any
        raise ValueError(f"gpuMs={gpu_ms!r}, resourceUnits={ru!r}, energyMj={energy!r}, coverage="
                         f"{settled.coverage if settled else None!r}: a record's figures must be finite")
    price = units.price(ru, event.prompt_tokens, event.completion_tokens, ctx.prices)
    return {
        "schema": SCHEMA, "kind": "request", "id": record_id or request_record_id(ctx, event.request_id),
        "billable": True, "requestId": event.request_id, "time": rfc3339(event.received_at),
        "endTime": rfc3339(event.received_at + max(0.0, event.done - event.received)), "tenant": event.tenant,
        "namespace": ctx.namespace, "service": ctx.service, "pod": ctx.pod, "model": event.model or ctx.model,
        "endpoint": event.endpoint, "runtime": ctx.runtime, "engineFingerprint": ctx.engine_fingerprint,
        "gpuProduct": ctx.gpu_product, "gpuCount": ctx.gpus, "precision": ctx.precision, "tier": ctx.tier,
        "inputTokens": event.prompt_tokens, "outputTokens": event.completion_tokens,
        "cachedTokens": event.cached_tokens, "truncatedTokens": event.truncated_tokens,
        "queueMs": _ms(event.admitted, event.received), "ttftMs": _ms(event.first_token, event.received),
        "durationMs": _ms(event.done, event.received), "gpuMs": gpu_ms, "energyMj": energy,
        "resourceUnits": ru, "ruPerGpuMs": ctx.ru_per_gpu_ms, "ruSource": ctx.ru_source,
        "currency": ctx.currency, "price": price["total"],
        "priceBreakdown": {k: v for k, v in price.items() if k != "total"},
        "cacheHit": event.cache_hit, "truncated": event.truncated, "runawayStopped": event.runaway_stopped,
        "error": event.error, "status": event.status, "streaming": event.streaming,
        "estimated": measurement == "timing", "measurement": measurement,
        "coverage": round(settled.coverage, 4) if settled else 1.0,
    }


def cold_start_record(event: ColdStartEvent, ctx: RecordContext) -> dict[str, Any]:
    """The one non-billable record of a pod start."""
    key = f"coldstart/{ctx.namespace}/{ctx.service}/{event.pod}/{event.started_at!r}"
    return {
        "schema": SCHEMA, "kind": "coldStart", "id": str(uuid.uuid5(ID_NAMESPACE, key)), "billable": False,
        "time": rfc3339(event.started_at), "tenant": None, "namespace": ctx.namespace, "service": ctx.service,
        "pod": event.pod, "model": ctx.model, "runtime": ctx.runtime, "engineFingerprint": ctx.engine_fingerprint,
        "gpuProduct": ctx.gpu_product, "gpuCount": ctx.gpus, "precision": ctx.precision, "tier": ctx.tier,
        "stages": [{"name": name, "seconds": round(seconds, 3)} for name, seconds in event.stages],
        "totalSeconds": round(event.total_seconds, 3), "price": "0", "currency": ctx.currency,
    }


# -- events to and from the journal (the pending table keeps them until they are settled) -----------
_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(RequestEvent))
_COLD_START_FIELDS = tuple(f.name for f in dataclasses.fields(ColdStartEvent))


def chunk_columns(chunks: tuple[TokenChunk, ...]) -> tuple[list[float], list[int]]:
    """A request's chunk times and token counts, as two lists (AttributeError when a chunk is not a TokenChunk)."""
    return [c.at for c in chunks], [c.tokens for c in chunks]


def event_to_json(event: RequestEvent | ColdStartEvent,
                  columns: tuple[list[float], list[int]] | None = None) -> str:
    """The event as the journal keeps it; ``columns``: its ``chunk_columns`` when the caller has them already."""
    # Field by field, not dataclasses.asdict: that deep-copies every token chunk, and cost the writer more
    # than a request's whole record (measured in bench.metering_writer). The chunks' times go in as packed
    # little-endian doubles (base64): exact, and about a sixth of the cost of writing each float as JSON text.
    if isinstance(event, RequestEvent):
        body: dict[str, Any] = {name: getattr(event, name) for name in _REQUEST_FIELDS if name != "chunks"}
        times, tokens = columns or chunk_columns(event.chunks)
        body["chunk_times"] = base64.b64encode(struct.pack(f"<{len(times)}d", *times)).decode()
        body["chunk_tokens"] = tokens
        body["type"] = "request"
    else:
        body = {name: getattr(event, name) for name in _COLD_START_FIELDS}
        body["type"] = "coldStart"
    return json.dumps(body, separators=(",", ":"))


def event_from_json(text: str) -> RequestEvent | ColdStartEvent:
    """The event journalled by ``event_to_json``, or by a gateway before packed chunk times (a list of pairs)."""
    body = json.loads(text)
    kind = body.pop("type")
    if kind == "coldStart":
        body["stages"] = tuple((str(n), float(s)) for n, s in body["stages"])
        return ColdStartEvent(**body)
    if "chunks" in body:
        pairs = body["chunks"]
    else:
        tokens = body.pop("chunk_tokens")
        times = struct.unpack(f"<{len(tokens)}d", base64.b64decode(body.pop("chunk_times")))
        pairs = zip(times, tokens, strict=True)
    body["chunks"] = tuple(TokenChunk(at, count) for at, count in pairs)
    return RequestEvent(**body)
