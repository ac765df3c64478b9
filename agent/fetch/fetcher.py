"""Fill missing blobs: one flight per blob, its pieces from peers or the origin, then verify and publish.

Concurrent requests for the same blob (same fill key) share one flight; every
piece has one fetch at a time however many ask for it (this node's flight and
peers asking for the piece, agent/fetch/piece_server.py). A flight opens the
blob's partial file (agent/fetch/open_fills.py), gets each missing piece --
joining a fetch already running for it, else from peers when placement says
another node owns it (agent/fetch/peer_reader.py), else from the origin
(agent/fetch/origin_reader.py) -- and then finishes the file in one line:
whole-file digests, checked against the origin's, published as a blob
(agent/store/). A file whose check fails with pieces from peers in it is
repaired from the origin, not discarded.

The parts, each owning its state::

    Fetcher        flights (fill key -> Flight), finishing, repair; the facade the service calls
    OpenFills      partial files open in this process, their per-piece tasks and streams
    OriginReader   origin request windows per host (agent/fetch/concurrency.py), spans of pieces, retries
    PeerReader     peer connection slots, whom to ask, what failures say about a peer
    PieceServer    answers peers' piece requests (blob, partial, running fetch, or a new origin fetch)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Set as AbstractSet

from agent.errors import PeerBusyError, PeerError, PieceMovedError
from agent.fetch.flight import Flight, PeerContext
from agent.fetch.open_fills import OpenFill, OpenFills, PieceStream, Signal
from agent.fetch.origin_reader import OriginReader
from agent.fetch.peer_reader import PEER_SCHEMES, PeerReader, relay_said_no
from agent.fetch.piece_server import PieceServer, ServedPiece
from agent.manifest import Blob, BlobDigest, FileEntry
from agent.metrics import Metrics
from agent.origins import Origin
from agent.singleflight import SingleFlight
from agent.store.store import Store
from client.errors import FetchFailedError, IntegrityError

__all__ = ["PEER_SCHEMES", "Fetcher", "Flight", "PeerContext", "ServedPiece", "first_error"]

log = logging.getLogger(__name__)

JOIN_TRIES = 3  # fetches of a piece started by others (for peers) that a flight waits out before failing
BUSY_ROUNDS = 3  # times peers that answered busy for a piece are asked again before the origin
BUSY_PAUSE = 0.25  # seconds before the first of those rounds, doubling each round


class Fetcher:
    """Makes blobs whole: the flights, and the readers and server they share."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        connections: int,
        retries: int,
        peers: PeerReader | None = None,
        *,
        open_files: int = 256,
        origin_ceiling: int = 128,
        origin_inflight: int = 512 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._changed = Signal()
        self._order = itertools.count()  # flights in the order they were asked for (file order)
        self._flights: dict[str, Flight] = {}
        self._fill_tasks: SingleFlight[str, Blob] = SingleFlight()
        self.fills = OpenFills(store, open_files)
        self.origin = OriginReader(
            store, metrics, connections, retries, self._changed.wake, ceiling=origin_ceiling, inflight=origin_inflight
        )
        self.peers = peers
        self.server = PieceServer(store, self.fills, self.origin, peers, lambda key: key in self._flights)

    # -- what others read ---------------------------------------------------
    async def wait_change(self, timeout: float) -> None:
        """Return when a piece or a blob completes anywhere, or after ``timeout`` seconds."""
        await self._changed.wait(timeout)

    @property
    def parallel_files(self) -> int:
        """How many files may fill at once (the open-files limit): callers need not start more than that."""
        return self.fills.limit

    def in_flight(self) -> int:
        """Files being filled now."""
        return len(self._flights)

    def done_bytes(self, fill_key: str) -> int:
        """Bytes of the file verified or arriving now (0 when it is not being filled)."""
        flight = self._flights.get(fill_key)
        return flight.done_bytes if flight is not None else 0

    def verified_pieces(self, fill_key: str) -> int:
        flight = self._flights.get(fill_key)
        return len(flight.done_pieces) if flight is not None else 0

    def filling(self, fill_key: str) -> tuple[str, frozenset[int]] | None:
        """(partial file under the cache root, its verified pieces) while the file fills, else None."""
        flight = self._flights.get(fill_key)
        if flight is None or flight.partial is None:
            return None
        return flight.partial, frozenset(flight.done_pieces)

    async def serve_piece(
        self, entry: FileEntry, index: int, origin: Origin, *, relay: bool = False, requester: str = ""
    ) -> ServedPiece:
        """Where a peer can read piece ``index`` of ``entry`` now (agent/fetch/piece_server.py)."""
        return await self.server.serve(entry, index, origin, relay=relay, requester=requester)

    async def holds(self, keys: list[str], piece_size: int) -> tuple[list[str], dict[str, list[int]]]:
        """Files held complete and pieces verified here, for a peer's ``/peer/v1/have`` (PieceServer.holds)."""
        return await self.server.holds(keys, piece_size)

    async def close(self) -> None:
        """Stop every flight (shutdown): what was verified stays for the next process."""
        tasks = self._fill_tasks.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one blob ------------------------------------------------------------
    async def ensure_blob(
        self, entry: FileEntry, origin: Origin, protect: AbstractSet[str], ctx: PeerContext | None = None
    ) -> Blob:
        """Make ``entry``'s bytes a complete blob in the store (one flight however many ask)."""
        digest = self.store.digest_of(entry)
        if digest is not None:
            return Blob(digest, entry.pieces)
        key = entry.fill_key
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = Flight(entry, order=next(self._order), ctx=ctx)
            self.origin.expect(flight, origin)
            task = self._fill_tasks.start(key, lambda: self._fill(flight, origin, protect), f"fill {entry.path}")
            task.add_done_callback(lambda _t: self._flights.pop(key, None))
        return await self._fill_tasks.run(key, lambda: self._fill(flight, origin, protect))

    async def _fill(self, flight: Flight, origin: Origin, protect: AbstractSet[str]) -> Blob:
        try:
            return await self._fill_file(flight, origin, protect)
        finally:
            self.origin.settle(flight)

    async def _fill_file(self, flight: Flight, origin: Origin, protect: AbstractSet[str]) -> Blob:
        entry = flight.entry
        h = await self.fills.acquire(entry, protect)
        fill = h.fill
        try:
            # Pieces from peers recorded before a restart: still peers' pieces, checked (and repaired if
            # need be) with the whole file, and not shown to streaming readers before that.
            flight.peer_pieces.update(fill.peer_sources)
            flight.done_pieces = set(fill.done) - set(fill.peer_sources)
            flight.done_bytes = sum(entry.piece_range(i)[1] for i in fill.done)
            flight.partial = self.store.relative(fill.path)
            self._changed.wake()
            flight.use_peers = self.peers is not None and await self.peers.allowed(flight, h, origin)
            if flight.use_peers and self.peers is not None:
                self.origin.settle(flight)  # pieces spread over peers: no file-order admission to hold
                await self.peers.wait_start()
                await self.peers.learn_holders(flight)
            try:
                async with asyncio.TaskGroup() as tg:
                    for index in fill.missing():
                        tg.create_task(self._piece(h, index, origin, flight))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            blob = await self._finish(h, flight, origin)
        except BaseException:
            self._changed.wake()
            self.fills.release(h, close=True)  # the next try opens it again, re-checking recorded pieces
            raise
        self.fills.release(h)
        self._changed.wake()
        log.info(
            "filled %s (%d bytes, %d from origin, %d pieces from peers, %d fetched here first for peers) in %.2fs",
            entry.path, entry.size, flight.fetched_bytes, len(flight.peer_pieces), flight.joined_pieces,
            time.monotonic() - flight.started,
        )
        return blob

    async def _finish(self, h: OpenFill, flight: Flight, origin: Origin) -> Blob:
        """Digests -> checked against the origin's -> published; a file that fails is discarded, never published.

        If pieces came from peers and the file does not match, it is not thrown
        away: those pieces are fetched again from the origin, peers whose piece
        differed are penalised, and the repaired file is checked again.
        """
        entry, fill = flight.entry, h.fill
        try:
            digests = await self.store.fill_digests(fill)
            mismatch = _mismatch(entry, digests, flight.stored_crc32c) if flight.peer_pieces else None
            if mismatch is not None:
                log.error("%s does not match the origin's digest with %d pieces from peers (%s); "
                          "fetching those again from the origin", entry.path, len(flight.peer_pieces), mismatch)
                await self._repair_from_origin(h, flight, origin)
                digests = await self.store.fill_digests(fill)
            _check_whole(entry, digests, flight.stored_crc32c)
        except IntegrityError:
            self.fills.retire(h)
            await self.store.discard_fill(fill)
            raise
        digest = BlobDigest(digests["xxh128"])
        try:
            pieces = await self.store.publish_fill(fill, digest)
        finally:
            self.fills.retire(h)
        flight.done_pieces.update(range(entry.piece_count))  # peer pieces show only now, checked
        return Blob(digest, pieces)

    async def _repair_from_origin(self, h: OpenFill, flight: Flight, origin: Origin) -> None:
        fill = h.fill
        sent = dict(flight.peer_pieces)
        flight.peer_pieces.clear()
        transfers = self.metrics.transfers
        transfers.peer_files_repaired += 1
        transfers.peer_bytes_repaired += sum(flight.entry.piece_range(i)[1] for i in sent)
        before = {i: fill.done[i] for i in sent if i in fill.done}
        for index in sent:
            await self.store.run(fill.forget_piece, index)
        try:
            async with asyncio.TaskGroup() as tg:
                for index in sent:
                    tg.create_task(self.origin.piece(h, index, origin, None))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        differed: dict[str, list[int]] = {}
        for index, addr in sent.items():
            if fill.done.get(index) != before.get(index):
                transfers.peer_pieces_rejected += 1
                differed.setdefault(addr, []).append(index)
        for addr, indexes in differed.items():  # one strike per peer and file, however many pieces
            if self.peers is not None:
                pieces = ",".join(map(str, sorted(indexes)))
                self.peers.penalise(addr, f"pieces {pieces} of {flight.entry.path} differed from the origin's")
        await self.store.run(fill.reset_whole, None)

    # -- one piece -----------------------------------------------------------
    async def _piece(self, h: OpenFill, index: int, origin: Origin, flight: Flight) -> None:
        """Get piece ``index`` into the file: join a fetch already running for it, or start one.

        The placement is prepared first (``PeerReader.sources``): it awaits a
        thread, and a peer asking for this piece meanwhile starts an origin fetch
        of it here (``PieceServer``). From the last look for such a fetch to
        tracking our own there is no await, so a piece is never fetched twice in
        one process.
        """
        peers = self.peers if flight.use_peers else None
        if peers is not None:
            await peers.prepare(flight)
        if not await self._join(h, index, flight):
            return
        sources = peers.sources(flight, index) if peers is not None else []
        if sources:
            task = asyncio.create_task(self._from_peers(h, index, origin, flight, sources))
        else:
            # Without peers, the missing pieces after this one go in the same request (a span);
            # with peers each piece is placed on its own node, so one piece a request.
            span = [index] if peers is not None else self.origin.span_from(h, index, flight)
            # Announced now, not when the task first runs: a peer asking for one of these
            # pieces in between must follow this fetch, not start a second one.
            streams = {i: h.announce(i) for i in span}
            # This node owns the piece: the other nodes will ask for it, so it goes first.
            owned = peers is not None and peers.has_peers()
            if owned:
                task = asyncio.create_task(self._own_piece(h, index, origin, flight, streams[index]))
            else:
                task = asyncio.create_task(
                    self.origin.span(h, span, origin, flight, streams, whole_pieces=peers is not None)
                )
            for i in span[1:]:
                h.track(i, task)  # their own _piece tasks join this one
        h.track(index, task)
        await task

    async def _own_piece(self, h: OpenFill, index: int, origin: Origin, flight: Flight, stream: PieceStream) -> None:
        """A piece this node owns: from the origin, unless by the time a connection is free it has a peer source.

        Members that appear meanwhile (the first seconds of a scale-up, a node
        joining that holds the model) re-place the pieces not yet begun: placement
        is asked again when the origin slot is ours, before any byte is asked for.
        """
        peers = self.peers
        assert peers is not None

        async def still_mine() -> bool:
            await peers.prepare(flight)
            return not peers.sources(flight, index)

        try:
            await self.origin.span(
                h, [index], origin, flight, {index: stream}, first=True, whole_pieces=True, still_mine=still_mine
            )
        except PieceMovedError:
            sources = peers.sources(flight, index)
            log.debug("piece %d of %s: re-placed, asking %s", index, flight.entry.path, sources)
            await self._from_peers(h, index, origin, flight, sources)

    async def _join(self, h: OpenFill, index: int, flight: Flight) -> bool:
        """Wait out fetches of the piece that others started here; False when one of them got it."""
        for _ in range(JOIN_TRIES):
            if index in h.fill.done:
                break
            running = h.tasks.get(index)
            if running is None:
                break
            # whoever started it failed however it failed: try it ourselves
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        else:
            if index not in h.fill.done and h.tasks.get(index) is not None:
                raise FetchFailedError(
                    f"{flight.entry.path!r}: piece {index} failed in {JOIN_TRIES} fetches started for peers"
                )
        if index not in h.fill.done:
            return True
        if index not in flight.done_pieces:  # fetched from the origin for a peer that asked first
            flight.done_pieces.add(index)
            flight.done_bytes += flight.entry.piece_range(index)[1]
            flight.joined_pieces += 1
        self._changed.wake()
        return False

    async def _from_peers(
        self, h: OpenFill, index: int, origin: Origin, flight: Flight, sources: list[tuple[str, bool]]
    ) -> None:
        """Ask holders, the relay parent, then the owners in rendezvous order; the origin when none delivered.

        A peer that answered busy (PeerBusyError: a holder finishing the file, an
        owner between two tries) is asked again, BUSY_ROUNDS times at most with
        a growing pause, before the origin: a short refusal must not send the
        piece (and, piece after piece, the whole file) to the origin. When none
        delivered, the piece is placed again with the members of now, and the
        owners not asked yet are asked the same way before the origin.
        """
        peers = self.peers
        assert peers is not None
        asked: set[str] = set()
        for placing in range(2):
            if placing:
                # The sources were placed with the members of when this piece began. If one joined
                # or went down since (the failures above may be that very change: an owner that
                # re-placed the piece onto a node joining mid-storm, or that died, cuts off those
                # following it), the piece has another owner now, who gets it from the origin once
                # for everyone: ask the owners not asked yet before taking it from the origin here.
                await peers.prepare(flight)
                sources = [(a, relay) for a, relay in peers.sources(flight, index) if a not in asked and not relay]
                if not sources:
                    break
                log.debug("piece %d of %s: placed anew, asking %s", index, flight.entry.path, sources)
            if await self._ask_peers(h, index, flight, sources, asked):
                return
        await self.origin.piece(h, index, origin, flight, h.announce(index))

    async def _ask_peers(
        self, h: OpenFill, index: int, flight: Flight, sources: list[tuple[str, bool]], asked: set[str]
    ) -> bool:
        """Ask ``sources`` in turn, those that answered busy again (BUSY_ROUNDS); True once one delivered."""
        assert self.peers is not None
        for attempt in range(BUSY_ROUNDS + 1):
            busy: list[tuple[str, bool]] = []
            for addr, relay in sources:
                asked.add(addr)
                try:
                    await self.peers.piece(h, index, addr, flight, relay)
                    return True
                except PeerError as exc:
                    if isinstance(exc, PeerBusyError) and not relay:
                        busy.append((addr, relay))
                    log.log(logging.DEBUG if relay_said_no(exc, relay) else logging.INFO,
                            "piece %d of %s from peer %s failed: %s", index, flight.entry.path, addr, exc)
            if not busy or attempt == BUSY_ROUNDS:
                return False
            await asyncio.sleep(BUSY_PAUSE * 2**attempt)
            sources = busy
        return False


