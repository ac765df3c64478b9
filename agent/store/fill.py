"""A blob being filled: a preallocated file plus a durable record of verified pieces.

Layout under the cache root (see agent/store/store.py):

    partial/<fill key>.part   the preallocated file, written with positional writes
    partial/<fill key>.json   {"size", "piece_size", "done": {index: xxh3-128 hex}, "peers": {index: peer}}

``peers`` names the peer each piece came from (pieces from the origin are not
in it): a fill resumed after a restart still knows which pieces to fetch again
from the origin, and whom to penalise, if the whole file does not match.

A piece is recorded in the state file only after its bytes were written and
hashed, and the state file is replaced atomically, so after a crash (kill -9)
the recorded pieces are exactly the ones whose bytes reached the file. On
resume each recorded piece is hashed again against its record (catches a torn
write after a power loss) and only missing or damaged pieces are fetched.
The file only moves to ``blobs/`` once the whole-file digests check out.

Files here are opened without following links and given explicit modes
(agent/store/safeio.py): a link planted at a partial file's name is replaced,
never written through, and the name is checked to still be the file the fill
holds before it is renamed into ``blobs/``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import crc32c
import xxhash

from agent.manifest import FileEntry
from agent.store.safeio import BLOB_MODE, PARTIAL_MODE, create_exclusive, same_file, write_atomic
from client.errors import CapacityError, IntegrityError

log = logging.getLogger(__name__)

MAP_WINDOW = 64 * 1024 * 1024
IOV_MAX = 1024  # Linux's limit on buffers per pwritev
# What one pwritev may write: the fill measures which costs least here (WriteSizer).
# The kernel sizes new page-cache folios by the write, and what a folio size costs
# depends on the machine and moves with its state: on a VM whose free memory the
# host takes back (virtio_balloon) a large folio can be fresh host memory that
# costs several times the copy, while small writes cost a syscall and a GIL
# hand-off per 32 KiB. Measured here (bench/write_size.py and bench/RESULTS.md),
# CPU s/GiB: one hour 32 KiB 0.32, 256 KiB 0.73, 1 MiB 1.36; an hour later 32 KiB
# 0.31, 256 KiB 0.23, 1 MiB 0.84; another day 1 MiB 0.24 and 2 MiB 2.2. Where
# memory is not taken back, 1 MiB writes cost about 0.1 s/GiB less than 32 KiB.
WRITE_SIZES = (32 * 1024, 128 * 1024, 1024 * 1024)
# Each size that is not the chosen one is tried again once this much has been written
# with the others (times how much dearer it was), so the choice follows the machine
# when its state changes, and a size that costs 6x is tried only every 192 MiB.
PROBE_EVERY = 32 * 1024 * 1024
# A larger size wins unless a smaller one is this much cheaper per byte: each call
# also costs a GIL hand-off to the other threads, which the writer's own time misses.
LARGER_MARGIN = 0.25
COST_WEIGHT = 0.3  # weight of the newest measurement in the chosen size's running cost
MIN_MEASURED = 256 * 1024  # a call writing less says too little about a size's cost
# How far behind the whole-file hash a fill drops its pages from the page cache
# (see BlobFill._drop_behind): far enough that their writeback, started when the
# hash passed them, is done, so they are clean and can be dropped.
DROP_LAG = 64 * 1024 * 1024


def hash_file(fd: int, start: int, end: int, hashers: Iterable[Any]) -> None:
    """Feed bytes [start, end) of ``fd`` to every hasher, through read-only mmap windows.

    Mapping the page cache (MAP_POPULATE, 64 MiB at a time) instead of reading
    into a buffer saves a full memory copy: the whole-file pass costs about a
    third of ``pread`` + hash. The file's size is checked first, because touching
    a mapping past the end of a file is SIGBUS, not an exception.
    """
    hashers = list(hashers)
    if end > os.fstat(fd).st_size:
        raise IntegrityError(f"file is shorter than {end} bytes")
    pos = start
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        span = min(MAP_WINDOW, end - base)
        with mmap.mmap(
            fd, span, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ, offset=base
        ) as window, memoryview(window) as whole, whole[pos - base : span] as view:
            for h in hashers:
                h.update(view)
        pos = base + span


def hash_range(fd: int, offset: int, length: int) -> str:
    """xxh3-128 hex of ``length`` bytes at ``offset`` (GIL released while hashing)."""
    h = xxhash.xxh3_128()
    hash_file(fd, offset, offset + length, [h])
    return h.hexdigest()


class S3EtagHasher:
    """The ETag S3 gives an object uploaded in parts of ``part_size`` (0: one part, plain MD5).

    A multipart upload's ETag is ``md5(md5(part 1) + md5(part 2) + ...)-N``; to
    recompute it the part size must be known (HeadObject with PartNumber=1, see
    agent/origins/s3.py). Used to check bytes that came from peers against the
    origin's own word when it has no sha256.
    """

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.whole = hashlib.md5()  # noqa: S324 - S3's ETag, compared with the origin's
        self.part = hashlib.md5()  # noqa: S324
        self.in_part = 0
        self.part_digests: list[bytes] = []

    def update(self, data: Any) -> None:
        if not self.part_size:
            self.whole.update(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.part_size - self.in_part)
            self.part.update(view[:take])
            self.in_part += take
            view = view[take:]
            if self.in_part == self.part_size:
                self.part_digests.append(self.part.digest())
                self.part = hashlib.md5()  # noqa: S324
                self.in_part = 0

    def hexdigest(self) -> str:
        if not self.part_size:
            return self.whole.hexdigest()
        parts = self.part_digests + ([self.part.digest()] if self.in_part else [])
        return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"  # noqa: S324


def origin_md5_only(entry: FileEntry) -> bool:
    """Whether the origin's MD5 is the only digest it gave for ``entry`` (then it must be checked).

    MD5 costs about 1.76 CPU s/GiB here against CRC32C's 0.10 (bench/digest_cost.py,
    bench/RESULTS.md), so a fill from the origin checks
    the cheapest digest the origin gave; the MD5 is hashed as well only where it
    is the sole one, or where pieces come from peers (a CRC is no check against
    a peer that lies: agent/fetch/peer_reader.py).
    """
    return bool(entry.md5) and not (entry.sha256 or entry.git_sha1 or entry.crc32c)


class WholeFileHasher:
    """xxh3-128 (always) plus the origin's own digests (when given) over a file, in order.

    ``etag_part_size`` adds an MD5-based digest under the name ``s3_etag``: an S3
    ETag (see :class:`S3EtagHasher`), or with 0 a plain MD5, which is also how the
    GCS / Azure ``md5`` of an entry is checked.
    """

    def __init__(
        self,
        size: int,
        want_sha256: bool,
        want_git_sha1: bool,
        etag_part_size: int | None = None,
        want_crc32c: bool = False,
    ) -> None:
        self.size = size
        self.offset = 0
        self.etag_part_size = etag_part_size
        self.hashers: dict[str, Any] = {"xxh128": xxhash.xxh3_128()}
        if want_sha256:
            self.hashers["sha256"] = hashlib.sha256()
        if want_git_sha1:
            git = hashlib.sha1()  # noqa: S324 - git's blob id, not a security boundary
            git.update(f"blob {size}\0".encode())
            self.hashers["git_sha1"] = git
        if want_crc32c:
            self.hashers["crc32c"] = crc32c.CRC32CHash()  # takes memoryviews of the mapping as they are (no copy)
        if etag_part_size is not None:
            self.hashers["s3_etag"] = S3EtagHasher(etag_part_size)

    def advance(self, fd: int, end: int) -> None:
        """Hash the file from where we stopped up to ``end``."""
        if end > self.offset:
            hash_file(fd, self.offset, end, self.hashers.values())
            self.offset = end

    def digests(self) -> dict[str, str]:
        assert self.offset == self.size, "whole-file digest of an incompletely hashed file"
        return {name: h.hexdigest() for name, h in self.hashers.items()}


def whole_file_digests(fd: int, size: int, want_sha256: bool, want_git_sha1: bool) -> dict[str, str]:
    """One sequential pass over a complete file."""
    hasher = WholeFileHasher(size, want_sha256, want_git_sha1)
    hasher.advance(fd, size)
    return hasher.digests()


def file_digests(path: str, size: int, want_sha256: bool = False) -> dict[str, str]:
    """Whole-file digests of the file at ``path``, or {} when it is missing or not ``size`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        if os.fstat(fd).st_size != size:
            return {}
        return whole_file_digests(fd, size, want_sha256, False)
    finally:
        os.close(fd)


class WriteSizer:
    """Chooses the pwritev size (from WRITE_SIZES) that costs the fills the least CPU per byte here.

    Why measure: which page-cache write size is cheap depends on the machine and
    changes with its state (see WRITE_SIZES), so no fixed size stays right. Each
    write call is timed in thread CPU time (user and system, which is where the
    page-cache allocation and copy are charged); the chosen size keeps a running
    cost per byte, the others their last probe's. Calls use the largest size
    within LARGER_MARGIN of the cheapest, and each other size is tried again
    after PROBE_EVERY bytes (scaled by how much dearer it was). One per store,
    shared by its fills and I/O threads.
    """

    def __init__(self, sizes: Sequence[int] = WRITE_SIZES) -> None:
        self.sizes = tuple(sizes)
        self.cost: dict[int, float] = {}  # running CPU ns per byte, per size
        self._since = dict.fromkeys(self.sizes, 0)  # bytes written with other sizes since each was tried
        self._lock = threading.Lock()
        self.best = self.sizes[0]

    def pick(self) -> int:
        """The size for the next write call: an untried size, one due for a probe, else the chosen one."""
        with self._lock:
            for size in self.sizes:
                if size not in self.cost:
                    return size
                due = PROBE_EVERY * max(1.0, self.cost[size] / max(self.cost[self.best], 1e-9))
                if size != self.best and self._since[size] >= due:
                    self._since[size] = 0  # one probe at a time
                    return size
            return self.best

    def record(self, size: int, nbytes: int, cpu_ns: int) -> None:
        """What a call writing ``nbytes`` in pieces of ``size`` cost (thread CPU ns)."""
        if nbytes < MIN_MEASURED:
            return
        with self._lock:
            per_byte = cpu_ns / nbytes
            old = self.cost.get(size)
            # The size in use is measured on every call and averaged; a probe of another one
            # is a fresh look at it and replaces what it cost before.
            self.cost[size] = old + COST_WEIGHT * (per_byte - old) if size == self.best and old else per_byte
            for other in self.sizes:
                if other != size:
                    self._since[other] += nbytes
            cheapest = min(self.cost.values())
            best = max(s for s, c in self.cost.items() if c <= cheapest * (1 + LARGER_MARGIN))
            if best != self.best:
                log.debug(
                    "page-cache writes of %d KiB from now (CPU ns per byte: %s)", best // 1024,
                    ", ".join(f"{s // 1024} KiB {c:.2f}" for s, c in sorted(self.cost.items())),
                )
                self.best = best


def write_batches(chunks: Sequence[bytes | memoryview], limit: int) -> list[list[memoryview]]:
    """Split consecutive chunks into pwritev batches of at most ``limit`` bytes and IOV_MAX buffers."""
    batches: list[list[memoryview]] = []
    batch: list[memoryview] = []
    size = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while len(view):
            if size == limit or len(batch) == IOV_MAX:
                batches.append(batch)
                batch, size = [], 0
            take = view[: limit - size]
            batch.append(take)
            size += len(take)
            view = view[len(take) :]
    if batch:
        batches.append(batch)
    return batches


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` after a short write of ``n`` bytes."""
    while n:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0
    return views


def write_json_atomic(path: str, data: Any) -> None:
    """Write a small state file so a reader sees the old or the new version, never half.

    Mode 0644 whatever the umask, never through a link at ``path``, and no
    temporary file left behind when the write fails (safeio.write_atomic).
    """
    write_atomic(path, json.dumps(data, separators=(",", ":")).encode())


class BlobFill:
    """Thread-side half of a fill: every method here blocks and runs in the I/O pool."""

    def __init__(
        self, directory: str, entry: FileEntry, drop_behind: bool = False, sizer: WriteSizer | None = None
    ) -> None:
        self.entry = entry
        self.drop_behind = drop_behind
        self.sizer = sizer if sizer is not None else WriteSizer()  # the store shares one among its fills
        self.key = entry.fill_key
        self.path = os.path.join(directory, f"{self.key}.part")
        self.state_path = os.path.join(directory, f"{self.key}.json")
        self.done: dict[int, str] = {}
        self.peer_sources: dict[int, str] = {}  # index -> the peer a recorded piece came from
        self.fd = -1
        self._state_lock = threading.Lock()  # pieces finish on several I/O threads at once
        self._write_lock = threading.Lock()
        # The whole-file digests follow the contiguous completed prefix while the
        # rest is still arriving, so finishing a blob costs only the last pieces.
        self._whole = _whole_hasher(entry, 0 if origin_md5_only(entry) else None)
        self._whole_lock = threading.Lock()

    # -- opening -------------------------------------------------------------
    def open(self) -> int:
        """Create or resume the partial file; return how many bytes were already verified."""
        state = self._read_state()
        self.fd, created = self._open_partial()
        try:
            if os.fstat(self.fd).st_size != self.entry.size:
                os.ftruncate(self.fd, 0)
                state = None
                self._preallocate()
            elif created:
                self._preallocate()
        except BaseException:
            self.close()
            raise
        if state:
            for index, digest in state.items():
                offset, length = self.entry.piece_range(index)
                if hash_range(self.fd, offset, length) == digest:
                    self.done[index] = digest
        self.peer_sources = {i: a for i, a in self._read_peers().items() if i in self.done}
        return sum(self.entry.piece_range(i)[1] for i in self.done)

    def _open_partial(self) -> tuple[int, bool]:
        """Open the partial file to resume it, or create it; returns (fd, created).

        Never through a link (O_NOFOLLOW): a symlink, or anything but a file
        only this name links to, is not a partial this agent wrote. It is
        removed (the link, not its target) and the fill starts afresh, so
        nothing outside the cache is ever truncated, written or chmod-ed.
        Two agents on one cache may race to create it: the loser opens the
        winner's file, as before.
        """
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                try:
                    return create_exclusive(self.path, PARTIAL_MODE, os.O_RDWR), True
                except FileExistsError:
                    continue
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                log.warning("%s is a symlink, not a partial file this agent wrote: replacing the link", self.path)
                _unlink_quietly(self.path)
                continue
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                if stat.S_IMODE(st.st_mode) != PARTIAL_MODE:
                    os.fchmod(fd, PARTIAL_MODE)
                return fd, False
            os.close(fd)
            log.warning("%s is not a partial file this agent wrote (%d links): replacing it", self.path, st.st_nlink)
            _unlink_quietly(self.path)
        raise OSError(errno.EEXIST, "cannot create the partial file: its name keeps being taken", self.path)

    def _read_record(self) -> dict[str, Any] | None:
        try:  # not through a link: what one points at is no state of ours
            with open(os.open(self.state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return None
        if not isinstance(data, dict):
            return None
        if data.get("size") != self.entry.size or data.get("piece_size") != self.entry.piece_size:
            return None
        return data

    def _read_state(self) -> dict[int, str] | None:
        data = self._read_record()
        if data is None:
            return None
        done = data.get("done", {})
        return {int(k): str(v) for k, v in done.items() if 0 <= int(k) < self.entry.piece_count}

    def _read_peers(self) -> dict[int, str]:
        """Which recorded pieces came from which peer (a record without ``peers`` is an older agent's: none)."""
        data = self._read_record()
        peers = data.get("peers") if data is not None else None
        if not isinstance(peers, dict):
            return {}
        out: dict[int, str] = {}
        for k, v in peers.items():
            if isinstance(k, str) and k.isdigit() and isinstance(v, str) and 0 <= int(k) < self.entry.piece_count:
                out[int(k)] = v
        return out

    def _record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"size": self.entry.size, "piece_size": self.entry.piece_size, "done": self.done}
        if self.peer_sources:
            record["peers"] = self.peer_sources
        return record

    def _preallocate(self) -> None:
        if self.entry.size == 0:
            return
        try:
            os.posix_fallocate(self.fd, 0, self.entry.size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CapacityError(
                    f"disk full: cannot preallocate {self.entry.size} bytes for {self.entry.path!r} "
                    f"in {os.path.dirname(self.path)}"
                ) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self.fd, self.entry.size)

    def missing(self) -> list[int]:
        return [i for i in range(self.entry.piece_count) if i not in self.done]

    # -- writing -------------------------------------------------------------
    def write(self, offset: int, chunks: Sequence[bytes | memoryview]) -> None:
        """Write ``chunks`` back to back at ``offset`` with vectored positional writes.

        The chunks are the HTTP body as the socket delivered it: writing them as
        they are avoids joining them into one buffer (a memory copy per byte).
        One writer per file at a time: parallel writers to one ext4 file spin on
        its inode lock and burn more CPU than they save. Each pwritev writes at
        most the size the store's WriteSizer picks for this call, and what the
        call cost is reported back to it.
        """
        with self._write_lock:
            limit = self.sizer.pick()
            started, begin = time.thread_time_ns(), offset
            for batch in write_batches(chunks, limit):
                while batch:
                    try:
                        n = os.pwritev(self.fd, batch, offset)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise CapacityError(f"disk full while writing {self.entry.path!r}") from exc
                        raise
                    offset += n
                    batch = _advance(batch, n)
            self.sizer.record(limit, offset - begin, time.thread_time_ns() - started)

    def record_piece(self, index: int, digest: str, source: str | None = None) -> None:
        """Mark a written, hashed piece complete; check it against the manifest if known.

        ``source`` is the peer the bytes came from (None: the origin), kept in the
        record so that a restart still knows it (see the module's docstring).

        The whole-file hash does not follow here: a piece that completes a long prefix
        would hash it (up to the whole file) while its connection waits. The fetcher
        runs :meth:`follow` in the pool without waiting for it, and :meth:`finish`
        catches up on whatever is left.
        """
        expected = self.entry.pieces[index] if self.entry.pieces else None
        if expected is not None and expected != digest:
            raise IntegrityError(
                f"piece {index} of {self.entry.path!r} hashed {digest}, manifest says {expected}"
            )
        with self._state_lock:
            self.done[index] = digest
            if source is None:
                self.peer_sources.pop(index, None)
            else:
                self.peer_sources[index] = source
            write_json_atomic(self.state_path, self._record())

    def follow(self) -> None:
        """Advance the whole-file hash over the completed prefix, unless another thread is at it."""
        self._follow(blocking=False)

    def reset_whole(self, etag_part_size: int | None = None, crc32c: bool = False) -> None:
        """Start the whole-file digests again from byte 0 (optionally also the S3 ETag, or a CRC32C).

        For a fill that takes pieces from peers: the ETag is only computed then,
        and after the whole-file check failed and the peers' pieces were fetched
        again from the origin, every digest is recomputed over the repaired file.
        The next :meth:`_follow` catches up over what is already complete.
        """
        entry = self.entry
        with self._whole_lock:
            if etag_part_size is None:
                etag_part_size = self._whole.etag_part_size
            crc32c = crc32c or "crc32c" in self._whole.hashers
            self._whole = _whole_hasher(entry, etag_part_size, crc32c)
        self._follow(blocking=True)

    def forget_piece(self, index: int) -> None:
        """Drop a recorded piece (it will be fetched again); the whole-file hash must be reset after."""
        with self._state_lock:
            self.done.pop(index, None)
            self.peer_sources.pop(index, None)
            write_json_atomic(self.state_path, self._record())

    def _contiguous_end(self) -> int:
        index = self._whole.offset // self.entry.piece_size
        while index in self.done:
            index += 1
        return min(self.entry.size, index * self.entry.piece_size)

    def _follow(self, blocking: bool) -> None:
        """Advance the whole-file hash over completed pieces; one thread at a time does it."""
        while self._whole_lock.acquire(blocking=blocking):
            try:
                if self.fd < 0:  # closed (finished or discarded) before a late follow ran
                    return
                end = self._contiguous_end()
                start = self._whole.offset
                if end <= start:
                    return
                self._whole.advance(self.fd, end)
                self._drop_behind(start, end)
            finally:
                self._whole_lock.release()

    def _drop_behind(self, start: int, end: int) -> None:
        """With ``drop_behind``: write back what the whole-file hash just passed; drop what it passed DROP_LAG ago.

        For nodes short of memory: page cache a process writes is charged to its
        cgroup, and a fill that keeps its pages leaves a second copy of the model
        in RAM (and gigabytes of dirty pages) until reclaim and writeback catch
        up. Dropping behind keeps the fill's footprint at about DROP_LAG per
        blob; pods that open the blob read it back from disk. It is off by
        default because it does not make a fetch faster: on this project's bench
        the two are even (1.02x), and its writeback runs inside the fetch
        (bench/RESULTS.md, cold miss "Current figures").

        POSIX_FADV_DONTNEED starts writeback of dirty pages and drops the clean
        ones, so the first call starts writing [start, end) and the second drops
        what was started DROP_LAG bytes of hashing earlier and is clean by now.
        The hash moves on from where the last call ended, so the second range
        picks up where the last one stopped.
        """
        if not self.drop_behind:
            return
        try:
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
            behind = max(0, start - DROP_LAG)
            if end - DROP_LAG > behind:
                os.posix_fadvise(self.fd, behind, end - DROP_LAG - behind, os.POSIX_FADV_DONTNEED)
        except OSError:
            self.drop_behind = False  # a hint the filesystem does not take: keep the pages

    # -- finishing -----------------------------------------------------------
    def digests(self) -> dict[str, str]:
        """The whole file's digests (xxh128; sha256 / git blob id / CRC32C / MD5 or S3 ETag as asked), caught up."""
        self._follow(blocking=True)
        return self._whole.digests()

    def publish(self, blob_dir: str, digest: str, index: Callable[[list[str]], None]) -> list[str]:
        """Make the checked file read-only and move it into place as ``blob_dir/digest``; return its piece hashes.

        Called only once the digests matched the origin's (agent/fetch/fetcher.py).
        The verified file replaces a blob of the same name already there (one
        atomic rename): the refill exists because the node did not count that
        blob as present, and it may be rotten, while these bytes were just
        checked. Re-hashing the old one instead would be a full read on a path
        that needs none. A reader holding the old blob keeps reading the old
        inode's bytes until it closes it; capacity counts the blob once, so
        for that while the disk holds a little more than the accounting says.
        Before the rename the partial file's name must still be the file this
        fill holds (safeio.same_file): a name swapped for a link would
        otherwise be published; such a fill is discarded (IntegrityError).

        ``index(pieces)`` records where the blob will be (the store's source
        and meta records) before the blob appears: killed after the rename, the
        next process still finds the blob by the origin object's key; killed
        before it, the record names a blob that is not there yet and the
        complete partial file is published again. Durability is the store's
        background sync (see Store.sync_loop), not an fsync here: that would put
        a full device write on every cold start.
        """
        if not same_file(self.path, self.fd):
            self.discard()
            raise IntegrityError(
                f"the partial file of {self.entry.path!r} at {self.path} was replaced while it was filled "
                "(not a file this agent wrote); discarded, fetch again"
            )
        os.fchmod(self.fd, BLOB_MODE)
        pieces = [self.done[i] for i in range(self.entry.piece_count)]
        index(pieces)
        os.rename(self.path, os.path.join(blob_dir, digest))  # over a stored copy: see above
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)
        return pieces

    def discard(self) -> None:
        self.close()
        for p in (self.path, self.state_path):
            _unlink_quietly(p)

    def close(self) -> None:
        # Under the whole-file lock: a follow still hashing in the pool must not map a
        # closed descriptor, or one the process has since reused for another file.
        with self._whole_lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _whole_hasher(entry: FileEntry, etag_part_size: int | None, crc32c: bool = False) -> WholeFileHasher:
    """The whole-file hasher for the digests ``entry`` carries (the MD5-based one, or a CRC32C the store
    keeps beside the listing, only when asked)."""
    return WholeFileHasher(
        entry.size, bool(entry.sha256), bool(entry.git_sha1), etag_part_size, bool(entry.crc32c) or crc32c
    )


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
