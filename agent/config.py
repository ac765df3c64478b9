"""The agent's settings: one immutable value built by the CLI, passed everywhere.

Nothing reads the environment at import time; the CLI maps each flag to its
``WARMSTART_*`` variable.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.defaults import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CONNECTIONS,
    DEFAULT_LISTEN,
    DEFAULT_PEER_DNS_INTERVAL,
    DEFAULT_PEER_HEDGE_TIMEOUT,
    DEFAULT_PIECE_SIZE,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET,
)


@dataclass(frozen=True)
class AgentConfig:
    """Everything `agent serve` is configured with."""

    cache_dir: str = DEFAULT_CACHE_DIR
    socket: str = DEFAULT_SOCKET
    listen: str = DEFAULT_LISTEN
    capacity: int = 100 * 1024**3
    piece_size: int = DEFAULT_PIECE_SIZE
    connections: int = DEFAULT_CONNECTIONS
    retries: int = DEFAULT_RETRIES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    # Write back and drop what a fill has verified from the page cache (agent/store/fill.py).
    drop_behind: bool = False
    socket_mode: int = 0o660
    socket_gid: int | None = None  # chgrp the socket to this group (the pods allowed to use it)
    # Peers (agent/peers/membership.py): off unless a token file is given.
    peers: tuple[str, ...] = ()
    peer_dns: str | None = None
    peer_dns_interval: float = DEFAULT_PEER_DNS_INTERVAL
    peer_token_file: str | None = None
    advertise: str | None = None
    peer_hedge_timeout: float = DEFAULT_PEER_HEDGE_TIMEOUT
    # The declarative warm set (agent/warmset/reconciler.py): a YAML file, watched every warm_set_poll seconds.
    warm_set: str | None = None
    warm_set_poll: float = 0.5
