"""Exact-match response cache for deterministic requests (temperature 0, one choice).

The key is the tenant, the request path (Triton's names the model: /v2/models/NAME/generate) and the
request body after the token policy rewrote it (which says whether the response streams); a hit replays
the exact bytes the engine sent (every chunk of a stream), so the client sees what a miss would show.
Tenants never share an entry: a hit served to one tenant would tell it that another sent exactly that
prompt, and when. Entries expire after a TTL; the cache holds at most ``max_entries`` entries and
``max_bytes`` bytes, evicting the least recently used first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from tensorfleet.gateway.config import CacheConfig


@dataclasses.dataclass(frozen=True)
class CachedResponse:
    status: int
    content_type: str
    chunks: tuple[bytes, ...]  # one chunk for a plain response, every forwarded chunk for a stream
    prompt_tokens: int
    completion_tokens: int
    stored: float

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks) + 256


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """temperature 0 (explicitly), a single choice, and nothing that makes answers vary by call."""
    temperature = body.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature != 0:
        return False
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        return False
    return not body.get("logprobs") and not body.get("user_random")


def cache_key(tenant: str, path: str, body: Mapping[str, Any]) -> str:
    canonical = json.dumps([tenant, path, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._entries: collections.OrderedDict[str, CachedResponse] = collections.OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.stored > self.config.ttl_seconds:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, status: int, content_type: str, chunks: tuple[bytes, ...], prompt_tokens: int,
            completion_tokens: int) -> bool:
        entry = CachedResponse(status, content_type, chunks, prompt_tokens, completion_tokens, self.clock())
        if entry.size > self.config.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.bytes += entry.size
        while len(self._entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
