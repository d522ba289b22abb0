"""Ports named on the command line: one that cannot be listened on is one line naming the flag
(``--metrics-port=9090: cannot listen on it: Address already in use; ...``), found before anything starts, never a
traceback from deep inside a server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable


def check_listenable(host: str, ports: Iterable[tuple[str, int]], hint: str) -> None:
    """ValueError naming the first ``(flag, port)`` whose port cannot be listened on at ``host`` (0 is skipped: it
    turns an endpoint off, or picks any free port); ``hint`` says what to do instead."""
    for flag, port in ports:
        if not port:
            continue
        try:
            _probe(host, port)
        except OSError as exc:
            raise ValueError(f"{flag}={port}: cannot listen on it: {exc.strerror or exc}; {hint}") from None


def _probe(host: str, port: int) -> None:
    """Bind every address of ``host`` as the servers do (SO_REUSEADDR, IPv6 sockets IPv6 only), then let go."""
    for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
