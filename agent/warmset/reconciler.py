"""The declarative warm set: keeps the node's cache in line with a YAML file (a mounted ConfigMap).

The file's format is agent/warmset/spec.py's. One asyncio task (:meth:`WarmSet.run`)
owns it all. Every ``poll`` seconds it looks at the file (its resolved path, inode,
mtime, size; the content hash when any of them moved, so a ConfigMap's atomic
``..data`` symlink swap is seen), and on a change parses it strictly. A bad file
(YAML error, unknown key, bad reference) leaves the last good set in force; the error is in the status, the log and a
counter. A good one is reconciled: new entries start, removed ones are let go
(their pins dropped, their blobs evictable, never deleted under a reader).

Each entry is a small state machine (:class:`Entry`, :class:`EntryState`): ``pending``
-> ``fetching`` -> ``ready``, or ``failed`` with a reason. Its work runs as a task of its own
(bounded in number by a semaphore) through the same ModelService as
``agent prefetch``, so peers share the origin's bytes.

Rollover: when an entry resolves to a revision other than the one it has ready
(an edited ``@rev``, a moving ``@main`` that moved), the new revision is fetched
while the old one stays pinned (a store hold) and stays what a bare reference
opens (``ModelService.serving``); only when the new one is complete and every
file verified does the bare reference move and the old hold go.

Capacity is checked after resolving and before fetching: the entry's bytes plus
every other pinned byte (other models, held revisions, other warm-set entries in
flight) must fit the cache. When they do not, the entry is refused (state
``failed``, reason ``capacity``, a log line naming the sizes) and is not tried
again until the file changes or the pinned bytes shrink (re-checked locally,
without asking the origin). Other failures retry with exponential backoff, at
most ``MAX_ATTEMPTS`` times per revision, and then wait for the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import random
import re
import time
from typing import Any

from agent.errors import WarmSetError
from agent.manifest import FileEntry, Manifest
from agent.refs import ModelRef, parse_ref
from agent.service import ModelService, Progress
from agent.store.fill import write_json_atomic
from agent.store.store import Store
from agent.units import format_size
from agent.warmset.spec import EntrySpec, FileStamp, WarmSetSpec, parse_warm_set, stamp
from client.errors import CapacityError, WarmstartError

log = logging.getLogger(__name__)

DEFAULT_POLL = 0.5
CONCURRENCY = 4
MAX_ATTEMPTS = 5
BACKOFF_BASE = 2.0
BACKOFF_CAP = 120.0
_OWNED_FILE = "warm-set-owned.json"  # model keys whose pin this warm set set (so a later file can drop them)


class EntryState(enum.StrEnum):
    """Where one entry stands: pending -> fetching -> ready, or failed (with a reason and maybe a retry)."""

    PENDING = "pending"
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"


STATES = tuple(EntryState)


class Entry:
    """One model of the warm set and where it stands."""

    def __init__(self, spec: EntrySpec) -> None:
        self.spec = spec
        self.ref = spec.parsed
        self.state = EntryState.PENDING
        self.revision: str | None = None  # the ready revision (what is served)
        self.target: str | None = None  # the revision being fetched
        self.replacing: str | None = None  # the ready revision the target replaces
        self.manifest: Manifest | None = None  # of the target, or of the ready revision
        self.progress: Progress | None = None
        self.error: dict[str, str] | None = None
        self.attempts = 0  # failed tries of the current target
        self.next_try: float = 0.0  # monotonic; 0 = now
        self.retry = True  # False after a capacity refusal or giving up: wait for a change
        self.refused_against: int | None = None  # the other-pinned bytes a capacity refusal saw
        self.added = time.time()
        self.last_ready: float | None = None  # wall time it was last seen ready
        self.last_resolved = 0.0  # monotonic, when it last asked to resolve
        self.task: asyncio.Task[None] | None = None
        self.rollovers = 0

    @property
    def moving(self) -> bool:
        """Whether re-resolving can give another revision (no revision, or a name that is not a commit)."""
        rev = self.ref.revision
        return rev is None or not (self.ref.scheme == "hf" and re.fullmatch(r"[0-9a-f]{40}", rev))

    def fail(self, kind: str, message: str, retry_in: float | None) -> None:
        self.state = EntryState.FAILED
        self.error = {"kind": kind, "message": message}
        self.retry = retry_in is not None
        self.next_try = time.monotonic() + retry_in if retry_in is not None else 0.0

    def held(self) -> set[tuple[ModelRef, str]]:
        """The revisions this entry keeps pinned: the ready one, and the target while it is fetched."""
        if not self.spec.pin:
            return set()
        return {(self.ref, r) for r in (self.revision, self.target) if r}

    def to_json(self, now_wall: float, now_mono: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ref": self.spec.ref,
            "pin": self.spec.pin,
            "state": self.state,
            "revision": self.revision,
            "target_revision": self.target,
            "replacing": self.replacing,
            "total_bytes": self.manifest.total_size if self.manifest else None,
            "done_bytes": None,
            "error": self.error,
            "attempts": self.attempts,
            "next_retry_s": (
                round(max(0.0, self.next_try - now_mono), 1) if self.state == EntryState.FAILED and self.retry else None
            ),
            "last_ready": self.last_ready,
            "seconds_since_ready": self.seconds_since_ready(now_wall),
            "rollovers": self.rollovers,
        }
        if self.state == EntryState.FETCHING and self.progress is not None:
            out["done_bytes"] = self.progress.done_bytes
        elif self.state == EntryState.READY and self.manifest is not None:
            out["done_bytes"] = self.manifest.total_size
        return out

    def seconds_since_ready(self, now_wall: float) -> float:
        """0 while ready; else since it was last ready (or since it was listed, if never)."""
        if self.state == EntryState.READY:
            return 0.0
        return round(now_wall - (self.last_ready or self.added), 1)


class WarmSet:
    """Keeps the node's cache in line with the warm-set file."""

    def __init__(self, path: str, service: ModelService, poll: float = DEFAULT_POLL,
                 concurrency: int = CONCURRENCY) -> None:
        self.path = path
        self.service = service
        self.store = service.store
        self.poll = poll
        self.slots = asyncio.Semaphore(concurrency)
        self.spec: WarmSetSpec | None = None
        self.entries: dict[str, Entry] = {}  # model key -> entry, in file order
        self.stamp: FileStamp | None = None
        self.content_hash: str | None = None
        self.generation = 0  # good files applied
        self.loaded_at: float | None = None
        self.file_error: dict[str, Any] | None = None
        self.file_errors = 0
        self.rollovers = 0
        self.owned: set[str] = set()
        self._wake = asyncio.Event()
        self._owned_lock = asyncio.Lock()

    # -- the file --------------------------------------------------------------
    async def check_file(self) -> bool:
        """Load the file if it changed; True when a new good set was applied."""
        try:
            now = await self.store.run(stamp, self.path)
        except OSError as exc:
            if self.stamp is not None or self.file_error is None or "missing" not in self.file_error["message"]:
                self._bad_file(f"warm-set file {self.path} missing or unreadable: {exc.strerror or exc}")
            self.stamp = None
            return False
        if now == self.stamp:
            return False
        try:
            data = await self.store.run(_read_bytes, now.realpath)
        except OSError as exc:
            self._bad_file(f"cannot read warm-set file {self.path}: {exc}")
            return False
        self.stamp = now
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.content_hash:
            return False
        self.content_hash = digest
        try:
            spec = parse_warm_set(data.decode("utf-8", errors="strict"))
        except (WarmSetError, UnicodeDecodeError) as exc:
            self._bad_file(f"{self.path}: {exc}")
            return False
        await self.apply(spec)
        return True

    def _bad_file(self, message: str) -> None:
        self.file_errors += 1
        self.file_error = {"message": message, "at": time.time()}
        kept = f"keeping the last good warm set (generation {self.generation})" if self.spec else "no warm set in force"
        log.error("warm set: %s; %s", message, kept)

    async def apply(self, spec: WarmSetSpec) -> None:
        """Reconcile the entries with ``spec``: start new ones, let removed ones go."""
        old = self.entries
        new: dict[str, Entry] = {}
        for s in spec.entries:
            key = s.parsed.key
            entry = old.get(key)
            if entry is not None and entry.spec == s:
                new[key] = entry
                continue
            if entry is not None:
                self._stop(entry)
                if entry.ref.revision != s.parsed.revision or entry.spec.pin != s.pin:
                    nxt = Entry(s)
                    # The revision it had ready stays served and pinned until its successor is whole.
                    nxt.revision, nxt.last_ready, nxt.added = entry.revision, entry.last_ready, entry.added
                    nxt.manifest = entry.manifest if entry.revision else None
                    nxt.rollovers = entry.rollovers
                    entry = nxt
                else:
                    entry = Entry(s)
            else:
                entry = Entry(s)
            new[key] = entry
        removed = [e for k, e in old.items() if k not in new]
        self.entries = new
        self.spec = spec
        self.generation += 1
        self.loaded_at = time.time()
        self.file_error = None
        for entry in self.entries.values():  # a new file is a reason to try refused/failed entries again
            if entry.state == EntryState.FAILED:
                entry.retry, entry.next_try, entry.attempts = True, 0.0, 0
        for entry in removed:
            self._stop(entry)
            self.service.serving.pop(entry.ref.key, None)
        self._update_holds()
        for entry in removed:
            await self._let_go(entry)
        # Pins this warm set set in an earlier life (before a restart) for models it no longer lists.
        for key in sorted(self.owned - set(self.entries)):
            await self._unpin_key(key)
        log.info("warm set generation %d from %s: %d models (%s), refresh %gs%s", self.generation, self.path,
                 len(spec.entries), ", ".join(e.ref for e in spec.entries) or "-", spec.refresh,
                 f"; removed {', '.join(e.spec.ref for e in removed)}" if removed else "")
        self._wake.set()

    def _stop(self, entry: Entry) -> None:
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()

    async def _let_go(self, entry: Entry) -> None:
        """An entry left the file: unpin its model (evictable from now on; readers keep their blobs)."""
        if entry.ref.key in self.owned:
            await self._unpin_key(entry.ref.key)
        log.info("warm set: %s removed; unpinned, its blobs are evictable", entry.spec.ref)

    async def _unpin_key(self, key: str) -> None:
        rec = self.store.models.get(key)
        if rec is not None and rec.pinned:
            await self.store.record_model(parse_ref(rec.ref), rec.revision, False)
        self.owned.discard(key)
        await self._save_owned()

    async def _save_owned(self) -> None:
        async with self._owned_lock:  # one writer at a time, each writing the set as it is then
            await self.store.run(write_json_atomic, self.store.path(_OWNED_FILE), {"keys": sorted(self.owned)})

    async def _load_owned(self) -> None:
        def read() -> set[str]:
            try:
                with open(self.store.path(_OWNED_FILE), encoding="utf-8") as f:
                    return set(json.load(f).get("keys", []))
            except (OSError, ValueError, AttributeError):
                return set()

        self.owned = await self.store.run(read)

    def _update_holds(self) -> None:
        holds: set[tuple[ModelRef, str]] = set()
        for entry in self.entries.values():
            holds |= entry.held()
        self.store.set_holds("warm-set", holds)

    # -- the loop ------------------------------------------------------------
    async def run(self) -> None:
        await self._load_owned()
        while True:
            try:
                await self.check_file()
                self._schedule()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad turn
                log.exception("warm set: reconcile turn failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)

    async def close(self) -> None:
        tasks = [e.task for e in self.entries.values() if e.task is not None and not e.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _schedule(self) -> None:
        """Start the work each entry is due for (at most one task per entry)."""
        if self.spec is None:
            return
        now = time.monotonic()
        for entry in self.entries.values():
            if entry.task is not None and not entry.task.done():
                continue
            if entry.state == EntryState.FAILED:
                if entry.error and entry.error["kind"] == "capacity" and entry.manifest is not None:
                    entry.task = asyncio.create_task(self._recheck_capacity(entry), name=f"warm {entry.spec.ref}")
                    continue
                due = entry.retry and now >= entry.next_try
                if not due and now - entry.last_resolved < self.spec.refresh:
                    continue
                if not due and not entry.moving and entry.target is not None:
                    continue  # gave up on a fixed revision: only a new file tries again
            elif entry.state == EntryState.READY:
                fresh = not entry.moving or now - entry.last_resolved < self.spec.refresh
                if fresh and (entry.manifest is None or self.service.holds(entry.manifest)):
                    continue  # (a ready model someone evicted by hand is fetched again)
            entry.task = asyncio.create_task(self._work(entry), name=f"warm {entry.spec.ref}")

    async def _recheck_capacity(self, entry: Entry) -> None:
        """A refused entry: try again (locally) only when the other pinned bytes shrank."""
        assert entry.manifest is not None
        other = await self._other_pinned(entry, entry.manifest)
        if entry.refused_against is not None and other >= entry.refused_against:
            return
        await self._work(entry, entry.manifest)

    async def _work(self, entry: Entry, manifest: Manifest | None = None) -> None:
        async with self.slots:
            try:
                await self._bring_up(entry, manifest)
            except asyncio.CancelledError:
                raise
            except WarmstartError as exc:
                self._failed(entry, getattr(exc, "kind", "error"), str(exc))
            except Exception as exc:  # an unexpected error is reported like any other, never kills the loop
                log.exception("warm set: %s", entry.spec.ref)
                self._failed(entry, "internal", f"{type(exc).__name__}: {exc}")
            finally:
                self._update_holds()

    def _failed(self, entry: Entry, kind: str, message: str) -> None:
        entry.attempts += 1
        entry.progress = None
        if entry.attempts >= MAX_ATTEMPTS:
            entry.fail(kind, f"{message} (gave up after {entry.attempts} attempts; next try at the next refresh "
                             "or file change)", None)
            log.error("warm set: %s failed %d times, giving up until the next refresh: %s",
                      entry.spec.ref, entry.attempts, message)
            return
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (entry.attempts - 1)) * random.uniform(0.8, 1.2)
        entry.fail(kind, message, delay)
        log.warning("warm set: %s failed (attempt %d of %d), retrying in %.0fs: %s",
                    entry.spec.ref, entry.attempts, MAX_ATTEMPTS, delay, message)

    async def _bring_up(self, entry: Entry, manifest: Manifest | None) -> None:
        if manifest is None:
            entry.last_resolved = time.monotonic()
            _, manifest = await self.service.resolve(entry.spec.ref, fresh=True)
        if entry.revision is None and entry.moving and (rec := self.store.models.get(entry.ref.key)) is not None:
            # After a restart: the revision the node has whole is the one a new revision replaces.
            known = await self.store.load_manifest(entry.ref, rec.revision)
            if known is not None and await self.service.is_complete(known, entry.spec.selection):
                entry.revision = rec.revision
        rev = manifest.revision
        # From here on the entry's manifest is the part of the revision its selection picks (sizes, holds,
        # status); the saved manifest stays whole (agent/service.py ensure).
        manifest = await self.service.select(entry.ref, manifest, entry.spec.selection)
        if rev == entry.revision and self.service.holds(manifest):
            rec = self.store.models.get(entry.ref.key)
            if rec is None or rec.revision != rev or rec.pinned != entry.spec.pin:
                await self.store.record_model(entry.ref, rev, entry.spec.pin)
            if entry.state != EntryState.READY:
                log.info("warm set: %s ready at %s", entry.spec.ref, rev)
            self._ready(entry, manifest)
            return
        if entry.target != rev:
            entry.attempts = 0
        entry.target = rev
        entry.replacing = entry.revision if entry.revision and entry.revision != rev else None
        entry.manifest = manifest
        other = await self._other_pinned(entry, manifest)
        need = _unique_size(manifest)
        if need + other > self.store.capacity:
            entry.refused_against = other
            msg = (f"does not fit: {entry.spec.ref}@{rev} needs {format_size(need)}, the cache holds "
                   f"{format_size(self.store.capacity)} and {format_size(other)} of it is pinned by other models"
                   + (f" (including the revision {entry.replacing[:12]} it replaces)" if entry.replacing else "")
                   + "; raise --capacity, unpin models or shrink the warm set")
            entry.fail("capacity", msg, None)
            self._keep_serving_old(entry, rev)
            log.error("warm set: %s refused: %s", entry.spec.ref, msg)
            return
        entry.refused_against = None
        entry.state = EntryState.FETCHING
        if entry.spec.pin and entry.ref.key not in self.owned:
            self.owned.add(entry.ref.key)  # ensure() pins the record from now on: ours to unpin
            asyncio.get_running_loop().create_task(self._save_owned())
        entry.error = None
        entry.progress = self.service.progress(manifest)
        self._update_holds()  # the target is pinned (held) from its first byte
        if entry.replacing:
            # A bare reference keeps opening the complete revision until the new one is whole.
            self.service.serving[entry.ref.key] = entry.replacing
            log.info("warm set: rolling %s over from %s to %s (%s)", entry.spec.ref, entry.replacing[:12],
                     rev[:12], format_size(manifest.total_size))
        else:
            log.info("warm set: fetching %s@%s (%s)", entry.spec.ref, rev, format_size(manifest.total_size))
        try:
            manifest = await self.service.ensure(entry.ref, manifest, entry.spec.pin, entry.spec.selection)
        except CapacityError as exc:  # the disk (not the pinned total) is short: wait for a change too
            other = await self._other_pinned(entry, manifest)
            entry.fail("capacity", str(exc), None)
            entry.refused_against = other
            self._keep_serving_old(entry, rev)
            log.error("warm set: %s refused: %s", entry.spec.ref, exc)
            return
        replaced = entry.replacing
        self._ready(entry, manifest)
        if replaced:
            entry.rollovers += 1
            self.rollovers += 1
            log.info("warm set: %s rolled over to %s; %s unpinned", entry.spec.ref, rev[:12], replaced[:12])
        else:
            log.info("warm set: %s ready at %s", entry.spec.ref, rev)

    def _keep_serving_old(self, entry: Entry, rev: str) -> None:
        """A refused target: the ready revision (if any) stays served and pinned; the target is dropped."""
        entry.target = None if entry.revision else rev
        entry.replacing = None
        if entry.revision:
            self.service.serving[entry.ref.key] = entry.revision

    def _ready(self, entry: Entry, manifest: Manifest) -> None:
        entry.state = EntryState.READY
        entry.revision = manifest.revision
        entry.manifest = manifest
        entry.target = entry.replacing = None
        entry.error = None
        entry.attempts = 0
        entry.retry = True
        entry.progress = None
        entry.last_ready = time.time()
        self.service.serving.pop(entry.ref.key, None)
        if entry.spec.pin and entry.ref.key not in self.owned:
            self.owned.add(entry.ref.key)
            asyncio.get_running_loop().create_task(self._save_owned())
        self._update_holds()

    async def _other_pinned(self, entry: Entry, manifest: Manifest) -> int:
        """Bytes pinned by everything but this target: models, held revisions, other entries being fetched.

        No await after the pinned set is read: the caller decides and marks the entry
        ``fetching`` in the same step, so two entries never both count on the same room.
        """
        pinned = await self.store.pinned_digests()
        mine = {_file_id(self.store, f) for f in manifest.files}
        sizes: dict[str, int] = {d: self.store.blob_sizes.get(d, 0) for d in pinned}
        for other in self.entries.values():
            if other is entry or not other.spec.pin or other.state != EntryState.FETCHING or other.manifest is None:
                continue
            for f in other.manifest.files:
                sizes.setdefault(_file_id(self.store, f), f.size)
        return sum(size for key, size in sizes.items() if key not in mine)

    # -- what is shown ---------------------------------------------------------
    def state_counts(self) -> dict[EntryState, int]:
        """How many entries are in each state (every state present, 0 included)."""
        counts = dict.fromkeys(STATES, 0)
        for e in self.entries.values():
            counts[e.state] += 1
        return counts

    def status(self) -> dict[str, Any]:
        now_wall, now_mono = time.time(), time.monotonic()
        entries = [e.to_json(now_wall, now_mono) for e in self.entries.values()]
        counts = self.state_counts()
        return {
            "path": self.path,
            "generation": self.generation,
            "loaded_at": self.loaded_at,
            "refresh_s": self.spec.refresh if self.spec else None,
            "file_error": self.file_error,
            "file_errors_total": self.file_errors,
            "rollovers_total": self.rollovers,
            "states": counts,
            "capacity_bytes": self.store.capacity,
            "entries": entries,
        }


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024 * 1024 + 1)[: 1024 * 1024]


def _file_id(store: Store, f: FileEntry) -> str:
    return store.digest_of(f) or f.digest or store.sources.get(f.fill_key) or f"fill:{f.fill_key}"


def _unique_size(manifest: Manifest) -> int:
    seen: dict[str, int] = {}
    for f in manifest.files:
        seen.setdefault(f.digest or f.fill_key, f.size)
    return sum(seen.values())
