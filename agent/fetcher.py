"""Fill missing blobs from an origin: parallel pieces, retries, one flight per blob.

Every piece is one range request. Up to ``connections`` requests run at once
across the whole agent; waiting pieces are admitted in the order their files
were asked for, then piece order (agent/slots.py), so the front of a model
lands first. A piece streams into its place in the partial file with
positional writes while it is hashed (xxh3-128); it is recorded only when all
of it arrived and, if the manifest already knows its hash, matched. Transient
failures retry with exponential backoff and full jitter, a bounded number of
times; what was verified stays for the next attempt or the next process.

Concurrent requests for the same blob (same fill key) share one flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass, field

import xxhash

from agent.fill import BlobFill
from agent.manifest import FileEntry
from agent.origins import Origin, TransientOriginError
from agent.slots import OrderedSlots
from agent.store import Store
from client.errors import FetchFailedError, IntegrityError

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0


@dataclass
class Flight:
    """One blob being filled; shared by everyone who asked for it."""

    entry: FileEntry
    task: asyncio.Task[str] | None = None
    done_bytes: int = 0
    fetched_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    order: int = 0
    # Readable while filling (for clients that stream): the partial file and its
    # verified pieces, kept on the event loop's side so the API can read them safely.
    partial: str | None = None
    done_pieces: set[int] = field(default_factory=set)


class Fetcher:
    def __init__(self, store: Store, connections: int, retries: int) -> None:
        self.store = store
        self.retries = retries
        self._slots = OrderedSlots(connections)
        self._order = itertools.count()  # flights in the order they were asked for (file order)
        self.flights: dict[str, Flight] = {}
        self.origin_bytes = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        """Wake everyone waiting in :meth:`wait_change` (a piece or a blob completed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        """Return when a piece or a blob completes anywhere, or after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def ensure_blob(self, entry: FileEntry, origin: Origin, protect: set[str]) -> str:
        """Make ``entry``'s bytes a complete blob in the store; return its digest."""
        digest = self.store.digest_of(entry)
        if digest is not None:
            entry.digest = digest
            return digest
        flight = self.flights.get(entry.fill_key)
        if flight is None:
            flight = Flight(entry, order=next(self._order))
            flight.task = asyncio.create_task(self._fill(flight, origin, protect), name=f"fill {entry.path}")
            self.flights[entry.fill_key] = flight
            flight.task.add_done_callback(lambda _t, k=entry.fill_key: self.flights.pop(k, None))
        assert flight.task is not None
        digest = await asyncio.shield(flight.task)
        entry.digest = digest
        entry.pieces = flight.entry.pieces
        return digest

    async def _fill(self, flight: Flight, origin: Origin, protect: set[str]) -> str:
        entry = flight.entry
        fill, have = await self.store.begin_fill(entry, protect)
        flight.done_bytes = have
        flight.done_pieces = set(fill.done)
        flight.partial = self.store.relative(fill.path)
        self._notify()
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    for index in fill.missing():
                        tg.create_task(self._fetch_piece(fill, index, origin, flight))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            digest = await self.store.finish_fill(fill, lambda d: _check_whole(entry, d))
        except BaseException:
            await self.store.abandon_fill(fill)
            self._notify()
            raise
        self._notify()
        log.info(
            "filled %s (%d bytes, %d from origin) in %.2fs",
            entry.path, entry.size, flight.fetched_bytes, time.monotonic() - flight.started,
        )
        return digest

    async def _fetch_piece(self, fill: BlobFill, index: int, origin: Origin, flight: Flight) -> None:
        offset, length = fill.entry.piece_range(index)
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            hasher = xxhash.xxh3_128()
            pos = offset

            async def sink(chunks: list[bytes]) -> None:
                nonlocal pos
                n = await self.store.run(_write_and_hash, fill, pos, chunks, hasher)
                pos += n
                flight.done_bytes += n
                flight.fetched_bytes += n
                self.origin_bytes += n

            async with self._slots.hold((flight.order, index)):
                try:
                    if length:
                        await origin.read_range(fill.entry, offset, length, sink)
                    await self.store.run(fill.record_piece, index, hasher.hexdigest())
                    flight.done_pieces.add(index)
                    self._notify()
                    return
                except (TransientOriginError, IntegrityError) as exc:
                    last = exc
                    flight.done_bytes -= pos - offset
                    log.warning(
                        "piece %d of %s failed (attempt %d/%d): %s",
                        index, fill.entry.path, attempt + 1, self.retries, exc,
                    )
        raise FetchFailedError(
            f"{fill.entry.path!r}: piece {index} failed {self.retries} times, last: {last}"
        )


def _write_and_hash(fill: BlobFill, offset: int, chunks: list[bytes], hasher: xxhash.xxh3_128) -> int:
    fill.write(offset, chunks)
    for chunk in chunks:
        hasher.update(chunk)
    return sum(len(c) for c in chunks)


def _check_whole(entry: FileEntry, digests: dict[str, str]) -> None:
    """Compare the finished file with every digest the origin or manifest promised."""
    for name, expected in (("sha256", entry.sha256), ("git_sha1", entry.git_sha1), ("xxh128", entry.digest)):
        if expected and digests.get(name) != expected:
            raise IntegrityError(
                f"{entry.path!r}: {name} of the fetched bytes is {digests.get(name)}, the origin says {expected}"
            )


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a TaskGroup's exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
