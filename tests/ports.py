"""Free TCP ports for tests that start their own Ray nodes (each node needs its own set)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all bound at once, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
