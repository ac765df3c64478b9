"""One agent per cache directory: an exclusive lock on ``<cache>/agent.lock`` for the agent's lifetime.

Two agents on one cache directory would each keep their own accounting of
blobs, partial files and capacity, fill the same partial files from two
processes, and evict each other's blobs from under readers. The lock is a
``flock`` on a file in the cache root, so it goes with the process (kill -9
included: nothing stale to clean up), and the file names the holder's pid and
socket so the second agent's one-line refusal says which agent to look for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from agent.store.safeio import FILE_MODE, make_root
from client.errors import WarmstartError

LOCK_FILE = "agent.lock"


class CacheInUseError(WarmstartError):
    """Another agent holds this cache directory."""


class CacheLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, root: str, socket: str) -> None:
        self.root = root
        self.socket = socket
        self.path = os.path.join(root, LOCK_FILE)
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock or raise CacheInUseError naming the holder (blocking: run it off the event loop)."""
        make_root(self.root)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CacheInUseError(
                f"another agent (pid {holder.get('pid', '?')}, socket {holder.get('socket', '?')}) already uses the "
                f"cache directory {self.root}; stop it, or give this one another --cache-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "socket": self.socket}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = -1


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
