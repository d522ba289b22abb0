"""Shares held for requests still in flight when their intervals must be finalised: pure, in memory, no I/O.

The gateway tells the sink when it sends a request to the engine (``admitted``), and the request's event says
when it ended. An interval is finalised once no request that could have work in it is unreported, but never
later than the settle horizon (``settle_after_seconds`` behind the present): the attribution keeps no more than
that of history. A request still open at the horizon (a stream of several minutes is normal traffic) is not left
out of the intervals finalised meanwhile, which would split its GPU time among the requests beside it: it takes
part in them as if it decoded one token per step, like the decoding requests it ran with (the median density of
the interval's work, or the whole interval when nobody else had work), and what it receives is *held* for it.
When its event arrives the held share becomes the start of its own (its real work is placed on the intervals
that are not final yet); a request that ends without an event gives its held share to nobody (unattributed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

OPEN_PREFIX = "\x00open:"  # piece keys of requests still in flight (no request key starts with a NUL)
Piece = tuple[str, float, float, float]  # (key, start, end, density)


class Span(Protocol):
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def tokens(self) -> float: ...


@dataclasses.dataclass
class Hold:
    """What a request still in flight received from the intervals finalised while it was open."""

    gpu_ms: float = 0.0
    energy_mj: float | None = None  # None while no interval it was held in measured energy
    seconds: float = 0.0  # time it was held in
    measured: float = 0.0  # of which in measured intervals (not sampling gaps)
    until: float = -math.inf  # end of the last interval it was held in

    def to_list(self) -> list[float | None]:
        return [self.gpu_ms, self.energy_mj, self.seconds, self.measured, self.until]

    @classmethod
    def from_list(cls, values: list[float | None]) -> Hold:
        gpu_ms, energy, seconds, measured, until = values
        return cls(float(gpu_ms or 0.0), None if energy is None else float(energy), float(seconds or 0.0),
                   float(measured or 0.0), -math.inf if until is None else float(until))

    def covered_tokens(self, spans: Sequence[Span]) -> float:
        """The request's tokens in the time it was held, counted as covered where that time was measured."""
        if self.seconds <= 0:
            return 0.0
        until, tokens = self.until, 0.0
        for span in spans:
            if span.end <= until:
                tokens += span.tokens
            elif span.start < until:
                tokens += span.tokens * (until - span.start) / (span.end - span.start)
        return tokens * self.measured / self.seconds


class Holds:
    """The requests in flight (request id -> admission, monotonic seconds) and the shares held for them."""

    def __init__(self) -> None:
        self.open: dict[str, float] = {}
        self.held: dict[str, Hold] = {}
        self.changed = False  # since the journal last had them

    def set_open(self, admissions: Mapping[str, float]) -> None:
        self.open = dict(admissions)

    def pieces(self, start: float, end: float, others: list[Piece]) -> list[Piece]:
        """Work pieces of the open requests admitted before ``end``, over ``[admission, end]`` within the interval."""
        opened = [(request_id, at if at > start else start) for request_id, at in self.open.items() if at < end]
        if not opened:
            return []
        density = _median([p[3] for p in others]) if others else 1.0
        return [(OPEN_PREFIX + request_id, lo, end, density) for request_id, lo in opened if end > lo]

    def credit(self, pieces: list[Piece], weights: Mapping[str, float], busy: float, active: float,
               energy: float | None, measured: bool) -> float:
        """Add an interval's shares of the open requests (``busy * weight / active``) to their holds; their sum."""
        total = 0.0
        for key, lo, hi, _ in pieces:
            hold = self.held.setdefault(key[len(OPEN_PREFIX):], Hold())
            part = busy * weights.get(key, 0.0) / active if active > 0 else 0.0
            hold.gpu_ms += part
            if energy is not None:
                hold.energy_mj = (hold.energy_mj or 0.0) + (energy * part / busy if busy > 0 else 0.0)
            hold.seconds += hi - lo
            hold.measured += hi - lo if measured else 0.0
            hold.until = hi
            total += part
        self.changed = self.changed or bool(pieces)
        return total

    def claim(self, request_id: str) -> Hold | None:
        """The share held for a request whose event arrived (it is no longer held)."""
        hold = self.held.pop(request_id, None)
        self.changed = self.changed or hold is not None
        return hold

    def drop_closed(self) -> list[tuple[str, Hold]]:
        """Forget the holds of requests that are no longer open and whose event did not come (it never will)."""
        gone = [(request_id, hold) for request_id, hold in self.held.items() if request_id not in self.open]
        for request_id, _ in gone:
            del self.held[request_id]
        self.changed = self.changed or bool(gone)
        return gone


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
