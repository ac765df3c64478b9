"""Pieces from peers: whom to ask, in what order, how many at once, and what a failure says about the peer.

A piece that a live peer holds complete (a blob, or a verified piece of a file
it is filling: ``/peer/v1/have``, asked once per model when a fill starts) is
asked of such holders first, whatever placement says: a node joining a cluster
that holds the model, or asking right after another node finished it, would
otherwise take every piece it owns by placement from the origin (issue 24: a
whole 256 MiB file). Then a piece that another live member owns
(agent/peers/placement.py) is asked of its relay parent, then its owner and the
members ranked above this node, and only then fetched from the origin (the
fetcher's fallback). Trust: a peer's
piece must match the hash the peer states for it, and the whole file must
match the origin's own digest (sha256, git blob id, the S3 ETag or a GCS / Azure MD5) before it
is published; a file whose origin gives no such digest is never taken from
peers (:meth:`PeerReader.allowed`). Peer pieces are not shown to streaming
readers before that check passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from agent.errors import (
    PeerBusyError,
    PeerCutShortError,
    PeerDownError,
    PeerError,
    PeerLiedError,
    PeerRefusedError,
    PeerSlowError,
)
from agent.fetch.flight import Flight
from agent.fetch.open_fills import OpenFill
from agent.fetch.sinks import PieceSink, record_piece
from agent.fetch.slots import OrderedSlots
from agent.metrics import Metrics
from agent.origins import Origin
from agent.peers.client import PeerClient, PieceRequest
from agent.peers.membership import Membership
from agent.peers.placement import rendezvous, request_key
from agent.singleflight import SingleFlight
from agent.store.store import Store
from client.errors import IntegrityError

log = logging.getLogger(__name__)

PEER_TRIES = 2  # owners asked for a piece before the origin
# Pieces asked of peers at once. Many more than origin connections: a piece that its owner
# is itself still getting from the origin arrives only at the owner's share of the origin's
# rate, so a node must follow many such pieces at once to fill its own link (measured: with
# 8 at a time, 8 nodes behind 100 Mbit/s links each downloaded at about half their rate until
# the origin was done; bench/RESULTS.md "Peers"). And enough to ask for the whole of most models
# at once: a request waits on its relay parent's own fetch, and with fewer requests than pieces
# a deep tree (12 levels at 2,600 nodes) fills in waves with idle links between them. In
# bench/fleet_sim.py, 3 GB (180 pieces) to 2,600 nodes at 300 MB/s: p50 38.2 s with 32, 18.0 s
# with 128, 11.7 s with 256 (the limit: 10 s); 140 GB in 524 pieces at 25 Gbit/s: 108.1 s with 32,
# 91.4 s with 256, 48.4 s with all 524 (limit 44.8 s). Requests stream into the partial file: a
# waiting one costs a connection, not a piece of memory (agent/daemon.py sizes its read buffer).
PEER_CONNECTIONS_FACTOR = 4
PEER_CONNECTIONS_MIN = 256
PEER_SCHEMES = ("s3", "gs", "az", "hf", "https")  # origins whose references peers may name (never a node's local files)
HOLDER_TRIES = 3  # holders of a piece asked before placement's sources
HAVE_TTL = 2.0  # seconds what peers said they hold is used before asking again
HAVE_KEYS_MAX = 10000  # files one /peer/v1/have asks about (the server's limit)

_PEER_ERROR_KINDS = {
    PeerDownError: "down",
    PeerSlowError: "slow",
    PeerLiedError: "rejected",
    PeerRefusedError: "refused",  # another piece size, or a relay parent not receiving the piece
    PeerBusyError: "refused",  # busy, between two tries, the file moving into place
    PeerCutShortError: "cut",  # the body ended early
}


def relay_said_no(exc: BaseException, relay: bool) -> bool:
    """A relay parent that is not getting the piece: the normal case outside a scale-up, not an error."""
    return relay and isinstance(exc, PeerRefusedError)


@dataclass
class Holdings:
    """What the live peers said they hold of one model's files, when asked (``/peer/v1/have``)."""

    at: float = 0.0
    complete: dict[str, set[str]] = field(default_factory=dict)  # fill key -> peers holding the whole file
    pieces: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # (fill key, index) -> peers

    def holders(self, fill_key: str, index: int) -> set[str]:
        return self.complete.get(fill_key, set()) | self.pieces.get((fill_key, index), set())

    def learn(self, addr: str, answer: dict[str, object], keys: set[str], piece_count: dict[str, int]) -> None:
        """Take one peer's answer, keeping only what names files asked about (a peer's word, checked)."""
        complete = answer.get("complete")
        if isinstance(complete, list):
            for key in complete:
                if isinstance(key, str) and key in keys:
                    self.complete.setdefault(key, set()).add(addr)
        pieces = answer.get("pieces")
        if isinstance(pieces, dict):
            for key, indexes in pieces.items():
                if key not in keys or not isinstance(indexes, list):
                    continue
                for index in indexes[: piece_count[key]]:
                    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < piece_count[key]:
                        self.pieces.setdefault((key, index), set()).add(addr)