def _mismatch(entry: FileEntry, digests: dict[str, str], stored_crc32c: str | None = None) -> str | None:
    """How the finished file differs from every digest the origin or manifest promised (None: it matches).

    ``stored_crc32c``: a whole-object CRC32C the object store keeps (Flight.stored_crc32c).
    """
    if stored_crc32c is not None and digests.get("crc32c") != stored_crc32c:
        return (f"{entry.path!r}: crc32c of the fetched bytes is {digests.get('crc32c')}, "
                f"the object store says {stored_crc32c}")
    named = (("sha256", entry.sha256), ("git_sha1", entry.git_sha1), ("crc32c", entry.crc32c), ("xxh128", entry.digest))
    for name, expected in named:
        if expected and digests.get(name) != expected:
            return f"{entry.path!r}: {name} of the fetched bytes is {digests.get(name)}, the origin says {expected}"
    if "s3_etag" in digests:
        if entry.md5:  # GCS / Azure: the MD5 the origin lists (agent/store/fill.py origin_md5_only)
            if digests["s3_etag"] != entry.md5:
                return f"{entry.path!r}: md5 of the fetched bytes is {digests['s3_etag']}, the origin says {entry.md5}"
            return None
        expected = str(entry.source.get("etag", "")).strip('"').lower()
        if digests["s3_etag"] != expected:
            return f"{entry.path!r}: the fetched bytes make ETag {digests['s3_etag']}, S3 says {expected}"
    return None


def _check_whole(entry: FileEntry, digests: dict[str, str], stored_crc32c: str | None = None) -> None:
    """Raise IntegrityError when the finished file is not what the origin promised."""
    mismatch = _mismatch(entry, digests, stored_crc32c)
    if mismatch is not None:
        raise IntegrityError(mismatch)


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a TaskGroup's exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
