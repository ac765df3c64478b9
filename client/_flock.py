"""The shared ``flock`` a reader holds on a cache blob: the agent only deletes blobs it can lock exclusively."""

from __future__ import annotations

import errno
import fcntl
import time

from client.errors import WarmstartError

LOCK_TIMEOUT = 10.0


def lock_shared(fd: int, path: str, timeout: float = LOCK_TIMEOUT) -> None:
    """Take a shared flock, waiting a bounded time for an exclusive holder (the agent deleting it) to finish."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise WarmstartError(f"{path}: could not take a shared lock within {timeout:g}s (held exclusively)")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
