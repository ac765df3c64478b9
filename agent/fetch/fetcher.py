"""Fill missing blobs: parallel pieces from peers or the origin, retries, one flight per blob.

Every piece is one range request. Up to ``connections`` origin requests run at
once across the whole agent; waiting pieces are admitted in the order their
files were asked for, then piece order (agent/fetch/slots.py), so the front of a
model lands first. A piece streams into its place in the partial file with
positional writes while it is hashed (xxh3-128); it is recorded only when all
of it arrived and, if the manifest already knows its hash, matched. Transient
failures retry with exponential backoff and full jitter, a bounded number of
times; what was verified stays for the next attempt or the next process.

Concurrent requests for the same blob (same fill key) share one flight, and
every piece has one fetch at a time however many ask for it: this node's own
flight and peers asking for the piece (agent/api/peer.py) wait on the same one.

Piece sources (with peers configured, agent/peers/membership.py): a piece that another
live member owns by rendezvous order is asked of that owner first, then the
next, finally fetched from the origin; a piece this node owns comes from the
origin. Trust: a peer's piece must match the hash the peer states for it, and
the whole file must match the origin's own digest (sha256, git blob id or the
S3 ETag) before it is published; a file whose origin gives no such digest is
never taken from peers. Peer pieces are not shown to streaming readers
(``Flight.done_pieces``) before that check passed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from agent.store.fill import BlobFill
from agent.manifest import FileEntry, Manifest
from agent.metrics import Metrics
from agent.origins import Origin, TransientOriginError
from agent.peers.client import (
    PeerCutShortError,
    PeerDownError,
    PeerError,
    PeerLiedError,
    PeerRefusedError,
    PeerSlowError,
    PieceRequest,
)
from agent.peers.membership import PieceSpec
from agent.fetch.slots import OrderedSlots
from agent.store.store import Store
from client.errors import FetchFailedError, IntegrityError

if TYPE_CHECKING:
    from agent.peers.client import PeerClient
    from agent.peers.membership import Membership

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0
PEER_TRIES = 2  # owners asked for a piece before the origin
# The most one origin range request asks for when a node fills without peers: several
# consecutive pieces in one request. SeaweedFS served the 1 GiB bench model in 64 MiB
# ranges in 0.7-0.75x the time and server CPU of 16 MiB ones (bench/RESULTS.md "Cold miss").
ORIGIN_RANGE_MAX = 64 * 1024 * 1024
JOIN_TRIES = 3  # fetches of a piece started by others (for peers) that a flight waits out before failing
# Pieces asked of peers at once. Many more than origin connections: a piece that its owner
# is itself still getting from the origin arrives only at the owner's share of the origin's
# rate, so a node must follow many such pieces at once to fill its own link (measured: with
# 8 at a time, 8 nodes behind 100 Mbit/s links each downloaded at about half their rate until
# the origin was done; bench/RESULTS.md "Peers").
PEER_CONNECTIONS_FACTOR = 4
PEER_CONNECTIONS_MIN = 32
# How long a relay parent that is getting the file itself waits for its fetch of the asked
# piece to start before it says no (under the requester's hedge timeout, 2 s by default).
RELAY_WAIT = 1.0
FILL_LINGER = 30.0  # seconds an idle partial file stays open for peers asking for more of it
PEER_SCHEMES = ("s3", "hf", "https")  # origins whose references peers may name (never a node's local files)


@dataclass(frozen=True)
class PeerContext:
    """Where a flight's bytes come from, as a peer must be told to check it itself."""

    ref: str  # the reference's base, e.g. s3://bucket/prefix
    revision: str
    scheme: str
    # every piece of the model, in model order, so that all nodes spread its owners evenly the same way
    pieces: tuple[PieceSpec, ...] = field(default=(), compare=False, hash=False, repr=False)
    # (fill key, index) -> position in ``pieces``
    positions: dict[tuple[str, int], int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, ref_base: str, scheme: str, manifest: Manifest) -> PeerContext:
        pieces = tuple((f.fill_key, i, f.piece_range(i)[1]) for f in manifest.files for i in range(f.piece_count))
        return cls(ref_base, manifest.revision, scheme, pieces, {(k, i): n for n, (k, i, _) in enumerate(pieces)})


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
    # Pieces from peers join only when the whole file checked out (at commit).
    partial: str | None = None
    done_pieces: set[int] = field(default_factory=set)
    ctx: PeerContext | None = None
    use_peers: bool = False
    peer_pieces: dict[int, str] = field(default_factory=dict)  # index -> the peer that sent it
    joined_pieces: int = 0  # pieces another fetch here got first (one started for a peer that asked)


