"""gateway.json, the service's configuration the operator renders into a ConfigMap, as typed objects.

The operator renders it from an InferenceService the API server has validated, but the file can be
edited by hand, so it is checked again here and every problem names its field. The gateway re-reads it
when it changes (``Gateway.reload``); a broken edit keeps the previous configuration.

The document has two parts. The policy sections (``POLICY_SECTIONS``: token policy, auth, billing,
metering overrides) apply to the running gateway. The rest (service, model, runtime, GPUs, engine,
warm-up) describes the engine beside it: it is bound to the pod's revision and read once, at start.
The operator renders the two parts into two ConfigMaps: the policy into ``<name>-gateway``, which every
revision of a service's pods mounts and reloads, and the revision-bound part into
``<name>-gateway-<revision_hash>``, which only the pods of that revision mount (``read_configuration``
puts them together, the revision file taking precedence). So a pod that starts during a rollout, of
either revision, reads its own engine's facts, and a change to them rolls the pods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
POLICY_SECTIONS = frozenset({"tokenPolicy", "auth", "billing", "metering"})  # applied while the gateway runs


class ConfigError(ValueError):
    """gateway.json is unusable; the message names the field."""


@dataclasses.dataclass(frozen=True)
class WarmupRequest:
    prompt: str | None
    prompt_tokens: int | None
    max_tokens: int
    concurrency: int


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    enabled: bool = True
    timeout_seconds: float = 1800.0
    max_latency_ms: int | None = None
    requests: tuple[WarmupRequest, ...] = ()  # empty: the defaults (short, long, concurrent batch)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    enabled: bool = False
    ttl_seconds: float = 300.0
    max_entries: int = 10000
    max_bytes: int = 256 * 1024 * 1024


CONTEXT_STRATEGIES = ("reject", "truncate-oldest")


@dataclasses.dataclass(frozen=True)
class RunawayConfig:
    """Runaway-output control (see tensorfleet.gateway.runaway); the CRD's bounds are checked again here."""

    enabled: bool = False
    ngram_size: int = 4  # shortest repeated block counted, in words
    max_repeats: int = 12  # stop when a block has repeated back to back more than this many times
    window_tokens: int = 256  # words remembered: the longest loop period that is recognised
    max_punctuation_run: int = 200  # characters of punctuation or whitespace only in a row


@dataclasses.dataclass(frozen=True)
class TokenPolicyConfig:
    max_input_tokens: int | None = None
    max_output_tokens: int = 4096
    tenant_tokens_per_minute: int | None = None
    tenants: Mapping[str, int] = dataclasses.field(default_factory=dict)  # tenant -> tokens per minute
    cache: CacheConfig = CacheConfig()
    context_strategy: str = "reject"  # or truncate-oldest
    runaway: RunawayConfig = RunawayConfig()
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the whole section, for later policies

    def tokens_per_minute(self, tenant: str) -> int | None:
        return self.tenants.get(tenant, self.tenant_tokens_per_minute)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    api_keys: bool = False  # an API-key Secret is mounted
    trusted_tenant_header: str | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    anonymous_tenant: str | None = None

    @property
    def enabled(self) -> bool:
        return self.api_keys or self.trusted_tenant_header is not None


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    namespace: str = "default"
    service: str = ""
    served_model: str = "model"
    max_model_len: int | None = None
    engine_max_batch_size: int | None = None
    runtime: str = "vllm"
    tier: str = "standard"
    warmup: WarmupConfig = WarmupConfig()
    token_policy: TokenPolicyConfig = TokenPolicyConfig()
    auth: AuthConfig = AuthConfig()


def _obj(doc: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}.{key}: expected an object")
    return value


def _int(doc: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int = 1,
         maximum: int | None = None) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}.{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}.{key}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}.{key}: must be at most {maximum}, got {value}")
    return value


