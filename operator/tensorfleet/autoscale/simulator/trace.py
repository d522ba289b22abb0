"""Request traces: one row per request with its arrival time, prompt tokens and generated tokens.

The format is the Azure LLM inference trace's (Patel et al., "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024): a CSV with the columns ``TIMESTAMP``, ``ContextTokens``
and ``GeneratedTokens``. ``TIMESTAMP`` is a date-time (``2023-11-16 18:15:46.6805900``; digits past
microseconds are dropped; UTC unless it has an offset) or a number of seconds, the same in every row.
Arrival times are made relative to the first request; a trace spans at most 31 days.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import math
import pathlib
import re
from collections.abc import Iterable, Iterator

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAX_TOKENS = 10_000_000
MAX_SPAN_SECONDS = 31 * 86400  # a month of arrivals; simulated tick by tick


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
    header = _header(reader, source)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{source}: missing column(s) {', '.join(missing)}; a trace needs {', '.join(COLUMNS)}")
    rows: list[tuple[float, int, int, int, str]] = []  # (time, context, generated, line, TIMESTAMP as written)
    first: tuple[bool, int] | None = None  # (written as a date-time, line) of the first row
    for raw in _records(reader, source):
        line = reader.line_num  # the file's line (blank lines are skipped, a quoted field may span lines)
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{source}:{line}"
        stamp, is_date = _timestamp(row["TIMESTAMP"], where)
        first = first or (is_date, line)
        if is_date != first[0]:
            raise TraceError(f"{where}: column TIMESTAMP: {row['TIMESTAMP']!r} is {_FORMATS[is_date]}, but line "
                             f"{first[1]} is {_FORMATS[first[0]]}: use one format")
        rows.append((stamp, _tokens(row["ContextTokens"], where, "ContextTokens", 1),
                     _tokens(row["GeneratedTokens"], where, "GeneratedTokens", 1), line, row["TIMESTAMP"]))
    if not rows:
        raise TraceError(f"{source}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    _check_span(rows[0], rows[-1], source)
    start = rows[0][0]
    return Trace(tuple(r[0] - start for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows), source)


_FORMATS = {True: "a date-time", False: "seconds"}
_PAST_MICROSECONDS = re.compile(r"(\.\d{6})\d+")  # digits of a fraction past microseconds (the Azure trace has 7)


def _header(reader: csv.DictReader[str], source: str) -> list[str]:
    """The column names, stripped; without the byte-order mark that Excel's "CSV UTF-8" writes first."""
    with _csv_errors(reader, source):
        names = [name.strip() for name in reader.fieldnames or ()]
    if names:
        names[0] = names[0].removeprefix("\ufeff").strip()
    reader.fieldnames = names
    return names


def _records(reader: csv.DictReader[str], source: str) -> Iterator[dict[str | None, str | None]]:
    with _csv_errors(reader, source):
        yield from reader


@contextlib.contextmanager
def _csv_errors(reader: csv.DictReader[str], source: str) -> Iterator[None]:
    """What the csv module refuses (a field over its limit of ``csv.field_size_limit()`` characters) as a
    ``TraceError`` naming the line it was reading (the reader's own count: ``reader.line_num`` counts rows read)."""
    try:
        yield
    except csv.Error as exc:
        raise TraceError(f"{source}:{reader.reader.line_num}: {exc}") from None


def _check_span(first: tuple[float, int, int, int, str], last: tuple[float, int, int, int, str], source: str) -> None:
    """The simulation steps through every tick of the span: a span of years (a typo, ``1e12``) would never end."""
    span = last[0] - first[0]
    if span > MAX_SPAN_SECONDS:
        later = last if last[3] > first[3] else first
        earlier = first if later is last else last
        raise TraceError(f"{source}:{later[3]}: column TIMESTAMP: {later[4]!r} makes the trace span "
                         f"{span / 86400:.1f} days (from line {earlier[3]}); at most {MAX_SPAN_SECONDS // 86400}")


def _timestamp(text: str, where: str) -> tuple[float, bool]:
    """(seconds, whether written as a date-time)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise TraceError(f"{where}: column TIMESTAMP: {text!r} is not a finite number")
        return seconds, False
    try:
        stamp = datetime.datetime.fromisoformat(_PAST_MICROSECONDS.sub(r"\1", text, count=1))
    except ValueError:
        raise TraceError(f"{where}: column TIMESTAMP: {text!r} is neither a date-time nor seconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp(), True


def _tokens(text: str, where: str, column: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{where}: column {column}: {text!r} is not a whole number of tokens") from None
    if not minimum <= value <= MAX_TOKENS:
        raise TraceError(f"{where}: column {column}: {value} is outside [{minimum}, {MAX_TOKENS}]")
    return value
