"""Fill a mapping's pages ahead of its reader: large reads from a few threads, not 4 KiB page faults.

A zero-copy CPU load hands out views of a private mapping of a cache file.
Left alone, the first touch of each page faults, and the kernel's readahead
serves those faults one window at a time for one thread: the disk sees a
queue one or two requests deep. Here a few threads run ahead
of the reader, each taking the next chunk: it queues the whole chunk's reads
at once (``posix_fadvise(WILLNEED)``: the disk sees a deep queue of large
requests, as with large positional reads), then waits for them and maps the
pages (``madvise(MADV_POPULATE_READ)``, Linux 5.14+), so the reader takes no
fault at all. They stay within a window ahead of the reader, so memory use is
what it would be anyway. On older kernels the mapping step is skipped: the
reader still faults, but on pages already read.

Measured (bench/load_cached.py, 1 GiB cold, 2-core VM): queueing plus
populating 32 MiB chunks from 4 threads reached 0.93-0.95x of 4 threads of
plain positional reads; populating alone 0.82x; page faults alone 0.6-0.7x.

Warming is only an optimisation: if the kernel refuses, the reader faults the
pages in itself as before, so nothing here ever raises into a load.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Callable, Iterable

MADV_POPULATE_READ = 22  # linux/mman.h, since Linux 5.14
DEFAULT_THREADS = 4
DEFAULT_CHUNK = 32 * 1024 * 1024
DEFAULT_WINDOW = 256 * 1024 * 1024

_populate_supported = True  # cleared the first time the kernel does not know MADV_POPULATE_READ


def _load_madvise() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)  # calls through ctypes release the GIL
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def page_chunks(ranges: Iterable[tuple[int, int]], chunk: int, page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges, page-aligned, merged where they touch and cut into ``chunk``-sized pieces."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        start, end = offset - offset % page, offset + length
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(pos, min(chunk, end - pos)) for start, end in merged for pos in range(start, end, chunk)]


class Readahead:
    """Threads that populate ``ranges`` of a mapping in order, at most ``window`` bytes ahead of :meth:`wait`.

    ``address`` is where the mapping of ``fd`` starts in this process. The
    mapping and ``fd`` must stay valid until :meth:`close` returns.
    """

    def __init__(
        self,
        address: int,
        fd: int,
        ranges: Iterable[tuple[int, int]],
        *,
        threads: int = DEFAULT_THREADS,
        chunk: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._address, self._fd = address, fd
        self._chunks = page_chunks(ranges, chunk)
        self._ends = [off + n for off, n in self._chunks]
        self._ahead = max(1, window // chunk)
        self._done = [False] * len(self._chunks)
        self._next = 0  # next chunk a worker takes
        self._reader = 0  # first chunk the reader still needs
        self._stopped = False
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"warmstart-readahead-{i}", daemon=True)
            for i in range(min(threads, len(self._chunks)))
        ]
        for t in self._threads:
            t.start()

    def wait(self, offset: int, nbytes: int) -> None:
        """Block until the chunks holding ``[offset, offset + nbytes)`` are populated (or warming gave up)."""
        if nbytes <= 0 or not self._chunks:
            return
        first = bisect.bisect_right(self._ends, offset)  # the first chunk ending beyond offset
        last = bisect.bisect_right(self._ends, offset + nbytes - 1)
        with self._cond:
            self._reader = max(self._reader, first)
            self._cond.notify_all()
            while not self._stopped and not all(self._done[first : last + 1]):
                self._cond.wait()

    def close(self) -> None:
        """Stop the workers (a populate in progress finishes first) and wait for them."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._next < len(self._chunks) and self._next - self._reader >= self._ahead:
                    self._cond.wait()
                if self._stopped or self._next >= len(self._chunks):
                    return
                index = self._next
                self._next += 1
            ok = self._populate(*self._chunks[index])
            with self._cond:
                self._done[index] = True
                if not ok:
                    self._stopped = True  # the reader faults the rest in itself
                self._cond.notify_all()

    def _populate(self, offset: int, length: int) -> bool:
        global _populate_supported
        try:  # queue the whole chunk's reads at once (deep queue), then wait for them and map them
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            return False
        if _populate_supported and _madvise is not None:
            if _madvise(self._address + offset, length, MADV_POPULATE_READ) == 0:
                return True
            if ctypes.get_errno() != 22:  # EINVAL: an older kernel; anything else (EIO, EFAULT): give up
                return False
            _populate_supported = False
        return True  # the reads are queued; the reader faults on pages already arriving