def _bool(doc: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: expected true or false, got {value!r}")
    return value


def _str(doc: Mapping[str, Any], key: str, path: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}.{key}: expected a string, got {value!r}")
    return value or None


def _warmup(doc: Mapping[str, Any]) -> WarmupConfig:
    path = "warmup"
    requests = []
    raw_requests = doc.get("requests") or []
    if not isinstance(raw_requests, list):
        raise ConfigError("warmup.requests: expected a list")
    for index, item in enumerate(raw_requests):
        where = f"{path}.requests[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected an object")
        prompt, tokens = _str(item, "prompt", where), _int(item, "promptTokens", where, None)
        if (prompt is None) == (tokens is None):
            raise ConfigError(f"{where}: set exactly one of prompt or promptTokens")
        requests.append(WarmupRequest(prompt, tokens, _int(item, "maxTokens", where, 16) or 16,
                                      _int(item, "concurrency", where, 1) or 1))
    return WarmupConfig(
        enabled=bool(doc.get("enabled", True)),
        timeout_seconds=float(_int(doc, "timeoutSeconds", path, 1800) or 1800),
        max_latency_ms=_int(doc, "maxLatencyMs", path, None),
        requests=tuple(requests),
    )


def _token_policy(doc: Mapping[str, Any]) -> TokenPolicyConfig:
    path = "tokenPolicy"
    tenants: dict[str, int] = {}
    raw_tenants = doc.get("tenants") or []
    if not isinstance(raw_tenants, list):
        raise ConfigError("tokenPolicy.tenants: expected a list")
    for index, item in enumerate(raw_tenants):
        where = f"{path}.tenants[{index}]"
        name = _str(item, "name", where) if isinstance(item, Mapping) else None
        if not name:
            raise ConfigError(f"{where}.name: required")
        limit = _int(item, "tokensPerMinute", where, None)
        if limit is not None:
            tenants[name] = limit
    cache = _obj(doc, "responseCache", path)
    where = f"{path}.responseCache"
    strategy = doc.get("contextStrategy") or "reject"
    if strategy not in CONTEXT_STRATEGIES:
        raise ConfigError(f"{path}.contextStrategy: must be one of {', '.join(CONTEXT_STRATEGIES)}, got {strategy!r}")
    return TokenPolicyConfig(
        max_input_tokens=_int(doc, "maxInputTokens", path, None),
        max_output_tokens=_int(doc, "maxOutputTokens", path, 4096) or 4096,
        tenant_tokens_per_minute=_int(doc, "tenantTokensPerMinute", path, None),
        tenants=tenants,
        cache=CacheConfig(
            enabled=bool(cache.get("enabled", False)),
            ttl_seconds=float(_int(cache, "ttlSeconds", where, 300) or 300),
            max_entries=_int(cache, "maxEntries", where, 10000) or 10000,
            max_bytes=_int(cache, "maxBytes", where, 256 * 1024 * 1024, minimum=1024) or 1024,
        ),
        context_strategy=strategy,
        runaway=_runaway(_obj(doc, "runaway", path)),
        raw=dict(doc),
    )


def _runaway(doc: Mapping[str, Any]) -> RunawayConfig:
    path = "tokenPolicy.runaway"
    default = RunawayConfig()
    config = RunawayConfig(
        enabled=_bool(doc, "enabled", path, False),
        ngram_size=_int(doc, "ngramSize", path, default.ngram_size, 1, 64) or default.ngram_size,
        max_repeats=_int(doc, "maxRepeats", path, default.max_repeats, 2, 10000) or default.max_repeats,
        window_tokens=_int(doc, "windowTokens", path, default.window_tokens, 8, 65536) or default.window_tokens,
        max_punctuation_run=_int(doc, "maxPunctuationRun", path, default.max_punctuation_run, 8, 65536)
        or default.max_punctuation_run,
    )
    if config.ngram_size > config.window_tokens:
        raise ConfigError(f"{path}.ngramSize: must not exceed {path}.windowTokens ({config.window_tokens}), "
                          f"got {config.ngram_size}")
    return config


