"""Per-tenant token budgets: a token bucket per tenant, reserve before admission, settle after.

A request reserves its worst case (input tokens plus max_tokens, capped at one minute's budget so that
any request can eventually run) before it is sent to the engine. When it finishes, the reservation is
settled against the tokens actually used: unused tokens go back, an overrun becomes debt that delays
the tenant's next requests. Concurrent long generations therefore cannot overrun the budget together.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable


@dataclasses.dataclass
class _Bucket:
    capacity: float
    tokens: float
    updated: float


@dataclasses.dataclass(frozen=True)
class Reservation:
    tenant: str
    tokens: int


class RateLimited(Exception):
    def __init__(self, tenant: str, needed: int, available: int, limit: int, retry_after: int) -> None:
        super().__init__(f"tenant {tenant!r} is over its budget of {limit} tokens per minute: this request "
                         f"reserves {needed} tokens and {max(available, 0)} are available; retry in {retry_after} s")
        self.retry_after = retry_after
        self.limit = limit
        self.needed = needed


class TokenRateLimiter:
    """Token buckets keyed by tenant; ``limit_of(tenant)`` gives tokens per minute or None (unlimited)."""

    def __init__(self, limit_of: Callable[[str], int | None], clock: Callable[[], float] = time.monotonic,
                 max_tenants: int = 100_000) -> None:
        self.limit_of = limit_of
        self.clock = clock
        self.max_tenants = max_tenants
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, tenant: str, limit: int) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self.max_tenants:
                self._evict_full(now)
            bucket = self._buckets[tenant] = _Bucket(float(limit), float(limit), now)
        if bucket.capacity != limit:  # the budget was changed by a configuration reload
            bucket.tokens = min(float(limit), bucket.tokens + (limit - bucket.capacity))
            bucket.capacity = float(limit)
        bucket.tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated) * bucket.capacity / 60.0)
        bucket.updated = now
        return bucket

    def _evict_full(self, now: float) -> None:
        """Forget tenants whose bucket has refilled: they would start full anyway."""
        for tenant, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * bucket.capacity / 60.0 >= bucket.capacity:
                del self._buckets[tenant]

    def reserve(self, tenant: str, tokens: int) -> Reservation | None:
        """Take ``tokens`` from the tenant's bucket or raise RateLimited; None when the tenant is unlimited."""
        limit = self.limit_of(tenant)
        if limit is None:
            return None
        bucket = self._bucket(tenant, limit)
        needed = min(tokens, limit)
        if bucket.tokens < needed:
            missing = needed - bucket.tokens
            retry_after = max(1, math.ceil(missing * 60.0 / limit))
            raise RateLimited(tenant, needed, int(bucket.tokens), limit, retry_after)
        bucket.tokens -= needed
        return Reservation(tenant, needed)

    def settle(self, reservation: Reservation | None, used: int) -> None:
        """Return what was reserved and not used, or charge an overrun as debt."""
        if reservation is None:
            return
        limit = self.limit_of(reservation.tenant)
        if limit is None:
            return
        bucket = self._bucket(reservation.tenant, limit)
        bucket.tokens = min(bucket.capacity, bucket.tokens + reservation.tokens - used)

    def available(self, tenant: str) -> float | None:
        limit = self.limit_of(tenant)
        return None if limit is None else self._bucket(tenant, limit).tokens
