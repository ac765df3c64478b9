"""Check a cached blob against its recorded piece hashes before any of its bytes reach a caller.

A blob in the node cache was verified when it was written, but disks rot and
files get scribbled on; the client reads blobs itself (zero-copy mapping for CPU
tensors, positional reads into pinned buffers for a device), so the agent never
sees those reads. :class:`BlobCheck` therefore re-hashes (xxh3-128) every piece
that holds a requested byte, and the loader hands out a tensor only once the
pieces under it matched.

Why threads reading ahead of the loader, with positional reads: for a zero-copy
``open_tensors`` the loader maps the file and touches nothing, so the checker IS the
cold read of the model and must go as fast as the disk. :data:`THREADS` threads take
pieces (the lowest one a caller waits for first, then read-ahead, at most
:data:`AHEAD` bytes past the furthest piece asked for) and read each with ``os.preadv``
of :data:`CHUNK` bytes into a buffer they reuse, on a descriptor of the checker's own
(``POSIX_FADV_SEQUENTIAL``: the kernel's read-ahead window doubled), feeding an
incremental xxh3-128 (GIL released). The kernel's read-ahead keeps several large disk
reads in flight and fills the page cache with large folios, which the loader's mapping
or reads then hit. The previous checker, one thread page-faulting through a read-only
mapping, kept 1-2 disk reads in flight (``open_tensors`` 0.3-0.76x the machine's read
limit cold), and a file truncated or unreadable under it killed the process
(``SIGBUS``); a short read is now a :class:`CorruptPieceError`, an I/O error an
``OSError``. Handing the window to the kernel first (:data:`WILLNEED`) was tried and
left off. Pieces are checked once per open. Figures: bench/RESULTS.md, "Checking cached
blobs while loading".

The threads start on the first :meth:`BlobCheck.ensure`. A loader that reads the blob into
memory of its own (``copy=True``, client/copy_read.py) starts none: it hashes each piece
from its buffer with :meth:`BlobCheck.check_piece`, so the file is read once, and the
bytes it hands out are the very bytes that matched.

The expected hashes are ``meta/<digest>.json`` (``{"size", "piece_size",
"pieces"}``, written by the agent when it published the blob). When that record is
missing or malformed the whole file is checked against its name (the blob's
xxh3-128), before its first byte is handed out.

What is not covered: files still being filled (their pieces were hashed by the
agent from the bytes it wrote, moments before; see client/stream.py), and pages
of a zero-copy tensor that the kernel drops later and reads again from disk.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from types import ModuleType

from client.errors import IntegrityError, WarmstartError

_xxhash: ModuleType | None
try:
    import xxhash as _xxhash
except ImportError:  # an image with torch alone: the agent checks instead (see client.iter_tensors)
    _xxhash = None

AHEAD = 64 * 1024 * 1024  # how far past the furthest byte asked for the checker may read
CHUNK = 1024 * 1024  # one positional read of a checker thread: fits a core's L2, where the hash then reads it
THREADS = 2  # checker threads per open blob: reads in flight while the other hashes
# Hand the read-ahead window to the kernel (posix_fadvise WILLNEED) before reading: more disk reads in
# flight, but the kernel then fills the page cache with 4 KiB folios (not the large ones its own read-ahead
# makes), so every later mapping of those pages takes ~2.5x the page faults. Off; see bench/RESULTS.md.
WILLNEED = False
MAX_META_BYTES = 16 * 1024 * 1024  # 32 hex digits + quotes per piece: ample for any blob
_HEX128 = re.compile(r"^[0-9a-f]{32}$")

# Read buffers kept between opens: a fresh one per thread per blob costs page faults and zeroing every time.
_spare_buffers: list[bytearray] = []
_spare_lock = threading.Lock()
_MAX_SPARE = 8


def _take_buffer(size: int) -> bytearray:
    with _spare_lock:
        while _spare_buffers:
            buf = _spare_buffers.pop()
            if len(buf) == size:
                return buf
    return bytearray(size)


def _give_buffer(buf: bytearray) -> None:
    with _spare_lock:
        if len(_spare_buffers) < _MAX_SPARE:
            _spare_buffers.append(buf)


def available() -> bool:
    """Whether this process can hash (the ``xxhash`` package is installed)."""
    return _xxhash is not None


class CorruptPieceError(IntegrityError):
    """A piece of a cached blob does not match its recorded hash; ``blob`` is its path relative to the cache."""

    def __init__(self, message: str, blob: str, piece: int) -> None:
        super().__init__(message)
        self.blob = blob
        self.piece = piece


def expected_hashes(cache_dir: str, digest: str, size: int) -> tuple[int, list[str]]:
    """``(piece_size, hashes)`` for blob ``digest`` of ``size`` bytes; the whole file as one piece when unrecorded.

    The record is untrusted input: anything that does not describe exactly
    this blob is ignored in favour of the whole-file hash, which is its name.
    """
    whole = (max(size, 1), [digest])
    try:
        with open(os.path.join(cache_dir, "meta", f"{digest}.json"), "rb") as f:
            meta = json.loads(f.read(MAX_META_BYTES + 1))
    except (OSError, ValueError):
        return whole
    if not isinstance(meta, dict):
        return whole
    piece_size, pieces = meta.get("piece_size"), meta.get("pieces")
    if meta.get("size") != size or not isinstance(piece_size, int) or piece_size <= 0 or not isinstance(pieces, list):
        return whole
    if len(pieces) != -(-size // piece_size) or not all(isinstance(p, str) and _HEX128.match(p) for p in pieces):
        return whole
    return piece_size, pieces


class BlobCheck:
    """Pieces of one open blob, hashed by threads ahead of the loader; :meth:`ensure` blocks until a range passed.

    Thread-safe (the device ring calls :meth:`ensure` from its reader threads).
    """

    def __init__(self, fd: int, blob: str, size: int, piece_size: int, hashes: list[str], label: str) -> None:
        if _xxhash is None:
            raise WarmstartError("checking cached blobs needs the xxhash package (pip install xxhash)")
        self.blob = blob
        self.label = label
        self.size = size
        self.piece_size = piece_size
        self.hashes = hashes
        self._ok = [False] * len(hashes)
        self._busy: set[int] = set()  # pieces a thread is hashing now
        self._asked: set[int] = set()  # pieces a caller waits for, not yet checked
        self._frontier = -1  # the furthest piece asked for; the threads read up to AHEAD past it
        self._ahead = max(1, AHEAD // piece_size)
        self._advised = 0  # bytes below this were already handed to the kernel's read-ahead (fadvise WILLNEED)
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        # A descriptor of our own: the loader may close its one (and the number be reused) while we still read.
        self._fd = os.dup(fd)
        self._threads: list[threading.Thread] = []
        self._started = False  # threads start on the first ensure(): a caller that hashes its own reads needs none
        try:
            if size and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger kernel read-ahead window
        except BaseException:
            self.close()
            raise

    @property
    def pieces(self) -> int:
        """How many pieces the blob has (one when no piece record was found: the whole file)."""
        return len(self.hashes)

    def piece_range(self, i: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of the blob that piece ``i`` covers."""
        start = i * self.piece_size
        end = min(self.size, start + self.piece_size) if len(self.hashes) > 1 else self.size
        return start, end

    def check_piece(self, i: int, parts: Sequence[memoryview | bytes]) -> None:
        """Hash piece ``i`` from ``parts`` (its bytes, in order, read by the caller) and record the verdict.

        For a loader that reads the blob into memory of its own (client/copy_read.py):
        the bytes it hands out are the very bytes hashed here, not a second read of the
        file. Raises :class:`CorruptPieceError` (and fails every later :meth:`ensure`)
        when they do not match, or are not exactly the piece's length.
        """
        assert _xxhash is not None
        start, end = self.piece_range(i)
        hasher = _xxhash.xxh3_128()
        got = 0
        for part in parts:
            hasher.update(part)
            got += len(part)
        ok = got == end - start and str(hasher.hexdigest()) == self.hashes[i]
        with self._cond:
            if not ok:
                error = self._corrupt(i)
                if self._error is None:
                    self._error = error
                self._cond.notify_all()
                raise error
            self._ok[i] = True
            self._cond.notify_all()

    def _corrupt(self, i: int) -> CorruptPieceError:
        start, end = self.piece_range(i)
        return CorruptPieceError(
            f"{self.label}: piece {i} (bytes {start}-{end}) of the cached {self.blob} does not"
            " match its recorded xxh3-128 hash: the file on disk is corrupt",
            self.blob, i,
        )  # fmt: skip

    def _start(self) -> None:
        """Start the hashing threads, once. Under the lock."""
        if self._started or self._closed:
            return
        self._started = True
        for n in range(min(THREADS, len(self.hashes))):
            thread = threading.Thread(target=self._run, name=f"warmstart-check-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def ensure(self, offset: int, nbytes: int) -> None:
        """Return once every piece holding bytes [offset, offset + nbytes) matched; raise if one did not."""
        if nbytes <= 0 or not self._ok:
            return
        first = min(offset // self.piece_size, len(self._ok) - 1)
        last = min((offset + nbytes - 1) // self.piece_size, len(self._ok) - 1)
        with self._cond:
            todo = [i for i in range(first, last + 1) if not self._ok[i]]
            if todo:
                self._start()
            self._asked.update(todo)
            if todo or last > self._frontier:
                # The frontier moves even over pieces already checked, or read-ahead would stall
                # there and the loader next wait for a cold read.
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
        asked = [i for i in self._asked if i not in self._busy]
        if asked:
            return min(asked)
        for i in range(max(0, self._frontier + 1), min(len(self._ok), self._frontier + 1 + self._ahead)):
            if not self._ok[i] and i not in self._busy:
                return i
        return None

    def _advise(self, i: int) -> tuple[int, int] | None:
        """The range to hand the kernel (:data:`WILLNEED`) before hashing piece ``i``; None if done. Under the lock.

        Up to the end of the read-ahead window (never past it), so the disk has
        many reads queued while the threads hash what already arrived.
        """
        end = min(self.size, (max(i, self._frontier) + 1 + self._ahead) * self.piece_size)
        start = max(self._advised, i * self.piece_size)
        if end <= start:
            return None
        self._advised = end
        return start, end - start

    def _run(self) -> None:
        buf = _take_buffer(CHUNK)
        try:
            while True:
                with self._cond:
                    i = self._next()
                    while not self._closed and self._error is None and i is None:
                        self._cond.wait(1.0)
                        i = self._next()
                    if self._closed or self._error is not None or i is None:
                        return
                    self._busy.add(i)
                    advice = self._advise(i)
                if advice is not None and WILLNEED and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fd, advice[0], advice[1], os.POSIX_FADV_WILLNEED)
                ok = self._hash(i, buf) == self.hashes[i]
                with self._cond:
                    self._busy.discard(i)
                    self._asked.discard(i)
                    if not ok:
                        self._error = self._corrupt(i)
                        self._cond.notify_all()
                        return
                    self._ok[i] = True
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting loader
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
        finally:
            _give_buffer(buf)

    def _hash(self, i: int, buf: bytearray) -> str:
        """xxh3-128 of piece ``i``, read with positional reads of up to :data:`CHUNK` bytes into ``buf``."""
        assert _xxhash is not None
        start, end = self.piece_range(i)
        hasher = _xxhash.xxh3_128()
        with memoryview(buf) as view:
            pos = start
            while pos < end:
                n = os.preadv(self._fd, [view[: min(len(view), end - pos)]], pos)
                if n <= 0:
                    raise CorruptPieceError(
                        f"{self.label}: the cached {self.blob} ended at byte {pos}, inside piece {i}"
                        f" (bytes {start}-{end}): the file on disk was truncated",
                        self.blob, i,
                    )  # fmt: skip
                hasher.update(view[:n])
                pos += n
        return str(hasher.hexdigest())

    def close(self) -> None:
        """Stop the threads and close our descriptor. Idempotent; waiters still blocked raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join()
        with self._cond:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