def _auth(doc: Mapping[str, Any], api_keys_mounted: bool) -> AuthConfig:
    proxies = []
    raw = doc.get("trustedProxies") or []
    if not isinstance(raw, list):
        raise ConfigError("auth.trustedProxies: expected a list of CIDRs")
    for index, cidr in enumerate(raw):
        try:
            proxies.append(ipaddress.ip_network(str(cidr), strict=False))
        except ValueError:
            raise ConfigError(f"auth.trustedProxies[{index}]: {cidr!r} is not an IP network (CIDR)") from None
    header = _str(doc, "trustedTenantHeader", "auth")
    if header and not proxies:
        log.warning("auth.trustedTenantHeader is set but auth.trustedProxies is empty: the header is never honoured")
    return AuthConfig(
        api_keys=api_keys_mounted or bool(doc.get("apiKeysSecretRef")),
        trusted_tenant_header=header.lower() if header else None,
        trusted_proxies=tuple(proxies),
        anonymous_tenant=_str(doc, "anonymousTenant", "auth"),
    )


def parse(doc: Mapping[str, Any], api_keys_mounted: bool = False) -> GatewayConfig:
    """A GatewayConfig from the gateway.json document; ConfigError names the first bad field."""
    if not isinstance(doc, Mapping):
        raise ConfigError("gateway.json: expected a JSON object")
    model = _obj(doc, "model", "")
    engine = _obj(doc, "engine", "")
    service = _obj(doc, "service", "")
    served = _str(model, "servedName", "model")
    if not served:
        raise ConfigError("model.servedName: required")
    return GatewayConfig(
        namespace=str(service.get("namespace") or "default"),
        service=str(service.get("name") or ""),
        served_model=served,
        max_model_len=_int(model, "maxModelLen", "model", None),
        engine_max_batch_size=_int(engine, "maxBatchSize", "engine", None),
        runtime=str(doc.get("runtime") or "vllm"),
        tier=str(_obj(doc, "billing", "").get("tier") or "standard"),
        warmup=_warmup(_obj(doc, "warmup", "")),
        token_policy=_token_policy(_obj(doc, "tokenPolicy", "")),
        auth=_auth(_obj(doc, "auth", ""), api_keys_mounted),
    )


def read_document(path: str) -> Mapping[str, Any]:
    """The JSON object in ``path``; ConfigError names the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as stream:
            doc = json.load(stream)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the gateway configuration: {exc.strerror}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return doc


def read_configuration(path: str, revision_path: str | None = None) -> dict[str, Any]:
    """The gateway's whole configuration document: ``path`` (gateway.json) and, when given, the revision-bound
    sections of ``revision_path`` in place of any in ``path`` (they take precedence). ConfigError names the
    file and what is wrong with it; a bad field of the revision file names the file and the field."""
    document = read_document(path)
    if revision_path is None:
        return dict(document)
    revision = revision_part(read_document(revision_path))
    try:
        parse(revision)  # alone, so that its errors name its file
    except ConfigError as exc:
        raise ConfigError(f"{revision_path}: {exc}") from None
    return pin_revision(document, revision)


def load(path: str, api_keys_mounted: bool = False, revision_path: str | None = None) -> GatewayConfig:
    return parse(read_configuration(path, revision_path), api_keys_mounted)


def revision_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of gateway.json bound to the pod's revision: all but ``POLICY_SECTIONS``."""
    return {key: value for key, value in doc.items() if key not in POLICY_SECTIONS}


def policy_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of gateway.json the running gateway applies: ``POLICY_SECTIONS``."""
    return {key: value for key, value in doc.items() if key in POLICY_SECTIONS}


def revision_hash(doc: Mapping[str, Any]) -> str:
    """A short hash of ``revision_part(doc)``: equal for two documents exactly when that part is."""
    canonical = json.dumps(revision_part(doc), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pin_revision(doc: Mapping[str, Any], revision: Mapping[str, Any]) -> dict[str, Any]:
    """``doc``'s policy sections with ``revision`` (the ``revision_part`` the gateway started with) in place
    of its own revision-bound sections."""
    return {**policy_part(doc), **revision}


def file_version(path: str) -> tuple[int, int] | None:
    """(mtime_ns, size) of the file a ConfigMap mount points at, or None when it is missing.

    Kubernetes swaps the ``..data`` symlink of the mount on updates, so the resolved file changes.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
