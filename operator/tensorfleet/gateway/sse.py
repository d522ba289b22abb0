"""Server-sent events, split and edited at the byte level: the streaming hot path parses no JSON.

Engines write one ``data: {...}\\n\\n`` event at a time; ``EventSplitter`` cuts the byte stream at event
boundaries (keeping a partial tail for the next read), and the helpers below read or drop a field of a
compact JSON payload without decoding it.
"""

from __future__ import annotations

DATA = b"data: "
DONE = b"[DONE]"
SEPARATOR = b"\n\n"


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


def int_field(payload: bytes, name: bytes, start: int = 0) -> int | None:
    """The integer value of the first ``"name":<int>`` at or after ``start``; None when absent."""
    key = b'"' + name + b'":'
    at = payload.find(key, start)
    if at < 0:
        return None
    at += len(key)
    end = at
    while end < len(payload) and payload[end] in b"0123456789":
        end += 1
    return int(payload[at:end]) if end > at else None


def object_span(payload: bytes, name: bytes) -> tuple[int, int] | None:
    """(start, end) of ``,"name":{...}`` (comma included) in a compact JSON object, or None.

    Only for objects whose values hold no braces inside strings (usage objects are all numbers).
    """
    key = b',"' + name + b'":{'
    start = payload.find(key)
    if start < 0:
        return None
    # Find the matching brace with find() rather than a byte loop: usage objects nest at most one level.
    opened = start + len(key)
    end = payload.find(b"}", opened)
    inner = payload.find(b"{", opened, end)
    while inner >= 0 and end >= 0:
        end = payload.find(b"}", end + 1)
        inner = payload.find(b"{", inner + 1, end)
    return None if end < 0 else (start, end + 1)


def drop_object(payload: bytes, name: bytes) -> bytes:
    span = object_span(payload, name)
    if span is None:
        return payload
    return payload[:span[0]] + payload[span[1]:]


def event(data: bytes) -> bytes:
    return DATA + data + SEPARATOR
