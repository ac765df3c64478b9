"""Body buffers lent to sinks: page-aligned, reused, and kept past a sink's call on request.

Origins read bodies into these (agent/origins/range_http.py from sockets,
agent/origins/local.py from files) instead of letting each read make new
memory: a new 1 MiB buffer page-faults 256 times, and on a VM whose host takes
free memory back each of those faults costs more. Every byte sits at a buffer
position congruent with its file offset modulo :data:`ALIGN`, so the fill can
write whole pages with ``O_DIRECT`` straight from the buffer (agent/fill.py).
A sink that needs a chunk after it returns (the fill's whole-file hash, which
goes in file order while pieces arrive in parallel) keeps it with
:meth:`Batch.keep`; the origin then reads on into another buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import threading
from collections.abc import Sequence

# Large enough that the sink (a thread hop per call) runs about once per MiB; the
# fill splits what it writes through the page cache into its own smaller writes.
BUFFER_SIZE = 1024 * 1024
# Body bytes sinks may keep past their call (Batch.keep), for all fills together: enough for
# the pieces in flight (16 connections x 16 MiB) to wait for the whole-file hash, which
# takes them in file order. Past it a fill hashes from the file, from disk after O_DIRECT.
KEEP_MAX = 256 * 1024 * 1024
# Buffers kept between fetches for the next ones (an idle agent holds this much); the rest
# of what a fetch used is unmapped when given back.
SPARE_BUFFERS = 64
# Body bytes land at buffer positions congruent with their file offset modulo this, so
# whole pages can go to the disk with O_DIRECT from the buffer (agent/fill.py).
ALIGN = 4096

class BufferPool:
    """Page-aligned body buffers kept for reuse, shared by every connection of a client.

    Reusing them is the point: a new 1 MiB buffer is fresh memory, and writing into
    it page-faults 256 times. Connections hold buffers only while reading an answer,
    so idle connections hold none; sinks hold the ones they kept (at most KEEP_MAX).
    ``take`` and ``give`` run on the event loop; ``lend`` and the return of a kept
    buffer may come from the store's threads.
    """

    def __init__(self) -> None:
        self._spare: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.kept = 0  # bytes of buffers sinks kept and have not released

    def take(self) -> mmap.mmap:
        return self._spare.pop() if self._spare else mmap.mmap(-1, BUFFER_SIZE)

    def give(self, buf: mmap.mmap) -> None:
        if len(self._spare) < SPARE_BUFFERS:
            self._spare.append(buf)

    def lend(self) -> bool:
        """Count one more kept buffer; False when sinks already keep KEEP_MAX."""
        with self._lock:
            if self.kept + BUFFER_SIZE > KEEP_MAX:
                return False
            self.kept += BUFFER_SIZE
            return True

    def returned(self, buf: mmap.mmap) -> None:
        """A kept buffer is free again (on the loop)."""
        with self._lock:
            self.kept -= BUFFER_SIZE
        self.give(buf)


class Lease:
    """A kept chunk: its view stays valid until :meth:`release` (once, from any thread)."""

    def __init__(self, pool: BufferPool, buf: mmap.mmap, loop: asyncio.AbstractEventLoop) -> None:
        self._pool, self._buf, self._loop = pool, buf, loop
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            buf, self._buf = self._buf, None
        if buf is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nothing to return to
                self._loop.call_soon_threadsafe(self._pool.returned, buf)


class Batch(list[memoryview]):
    """One hand-off of body chunks to a sink, each at a buffer position aligned like its file offset.

    ``aligned`` tells the fill that whole pages of these chunks can be written
    with O_DIRECT. A sink calls :meth:`keep` (from any thread, before it returns)
    for a chunk it still needs afterwards.
    """

    aligned = True

    def __init__(self, ready: Sequence[tuple[mmap.mmap, int, int]], pool: BufferPool) -> None:
        super().__init__(memoryview(buf)[start:end] for buf, start, end in ready)
        self._bufs = [buf for buf, _, _ in ready]
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.kept = [False] * len(ready)

    def keep(self, index: int) -> Lease | None:
        """Keep chunk ``index`` valid past the sink's call; None when sinks keep too much already."""
        if not self._pool.lend():
            return None
        self.kept[index] = True
        return Lease(self._pool, self._bufs[index], self._loop)
