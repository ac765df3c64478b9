"""``copy=True`` loads of one safetensors file: read once, straight into one buffer of its own, near the disk's speed.

Why not one read per tensor into fresh memory (what ``copy=True`` did before): cold,
that was the checker's read from disk into the page cache, then a second copy from
the page cache into memory the process touched for the first time, one tensor at a
time, page fault by page fault: 2.25 s for 1 GiB on a machine that reads it in
0.66 s (issue 22). :class:`FileCopy` instead

- allocates ONE destination buffer for the file's data section (``torch.empty``,
  uint8), placed so that every file offset keeps its alignment in memory (O_DIRECT
  needs 4 KiB, tensors their element size);
- fills it from :data:`THREADS` threads, each taking the next :data:`CHUNK` of the
  file: pages not in the page cache (``mincore``) are read with ``O_DIRECT`` (the
  disk writes into the buffer: no page-cache copy, no second pass), pages already
  cached with a plain ``pread``; the few unaligned bytes at the edges always with
  ``pread``;
- hashes each piece of the blob from the buffer itself once all its bytes arrived
  (``check.check_piece``, client/verify.py): the bytes handed out are the bytes
  verified, and the file is read once, not once to check and once to copy;
- hands out each tensor as a view of the buffer (dtype and shape from the header)
  only once every piece under it (and under the header) matched its recorded hash;
  a tensor whose offset is misaligned for its element type is copied out;
- faults the buffer in (``MADV_POPULATE_WRITE``) on a thread of its own, a chunk at a
  time ahead of the readers (:data:`PREFAULT`): the zeroing of fresh memory then happens
  beside the reads, not inside them while the disk waits;
- can start reading before :meth:`FileCopy.tensors` is called (:meth:`FileCopy.start`),
  and tells its loader when every chunk is under way (:meth:`FileCopy.then`): the loader
  starts the next file's reads there, so the disk's queue does not drain between files.

Memory: the buffer lives as long as any tensor viewing it (one tensor kept keeps the
file's data section); untouched parts (tensors not selected) take no memory. Files
still arriving (a streaming load) work the same way: each chunk waits for its bytes
to be on disk first (``wait``), and pages just written are in the page cache, so
they are read with ``pread``. Figures: bench/RESULTS.md, "Loading a cached model".
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Protocol

import torch

from client._buffers import writable_bytes
from client.errors import MalformedFileError, WarmstartError
from client.safetensors_header import TensorInfo, read_header_with

CHUNK = 16 * 1024 * 1024  # one read of a copy thread; a multiple of ALIGN (and of the agent's default piece size)
STREAM_CHUNK = 1024 * 1024  # the read of a file still arriving: a tensor comes as soon as its bytes do
THREADS = 3  # reads in flight: the disk needs a few queued to reach its limit, the CPU hashes meanwhile
ALIGN = 4096  # O_DIRECT alignment of file offsets, lengths and memory (the largest logical block size in use)
# Ask for transparent huge pages under the buffer (madvise MADV_HUGEPAGE): the reads then fault in 2 MiB at a
# time instead of 4 KiB (512x fewer faults; page faults were most of copy=True's CPU). Where THP is off, a no-op.
HUGE_PAGES = True
# Fault the buffer in (madvise MADV_POPULATE_WRITE, Linux 5.14+) on a thread of its own, chunk by chunk ahead of
# the reads: otherwise each O_DIRECT read first faults and zeroes its fresh pages inside the read, and the disk
# waits for that. Only for a file with pages to read from disk (not for one all in the page cache). Where the kernel
# lacks it, the prefaulter stops at its first refusal and the reads fault as before.
PREFAULT = True
_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_MAX_READ = 1 << 30  # Linux returns at most 0x7ffff000 bytes per read

# wait(offset, nbytes) blocks until those bytes of the file are on disk (a file still arriving)
Wait = Callable[[int, int], None]


class PieceCheck(Protocol):
    """Recorded piece hashes of one blob (client/verify.py's BlobCheck)."""

    @property
    def pieces(self) -> int:
        """How many pieces the blob has."""

    def piece_range(self, i: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of piece ``i``."""

    def check_piece(self, i: int, parts: Sequence[memoryview | bytes]) -> None:
        """Hash piece ``i`` from ``parts``; raise :class:`client.verify.CorruptPieceError` on a mismatch."""


class FileCopy:
    """One open safetensors file read into one buffer; :meth:`tensors` yields views of it, each once verified.

    The header is read (through ``wait`` when given) on construction; it is only
    trusted for what it says once the pieces under it matched (a header that does
    not parse, with a checker, is checked first, so a corrupt one is reported as
    such). ``fd`` stays the caller's to close, after :meth:`tensors` ended.

    ``chunk``: bytes per read (a multiple of :data:`ALIGN`). ``direct=False``: never
    O_DIRECT (a file still being written: its new pages are in the page cache, and an
    O_DIRECT read would first force their write-back). Where ``mincore`` cannot tell
    what is cached, every aligned read is O_DIRECT.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        check: PieceCheck | None = None,
        wait: Wait | None = None,
        chunk: int = CHUNK,
        direct: bool = True,
    ) -> None:
        if chunk <= 0 or chunk % ALIGN:
            raise ValueError(f"chunk must be a positive multiple of {ALIGN}, got {chunk}")
        self.name = name
        self._chunk = chunk
        self._fd = fd
        self._check = check
        self._wait = wait
        self._direct = direct
        self.file_size = os.fstat(fd).st_size
        try:
            self.header, self._prefix = read_header_with(self._read_exact, self.file_size, name=name)
        except MalformedFileError:
            if check is not None:
                self._check_prefix_pieces()  # CorruptPieceError when the header's bytes are not the recorded ones
            raise
        self.data_start = self.header.data_start
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._direct_fd = -1
        self._started = False
        self._drained = False  # every chunk taken by a reader (the :meth:`then` point)
        self._on_drained: Callable[[], None] | None = None
        self._ready: Callable[[TensorInfo], bool] | None = None  # set once the plan is made

    # ------------------------------------------------------------------ reading the header

    def _read_exact(self, offset: int, nbytes: int) -> bytes:
        if self._wait is not None:
            self._wait(offset, nbytes)
        out = bytearray()
        while len(out) < nbytes:
            chunk = os.pread(self._fd, nbytes - len(out), offset + len(out))
            if not chunk:
                raise MalformedFileError(f"{self.name}: file ended at byte {offset + len(out)} (truncated?)")
            out += chunk
        return bytes(out)

    def _check_prefix_pieces(self) -> None:
        """Check the pieces holding the first bytes of the file (where a header lives), read with pread."""
        assert self._check is not None
        start, end = self._check.piece_range(0)
        self._check.check_piece(0, [self._read_exact(start, end - start)])

    # ------------------------------------------------------------------ the plan

    def start(self, infos: Sequence[TensorInfo]) -> None:
        """Start reading the bytes ``infos`` need (the tensors :meth:`tensors` will be given), once; thread-safe.

        Called ahead of :meth:`tensors` to overlap this file's reads with another's
        (:meth:`then`); :meth:`tensors` calls it itself otherwise. A failure here is
        kept and raised by :meth:`tensors`, not by the caller (which may be another
        file's reader thread). Nothing starts once :meth:`close` was called.
        """
        with self._cond:
            if self._started or self._closed:
                return
            self._started = True
        try:
            self._start(infos)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self._fail(exc)

    def then(self, start_next: Callable[[], None]) -> None:
        """Call ``start_next`` (once, on a reader thread) when every chunk of this file has been taken by a reader.

        Why: the loader reads files one after another, and each file's last reads
        leave the disk's queue draining while they finish and are hashed; starting
        the next file's reads then keeps it full. Called at once if that point has
        passed; never if this copy is closed or failed before it.
        """
        with self._cond:
            if not self._drained:
                self._on_drained = start_next
                return
            if self._closed or self._error is not None:
                return
        start_next()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _mark_drained(self) -> None:
        """Every chunk is taken: run the :meth:`then` hook, once, unless stopped."""
        with self._cond:
            if self._drained:
                return
            self._drained = True
            hook, self._on_drained = self._on_drained, None
            if self._closed or self._error is not None:
                return
        if hook is not None:
            hook()

    def _spawn(self, target: Callable[[], None], name: str) -> bool:
        """Start a thread of this copy unless it was closed (then False): :meth:`close` joins every one started."""
        with self._cond:
            if self._closed:
                return False
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            return True

    def tensors(self, infos: Sequence[TensorInfo]) -> Generator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``infos`` (tensors of this file, in file order), each once its bytes are in.

        Reading starts on the first ``next`` unless :meth:`start` (with the same
        ``infos``) started it before; threads stop when the generator ends or is closed.
        """
        try:
            self.start(infos)
            for t in infos:
                with self._cond:
                    while self._ready is None or not self._ready(t):
                        if self._error is not None:
                            raise self._error
                        if self._closed:
                            raise WarmstartError(f"{self.name}: the load was stopped")
                        self._cond.wait(1.0)
                yield t.name, self._tensor(t)
        finally:
            self.close()

    def _start(self, infos: Sequence[TensorInfo]) -> None:
        """Allocate the buffer, plan the chunks and pieces ``infos`` need, and start the reader threads."""
        data_size = self.file_size - self.data_start
        raw = torch.empty(data_size + ALIGN, dtype=torch.uint8)
        shift = (self.data_start - raw.data_ptr()) % ALIGN  # file offset o sits at an address = o (mod ALIGN)
        self.buffer = raw[shift : shift + data_size]
        if HUGE_PAGES and data_size >= 4 * _HUGE:
            _advise_huge(self.buffer.data_ptr(), data_size)
        view = writable_bytes(self.buffer) if data_size else memoryview(b"")
        wanted = [(t.offset, t.offset + t.nbytes) for t in infos if t.nbytes]
        check = self._check
        # pieces (with a checker) that must match before anything is handed out: those under the header
        header_pieces: set[int] = set()
        ranges = wanted
        if check is not None:
            header_pieces = set(self._pieces_over(0, self.data_start))
            needed = header_pieces.union(*(self._pieces_over(a, b) for a, b in wanted))
            ranges = [check.piece_range(i) for i in sorted(needed)]
        chunk_ids = sorted({c for a, b in ranges for c in self._chunks_over(max(a, self.data_start), b)})
        pieces_of: dict[int, list[int]] = {c: [] for c in chunk_ids}
        remaining: dict[int, int] = {}
        if check is not None:
            for i in sorted(needed):
                a, b = check.piece_range(i)
                over = self._chunks_over(max(a, self.data_start), b)
                remaining[i] = len(over)
                for c in over:
                    pieces_of[c].append(i)
        done_chunks: set[int] = set()
        ok_pieces: set[int] = set()

        def hash_piece(i: int) -> None:
            assert check is not None
            a, b = check.piece_range(i)
            parts: list[memoryview | bytes] = []
            if a < self.data_start:
                parts.append(self._prefix[a : min(b, self.data_start)])
            if b > self.data_start:
                parts.append(view[max(a, self.data_start) - self.data_start : b - self.data_start])
            check.check_piece(i, parts)
            with self._cond:
                ok_pieces.add(i)
                self._cond.notify_all()

        if check is not None:  # pieces wholly inside the header: their bytes are all in hand already
            for i in [i for i, n in remaining.items() if n == 0]:
                hash_piece(i)
        todo = iter(chunk_ids)
        # the first THREADS chunks are faulted by their readers, who start on them at once; set below once it is
        # known that some reads go to the disk (O_DIRECT): a file all in the page cache is read by CPU-bound
        # copies, which a fourth thread zeroing memory beside them only slows (bench/RESULTS.md, warm)
        ahead: list[int] = []

        def prefault() -> None:
            for c in ahead:
                with self._cond:
                    if self._closed or self._error is not None:
                        return
                start, end = self._chunk_range(c)
                if not _populate(self.buffer.data_ptr() + start - self.data_start, end - start):
                    return

        def work() -> None:
            try:
                while True:
                    with self._cond:
                        c = None if self._closed or self._error is not None else next(todo, None)
                    if c is None:
                        self._mark_drained()
                        return
                    start, end = self._chunk_range(c)
                    if self._wait is not None:
                        self._wait(start, end - start)
                    self._read_chunk(view, start, end, resident)
                    full: list[int] = []
                    with self._cond:
                        done_chunks.add(c)
                        for i in pieces_of[c]:
                            remaining[i] -= 1
                            if remaining[i] == 0:
                                full.append(i)
                        self._cond.notify_all()
                    for i in full:
                        hash_piece(i)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
                self._fail(exc)

        def ready(t: TensorInfo) -> bool:
            if check is None:
                return all(c in done_chunks for c in self._chunks_over(t.offset, t.offset + t.nbytes))
            over = self._pieces_over(t.offset, t.offset + t.nbytes) if t.nbytes else []
            return all(i in ok_pieces for i in header_pieces) and all(i in ok_pieces for i in over)

        resident = self._resident_pages() if chunk_ids and self._direct else None
        if chunk_ids and self._direct and (resident is None or resident.count(0)):
            direct_fd = _open_direct(self._fd)
            with self._cond:
                if not self._closed:
                    self._direct_fd, direct_fd = direct_fd, -1
            if direct_fd >= 0:  # closed meanwhile: close() has already looked for it
                os.close(direct_fd)
        if PREFAULT and self._direct_fd >= 0:
            ahead = chunk_ids[THREADS:]
        with self._cond:
            self._ready = ready
            self._cond.notify_all()
        for n in range(min(THREADS, len(chunk_ids))):
            self._spawn(work, f"warmstart-copy-{n}")
        if ahead:
            self._spawn(prefault, "warmstart-copy-prefault")
        if not chunk_ids:  # nothing to read: the next file may start at once
            self._mark_drained()

    def _tensor(self, t: TensorInfo) -> torch.Tensor:
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        flat = self.buffer[t.offset - self.data_start : t.offset - self.data_start + t.nbytes]
        if t.offset % t.dtype.itemsize:
            flat = flat.clone()  # misaligned for its element type: memory of its own, aligned
        return flat.view(t.dtype).view(t.shape)

    def _chunk_range(self, c: int) -> tuple[int, int]:
        return max(c * self._chunk, self.data_start), min((c + 1) * self._chunk, self.file_size)

    def _chunks_over(self, a: int, b: int) -> list[int]:
        """The chunks (numbered by file offset // chunk size) that hold bytes of ``[a, b)``."""
        return list(range(a // self._chunk, (b - 1) // self._chunk + 1)) if b > a else []

    def _pieces_over(self, a: int, b: int) -> list[int]:
        assert self._check is not None
        if b <= a:
            return []
        start0, end0 = self._check.piece_range(0)
        size = end0 - start0
        last = self._check.pieces - 1
        return list(range(min(a // size, last), min((b - 1) // size, last) + 1))

    # ------------------------------------------------------------------ reading the data

    def _read_chunk(self, view: memoryview, start: int, end: int, resident: bytes | None) -> None:
        """Bytes ``[start, end)`` of the file into their place in the buffer: O_DIRECT where not cached."""
        dest = view[start - self.data_start : end - self.data_start]
        a, b = -(-start // ALIGN) * ALIGN, end // ALIGN * ALIGN
        direct = self._direct_fd >= 0 and b > a
        if direct and resident is not None:
            pages = resident[start // mmap.PAGESIZE : -(-end // mmap.PAGESIZE)]
            direct = pages.count(0) * 2 > len(pages)  # mostly not in the page cache
        if not direct:
            self._pread(self._fd, dest, start)
            return
        self._pread(self._fd, dest[: a - start], start)
        try:
            self._pread(self._direct_fd, dest[a - start : b - start], a, direct=True)
        except OSError as exc:  # a file system or device that refuses this O_DIRECT read: read it the plain way
            if exc.errno not in (22, 95):  # EINVAL, EOPNOTSUPP
                raise
            self._pread(self._fd, dest[a - start : b - start], a)
        self._pread(self._fd, dest[b - start :], b)

    def _pread(self, fd: int, dest: memoryview, offset: int, direct: bool = False) -> None:
        done = 0
        while done < len(dest):
            n = os.preadv(fd, [dest[done : done + _MAX_READ]], offset + done)
            if n == 0:
                raise MalformedFileError(
                    f"{self.name}: file ended at byte {offset + done}, inside its data (truncated while loading?)"
                )
            done += n
            if direct and done % ALIGN and done < len(dest):  # a short O_DIRECT read off the grid: finish plainly
                self._pread(self._fd, dest[done:], offset + done)
                return

    def _resident_pages(self) -> bytes | None:
        """One byte per page of the file, 0 where it is not in the page cache (``mincore``); None if unknown."""
        return _mincore(self._fd, self.file_size)

    def close(self) -> None:
        """Stop reading (threads finish their current chunk) and close the O_DIRECT descriptor. Idempotent."""
        with self._cond:
            self._closed = True
            self._on_drained = None
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            fd, self._direct_fd = self._direct_fd, -1
        if fd >= 0:
            os.close(fd)


def _open_direct(fd: int) -> int:
    """A second descriptor of ``fd``'s file opened with O_DIRECT, or -1 where that is not possible.

    A new open (through /proc), not ``fcntl``: O_DIRECT set on ``fd`` itself would
    change the file description the caller (and its flock) shares.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | flag)
    except OSError:
        return -1


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
    return _libc


def _advise_huge(addr: int, size: int) -> None:
    """madvise(MADV_HUGEPAGE) over the 2 MiB-aligned part of ``[addr, addr + size)``; failures ignored (advice)."""
    start, end = -(-addr // _HUGE) * _HUGE, (addr + size) // _HUGE * _HUGE
    if end <= start or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        _load_libc().madvise(start, end - start, _MADV_HUGEPAGE)


def _populate(addr: int, size: int) -> bool:
    """Fault in ``[addr, addr + size)`` writable (madvise MADV_POPULATE_WRITE); False where the kernel refuses.

    The pages' contents are not changed: pages already present (a read got there
    first) are left as they are, absent ones come in zeroed, as a first write would
    bring them. Whole pages only: the range is trimmed to the 4 KiB pages inside it.
    """
    start, end = -(-addr // ALIGN) * ALIGN, (addr + size) // ALIGN * ALIGN
    if end <= start or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_load_libc().madvise(start, end - start, _MADV_POPULATE_WRITE) == 0)
    except (OSError, AttributeError):
        return False


def _mincore(fd: int, size: int) -> bytes | None:
    """Which pages of ``fd``'s first ``size`` bytes are in the page cache; None where ``mincore`` is not to be had."""
    if size <= 0 or not hasattr(os, "O_DIRECT"):
        return None
    try:
        libc = _load_libc()
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return bytes(vec)
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError):
        return None

