"""Request traces: one row per request with its arrival time, prompt tokens and generated tokens.

The format is the Azure LLM inference trace's (Patel et al., "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024): a CSV with the columns ``TIMESTAMP``, ``ContextTokens``
and ``GeneratedTokens``. ``TIMESTAMP`` is a date-time (``2023-11-16 18:15:46.6805900``; digits past
microseconds are dropped) or a number of seconds. Arrival times are made relative to the first request.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import pathlib
from collections.abc import Iterable

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAX_TOKENS = 10_000_000


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file, the line and the column."""


@dataclasses.dataclass(frozen=True)
class Trace:
    arrivals: tuple[float, ...]  # seconds since the first request, ascending
    context_tokens: tuple[int, ...]
    generated_tokens: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not (len(self.arrivals) == len(self.context_tokens) == len(self.generated_tokens)):
            raise TraceError("arrivals, context_tokens and generated_tokens must have the same length")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration(self) -> float:
        return self.arrivals[-1] if self.arrivals else 0.0

    def window(self, start: float, end: float) -> Trace:
        """The requests arriving in [start, end), re-based to start at 0."""
        keep = [i for i, t in enumerate(self.arrivals) if start <= t < end]
        return Trace(tuple(self.arrivals[i] - start for i in keep), tuple(self.context_tokens[i] for i in keep),
                     tuple(self.generated_tokens[i] for i in keep), self.source)


def load_trace(path: str | pathlib.Path) -> Trace:
    """Read a trace CSV; bad rows raise ``TraceError`` naming the line and column, nothing is guessed."""
    path = pathlib.Path(path)
    try:
        with path.open(newline="") as stream:
            return parse_trace(stream, str(path))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror or exc}") from None


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> Trace:
    reader = csv.DictReader(lines)
    header = [h.strip() for h in reader.fieldnames or ()]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{source}: missing column(s) {', '.join(missing)}; a trace needs {', '.join(COLUMNS)}")
    rows: list[tuple[float, int, int]] = []
    for line, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{source}:{line}"
        rows.append((_timestamp(row["TIMESTAMP"], where), _tokens(row["ContextTokens"], where, "ContextTokens", 1),
                     _tokens(row["GeneratedTokens"], where, "GeneratedTokens", 1)))
    if not rows:
        raise TraceError(f"{source}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return Trace(tuple(r[0] - start for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows), source)


def _timestamp(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        head, dot, fraction = text.partition(".")
        stamp = datetime.datetime.fromisoformat(f"{head}.{fraction[:6]}" if dot else head)
    except ValueError:
        raise TraceError(f"{where}: column TIMESTAMP: {text!r} is neither a date-time nor seconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


def _tokens(text: str, where: str, column: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{where}: column {column}: {text!r} is not a whole number of tokens") from None
    if not minimum <= value <= MAX_TOKENS:
        raise TraceError(f"{where}: column {column}: {value} is outside [{minimum}, {MAX_TOKENS}]")
    return value
