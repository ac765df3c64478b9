"""The read-time checker of cached blobs as it was before it read with positional reads (bench only).

client/verify.py's ``BlobCheck`` at commit ffddbf9: one thread hashing each piece through a
read-only shared mapping of the blob (page faults), then ``MADV_DONTNEED``. Kept so that
bench/load_cached.py can measure it against the current checker in the same run
(contenders ``ws-open-prev``, ``ws-iter-prev``); not used by the client.
"""

from __future__ import annotations

import mmap
import threading

import xxhash as _xxhash

from client.errors import WarmstartError
from client.verify import AHEAD, CorruptPieceError


class PrevBlobCheck:
    """Pieces of one open blob, hashed on a thread ahead of the loader; :meth:`ensure` blocks until a range passed.

    Thread-safe (the device ring calls :meth:`ensure` from its reader threads).
    """

    def __init__(self, fd: int, blob: str, size: int, piece_size: int, hashes: list[str], label: str) -> None:
        self.blob = blob
        self.label = label
        self.size = size
        self.piece_size = piece_size
        self.hashes = hashes
        self._ok = [False] * len(hashes)
        self._asked: set[int] = set()  # pieces a caller waits for, not yet checked
        self._frontier = -1  # the furthest piece asked for; the thread reads up to AHEAD past it
        self._ahead = max(1, AHEAD // piece_size)
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) if size else None
        self._thread = threading.Thread(target=self._run, name="warmstart-check", daemon=True)
        self._thread.start()

    def ensure(self, offset: int, nbytes: int) -> None:
        """Return once every piece holding bytes [offset, offset + nbytes) matched; raise if one did not."""
        if nbytes <= 0 or not self._ok:
            return
        first = min(offset // self.piece_size, len(self._ok) - 1)
        last = min((offset + nbytes - 1) // self.piece_size, len(self._ok) - 1)
        with self._cond:
            todo = [i for i in range(first, last + 1) if not self._ok[i]]
            if todo:
                self._asked.update(todo)
                self._frontier = max(self._frontier, last)
                self._cond.notify_all()
            while True:
                if self._error is not None:
                    raise self._error
                if all(self._ok[i] for i in todo):
                    return
                if self._closed:
                    raise WarmstartError(f"{self.label}: the check of {self.blob} was stopped")
                self._cond.wait(1.0)

    def _next(self) -> int | None:
        """The piece to hash now (lowest asked first, then read-ahead); None to wait. Under the lock."""
        if self._asked:
            return min(self._asked)
        for i in range(max(0, self._frontier + 1), min(len(self._ok), self._frontier + 1 + self._ahead)):
            if not self._ok[i]:
                return i
        return None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    i = self._next()
                    while not self._closed and i is None:
                        self._cond.wait(1.0)
                        i = self._next()
                    if self._closed or i is None:
                        return
                ok = self._hash(i) == self.hashes[i]
                with self._cond:
                    self._asked.discard(i)
                    if not ok:
                        start = i * self.piece_size
                        end = min(self.size, start + self.piece_size)
                        self._error = CorruptPieceError(
                            f"{self.label}: piece {i} (bytes {start}-{end}) of the cached {self.blob} does not"
                            " match its recorded xxh3-128 hash: the file on disk is corrupt",
                            self.blob, i,
                        )  # fmt: skip
                        self._cond.notify_all()
                        return
                    self._ok[i] = True
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting loader
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _hash(self, i: int) -> str:
        assert self._mm is not None
        start = i * self.piece_size
        end = min(self.size, start + self.piece_size) if len(self.hashes) > 1 else self.size
        with memoryview(self._mm) as view:
            digest = str(_xxhash.xxh3_128(view[start:end]).hexdigest())
        # Unmap what was read: the pages stay in the page cache for the loader, not in this process.
        page_start = start - start % mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, page_start, end - page_start)
        return digest

    def close(self) -> None:
        """Stop the thread and unmap. Idempotent; waiters still blocked raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
