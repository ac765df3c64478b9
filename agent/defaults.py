"""The agent's default settings, as plain constants with no imports.

Why a module of its own: the `agent` CLI builds its parser from these, and the
short-lived verbs (`agent prefetch`, `agent ls`) must start fast on a node whose
page cache is cold; pulling in the config dataclass and the manifest module
(dataclasses, hashlib) only for their constants cost about 30 ms there.
"""

DEFAULT_CACHE_DIR = "/var/lib/warmstart"
DEFAULT_SOCKET = "/run/warmstart/agent.sock"
DEFAULT_LISTEN = "0.0.0.0:7070"
DEFAULT_CAPACITY = "100GiB"
DEFAULT_CONNECTIONS = 8
DEFAULT_RETRIES = 6
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_PEER_DNS_INTERVAL = 10.0
DEFAULT_PEER_HEDGE_TIMEOUT = 2.0

DEFAULT_PIECE_SIZE = 16 * 1024 * 1024
MIN_PIECE_SIZE = 1024 * 1024
MAX_PIECE_SIZE = 256 * 1024 * 1024