class PeerReader:
    """This node's requests to its peers, and what it learns about them from the answers."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        membership: Membership,
        client: PeerClient,
        connections: int,
        *,
        start_wait: float = 0.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.membership = membership
        self.client = client
        self.start_wait = start_wait  # --peer-start-wait
        self._holdings: dict[str, Holdings] = {}  # model name -> what peers hold of it
        self._asking: SingleFlight[str, Holdings] = SingleFlight()
        self._slots = OrderedSlots(max(PEER_CONNECTIONS_MIN, PEER_CONNECTIONS_FACTOR * connections))

    @property
    def me(self) -> str:
        return self.membership.me

    def has_peers(self) -> bool:
        return bool(self.membership.peers)

    async def allowed(self, flight: Flight, h: OpenFill, origin: Origin) -> bool:
        """Whether this blob may take pieces from peers: only when the origin's own digest can check them."""
        if not self.membership.peers or flight.ctx is None or flight.ctx.scheme not in PEER_SCHEMES:
            return False
        entry = flight.entry
        if entry.sha256 or entry.git_sha1 or entry.crc32c:
            return True
        crc = await origin.stored_crc32c(entry)
        if crc is not None:  # the store's own CRC32C: 0.10 CPU s/GiB against the ETag's MD5 at 1.76
            flight.stored_crc32c = crc
            await self.store.run(h.fill.reset_whole, None, True)
            return True
        part_size = await origin.etag_part_size(entry)
        if part_size is None:
            log.info("%s: the origin gives no digest to check peers' bytes against; fetching it from the origin only",
                     entry.path)
            return False
        await self.store.run(h.fill.reset_whole, part_size)
        return True

    async def wait_start(self) -> None:
        """At start-up, wait (at most ``start_wait`` s) until every member answered once, before placing pieces.

        A fill started before this node heard from the others (a warm set applied
        at start-up, a prefetch at readiness) would take every piece from the origin.
        """
        await self.membership.wait_settled(self.start_wait)

    async def prepare(self, flight: Flight) -> None:
        """Compute the model's placement off the event loop, once per model and member list."""
        model = flight.ctx.model if flight.ctx is not None else None
        if model is not None:
            await self.membership.prepare(model)

    async def learn_holders(self, flight: Flight) -> None:
        """Ask the live peers which of the model's files and pieces they hold (once per model per HAVE_TTL).

        One ``/peer/v1/have`` per live peer, all at once, bounded by the hedge
        timeout; a peer that does not answer simply holds nothing here.
        """
        ctx = flight.ctx
        model = ctx.model if ctx is not None else None
        if ctx is None or model is None or not self.membership.live():
            return
        name = model[0]
        known = self._holdings.get(name)
        if known is not None and time.monotonic() - known.at < HAVE_TTL:
            return
        self._holdings[name] = await self._asking.run(name, lambda: self._ask_holders(ctx.pieces))
        while len(self._holdings) > 64:  # models filling at once: the oldest answers go first
            self._holdings.pop(next(iter(self._holdings)))

    async def _ask_holders(self, pieces: tuple[tuple[str, int, int], ...]) -> Holdings:
        counts: dict[str, int] = {}
        for key, index, _ in pieces:
            counts[key] = max(counts.get(key, 0), index + 1)
        keys = list(counts)[:HAVE_KEYS_MAX]
        piece_size = max((n for _, _, n in pieces), default=0)
        found = Holdings(time.monotonic())
        if not keys or piece_size <= 0:
            return found

        async def ask(addr: str) -> None:
            try:
                answer = await self.client.have(addr, keys, piece_size, self.me)
            except PeerError as exc:
                log.debug("have from %s: %s", addr, exc)
                return
            found.learn(addr, answer, set(keys), counts)

        await asyncio.gather(*(ask(a) for a in self.membership.live()))
        return found

    def holders(self, flight: Flight, index: int) -> list[str]:
        """Live peers that said they hold piece ``index`` complete, spread by rendezvous rank (HOLDER_TRIES)."""
        ctx = flight.ctx
        model = ctx.model if ctx is not None else None
        known = self._holdings.get(model[0]) if model is not None else None
        if known is None:
            return []
        key = flight.entry.fill_key
        live = set(self.membership.live())
        found = [a for a in known.holders(key, index) if a in live]
        return rendezvous(found, key, index)[:HOLDER_TRIES]

    def sources(self, flight: Flight, index: int) -> list[tuple[str, bool]]:
        """Whom to ask for piece ``index``, as (peer, as a relay parent); empty when nobody but the origin.

        Holders first (whatever placement says), then placement's relay parent
        and owners (empty from placement when this node owns the piece).
        """
        model = flight.ctx.model if flight.ctx is not None else None
        placed = self.membership.sources(flight.entry.fill_key, index, PEER_TRIES, model)
        holders = self.holders(flight, index)
        if not holders:
            return placed
        return [(a, False) for a in holders] + [(a, relay) for a, relay in placed if a not in holders]

    def promote(self, fill_key: str, index: int) -> None:
        """A relay child waits for this piece: its request here goes next among those waiting."""
        self._slots.promote((fill_key, index), (-1, 0))

    def penalise(self, addr: str, why: str) -> None:
        self.membership.penalise(addr, why)

    async def piece(self, h: OpenFill, index: int, addr: str, flight: Flight, relay: bool = False) -> None:
        """Get one piece from peer ``addr`` (a relay parent when ``relay``); other peers may follow it as it lands."""
        assert flight.ctx is not None
        fill, entry = h.fill, flight.entry
        offset, length = entry.piece_range(index)
        transfers = self.metrics.transfers

        def landed(n: int) -> None:
            flight.done_bytes += n
            transfers.peer_bytes_received += n

        sink = PieceSink(self.store, fill, offset, landed)

        def answered() -> None:
            # Followable once the peer agreed to send it: not while queued here, nor before a
            # refusal (a follower would wait on nothing, or be cut off by a no that was not its
            # parent's). Its bytes may still be on their way from the origin to the owner.
            sink.stream = h.announce(index, upstream=addr)

        req = PieceRequest(
            flight.ctx.ref, flight.ctx.revision, entry.path, entry.fill_key, entry.piece_size, index,
            relay=relay, requester=self.me,
        )  # fmt: skip
        try:
            async with self._slots.hold(self._order(flight, index), name=(entry.fill_key, index)):
                with self.metrics.piece_fetch("peer"):
                    stated = await self.client.fetch_piece(addr, req, length, sink, answered)
            got = sink.hasher.hexdigest()
            if got != stated:
                raise PeerLiedError(f"piece {index} hashed {got}, the peer stated {stated!r}")
            try:
                await record_piece(self.store, fill, index, got, addr)
            except IntegrityError as exc:
                raise PeerLiedError(str(exc)) from None
            if sink.stream is not None:
                sink.stream.digest = got
        except BaseException as exc:
            flight.done_bytes -= sink.written
            self._account(exc, addr, relay, f"{entry.path}: {exc}")
            raise
        finally:
            if sink.stream is not None:
                h.unannounce(index, sink.stream)
        flight.peer_pieces[index] = addr
        self.membership.mark_up(addr)

    def _account(self, exc: BaseException, addr: str, relay: bool, what: str) -> None:
        """What a failed request says about the peer: counted, and the peer marked down, slow or penalised."""
        if isinstance(exc, PeerError) and not relay_said_no(exc, relay):
            self.metrics.fetch_error("peer", _PEER_ERROR_KINDS.get(type(exc), "error"))
        if isinstance(exc, PeerLiedError):
            self.metrics.transfers.peer_pieces_rejected += 1
            self.membership.penalise(addr, what)
        elif isinstance(exc, PeerDownError):
            self.membership.mark_down(addr, str(exc))
        elif isinstance(exc, PeerSlowError):
            self.membership.mark_slow(addr, str(exc))

    def _order(self, flight: Flight, index: int) -> tuple[int, ...]:
        """Where a piece asked of a peer waits for a connection: level by level in the pieces' relay
        trees, then the model's pieces rotated per node (:func:`~agent.peers.placement.request_key`).

        If every node asked for the pieces in model order, all of them would ask the
        owners of the first pieces at once while the owners of the last ones idle,
        and those would be the tail (measured: bench/RESULTS.md "Peers"). Node k of
        N starts k/N of the way into the model instead, so the asking is spread over
        all owners all the time. (Pieces this node fetches from the origin keep
        model order: only a scale-up of several nodes reorders.)
        """
        ctx = flight.ctx
        pos = ctx.positions.get((flight.entry.fill_key, index)) if ctx is not None else None
        if ctx is None or pos is None:
            return (flight.order, index)
        members = sorted([self.me, *self.membership.live()])
        assert ctx.model is not None
        level = self.membership.tree_level(flight.entry.fill_key, index, ctx.model)
        return (0, *request_key(level, pos, members.index(self.me), len(members), len(ctx.pieces)))
