"""Free loopback TCP ports for the servers the tests start.

Ports are picked at random below the kernel's ephemeral range (on Linux it
starts at 32768): a port that we probe, release and hand to a child process
could otherwise be taken by any outgoing connection of this machine before the
child binds it. A port handed out once is not handed out again by this
process, and callers retry with a new port when a bind still loses a race
(another test run on the same machine).
"""

from __future__ import annotations

import random
import socket
import threading

LOW, HIGH = 10_000, 32_000  # below the ephemeral range, above the well-known ports
MAX_TRIES = 500

_lock = threading.Lock()
_handed_out: set[int] = set()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could bind host:port now (nothing listens there or holds a bind).

    SO_REUSEADDR as servers set it (Go's net.Listen, asyncio, aiohttp): a
    port whose old connections linger in TIME_WAIT counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(*, also_free_at: tuple[int, ...] = (), host: str = "127.0.0.1", low: int = LOW, high: int = HIGH) -> int:
    """A port P such that P and P+k for every k in ``also_free_at`` are free.

    ``also_free_at=(10000,)`` is what SeaweedFS needs: each of its ``-*.port`` P
    also binds P+10000 for gRPC.
    """
    rng = random.Random()
    with _lock:
        for _ in range(MAX_TRIES):
            port = rng.randrange(low, high)
            wanted = [port, *(port + k for k in also_free_at)]
            if any(p in _handed_out or p >= 65536 for p in wanted):
                continue
            if all(port_is_free(p, host) for p in wanted):
                _handed_out.update(wanted)
                return port
    raise RuntimeError(f"no free port found in {low}-{high} after {MAX_TRIES} tries")


def free_ports(n: int, *, also_free_at: tuple[int, ...] = (), host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports from :func:`free_port` (their P+k never collide with another P)."""
    ports: list[int] = []
    for _ in range(n):
        ports.append(free_port(also_free_at=also_free_at, host=host))
    return ports
