"""The node cache on disk: content-addressed blobs, fills, manifests, models, capacity.

Layout under the cache root, readable with ``ls``:

    blobs/<xxh128 hex>             complete, verified, read-only file contents
    meta/<xxh128 hex>.json         {"size", "piece_size", "pieces"} for `agent verify`
    partial/<fill key>.part|.json  blobs being filled (agent/store/fill.py)
    sources/<fill key>             the digest an origin object turned out to have
    manifests/<model key>/<rev>.json  resolved file lists (agent/manifest.py)
    models/<model key>.json        {"ref", "revision", "pinned", "last_used"}
    snapshots/<model key>/<rev>/   the revision's files as relative links to blobs (agent/store/snapshots.py)
    synced-at                      {"time": T}: every blob written before T is on the device

Durability without an fsync per blob: a background task syncs the cache's
filesystem a few seconds after blobs were published and then records the time
in ``synced-at``. On start, any blob whose data was written after that time
(a power loss may have left it torn) is hashed again against its name before it
is served; a blob that does not match is deleted and will be fetched again.
A crashed process (kill -9) loses nothing: the page cache outlives it.

A blob is stored once however many models or revisions name it. Capacity counts
blobs plus preallocated partial files; when a new fill does not fit, the least
recently used blobs go first, never a pinned one, never one a reader holds a
shared ``flock`` on (clients take one while they read), never one the request
itself needs. Last use is the blob's atime, set explicitly on every open, so it
survives restarts without a database.

Nothing is written through a link, and modes do not follow the umask
(agent/store/safeio.py): directories 0755, state files 0644, partial files
0600, blobs 0444. A directory under the root that is a symlink is refused with
a one-line error; a link at a file's name is replaced, never written through.
Temporary files of atomic writes are removed when the write fails, and those a
kill left behind are swept at start.

All in-memory state is touched only from the event loop; file work runs in the
I/O thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import xxhash

from agent.manifest import BlobDigest, FileEntry, FillKey, Manifest
from agent.refs import ModelRef, parse_ref
from agent.store.fill import BlobFill, WriteSizer, file_digests, write_json_atomic
from agent.store.safeio import BLOB_MODE, PARTIAL_MODE, create_exclusive, ensure_dir, same_file, sweep_tmp
from agent.store.snapshots import link_snapshot, remove_snapshots, sweep_unfinished
from agent.units import format_size
from client.errors import BadRequestError, CapacityError, IntegrityError, WarmstartError

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_DIRS = ("blobs", "meta", "partial", "sources", "manifests", "models")
SYNC_INTERVAL = 5.0
SYNC_SLACK = 0.1  # file times use the kernel's coarse clock: record the marker a little early
STREAM_CHUNK = 4 * 1024 * 1024  # bytes of a streamed blob (adopt_stream) read and written at once


@dataclass
class ModelRecord:
    """What the node knows of one model reference (its base, without revision)."""

    ref: str
    key: str
    revision: str
    pinned: bool = False
    last_used: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "revision": self.revision, "pinned": self.pinned, "last_used": self.last_used}


class Store:
    """The cache root and its accounting."""

    def __init__(self, root: str, capacity: int, pool: ThreadPoolExecutor, drop_behind: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.capacity = capacity
        self.drop_behind = drop_behind  # see BlobFill._drop_behind
        self.write_sizer = WriteSizer()  # the page-cache write size every fill uses, measured
        self.pool = pool
        self.blob_sizes: dict[str, int] = {}
        self.partial_sizes: dict[str, int] = {}
        self._reserving = asyncio.Lock()  # reserve(): one at a time (see there)
        self.sources: dict[FillKey, BlobDigest] = {}
        self.models: dict[str, ModelRecord] = {}
        self._pinned_cache: set[str] | None = None
        # Revisions held pinned besides the model records' own (the warm set's: a
        # revision being replaced stays pinned until its successor is complete).
        self.holds: dict[str, set[tuple[ModelRef, str]]] = {}
        self._manifest_cache: dict[tuple[str, str], Manifest] = {}
        self.evictions = 0
        self.reverified = 0
        self._dirty = False

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def relative(self, path: str) -> str:
        """``path`` relative to the cache root, as the local API names files to clients."""
        return os.path.relpath(path, self.root)

    def blob_path(self, digest: str) -> str:
        return self.path("blobs", digest)

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run blocking file work in the I/O pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def run_later(self, fn: Callable[[*Ts], object], *args: *Ts) -> None:
        """Start blocking file work in the I/O pool that nobody waits for (its failure is logged).

        Only for work that may also never happen: once the pool is shut down it is skipped.
        """
        try:
            self.pool.submit(fn, *args).add_done_callback(_log_failure)
        except RuntimeError:  # the agent is stopping
            log.debug("not started, the I/O pool is shut down: %s", getattr(fn, "__qualname__", fn))

    # -- startup -------------------------------------------------------------
    async def open(self) -> None:
        """Create the layout (or find it), and load the small indexes into memory."""
        await self.run(self._open_sync)
        log.info(
            "store open at %s: %d blobs, %d partial, %s used of %s",
            self.root, len(self.blob_sizes), len(self.partial_sizes),
            format_size(self.used_bytes), format_size(self.capacity),
        )

    def _open_sync(self) -> None:
        try:  # fail early and clearly on a read-only mount or a directory of another user
            for d in _DIRS:
                ensure_dir(self.root, d)  # refuses a symlinked layout directory, fixes a world-writable one
            probe = self.path(f".write-probe-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)  # one a killed process of the same pid left
            os.close(create_exclusive(probe, PARTIAL_MODE))
            os.unlink(probe)
        except OSError as exc:
            if isinstance(exc, WarmstartError) or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise OSError(exc.errno, f"cannot write the cache directory {self.root}: {exc.strerror}") from None
        sweep_unfinished(self.root)
        # State files half-written when a process was killed (partial/ is swept below).
        for d in (self.root, self.path("meta"), self.path("sources"), self.path("models")):
            sweep_tmp(d)
        for manifests in os.scandir(self.path("manifests")):
            if manifests.is_dir(follow_symlinks=False):
                sweep_tmp(manifests.path)
        synced_at = self._read_synced_at()
        for entry in os.scandir(self.path("blobs")):
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat()
            unsynced = st.st_mtime >= synced_at
            if unsynced and not _blob_matches(entry.path, entry.name, st.st_size):
                log.warning(
                    "blob %s was written after the last sync and does not match its digest; removed", entry.name
                )
                os.unlink(entry.path)
                continue
            self.reverified += unsynced
            self.blob_sizes[entry.name] = st.st_size
        for entry in os.scandir(self.path("partial")):
            if entry.name.startswith("artifact-") and entry.name.endswith(".part"):
                os.unlink(entry.path)  # an artifact upload cut off by a crash: nobody resumes it
            elif entry.name.endswith(".part"):
                self.partial_sizes[entry.name[:-5]] = entry.stat(follow_symlinks=False).st_blocks * 512
            elif ".tmp" in entry.name:
                os.unlink(entry.path)  # a state file half-written when we were killed
            elif entry.name.endswith(".json") and not os.path.exists(entry.path[:-5] + ".part"):
                os.unlink(entry.path)  # killed between publishing a blob and removing its fill state
        for entry in os.scandir(self.path("sources")):
            try:
                with open(entry.path, encoding="utf-8") as f:
                    self.sources[FillKey(entry.name)] = BlobDigest(str(json.load(f)))
            except (OSError, ValueError):
                continue
        for entry in os.scandir(self.path("models")):
            if not entry.name.endswith(".json"):
                continue
            try:
                with open(entry.path, encoding="utf-8") as f:
                    data = json.load(f)
                key = entry.name[:-5]
                self.models[key] = ModelRecord(
                    ref=data["ref"], key=key, revision=data["revision"],
                    pinned=bool(data.get("pinned")), last_used=float(data.get("last_used", 0)),
                )
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable model record %s", entry.path)

    def _read_synced_at(self) -> float:
        try:
            with open(self.path("synced-at"), encoding="utf-8") as f:
                return float(json.load(f)["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0  # never synced: every blob is checked once

    # -- durability ----------------------------------------------------------
    async def sync(self) -> None:
        """Flush the cache's filesystem, then record that everything before now is durable."""
        self._dirty = False
        started = time.time() - SYNC_SLACK

        def flush() -> None:
            _syncfs(self.root)
            path = self.path("synced-at")
            write_json_atomic(path, {"time": started})
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await self.run(flush)

    async def sync_loop(self, interval: float = SYNC_INTERVAL) -> None:
        """Background task: sync a few seconds after blobs were published."""
        while True:
            await asyncio.sleep(interval)
            if self._dirty:
                try:
                    await self.sync()
                except OSError as exc:
                    self._dirty = True
                    log.error("cannot sync the cache filesystem: %s", exc)

    # -- accounting ----------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(self.blob_sizes.values()) + sum(self.partial_sizes.values())

    @property
    def blob_count(self) -> int:
        return len(self.blob_sizes)

    def blob_size(self, digest: str) -> int:
        """The size of a complete blob (0 when the node does not hold it)."""
        return self.blob_sizes.get(digest, 0)

    def pinned_bytes(self) -> int | None:
        """Bytes of the blobs of pinned models, as of the last :meth:`pinned_digests` (None before one)."""
        if self._pinned_cache is None:
            return None
        return sum(self.blob_sizes.get(d, 0) for d in self._pinned_cache)

    def has_blob(self, digest: str | None) -> bool:
        return digest is not None and digest in self.blob_sizes

    def digest_of(self, entry: FileEntry) -> BlobDigest | None:
        """The stored digest of an entry's bytes, if the node holds them complete."""
        digest = entry.digest or self.sources.get(entry.fill_key)
        return digest if self.has_blob(digest) else None

    # -- manifests and model records ----------------------------------------
    async def save_manifest(self, ref: ModelRef, manifest: Manifest) -> None:
        directory = self.path("manifests", ref.key)
        path = os.path.join(directory, f"{manifest.revision}.json")
        self._manifest_cache[(ref.key, manifest.revision)] = manifest
        self._pinned_cache = None

        def write() -> None:
            ensure_dir(self.root, "manifests", ref.key)
            write_json_atomic(path, manifest.to_json())

        await self.run(write)

    async def load_manifest(self, ref: ModelRef, revision: str) -> Manifest | None:
        cached = self._manifest_cache.get((ref.key, revision))
        if cached is not None:
            return cached
        path = self.path("manifests", ref.key, f"{revision}.json")

        def read() -> Manifest | None:
            try:
                with open(path, encoding="utf-8") as f:
                    return Manifest.from_json(json.load(f))
            except (FileNotFoundError, NotADirectoryError):
                return None

        manifest = await self.run(read)
        if manifest is not None:
            self._manifest_cache[(ref.key, revision)] = manifest
        return manifest

    async def manifest_revisions(self, ref: ModelRef) -> list[str]:
        """Revisions of ``ref`` whose manifests this node saved (complete or not), in no order."""

        def listing() -> list[str]:
            try:
                names = os.listdir(self.path("manifests", ref.key))
            except (FileNotFoundError, NotADirectoryError):
                return []
            return [n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith(".")]

        return await self.run(listing)

    async def record_model(self, ref: ModelRef, revision: str, pin: bool | None = None) -> ModelRecord:
        rec = self.models.get(ref.key)
        if rec is None:
            rec = ModelRecord(ref=ref.base, key=ref.key, revision=revision)
            self.models[ref.key] = rec
        rec.revision = revision
        rec.last_used = time.time()
        if pin is not None:
            rec.pinned = pin
        self._pinned_cache = None
        await self.run(write_json_atomic, self.path("models", f"{ref.key}.json"), rec.to_json())
        return rec

    async def forget_model(self, ref: ModelRef) -> None:
        self.models.pop(ref.key, None)
        self._pinned_cache = None

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path("models", f"{ref.key}.json"))
            remove_snapshots(self.root, ref.key)

        await self.run(remove)

    async def snapshot(self, ref: ModelRef, manifest: Manifest) -> str | None:
        """The revision's snapshot directory (path under the root), or None if it cannot be laid out.

        Every file must be a blob by now. An object store can hold both ``a`` and
        ``a/b``, which no directory can: such a model still opens as tensors.
        """
        if any(f.digest is None for f in manifest.files):
            raise IntegrityError(f"{ref.base}@{manifest.revision} is not complete; no snapshot")
        files = [(f.path, f.digest) for f in manifest.files if f.digest is not None]
        try:
            return await self.run(link_snapshot, self.root, ref.key, manifest.revision, files)
        except OSError as exc:
            log.warning("no snapshot directory for %s@%s: %s", ref.base, manifest.revision, exc)
            return None

    async def model_digests(self, rec: ModelRecord) -> set[str]:
        manifest = await self.load_manifest(_ref_of(rec), rec.revision)
        if manifest is None:
            return set()
        return {d for f in manifest.files if (d := f.digest or self.sources.get(f.fill_key))}

    def set_holds(self, owner: str, holds: set[tuple[ModelRef, str]]) -> None:
        """Pin exactly these (reference, revision) pairs on behalf of ``owner`` (replacing its last set)."""
        if holds:
            self.holds[owner] = set(holds)
        else:
            self.holds.pop(owner, None)
        self._pinned_cache = None

    async def revision_digests(self, ref: ModelRef, revision: str) -> set[str]:
        manifest = await self.load_manifest(ref, revision)
        if manifest is None:
            return set()
        return {d for f in manifest.files if (d := f.digest or self.sources.get(f.fill_key))}

    async def pinned_digests(self) -> set[str]:
        if self._pinned_cache is None:
            pinned: set[str] = set()
            for rec in list(self.models.values()):
                if rec.pinned:
                    pinned |= await self.model_digests(rec)
            for held in list(self.holds.values()):
                for ref, revision in held:
                    pinned |= await self.revision_digests(ref, revision)
            self._pinned_cache = pinned
        return self._pinned_cache

    # -- fills ---------------------------------------------------------------
    async def begin_fill(self, entry: FileEntry, protect: AbstractSet[str]) -> tuple[BlobFill, int]:
        """Open (or resume) the partial file for ``entry``, making room for it first."""
        fill = BlobFill(self.path("partial"), entry, self.drop_behind, self.write_sizer)
        if fill.key not in self.partial_sizes:
            await self.reserve(entry.size, protect, fill.key)
        try:
            have = await self.run(fill.open)
        except BaseException:
            await self.run(fill.discard)
            self.partial_sizes.pop(fill.key, None)
            raise
        return fill, have

    async def fill_digests(self, fill: BlobFill) -> dict[str, str]:
        """The whole-file digests of a complete fill (the last pieces hashed now, the rest already followed)."""
        return await self.run(fill.digests)

    async def publish_fill(self, fill: BlobFill, digest: BlobDigest) -> tuple[str, ...]:
        """Publish a complete, checked fill as ``blobs/<digest>``; returns its piece hashes."""
        def write_index(pieces: list[str]) -> None:
            meta = {"size": fill.entry.size, "piece_size": fill.entry.piece_size, "pieces": pieces}
            write_json_atomic(self.path("meta", f"{digest}.json"), meta)
            write_json_atomic(self.path("sources", fill.key), digest)

        try:
            pieces = await self.run(fill.publish, self.path("blobs"), digest, write_index)
        finally:
            self.partial_sizes.pop(fill.key, None)  # published, or discarded by publish()
        self.blob_sizes[digest] = fill.entry.size
        self._dirty = True
        self.sources[fill.key] = digest
        self._pinned_cache = None
        return tuple(pieces)

    async def discard_fill(self, fill: BlobFill) -> None:
        """Delete a fill whose bytes did not check out (its partial file and piece record)."""
        await self.run(fill.discard)
        self.partial_sizes.pop(fill.key, None)

    async def adopt_stream(
        self, read: Callable[[int], Awaitable[bytes]], size: int, expect: str | None = None,
        expect_sha256: str | None = None,
    ) -> tuple[str, str]:
        """Store ``size`` bytes from ``read`` as a blob, hashing as they land; returns (xxh128, SHA-256).

        For blobs that arrive as one stream with no origin behind them (compile
        artifact bundles, from a local upload or a peer). Room is made first
        (LRU eviction, or CapacityError). With ``expect``, bytes whose xxh128
        differ are discarded (IntegrityError) and never become a blob; the same
        with ``expect_sha256`` (a signed artifact's, agent/artifacts/signing.py:
        xxh128 names the blob, the SHA-256 is what cannot be forged). The
        partial file (``partial/artifact-<random>.part``, removed at the next
        start if a crash cut it off) counts in capacity while it fills.
        """
        if size < 0:
            raise BadRequestError("size must be given (Content-Length) and not negative")
        key = f"artifact-{uuid.uuid4().hex}"
        await self.reserve(size, {expect} if expect else set(), key)
        part = self.path("partial", f"{key}.part")
        hasher = xxhash.xxh3_128()
        strong = hashlib.sha256()
        fd = await self.run(create_exclusive, part, PARTIAL_MODE)
        published = False
        try:
            got = 0
            buf: list[bytes] = []
            pending = 0

            def flush(chunks: list[bytes], offset: int) -> None:
                for c in chunks:
                    hasher.update(c)
                    strong.update(c)
                os.pwritev(fd, chunks, offset)

            while True:
                data = await read(STREAM_CHUNK)
                if not data:
                    break
                got += len(data)
                if got > size:
                    raise BadRequestError(f"more than the {size} bytes announced")
                buf.append(data)
                pending += len(data)
                if pending >= STREAM_CHUNK:
                    await self.run(flush, buf, got - pending)
                    buf, pending = [], 0
            if buf:
                await self.run(flush, buf, got - pending)
            if got != size:
                raise IntegrityError(f"bundle upload ended after {got} of {size} bytes")
            digest = hasher.hexdigest()
            if expect is not None and digest != expect:
                raise IntegrityError(f"bundle bytes hash to {digest}, not the {expect} they were asked for")
            sha256 = strong.hexdigest()
            if expect_sha256 is not None and sha256 != expect_sha256:
                raise IntegrityError(f"bundle bytes' SHA-256 is {sha256}, not the signed {expect_sha256}")

            def publish() -> None:
                if not same_file(part, fd):
                    raise IntegrityError(f"the upload's file {part} was replaced while it was written; push again")
                os.fchmod(fd, BLOB_MODE)
                # Over a stored copy of the same name: these bytes were just hashed, that one may have rotted
                # (a reader of the old one keeps its inode; see BlobFill.publish).
                os.rename(part, self.blob_path(digest))

            await self.run(publish)
            published = True
            self.blob_sizes[digest] = size
            self._dirty = True
            self._pinned_cache = None
            return digest, sha256
        finally:
            self.partial_sizes.pop(key, None)
            await self.run(_close_and_drop, fd, None if published else part)

    async def abandon_fill(self, fill: BlobFill) -> None:
        """Close a fill that failed; keep its verified pieces for the next try."""
        await self.run(fill.close)

    # -- blobs ---------------------------------------------------------------
    async def read_meta(self, digest: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            try:
                with open(self.path("meta", f"{digest}.json"), encoding="utf-8") as f:
                    return dict(json.load(f))
            except (FileNotFoundError, ValueError):
                return None

        return await self.run(read)

    async def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs used now (their atime), for LRU."""
        paths = [self.blob_path(d) for d in digests if d in self.blob_sizes]

        def touch_all() -> None:
            now = time.time()
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(p, (now, os.stat(p).st_mtime))

        await self.run(touch_all)

    async def remove_blob(self, digest: str, force: bool = False) -> bool:
        """Delete a blob unless a reader holds it (shared flock). Returns whether it went."""
        path = self.blob_path(digest)

        def remove() -> bool:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return True
            try:
                if not force:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return False
                # a concurrent eviction (or `agent evict`) of the same blob may have got there first
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                for extra in (self.path("meta", f"{digest}.json"),):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(extra)
                return True
            finally:
                os.close(fd)

        gone = bool(await self.run(remove))
        if gone:
            self.blob_sizes.pop(digest, None)
            self._pinned_cache = None
        return gone

    async def reserve(self, nbytes: int, protect: AbstractSet[str], key: str) -> None:
        """Make room for ``nbytes`` more and count them as partial ``key``: evict LRU blobs, or raise CapacityError.

        One reservation at a time, counted before the next one looks: two fills
        starting together would otherwise both see the room that only one of them
        can have (their checks straddle the awaits below), and the cache would
        end over its capacity (tests/test_reliability_load.py saw 1,792 bytes over).
        """
        async with self._reserving:
            await self._make_room(nbytes, protect)
            self.partial_sizes[key] = nbytes

    async def _make_room(self, nbytes: int, protect: AbstractSet[str]) -> None:
        over = self.used_bytes + nbytes - self.capacity
        free = await self.run(_free_bytes, self.root)
        short = nbytes - free
        if over <= 0 and short <= 0:
            return
        pinned = await self.pinned_digests()
        candidates = [d for d in self.blob_sizes if d not in pinned and d not in protect]
        evictable = sum(self.blob_sizes[d] for d in candidates)
        if evictable < max(over, short):
            candidates = []  # evicting cannot make it fit: keep the cache as it is
        atimes = await self.run(_atimes, [self.blob_path(d) for d in candidates])
        held = 0
        for _, digest in sorted(zip(atimes, candidates, strict=True)):
            if over <= 0 and short <= 0:
                break
            size = self.blob_sizes.get(digest, 0)
            if await self.remove_blob(digest):
                log.info("evicted blob %s (%s) to make room", digest, format_size(size))
                self.evictions += 1
                over -= size
                short -= size
            else:
                held += size
        if over > 0:
            raise CapacityError(
                f"cache capacity exceeded: need {format_size(nbytes)} more, "
                f"{format_size(self.used_bytes)} of {format_size(self.capacity)} used, "
                f"{format_size(sum(self.blob_sizes.get(d, 0) for d in pinned))} pinned, "
                f"{format_size(held)} in use by readers; raise --capacity or evict/unpin models"
            )
        if short > 0:
            raise CapacityError(
                f"disk full: need {format_size(nbytes)} but only {format_size(nbytes - short)} free "
                f"on the filesystem of {self.root}, and nothing more can be evicted"
            )


def _log_failure(done: Future[Any]) -> None:
    """Done-callback of :meth:`Store.run_later`: say what failed, since nobody awaits it."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("background file work failed: %s", done.exception())


def _syncfs(path: str) -> None:
    """syncfs(2) on the filesystem holding ``path`` (sync(2) where libc lacks it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None:
            os.sync()
        elif libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _blob_matches(path: str, digest: str, size: int) -> bool:
    try:
        return file_digests(path, size).get("xxh128") == digest
    except OSError:
        return False


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _atimes(paths: list[str]) -> list[float]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_atime)
        except FileNotFoundError:
            out.append(0.0)
    return out


def _ref_of(rec: ModelRecord) -> ModelRef:
    return parse_ref(rec.ref)


def _close_and_drop(fd: int, path: str | None) -> None:
    os.close(fd)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