class Signal:
    """A broadcast wake-up: :meth:`wake` releases everyone waiting now; :meth:`wait` has a timeout."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


class PieceStream(Signal):
    """A fetch of one piece in progress, for readers that pass the bytes on as they land.

    ``upstream`` is the peer the bytes come from (None: the origin).
    ``written`` is how many bytes from the piece's start are in the file;
    ``attempt`` changes when a try failed and the piece starts over (a reader
    that already sent bytes of the failed try gives up); ``digest`` is set once
    the piece is recorded, ``failed`` when it never will be.
    """

    def __init__(self, upstream: str | None = None) -> None:
        super().__init__()
        self.upstream = upstream
        self.written = 0
        self.attempt = 0
        self.digest: str | None = None
        self.failed = False


class OpenFill:
    """A partial file open in this process: the one BlobFill its users (flight, peers) share."""

    def __init__(self, fill: BlobFill) -> None:
        self.fill = fill
        self.users = 0
        self.closed = False
        self.tasks: dict[int, asyncio.Task[None]] = {}  # one fetch per piece
        self.streams: dict[int, PieceStream] = {}  # pieces being fetched, that peers may follow
        self.announced = Signal()  # a stream was added
        self.linger: asyncio.TimerHandle | None = None


@dataclass
class ServedPiece:
    """How to answer a peer for one piece: bytes of ``path`` at ``offset``, hash now or when ``stream`` ends."""

    path: str
    offset: int
    length: int
    digest: str | None
    stream: PieceStream | None = None


class Fetcher:
    def __init__(self, store: Store, connections: int, retries: int, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.retries = retries
        self._slots = OrderedSlots(connections)
        self._peer_slots = OrderedSlots(max(PEER_CONNECTIONS_MIN, PEER_CONNECTIONS_FACTOR * connections))
        self._order = itertools.count()  # flights in the order they were asked for (file order)
        self.flights: dict[str, Flight] = {}
        self._fills: dict[str, OpenFill] = {}
        self._opening: dict[str, asyncio.Task[OpenFill]] = {}
        self._meta_pieces: dict[str, list[str]] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self.peers: Membership | None = None
        self.peer_client: PeerClient | None = None
        self.origin_bytes = 0
        self.peer_bytes_received = 0
        self.peer_bytes_served = 0
        self.peer_bytes_relayed = 0  # of those, to relay requests (as a parent in a piece's relay tree)
        self.peer_pieces_rejected = 0
        self.peer_files_repaired = 0
        self.peer_bytes_repaired = 0
        self._changed = Signal()

    def stats(self) -> dict[str, int]:
        return {
            "origin_bytes": self.origin_bytes,
            "peer_bytes_received": self.peer_bytes_received,
            "peer_bytes_served": self.peer_bytes_served,
            "peer_bytes_relayed": self.peer_bytes_relayed,
            "peer_pieces_rejected": self.peer_pieces_rejected,
            "peer_files_repaired": self.peer_files_repaired,
            "peer_bytes_repaired": self.peer_bytes_repaired,
        }

    def _notify(self) -> None:
        """Wake everyone waiting in :meth:`wait_change` (a piece or a blob completed)."""
        self._changed.wake()

    async def wait_change(self, timeout: float) -> None:
        """Return when a piece or a blob completes anywhere, or after ``timeout`` seconds."""
        await self._changed.wait(timeout)

    async def ensure_blob(
        self, entry: FileEntry, origin: Origin, protect: set[str], ctx: PeerContext | None = None
    ) -> str:
        """Make ``entry``'s bytes a complete blob in the store; return its digest."""
        digest = self.store.digest_of(entry)
        if digest is not None:
            entry.digest = digest
            return digest
        flight = self.flights.get(entry.fill_key)
        if flight is None:
            flight = Flight(entry, order=next(self._order), ctx=ctx)
            flight.task = asyncio.create_task(self._fill(flight, origin, protect), name=f"fill {entry.path}")
            self.flights[entry.fill_key] = flight
            flight.task.add_done_callback(lambda _t, k=entry.fill_key: self.flights.pop(k, None))
        assert flight.task is not None
        digest = await asyncio.shield(flight.task)
        entry.digest = digest
        entry.pieces = flight.entry.pieces
        return digest

    # -- the partial files open in this process -----------------------------
    async def _acquire(self, entry: FileEntry, protect: set[str]) -> OpenFill:
        key = entry.fill_key
        h = self._fills.get(key)
        if h is None:
            opening = self._opening.get(key)
            if opening is None:
                opening = asyncio.create_task(self._open_fill(entry, protect), name=f"open {entry.path}")
                self._opening[key] = opening
                opening.add_done_callback(lambda _t: self._opening.pop(key, None))
            h = await asyncio.shield(opening)
        h.users += 1
        if h.linger is not None:
            h.linger.cancel()
            h.linger = None
        return h

    async def _open_fill(self, entry: FileEntry, protect: set[str]) -> OpenFill:
        fill, _ = await self.store.begin_fill(entry, protect)
        h = OpenFill(fill)
        self._fills[entry.fill_key] = h
        return h

    def _release(self, h: OpenFill, close: bool = False) -> None:
        """One user less; an unused partial stays open a while (peers tend to ask for more of it).

        With ``close`` (a fill that failed) it is closed at once if nobody else
        uses it, as before peers: a new attempt re-opens it and re-hashes its
        recorded pieces.
        """
        h.users -= 1
        if h.users == 0 and not h.closed and close and not h.tasks:
            self._retire(h)
            closing = asyncio.ensure_future(self.store.abandon_fill(h.fill))
            self._closing.add(closing)  # held until done: the loop keeps only weak references to tasks
            closing.add_done_callback(self._closing.discard)
        elif h.users == 0 and not h.closed:
            h.linger = asyncio.get_running_loop().call_later(FILL_LINGER, self._close_later, h)

    def _close_later(self, h: OpenFill) -> None:
        closing = asyncio.ensure_future(self._close_idle(h))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _close_idle(self, h: OpenFill) -> None:
        if h.users or h.closed or h.tasks:
            return
        h.closed = True
        if self._fills.get(h.fill.key) is h:
            del self._fills[h.fill.key]
        await self.store.abandon_fill(h.fill)

    def _retire(self, h: OpenFill) -> None:
        """The fill was published or discarded: its file handle is no longer ours to share."""
        h.closed = True
        if self._fills.get(h.fill.key) is h:
            del self._fills[h.fill.key]

    # -- one blob ------------------------------------------------------------
    async def _fill(self, flight: Flight, origin: Origin, protect: set[str]) -> str:
        entry = flight.entry
        h = await self._acquire(entry, protect)
        fill = h.fill
        try:
            flight.done_pieces = set(fill.done)
            flight.done_bytes = sum(entry.piece_range(i)[1] for i in fill.done)
            flight.partial = self.store.relative(fill.path)
            self._notify()
            flight.use_peers = await self._peers_allowed(flight, fill, origin)
            try:
                async with asyncio.TaskGroup() as tg:
                    for index in fill.missing():
                        tg.create_task(self._piece(h, index, origin, flight))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            digest = await self._finish(h, flight, origin)
        except BaseException:
            self._notify()
            self._release(h, close=True)  # the next try opens it again, re-checking recorded pieces
            raise
        self._release(h)
        self._notify()
        log.info(
            "filled %s (%d bytes, %d from origin, %d pieces from peers, %d fetched here first for peers) in %.2fs",
            entry.path, entry.size, flight.fetched_bytes, len(flight.peer_pieces), flight.joined_pieces,
            time.monotonic() - flight.started,
        )
        return digest

    async def _peers_allowed(self, flight: Flight, fill: BlobFill, origin: Origin) -> bool:
        """Whether this blob may take pieces from peers: only when the origin's own digest can check them."""
        if self.peers is None or not self.peers.peers or flight.ctx is None or flight.ctx.scheme not in PEER_SCHEMES:
            return False
        entry = flight.entry
        if entry.sha256 or entry.git_sha1:
            return True
        part_size = None
        etag_part_size = getattr(origin, "etag_part_size", None)
        if etag_part_size is not None:
            part_size = await etag_part_size(entry)
        if part_size is None:
            log.info("%s: the origin gives no digest to check peers' bytes against; fetching it from the origin only",
                     entry.path)
            return False
        await self.store.run(fill.reset_whole, part_size)
        return True

    async def _finish(self, h: OpenFill, flight: Flight, origin: Origin) -> str:
        """Publish the blob once its whole-file digests match the origin's.

        If pieces came from peers and the file does not match, it is not thrown
        away: those pieces are fetched again from the origin, peers whose piece
        differed are penalised, and the repaired file is checked again.
        """
        entry, fill = flight.entry, h.fill
        try:
            if flight.peer_pieces:
                try:
                    digest = await self.store.finish_fill(fill, lambda d: _check_whole(entry, d, _PeerDataSuspect))
                except _PeerDataSuspect as exc:
                    log.error("%s does not match the origin's digest with %d pieces from peers (%s); "
                              "fetching those again from the origin", entry.path, len(flight.peer_pieces), exc)
                    await self._repair_from_origin(h, flight, origin)
                    digest = await self.store.finish_fill(fill, lambda d: _check_whole(entry, d, IntegrityError))
            else:
                digest = await self.store.finish_fill(fill, lambda d: _check_whole(entry, d, IntegrityError))
        except IntegrityError:
            self._retire(h)  # finish() discarded the partial file
            raise
        self._retire(h)
        flight.done_pieces.update(range(entry.piece_count))  # peer pieces show only now, checked
        return digest

    async def _repair_from_origin(self, h: OpenFill, flight: Flight, origin: Origin) -> None:
        fill = h.fill
        sent = dict(flight.peer_pieces)
        flight.peer_pieces.clear()
        self.peer_files_repaired += 1
        self.peer_bytes_repaired += sum(flight.entry.piece_range(i)[1] for i in sent)
        before = {i: fill.done[i] for i in sent if i in fill.done}
        for index in sent:
            await self.store.run(fill.forget_piece, index)
        try:
            async with asyncio.TaskGroup() as tg:
                for index in sent:
                    tg.create_task(self._origin_piece(h, index, origin, None))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        differed: dict[str, list[int]] = {}
        for index, addr in sent.items():
            if fill.done.get(index) != before.get(index):
                self.peer_pieces_rejected += 1
                differed.setdefault(addr, []).append(index)
        for addr, indexes in differed.items():  # one strike per peer and file, however many pieces
            if self.peers is not None:
                self.peers.penalise(
                    addr, f"pieces {','.join(map(str, sorted(indexes)))} of {flight.entry.path} differed from the origin's"
                )
        await self.store.run(fill.reset_whole, None)

    # -- one piece -----------------------------------------------------------
    async def _piece(self, h: OpenFill, index: int, origin: Origin, flight: Flight) -> None:
        """Get piece ``index`` into the file: join a fetch already running for it, or start one.

        The placement is prepared first: it awaits a thread, and a peer asking for
        this piece meanwhile starts an origin fetch of it here (``serve_piece``).
        From the last look for such a fetch to tracking our own there is no await,
        so a piece is never fetched twice in one process.
        """
        ctx = flight.ctx
        model = (f"{ctx.ref}@{ctx.revision}", ctx.pieces) if ctx is not None and ctx.pieces else None
        peers = self.peers if flight.use_peers else None
        if peers is not None and model is not None:
            await peers.prepare(model)  # off the loop, once per model and member list
        for _ in range(JOIN_TRIES):
            if index in h.fill.done:
                break
            running = h.tasks.get(index)
            if running is None:
                break
            try:
                await asyncio.shield(running)
            except Exception:
                pass  # whoever started it failed; try it ourselves
        else:
            if index not in h.fill.done and h.tasks.get(index) is not None:
                raise FetchFailedError(
                    f"{flight.entry.path!r}: piece {index} failed in {JOIN_TRIES} fetches started for peers"
                )
        if index in h.fill.done:  # fetched from the origin for a peer that asked first
            if index not in flight.done_pieces:
                flight.done_pieces.add(index)
                flight.done_bytes += flight.entry.piece_range(index)[1]
                flight.joined_pieces += 1
            self._notify()
            return
        # (peer, ask it as a relay parent)
        sources = peers.sources(flight.entry.fill_key, index, PEER_TRIES, model) if peers is not None else []
        if sources:
            task = asyncio.create_task(self._get_piece(h, index, origin, flight, sources))
        else:
            # Without peers, the missing pieces after this one go in the same request (a span);
            # with peers each piece is placed on its own node, so one piece a request.
            span = [index] if peers is not None else self._span_from(h, index, flight)
            # Announced now, not when the task first runs: a peer asking for one of these
            # pieces in between must follow this fetch, not start a second one.
            streams = {i: self._announce(h, i) for i in span}
            # This node owns the piece: the other nodes will ask for it, so it goes first.
            owned = peers is not None and bool(peers.peers)
            task = asyncio.create_task(self._origin_span(h, span, origin, flight, streams, first=owned))
            for i in span[1:]:
                self._track(h, i, task)  # their own _piece tasks join this one
        self._track(h, index, task)
        await task

    def _span_from(self, h: OpenFill, index: int, flight: Flight) -> list[int]:
        """Piece ``index`` and the missing pieces right after it that nothing fetches yet (ORIGIN_RANGE_MAX in all)."""
        entry = h.fill.entry
        span = [index]
        while (len(span) + 1) * entry.piece_size <= ORIGIN_RANGE_MAX:
            nxt = span[-1] + 1
            if nxt >= entry.piece_count or nxt in h.fill.done or nxt in h.tasks or nxt in flight.done_pieces:
                break
            span.append(nxt)
        return span

    async def _record_piece(self, fill: BlobFill, index: int, digest: str) -> None:
        """Record a written, hashed piece; the whole-file hash follows in the pool, without holding the caller."""
        await self.store.run(fill.record_piece, index, digest)
        self.store.run_later(fill.follow)

    def _track(self, h: OpenFill, index: int, task: asyncio.Task[None]) -> None:
        h.tasks[index] = task
        task.add_done_callback(lambda t: h.tasks.pop(index, None) if h.tasks.get(index) is t else None)

    @staticmethod
    def _announce(h: OpenFill, index: int, upstream: str | None = None) -> PieceStream:
        stream = PieceStream(upstream)
        h.streams[index] = stream
        h.announced.wake()
        return stream

    @staticmethod
    def _unannounce(h: OpenFill, index: int, stream: PieceStream) -> None:
        """The fetch behind ``stream`` ended: recorded (``digest`` set) or failed; followers are told."""
        stream.failed = stream.digest is None
        stream.wake()
        if h.streams.get(index) is stream:
            del h.streams[index]

    async def _get_piece(
        self, h: OpenFill, index: int, origin: Origin, flight: Flight, sources: list[tuple[str, bool]]
    ) -> None:
        """Ask the relay parent, then the owners in rendezvous order; the origin when none delivered."""
        for addr, relay in sources:
            try:
                await self._peer_piece(h, index, addr, flight, relay)
                return
            except PeerError as exc:
                log.log(logging.DEBUG if _relay_said_no(exc, relay) else logging.INFO,
                        "piece %d of %s from peer %s failed: %s", index, flight.entry.path, addr, exc)
        await self._origin_piece(h, index, origin, flight, self._announce(h, index))

    async def _peer_piece(self, h: OpenFill, index: int, addr: str, flight: Flight, relay: bool = False) -> None:
        """Get one piece from peer ``addr`` (a relay parent when ``relay``); other peers may follow it as it lands."""
        assert self.peers is not None and self.peer_client is not None and flight.ctx is not None
        fill, entry = h.fill, flight.entry
        offset, length = entry.piece_range(index)

        def landed(n: int) -> None:
            flight.done_bytes += n
            self.peer_bytes_received += n

        sink = _PieceSink(self.store, fill, offset, landed)

        def answered() -> None:
            # Followable once the peer agreed to send it: not while queued here, nor before a
            # refusal (a follower would wait on nothing, or be cut off by a no that was not its
            # parent's). Its bytes may still be on their way from the origin to the owner.
            sink.stream = self._announce(h, index, upstream=addr)

        req = PieceRequest(
            flight.ctx.ref, flight.ctx.revision, entry.path, entry.fill_key, entry.piece_size, index,
            relay=relay, requester=self.peers.me,
        )  # fmt: skip
        try:
            async with self._peer_slots.hold(self._peer_order(flight, index), name=(entry.fill_key, index)):
                with self.metrics.piece_fetch("peer"):
                    stated = await self.peer_client.fetch_piece(addr, req, length, sink, answered)
            got = sink.hasher.hexdigest()
            if got != stated:
                raise PeerLiedError(f"piece {index} hashed {got}, the peer stated {stated!r}")
            try:
                await self._record_piece(fill, index, got)
            except IntegrityError as exc:
                raise PeerLiedError(str(exc)) from None
            if sink.stream is not None:
                sink.stream.digest = got
        except BaseException as exc:
            flight.done_bytes -= sink.written
            if isinstance(exc, PeerError) and not _relay_said_no(exc, relay):
                self.metrics.fetch_error("peer", _PEER_ERROR_KINDS.get(type(exc), "error"))
            if isinstance(exc, PeerLiedError):
                self.peer_pieces_rejected += 1
                self.peers.penalise(addr, f"{entry.path}: {exc}")
            elif isinstance(exc, PeerDownError):
                self.peers.mark_down(addr, str(exc))
            elif isinstance(exc, PeerSlowError):
                self.peers.mark_slow(addr, str(exc))
            raise
        finally:
            if sink.stream is not None:
                self._unannounce(h, index, sink.stream)
        flight.peer_pieces[index] = addr
        self.peers.mark_up(addr)

    def _peer_order(self, flight: Flight, index: int) -> tuple[int, int]:
        """Where a piece asked of a peer waits for a connection: the model's pieces, rotated per node.

        If every node asked for the pieces in model order, all of them would ask the
        owners of the first pieces at once while the owners of the last ones idle,
        and those would be the tail (measured: bench/RESULTS.md "Peers"). Node k of
        N starts k/N of the way into the model instead, so the asking is spread over
        all owners all the time. (Pieces this node fetches from the origin keep
        model order: only a scale-up of several nodes reorders.)
        """
        ctx = flight.ctx
        pos = ctx.positions.get((flight.entry.fill_key, index)) if ctx is not None else None
        if ctx is None or pos is None or self.peers is None:
            return (flight.order, index)
        members = sorted([self.peers.me, *self.peers.live()])
        shift = members.index(self.peers.me) * len(ctx.pieces) // len(members)
        return (0, (pos - shift) % len(ctx.pieces))

    async def _origin_piece(
        self,
        h: OpenFill,
        index: int,
        origin: Origin,
        flight: Flight | None,
        stream: PieceStream | None = None,
        *,
        first: bool = False,
    ) -> None:
        """Fetch one piece from the origin into the partial file, with retries; readers may follow it."""
        await self._origin_span(h, [index], origin, flight, {index: stream or self._announce(h, index)}, first=first)

    async def _origin_span(
        self,
        h: OpenFill,
        indices: list[int],
        origin: Origin,
        flight: Flight | None,
        streams: dict[int, PieceStream],
        *,
        first: bool = False,
    ) -> None:
        """Fetch consecutive pieces from the origin in one range request per try; readers may follow each.

        One long range costs the origin less than several short ones (SeaweedFS
        served 64 MiB ranges in 0.7-0.75x the time and CPU of 16 MiB ones:
        bench/RESULTS.md "Cold miss"), while pieces stay the unit that is
        hashed, recorded, followed and served to peers: each is recorded as soon
        as its last byte is written. A try that fails goes on from the first
        piece it did not complete. ``first``: ahead of this node's other pieces,
        as for a peer's request. An owner that fetches its own pieces first
        keeps the origin's link busy with every owner's pieces from the start,
        instead of only the pieces every node happens to want first (measured:
        bench/RESULTS.md "Peers").
        """
        fill = h.fill
        remaining = list(indices)
        last: Exception | None = None
        order = -1 if first or flight is None else flight.order  # -1: peers are (or will be) waiting on it

        def landed(n: int) -> None:
            self.origin_bytes += n
            if flight is not None:
                flight.done_bytes += n
                flight.fetched_bytes += n
        try:
            for attempt in range(self.retries):
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
                offset = fill.entry.piece_range(remaining[0])[0]
                end = sum(fill.entry.piece_range(remaining[-1]))
                sink = _SpanSink(self, h, remaining, landed, streams, flight)
                # Every origin request, for tracing where origin bytes go (a cluster should fetch
                # each piece from the origin about once): whose fill it is, which try.
                log.debug("origin range %d-%d of %s (pieces %d-%d, try %d, %s)", offset, end - 1, fill.entry.path,
                          remaining[0], remaining[-1], attempt + 1, "own fill" if flight is not None else "for a peer or a repair")
                async with self._slots.hold((order, remaining[0])):
                    try:
                        with self.metrics.fetch_running("origin"):
                            if end > offset:
                                await origin.read_range(fill.entry, offset, end - offset, sink)
                            await sink.complete()
                        return
                    except (TransientOriginError, IntegrityError) as exc:
                        last = exc
                        self.metrics.fetch_error("origin", "transient")
                        sink.abandon()
                        remaining = remaining[sink.recorded :]
                        if not remaining:  # every piece arrived and was recorded before the error
                            return
                        log.warning(
                            "piece %d of %s failed (attempt %d/%d): %s",
                            remaining[0], fill.entry.path, attempt + 1, self.retries, exc,
                        )
            self.metrics.fetch_error("origin", "failed")
            raise FetchFailedError(
                f"{fill.entry.path!r}: piece {remaining[0]} failed {self.retries} times, last: {last}"
            )
        finally:
            for index in indices:
                self._unannounce(h, index, streams[index])

    # -- serving peers -------------------------------------------------------
    async def serve_piece(
        self, entry: FileEntry, index: int, origin: Origin, *, relay: bool = False, requester: str = ""
    ) -> ServedPiece:
        """Where a peer can read piece ``index`` of ``entry`` now, fetching it from the origin if need be.

        From the complete blob (its recorded piece hashes), from the partial
        file when the piece is verified, else from the fetch of that piece
        running here (from the origin or from a peer), followed as it lands,
        else from an origin fetch started here. Refused (BusyError, the
        requester goes on to its next candidate): a ``relay`` request (from a
        child in the piece's relay tree, agent/peers/membership.py) for a piece this node
        is not receiving, which must not cost an origin fetch; a piece that
        this node is receiving from ``requester`` itself (no loops); a piece
        between two tries here.
        """
        offset, length = entry.piece_range(index)
        digest = self.store.digest_of(entry)
        if digest is not None:
            pieces = await self._blob_pieces(digest, entry)
            if pieces is not None:
                return ServedPiece(self.store.blob_path(digest), offset, length, pieces[index])
        if relay and entry.fill_key not in self._fills and entry.fill_key not in self.flights:
            raise BusyError(f"{entry.path!r} is not coming to this node")  # (and no partial file is made for it)
        h = await self._acquire(entry, set())
        try:
            stream = h.streams.get(index)
            if stream is None and relay and entry.fill_key in self.flights:
                # This node is getting the file too: its fetch of the piece may be about to start,
                # or be waiting for a peer connection (then it goes next: a child waits for it).
                self._peer_slots.promote((entry.fill_key, index), (-1, 0))
                deadline = time.monotonic() + RELAY_WAIT
                while stream is None and index not in h.fill.done and (left := deadline - time.monotonic()) > 0:
                    await h.announced.wait(left)
                    stream = h.streams.get(index)
            if index in h.fill.done:
                return ServedPiece(h.fill.path, offset, length, h.fill.done[index])
            if stream is not None and requester and stream.upstream == requester:
                raise BusyError(f"piece {index} of {entry.path!r} comes to this node from {requester} itself")
            if stream is None:
                if relay:
                    raise BusyError(f"piece {index} of {entry.path!r} is not coming to this node (yet)")
                if index in h.tasks:
                    raise BusyError(f"piece {index} of {entry.path!r} is between two tries here")
                h.users += 1  # the fetch keeps the file open until it ends
                stream = self._announce(h, index)
                # An origin fetch on a peer's behalf: the one kind not in any "filled" line's count.
                log.info("piece %d of %s: fetching it from the origin for %s (%s here)", index, entry.path,
                         requester or "a peer", "being filled" if entry.fill_key in self.flights else "not being filled")
                task = asyncio.create_task(self._serve_fetch(h, index, origin, stream), name=f"serve {entry.path}")
                self._track(h, index, task)
            return ServedPiece(h.fill.path, offset, length, None, stream)
        finally:
            self._release(h)

    async def _serve_fetch(self, h: OpenFill, index: int, origin: Origin, stream: PieceStream) -> None:
        try:
            await self._origin_piece(h, index, origin, None, stream)
        except Exception as exc:  # the requesters see the stream fail and move on
            log.warning("piece %d of %s for a peer failed: %s", index, h.fill.entry.path, exc)
        finally:
            self._release(h)

    async def _blob_pieces(self, digest: str, entry: FileEntry) -> list[str] | None:
        pieces = self._meta_pieces.get(digest)
        if pieces is None:
            meta = await self.store.read_meta(digest)
            if not meta or meta.get("piece_size") != entry.piece_size:
                return None
            pieces = self._meta_pieces[digest] = list(meta["pieces"])
        return pieces if len(pieces) == entry.piece_count else None


