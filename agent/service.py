"""Models as users see them: resolve a reference, make it whole, list, evict, verify.

This is the layer the local API calls. It turns a reference into a manifest
(from the origin, or from the node's own records when the reference is pinned
to a revision the node has, or when the origin is unreachable), asks the
fetcher for every missing blob, and keeps the model records (pins, last use)
current.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from agent.errors import TransientOriginError
from agent.fetch.fetcher import Fetcher, PeerContext, ServedPiece, first_error
from agent.manifest import Blob, FileEntry, FillKey, Manifest
from agent.origins import Origins
from agent.origins.base import Origin, peer_checkable
from agent.refs import ModelRef, parse_ref
from agent.selection import DEFAULT, INDEX_FILE, MAX_INDEX_BYTES, Selection, indexed_files
from agent.store.fill import file_digests
from agent.store.store import Store
from client.errors import (
    AccessDeniedError,
    BadReferenceError,
    CapacityError,
    FetchFailedError,
    ModelNotFoundError,
    ResourceError,
    WarmstartError,
)

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_RESOLVE_TIMEOUT = 5.0  # AgentConfig.resolve_timeout's default (agent/config.py: the verbs never import it)


@dataclass
class Progress:
    """A live view of how much of a manifest is on disk (read by the API every tick)."""

    manifest: Manifest
    store: Store
    fetcher: Fetcher
    started: float
    cached_at_start: int

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_size

    @property
    def done_bytes(self) -> int:
        return sum(
            entry.size if self.store.digest_of(entry) is not None else self.fetcher.done_bytes(entry.fill_key)
            for entry in self.manifest.files
        )

    def snapshot(self) -> dict[str, Any]:
        done = self.done_bytes
        elapsed = max(1e-6, time.monotonic() - self.started)
        return {
            "event": "progress",
            "done_bytes": done,
            "total_bytes": self.total_bytes,
            "rate_bps": max(0, done - self.cached_at_start) / elapsed,
        }


class ModelService:
    def __init__(
        self,
        store: Store,
        fetcher: Fetcher,
        origins: Origins,
        piece_size: int,
        *,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.origins = origins
        self.piece_size = piece_size
        self.resolve_timeout = resolve_timeout
        self.metrics = metrics
        # Model key -> when a bare reference to it was first served from the cache because its origin was
        # down; cleared when the origin answers again (``agent ls`` shows it). In memory: a restart forgets.
        self.stale_since: dict[str, float] = {}
        # Model key -> the revision a bare reference opens while a newer one is being
        # fetched in the background (the warm set's rollover): the newest *complete* one.
        self.serving: dict[str, str] = {}
        self._indexes: dict[str, frozenset[str] | None] = {}  # shard-index blob -> the shard names it lists

    async def is_complete(self, manifest: Manifest, selection: Selection = DEFAULT) -> bool:
        """Whether every file ``selection`` picks of ``manifest`` is a blob here (complete *for that request*:
        a revision fetched with the loader's files is complete for the loader, not for ``--all-files``)."""
        chosen = await self.chosen(manifest, selection)
        return chosen is not None and all(self.store.digest_of(f) is not None for f in chosen)

    def holds(self, manifest: Manifest) -> bool:
        """Whether every file of ``manifest`` (one already cut to a selection) is a blob here."""
        return all(self.store.digest_of(f) is not None for f in manifest.files)

    async def chosen(self, manifest: Manifest, selection: Selection) -> tuple[FileEntry, ...] | None:
        """The files of ``manifest`` that ``selection`` picks; None when that needs the shard index and the
        index is not cached (:meth:`select` fetches it)."""
        if not selection.needs_index(manifest.files):
            return selection.pick(manifest.files)
        index = next(f for f in manifest.files if f.path == INDEX_FILE)
        digest = self.store.digest_of(index)
        if digest is None:
            return None
        return selection.pick(manifest.files, await self._index_names(digest, manifest.ref))

    async def _index_names(self, digest: str, what: str) -> frozenset[str] | None:
        """The shard names of a cached index blob (parsed once per blob); None, with one log line, for an
        index that is not one (untrusted bytes: the top-level rule stands in)."""
        if digest in self._indexes:
            return self._indexes[digest]

        def read() -> bytes:
            with open(self.store.blob_path(digest), "rb") as f:
                return f.read(MAX_INDEX_BYTES + 1)

        try:
            names: frozenset[str] | None = indexed_files(await self.store.run(read))
        except ValueError as exc:
            log.warning("%s: %s is not a valid shard index (%s); choosing the top-level safetensors", what,
                        INDEX_FILE, exc)
            names = None
        if len(self._indexes) >= 1024:
            self._indexes.clear()
        self._indexes[digest] = names
        return names

    async def select(
        self, ref: ModelRef, manifest: Manifest, selection: Selection, origin: Origin | None = None
    ) -> Manifest:
        """``manifest`` cut to the files ``selection`` picks, fetching the shard index first when the choice
        depends on it. What the request is answered with; the saved manifest stays whole."""
        chosen = await self.chosen(manifest, selection)
        if chosen is None:
            index = next(f for f in manifest.files if f.path == INDEX_FILE)
            ctx = PeerContext.of(ref.base, ref.scheme, manifest)
            blob = await self.fetcher.ensure_blob(index, origin or self.origins.for_ref(ref), set(), ctx)
            chosen = selection.pick(manifest.files, await self._index_names(blob.digest, ref.base))
        return dataclasses.replace(manifest, files=chosen)

    # -- what the API reads of fills in progress ---------------------------
    def verified_pieces(self, entry: FileEntry) -> int:
        """Pieces of ``entry`` this node holds verified now (all of a complete blob's)."""
        if self.store.digest_of(entry) is not None:
            return entry.piece_count
        return self.fetcher.verified_pieces(entry.fill_key)

    def filling(self, entry: FileEntry) -> tuple[str, frozenset[int]] | None:
        """(partial file under the cache root, its verified pieces) while ``entry`` fills, else None."""
        return self.fetcher.filling(entry.fill_key)

    async def wait_change(self, timeout: float) -> None:
        """Return when a piece or a blob completes anywhere, or after ``timeout`` seconds."""
        await self.fetcher.wait_change(timeout)

    async def check_peer_ref(self, ref: ModelRef) -> None:
        """Refuse a reference a peer named whose host is not one this node may reach for a peer."""
        await self.origins.check_peer_ref(ref)

    async def peer_checkable(self, ref: ModelRef, entry: FileEntry) -> bool:
        """Whether a peer taking ``entry``'s pieces could check them against the origin's digest."""
        return await peer_checkable(entry, self.origins.for_ref(ref))

    async def serve_piece(
        self, ref: ModelRef, entry: FileEntry, index: int, *, relay: bool, requester: str
    ) -> ServedPiece:
        """Where a peer can read piece ``index`` of ``entry`` (see :meth:`Fetcher.serve_piece`)."""
        return await self.fetcher.serve_piece(entry, index, self.origins.for_ref(ref), relay=relay, requester=requester)

    async def held_for_peer(self, keys: list[str], piece_size: int) -> tuple[list[str], dict[str, list[int]]]:
        """Which of these files (fill keys) this node holds, for a peer (see :meth:`Fetcher.holds`)."""
        return await self.fetcher.holds(keys, piece_size)

    async def resolve(
        self, text: str, fresh: bool = False, selection: Selection = DEFAULT
    ) -> tuple[ModelRef, Manifest]:
        """The manifest ``text`` names now; raises BadReferenceError, ModelNotFoundError, ...

        A bare reference whose model is being rolled over names the complete revision
        (``serving``) unless ``fresh``: the warm set itself asks the origin.

        A bare reference with a complete revision cached waits at most
        ``resolve_timeout`` for the origin; when the origin is down (refuses,
        fails, answers 5xx, hangs) that revision is served and marked stale
        (:meth:`_stale`): a node that holds a model must keep serving it through
        an outage of the origin. An exact revision that is cached never asks the
        origin at all. With nothing complete cached the origin's own error (or
        wait) stands: there is nothing better to offer.
        """
        ref = parse_ref(text)
        if ref.revision:
            pinned = await self.store.load_manifest(ref, ref.revision)
            if pinned is not None:
                return ref, pinned
        elif not fresh and (serving := self.serving.get(ref.key)) is not None:
            current = await self.store.load_manifest(ref, serving)
            if current is not None and await self.is_complete(current, selection):
                return ref, current
        fallback = None if ref.revision else await self.newest_complete(ref, selection)
        origin = self.origins.for_ref(ref)
        try:
            if fallback is None:
                resolved = await origin.resolve(ref)
            else:
                async with asyncio.timeout(self.resolve_timeout):
                    resolved = await origin.resolve(ref)
        except TimeoutError:
            if fallback is None:
                raise FetchFailedError(f"the origin of {ref.base} did not answer in time") from None
            return ref, self._stale(ref, fallback, f"no answer within {self.resolve_timeout:g}s")
        except Exception as exc:
            if fallback is None and isinstance(exc, FetchFailedError) and not ref.revision:
                # Nothing complete here, but the record's partial revision may still be completed from peers.
                rec = self.store.models.get(ref.key)
                known = await self.store.load_manifest(ref, rec.revision) if rec is not None else None
                if known is not None:
                    log.warning("origin unreachable for %s (%s); trying cached revision %s", ref, exc, known.revision)
                    return ref, known
            if fallback is None or not _origin_down(exc, ref):
                raise
            return ref, self._stale(ref, fallback, f"{type(exc).__name__}: {exc}")
        self.stale_since.pop(ref.key, None)
        known = await self.store.load_manifest(ref, resolved.revision)
        if known is not None:
            return ref, known
        manifest = resolved.with_piece_size(self.piece_size, self.store.sources)
        await self.store.save_manifest(ref, manifest)
        return ref, manifest

    async def newest_complete(self, ref: ModelRef, selection: Selection = DEFAULT) -> Manifest | None:
        """The revision of a model this node knows that a bare reference falls back to: the model record's
        when complete (it moves only to complete revisions once it names one), else the newest complete
        manifest saved for it (resolved last). None for a model the node does not know (never fetched, or
        evicted)."""
        rec = self.store.models.get(ref.key)
        if rec is None:
            return None
        current = await self.store.load_manifest(ref, rec.revision)
        if current is not None and await self.is_complete(current, selection):
            return current
        complete = []
        for revision in await self.store.manifest_revisions(ref):
            manifest = await self.store.load_manifest(ref, revision)
            if manifest is not None and await self.is_complete(manifest, selection):
                complete.append(manifest)
        return max(complete, key=lambda m: m.resolved_at, default=None)

    def _stale(self, ref: ModelRef, manifest: Manifest, why: str) -> Manifest:
        """Serve ``manifest`` for a bare ``ref`` whose origin is down: one log line, the metric, the mark."""
        since = self.stale_since.setdefault(ref.key, time.time())
        log.warning(
            "origin unreachable for %s (%s); serving cached revision %s (stale since %s)",
            ref.base, why, manifest.revision, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
        )
        if self.metrics is not None:
            self.metrics.stale_serves.labels(ref.scheme).inc()
        return manifest

    def progress(self, manifest: Manifest) -> Progress:
        p = Progress(manifest, self.store, self.fetcher, time.monotonic(), 0)
        p.cached_at_start = p.done_bytes
        return p

    async def ensure(
        self, ref: ModelRef, manifest: Manifest, pin: bool | None = None, selection: Selection = DEFAULT
    ) -> Manifest:
        """Fetch every missing file ``selection`` picks of ``manifest``; on return all of those are verified
        blobs, and the returned manifest lists exactly them (completed).

        The saved manifest stays the whole revision, with digests for the files
        fetched so far under any selection: a later request with other patterns
        fetches only what is still missing. The model's record (what a bare
        reference falls back to, what `agent ls` shows) moves to a new revision
        only once that revision is complete when the record names a complete one
        now: never from whole to partial.
        """
        origin = self.origins.for_ref(ref)
        wanted = await self.select(ref, manifest, selection, origin)
        rec = self.store.models.get(ref.key)
        defer = False
        if rec is not None and rec.revision != manifest.revision and not await self.is_complete(manifest, selection):
            current = await self.store.load_manifest(ref, rec.revision)
            defer = current is not None and await self.is_complete(current, selection)
        if not defer:
            await self.store.record_model(ref, manifest.revision, pin)
        ctx = PeerContext.of(ref.base, ref.scheme, manifest)
        protect = {d for f in manifest.files if (d := self.store.digest_of(f))}
        blobs: dict[FillKey, Blob] = {}
        unchecked = [f for f in wanted.files if self.store.digest_of(f) is None and origin.without_digest(f)]

        # The small files first, all of them before any weight file starts (config, tokenizer,
        # the shard index: what a loader reads before any weight): started together, a weight
        # file's span could take every connection before the index asked for one and hold it
        # for the whole file (seen: a streaming load's first tensor waited for both 12 MiB
        # shards because the 1 KiB index came last). That costs one round trip of small
        # requests. Then the weights in manifest order (agent/fetch/slots.py admits them so).
        # At most parallel_files files at once: a model of 50,000 files must not hold 50,000
        # tasks and descriptors (measured: 19,932 fds and 867 MB before this bound, then "Too
        # many open files" for every request).
        small = [f for f in wanted.files if f.size <= f.piece_size]
        large = [f for f in wanted.files if f.size > f.piece_size]

        async def fill_all(entries: list[FileEntry]) -> None:
            todo = iter(entries)

            async def worker() -> None:
                for entry in todo:
                    blobs[entry.fill_key] = await self.fetcher.ensure_blob(entry, origin, protect, ctx)

            async with asyncio.TaskGroup() as tg:
                for _ in range(min(len(entries), self.fetcher.parallel_files)):
                    tg.create_task(worker())

        try:
            await fill_all(small)
            await fill_all(large)
        except BaseExceptionGroup as group:
            raise _disk_full(first_error(group), self.store.root) from None
        except OSError as exc:
            raise _disk_full(exc, self.store.root) from None
        if unchecked:
            log.warning("%s@%s: the origin gives no digest for %d file(s) (%s): checked against their own bytes "
                        "only (`agent verify` lists them)", ref.base, manifest.revision, len(unchecked),
                        ", ".join(f.path for f in unchecked[:5]) + (" ..." if len(unchecked) > 5 else ""))
            if self.metrics is not None:
                self.metrics.files_without_origin_digest.labels(ref.scheme).inc(len(unchecked))
        whole = await self._with_piece_hashes(manifest.completed(blobs))
        saved = await self.store.load_manifest(ref, manifest.revision)
        if saved is not None:  # a caller may hold the revision cut to its selection: never save less than is
            have = {f.path for f in whole.files}
            extra = tuple(f for f in saved.files if f.path not in have)
            if extra:
                order = {f.path: i for i, f in enumerate(saved.files)}
                files = sorted(whole.files + extra, key=lambda f: order.get(f.path, len(order)))
                whole = dataclasses.replace(whole, files=tuple(files))
        if whole != saved:
            await self.store.save_manifest(ref, whole)
        if defer:
            await self.store.record_model(ref, whole.revision, pin)
        paths = {f.path for f in wanted.files}
        done = dataclasses.replace(whole, files=tuple(f for f in whole.files if f.path in paths))
        await self.store.touch(f.digest for f in done.files if f.digest)
        return done

    async def _with_piece_hashes(self, manifest: Manifest) -> Manifest:
        """The manifest with piece hashes from blob metadata for entries that were already cached."""
        found: dict[FillKey, Blob] = {}
        for entry in manifest.files:
            if entry.pieces is None and entry.digest:
                meta = await self.store.read_meta(entry.digest)
                if meta and meta.get("piece_size") == entry.piece_size:
                    found[entry.fill_key] = Blob(entry.digest, tuple(meta["pieces"]))
        return manifest.completed(found) if found else manifest

    async def list_models(self) -> list[dict[str, Any]]:
        out = []
        for rec in sorted(self.store.models.values(), key=lambda r: r.ref):
            ref = parse_ref(rec.ref)
            manifest = await self.store.load_manifest(ref, rec.revision)
            files = manifest.files if manifest else []
            out.append({
                "ref": rec.ref,
                "revision": rec.revision,
                "total_size": sum(f.size for f in files),
                "cached_bytes": sum(f.size for f in files if self.store.digest_of(f)),
                "files": len(files),
                "pinned": rec.pinned,
                "last_used": rec.last_used,
                "stale_since": self.stale_since.get(rec.key),
                "without_origin_digest": sum(
                    1 for f in files if self.store.digest_of(f) and self.origins.for_ref(ref).without_digest(f)
                ),
            })
        return out

    async def evict(self, text: str) -> dict[str, Any]:
        """Unpin a model and delete the blobs no other model names; keep those a reader holds."""
        ref = parse_ref(text)
        rec = self.store.models.get(ref.key)
        if rec is None:
            raise ModelNotFoundError(f"{ref.base} is not in this node's cache (see `agent ls`)")
        mine = await self.store.model_digests(rec)
        others: set[str] = set()
        for other in list(self.store.models.values()):
            if other.key != rec.key:
                others |= await self.store.model_digests(other)
        freed, kept = 0, []
        for digest in sorted(mine):
            if digest in others:
                kept.append({"digest": digest, "reason": "used by another cached model"})
                continue
            size = self.store.blob_sizes.get(digest, 0)
            if await self.store.remove_blob(digest):
                freed += size
            else:
                kept.append({"digest": digest, "reason": "open by a reader; evicted when released"})
        await self.store.forget_model(ref)
        self.stale_since.pop(ref.key, None)
        return {"ref": ref.base, "freed_bytes": freed, "kept": kept}

    async def verify(self, ref: ModelRef, manifest: Manifest) -> dict[str, Any]:
        """Re-hash every blob of ``manifest``; remove and re-fetch any that do not match.

        Re-fetched: the corrupt files, and the files a loader reads (agent/selection.py) that are
        missing; a revision fetched with the loader's files is not grown to the whole repo by a verify,
        and one fetched with more keeps what it holds. ``without_origin_digest`` names the checked
        files whose origin gives no digest: checked against their own bytes only."""
        checked = corrupt = 0
        held = frozenset(f.path for f in manifest.files if self.store.digest_of(f) is not None)
        for entry in manifest.files:
            digest = self.store.digest_of(entry)
            if digest is None:
                continue
            checked += 1
            fd_digests = await self.store.run(
                file_digests, self.store.blob_path(digest), entry.size, bool(entry.sha256)
            )
            bad = fd_digests.get("xxh128") != digest or (entry.sha256 and fd_digests.get("sha256") != entry.sha256)
            if bad:
                corrupt += 1
                log.error("blob %s of %s (%s) is corrupt; removing and re-fetching", digest, ref, entry.path)
                await self.store.remove_blob(digest, force=True)
        wanted = held | {f.path for f in (await self.select(ref, manifest, DEFAULT)).files}
        missing = sum(1 for f in manifest.files if f.path in wanted and self.store.digest_of(f) is None)
        await self.ensure(ref, manifest, selection=Selection(paths=wanted))
        origin = self.origins.for_ref(ref)
        unchecked = sorted(f.path for f in manifest.files if f.path in held and origin.without_digest(f))
        return {"checked": checked, "corrupt": corrupt, "repaired": missing, "without_origin_digest": unchecked}


def _origin_down(exc: BaseException, ref: ModelRef) -> bool:
    """Whether a failed resolve means "the origin is unreachable or failing", so a cached revision may stand in.

    Refusals, resets, 5xx and timeouts are; a typed answer from an origin that is up is not (not found,
    access denied, a bad reference): serving a cached copy then would hide what the user must fix. A
    local directory that vanished is down, though: an NFS share that went away looks like that.
    """
    if isinstance(exc, ModelNotFoundError):
        return ref.scheme == "file"
    if isinstance(exc, AccessDeniedError | BadReferenceError | CapacityError | ResourceError):
        return False
    return isinstance(exc, FetchFailedError | TransientOriginError | OSError | aiohttp.ClientError | TimeoutError)


def _disk_full(exc: BaseException, root: str) -> BaseException:
    """A fill that ran out of disk or of descriptors gets one clear, typed line saying what to change."""
    if not isinstance(exc, OSError) or isinstance(exc, WarmstartError):
        return exc
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(
            f"disk full: no space left on the filesystem of {root} while filling{where}; "
            "verified pieces are kept: free space or lower --capacity, then fetch again"
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ResourceError(
            f"the agent ran out of file descriptors while filling{where}; verified pieces are kept: "
            "raise its open-file limit (ulimit -n, LimitNOFILE) or lower --open-files, then fetch again"
        )
    return exc
