"""Who pays for a request: an API key checked against hashed keys, or a header set by a trusted proxy.

API keys live in a Kubernetes Secret mounted as a folder: one file per tenant, named after the tenant,
holding the hex sha256 of that tenant's key (optionally prefixed ``sha256:``, or as ``sha256sum`` prints it
for standard input: ``<hex>  -``; several hashes, one per line, allow rotation). A hash listed for two
tenants is refused for both and reported as a problem of each file. The gateway never sees plain keys at
rest and re-reads the folder when the kubelet updates the mount. A tenant header is honoured only from a
peer address inside ``trustedProxies``; from anyone else it is ignored, so a client can never bill another
tenant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import re

from tensorfleet.gateway.config import DEFAULT_TENANT, AuthConfig

log = logging.getLogger(__name__)

# A line is the hex digest, optionally prefixed ``sha256:`` or followed by the `` -`` (`` *-``) with which
# ``sha256sum`` (and ``shasum -a 256``) names standard input, so HASH_COMMAND's output can be pasted as it is.
_HEX_SHA256 = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})(?: +\*?-)?$")
HASH_COMMAND = 'printf %s "$KEY" | sha256sum'

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
TENANT_NAME_RULE = "a letter or digit, then letters, digits, '.', '_', ':', '@', '-'; at most 128"


class AuthError(Exception):
    """The request names no tenant it may use; ``status`` is 401."""

    status = 401

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class KeyFileProblem:
    file: str
    message: str


class KeyStore:
    """Hashed API keys from a mounted Secret folder, reloaded when its content changes."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self._by_hash: dict[str, str] = {}
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self.problems: list[KeyFileProblem] = []

    def __len__(self) -> int:
        return len(self._by_hash)

    def tenant_for(self, key: str) -> str | None:
        # The lookup is on the digest of the key, so its timing tells nothing about stored keys.
        return self._by_hash.get(hash_key(key))

    def _entries(self) -> list[os.DirEntry[str]]:
        assert self.folder is not None
        try:
            # Kubernetes refuses Secret keys starting with "..": those are the kubelet's own (..data, ..<time>).
            return sorted((e for e in os.scandir(self.folder) if not e.name.startswith("..") and e.is_file()),
                          key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot read API keys from %s: %s", self.folder, exc)
            return []

    def reload(self) -> bool:
        """Re-read the folder when it changed; True when the keys changed."""
        if not self.folder:
            return False
        entries = self._entries()
        fingerprint = tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries)
        if fingerprint == self._fingerprint:
            return False
        owners: dict[str, set[str]] = {}
        problems: list[KeyFileProblem] = []
        for entry in entries:
            self._read_one(entry, owners, problems)
        by_hash = _one_tenant_each(owners, problems)
        for problem in problems:
            log.error("API key Secret, key %s: %s (ignored)", problem.file, problem.message)
        self._by_hash, self._fingerprint, self.problems = by_hash, fingerprint, problems
        log.info("loaded %d API key hash(es) for %d tenant(s)", len(by_hash), len(set(by_hash.values())))
        return True

    @staticmethod
    def _read_one(entry: os.DirEntry[str], owners: dict[str, set[str]], problems: list[KeyFileProblem]) -> None:
        if not TENANT_NAME.match(entry.name):
            problems.append(KeyFileProblem(entry.name, f"the key name must be a tenant name ({TENANT_NAME_RULE})"))
            return
        try:
            with open(entry.path, encoding="utf-8") as stream:
                lines = [line.strip() for line in stream.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(KeyFileProblem(entry.name, f"unreadable: {exc}"))
            return
        for line in lines:
            match = _HEX_SHA256.match(line)
            if not match:
                problems.append(KeyFileProblem(entry.name, "each line must be the hex sha256 of an API key, "
                                                           f"e.g. from: {HASH_COMMAND}"))
                continue
            owners.setdefault(match.group(2).lower(), set()).add(entry.name)


def _one_tenant_each(owners: dict[str, set[str]], problems: list[KeyFileProblem]) -> dict[str, str]:
    """The tenant of each hash listed for one; a hash listed for several is refused for all of them (it must
    not bill a tenant its holder may not be, and which one was meant is unknown), reported in each file."""
    by_hash: dict[str, str] = {}
    for digest, tenants in owners.items():
        if len(tenants) == 1:
            (by_hash[digest],) = tenants
            continue
        *others, last = sorted(tenants)
        message = (f"the same API key hash is listed for tenants {', '.join(others)} and {last}; a key must name "
                   f"one tenant, so it is refused for {'both' if len(tenants) == 2 else 'all of them'}")
        problems.extend(KeyFileProblem(tenant, message) for tenant in sorted(tenants))
    return by_hash


class TenantResolver:
    """The tenant of a request, from its headers and the address it came from."""

    def __init__(self, config: AuthConfig, keys: KeyStore) -> None:
        self.config = config
        self.keys = keys

    def _trusted(self, peer: str | None) -> bool:
        if not peer or not self.config.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.config.trusted_proxies)

    def resolve(self, authorization: str | None, tenant_header: str | None, peer: str | None) -> str:
        config = self.config
        if not config.enabled:
            return config.anonymous_tenant or DEFAULT_TENANT
        if config.trusted_tenant_header and tenant_header is not None and self._trusted(peer):
            if not TENANT_NAME.match(tenant_header):
                raise AuthError(f"header {config.trusted_tenant_header} must be a tenant name ({TENANT_NAME_RULE})",
                                "invalid_tenant")
            return tenant_header
        if authorization:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise AuthError("Authorization must be 'Bearer <API key>'")
            tenant = self.keys.tenant_for(key.strip()) if config.api_keys else None
            if tenant is None:
                raise AuthError("unknown API key")
            return tenant
        if config.anonymous_tenant:
            return config.anonymous_tenant
        raise AuthError("missing API key: send 'Authorization: Bearer <API key>'", "missing_api_key")