_PEER_ERROR_KINDS = {
    PeerDownError: "down",
    PeerSlowError: "slow",
    PeerLiedError: "rejected",
    PeerRefusedError: "refused",  # busy, another piece size, or a relay parent not receiving the piece
    PeerCutShortError: "cut",  # the body ended early
}


def _relay_said_no(exc: BaseException, relay: bool) -> bool:
    """A relay parent that is not getting the piece: the normal case outside a scale-up, not an error."""
    return relay and type(exc) is PeerRefusedError


class BusyError(Exception):
    """This node cannot serve the piece right now (the requester moves on)."""


class _PeerDataSuspect(Exception):
    """The whole file did not match with peer pieces in it: repair, do not discard."""


class _PieceSink:
    """Where one try of one piece lands, from the origin or a peer: one way for both.

    Each batch is written at its place in the partial file and hashed in the same
    pass (on the store's threads); then ``stream``'s followers are woken and
    ``landed`` counts the bytes. ``written`` is what this try put in the file.
    """

    def __init__(
        self,
        store: Store,
        fill: BlobFill,
        offset: int,
        landed: Callable[[int], None],
        stream: PieceStream | None = None,
    ) -> None:
        self.store, self.fill, self.offset, self.landed = store, fill, offset, landed
        self.stream = stream
        self.hasher = xxhash.xxh3_128()
        self.pos = offset

    @property
    def written(self) -> int:
        return self.pos - self.offset

    async def __call__(self, chunks: Sequence[bytes | memoryview]) -> None:
        n = await self.store.run(_write_and_hash, self.fill, self.pos, chunks, self.hasher)
        self.pos += n
        if self.stream is not None:
            self.stream.written = self.written
            self.stream.wake()
        self.landed(n)


