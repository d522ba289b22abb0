"""Server-sent events, split and edited at the byte level: the streaming hot path parses no JSON.

Engines write one ``data: {...}\\n\\n`` event at a time; ``EventSplitter`` cuts the byte stream at event
boundaries (keeping a partial tail for the next read), and the helpers below read or drop a field of a
compact JSON payload without decoding it.
"""

from __future__ import annotations

import re

DATA = b"data: "
DONE = b"[DONE]"
SEPARATOR = b"\n\n"
_INT = rb'"%s":(\d*)'
_OBJECT = rb',"%s":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}'
_compiled: dict[tuple[bytes, bytes], re.Pattern[bytes]] = {}


def _pattern(template: bytes, name: bytes) -> re.Pattern[bytes]:
    """``template`` for the field ``name``, compiled once."""
    pattern = _compiled.get((template, name))
    if pattern is None:
        pattern = _compiled[template, name] = re.compile(template % re.escape(name))
    return pattern


class EventSplitter:
    """Feeds raw bytes in; gives complete events (without the trailing blank line) out."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._tail:
            data = self._tail + data
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(SEPARATOR)
        self._tail = events.pop()
        return [e for e in events if e]

    @property
    def pending(self) -> bytes:
        return self._tail


def payload(event: bytes) -> bytes | None:
    """The data of a ``data:`` event, or None for comments and other fields."""
    if event.startswith(DATA):
        return event[len(DATA):]
    if event.startswith(b"data:"):
        return event[5:]
    return None


def int_field(payload: bytes, name: bytes, start: int = 0, end: int | None = None) -> int | None:
    """The integer value of the first ``"name":<int>`` in ``payload[start:end]``; None when absent or not a number."""
    found = _pattern(_INT, name).search(payload, start, len(payload) if end is None else end)
    return int(found[1]) if found is not None and found[1] else None


def object_span(payload: bytes, name: bytes) -> tuple[int, int] | None:
    """(start, end) of ``,"name":{...}`` (comma included) in a compact JSON object, or None.

    Only for objects of numbers and at most one level of nested objects, whose strings hold no braces
    (usage objects and their token details).
    """
    found = _pattern(_OBJECT, name).search(payload)
    return None if found is None else found.span()


def event(data: bytes) -> bytes:
    return DATA + data + SEPARATOR
