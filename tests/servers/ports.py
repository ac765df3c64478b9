"""Free loopback TCP ports for the servers the tests start.

Ports are picked at random below the kernel's ephemeral range (on Linux it
starts at 32768): a port that we probe, release and hand to a child process
could otherwise be taken by any outgoing connection of this machine before the
child binds it. A port handed out once is not handed out again by this
process, and callers retry with a new port when a bind still loses a race
(another test run on the same machine).

Under pytest-xdist each worker (``PYTEST_XDIST_WORKER=gw<i>`` of
``PYTEST_XDIST_WORKER_COUNT``) draws only from its own share of the ports, so
two workers of one run never race for a port: between a probe here and the
child's bind, only this worker's own children could take it. The shares split
the port numbers by ``(port - LOW) % SHARE_PERIOD``; the period is 10000, so a
port P and P+10000 (SeaweedFS's gRPC twin) always fall in the same share. Any
other ``also_free_at`` offset is checked against the share like P itself.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading

LOW, HIGH = 10_000, 32_000  # below the ephemeral range, above the well-known ports
MAX_TRIES = 500
SHARE_PERIOD = 10_000  # ports P and P + k * SHARE_PERIOD belong to the same worker


def worker_share() -> tuple[int, int]:
    """(this worker's index, number of workers) under pytest-xdist; (0, 1) when run without it.

    Read from the environment on each call: xdist sets it before any test runs.
    """
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        count = 1
    if match is None or count < 1:
        return 0, 1
    count = min(count, SHARE_PERIOD)
    return int(match.group(1)) % count, count


def in_share(port: int, share: tuple[int, int] | None = None) -> bool:
    """True if ``port`` is one this worker may hand out (every port is, without xdist)."""
    index, count = share or worker_share()
    return (port - LOW) % SHARE_PERIOD * count // SHARE_PERIOD == index

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
    share = worker_share()
    with _lock:
        for _ in range(MAX_TRIES * share[1]):  # a draw outside the share is no try
            port = rng.randrange(low, high)
            wanted = [port, *(port + k for k in also_free_at)]
            if any(p in _handed_out or p >= 65536 or not in_share(p, share) for p in wanted):
                continue
            if all(port_is_free(p, host) for p in wanted):
                _handed_out.update(wanted)
                return port
    raise RuntimeError(f"no free port found in {low}-{high} (worker share {share[0]} of {share[1]}) "
                       f"after {MAX_TRIES} tries")


def free_ports(n: int, *, also_free_at: tuple[int, ...] = (), host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports from :func:`free_port` (their P+k never collide with another P)."""
    ports: list[int] = []
    for _ in range(n):
        ports.append(free_port(also_free_at=also_free_at, host=host))
    return ports