class _SpanSink:
    """One try of a run of consecutive pieces from the origin: each piece into its own _PieceSink.

    Bytes are split at piece boundaries; a piece whose last byte is written is
    hashed, recorded (checked against the manifest) and announced complete
    before the next piece's bytes are taken. ``recorded`` counts the pieces
    this try completed.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        h: OpenFill,
        indices: list[int],
        landed: Callable[[int], None],
        streams: dict[int, PieceStream],
        flight: Flight | None,
    ) -> None:
        self.fetcher, self.h, self.indices, self.landed = fetcher, h, indices, landed
        self.streams, self.flight = streams, flight
        self.recorded = 0
        self.piece = self._next_sink()
        self.since = time.monotonic()  # when the current piece was asked for, or the one before it ended

    def _next_sink(self) -> _PieceSink:
        index = self.indices[self.recorded]
        offset = self.h.fill.entry.piece_range(index)[0]
        return _PieceSink(self.fetcher.store, self.h.fill, offset, self.landed, self.streams[index])

    def _room(self) -> int:
        return self.h.fill.entry.piece_range(self.indices[self.recorded])[1] - self.piece.written

    async def __call__(self, chunks: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(c) for c in chunks]
        while views:
            if self.recorded == len(self.indices):
                raise TransientOriginError("origin sent more bytes than the pieces asked for")
            room, take, size = self._room(), [], 0
            while views and size < room:
                view = views[0]
                if size + len(view) <= room:
                    take.append(views.pop(0))
                    size += len(view)
                else:
                    take.append(view[: room - size])
                    views[0] = view[room - size :]
                    size = room
            if take:
                await self.piece(take)
            if self._room() == 0:
                await self._record()

    async def _record(self) -> None:
        index = self.indices[self.recorded]
        digest = self.piece.hasher.hexdigest()
        await self.fetcher._record_piece(self.h.fill, index, digest)
        self.streams[index].digest = digest
        if self.flight is not None:
            self.flight.done_pieces.add(index)
        now = time.monotonic()
        self.fetcher.metrics.piece_fetched("origin", now - self.since)
        self.since = now
        self.fetcher._notify()
        self.recorded += 1
        if self.recorded < len(self.indices):
            self.piece = self._next_sink()

    async def complete(self) -> None:
        """After the range: record a last piece of zero bytes (an empty file's only piece)."""
        while self.recorded < len(self.indices) and self._room() == 0:
            await self._record()
        if self.recorded < len(self.indices):
            raise TransientOriginError(f"the origin's range ended {self._room()} bytes into piece {self.indices[self.recorded]}")

    def abandon(self) -> None:
        """This try failed: un-count the bytes of the piece it did not complete; its followers start over."""
        if self.recorded == len(self.indices):
            return
        if self.flight is not None:
            self.flight.done_bytes -= self.piece.written
        stream = self.streams[self.indices[self.recorded]]
        stream.attempt += 1
        stream.written = 0
        stream.wake()


def _write_and_hash(
    fill: BlobFill, offset: int, chunks: Sequence[bytes | memoryview], hasher: xxhash.xxh3_128
) -> int:
    fill.write(offset, chunks)
    for chunk in chunks:
        hasher.update(chunk)
    return sum(len(c) for c in chunks)


def _check_whole(entry: FileEntry, digests: dict[str, str], error: Any = IntegrityError) -> None:
    """Compare the finished file with every digest the origin or manifest promised."""
    for name, expected in (("sha256", entry.sha256), ("git_sha1", entry.git_sha1), ("xxh128", entry.digest)):
        if expected and digests.get(name) != expected:
            raise error(
                f"{entry.path!r}: {name} of the fetched bytes is {digests.get(name)}, the origin says {expected}"
            )
    if "s3_etag" in digests:
        expected = str(entry.source.get("etag", "")).strip('"').lower()
        if digests["s3_etag"] != expected:
            raise error(f"{entry.path!r}: the fetched bytes make ETag {digests['s3_etag']}, S3 says {expected}")


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a TaskGroup's exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
