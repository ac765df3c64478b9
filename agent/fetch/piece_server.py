"""Serving pieces to peers: where a peer can read a piece now, fetching it from the origin if need be.

Every piece has one fetch at a time in this process however many ask for it:
this node's own flight and peers asking for the piece wait on the same one,
and a peer follows a piece still arriving as its bytes land (cut-through,
agent/api/peer.py streams them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import BusyError
from agent.fetch.open_fills import OpenFill, OpenFills, PieceStream
from agent.fetch.origin_reader import OriginReader
from agent.fetch.peer_reader import PeerReader
from agent.manifest import FileEntry, FillKey
from agent.origins import Origin
from agent.store.store import Store

log = logging.getLogger(__name__)

# How long a relay parent that is getting the file itself waits for its fetch of the asked
# piece to start before it says no (under the requester's hedge timeout, 2 s by default).
RELAY_WAIT = 1.0


@dataclass(frozen=True)
class ServedPiece:
    """How to answer a peer for one piece: bytes of ``path`` at ``offset``, hash now or when ``stream`` ends."""

    path: str
    offset: int
    length: int
    digest: str | None
    stream: PieceStream | None = None


class PieceServer:
    """Answers peers' piece requests from blobs, partial files, fetches running here, or a new origin fetch."""

    def __init__(
        self,
        store: Store,
        fills: OpenFills,
        origin_reader: OriginReader,
        peer_reader: PeerReader | None,
        filling: Callable[[str], bool],
    ) -> None:
        self.store = store
        self.fills = fills
        self.origin_reader = origin_reader
        self.peer_reader = peer_reader
        self.filling = filling  # whether this node's own flight fills a fill key now
        self._meta_pieces: dict[str, list[str]] = {}
        self._meta_piece_size: dict[str, int] = {}

    async def serve(
        self, entry: FileEntry, index: int, origin: Origin, *, relay: bool = False, requester: str = ""
    ) -> ServedPiece:
        """Where a peer can read piece ``index`` of ``entry`` now, fetching it from the origin if need be.

        From the complete blob (its recorded piece hashes), from the partial
        file when the piece is verified, else from the fetch of that piece
        running here (from the origin or from a peer), followed as it lands,
        else from an origin fetch started here. Refused (BusyError, the
        requester goes on to its next candidate): a ``relay`` request (from a
        child in the piece's relay tree) for a piece this node is not
        receiving, which must not cost an origin fetch; a piece that this node
        is receiving from ``requester`` itself (no loops); a piece between two
        tries here.
        """
        offset, length = entry.piece_range(index)
        digest = self.store.digest_of(entry)
        if digest is not None:
            pieces = await self._blob_pieces(digest, entry)
            if pieces is not None:
                return ServedPiece(self.store.blob_path(digest), offset, length, pieces[index])
        filling = self.filling(entry.fill_key)
        if relay and entry.fill_key not in self.fills and not filling:
            raise BusyError(f"{entry.path!r} is not coming to this node")  # (and no partial file is made for it)
        h = await self.fills.acquire(entry, set())
        try:
            stream = h.streams.get(index)
            if stream is None and relay and filling:
                stream = await self._wait_for_own_fetch(h, index)
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
                stream = h.announce(index)
                # An origin fetch on a peer's behalf: the one kind not in any "filled" line's count.
                log.info("piece %d of %s: fetching it from the origin for %s (%s here)", index, entry.path,
                         requester or "a peer", "being filled" if filling else "not being filled")
                task = asyncio.create_task(self._fetch_for_peer(h, index, origin, stream), name=f"serve {entry.path}")
                h.track(index, task)
            return ServedPiece(h.fill.path, offset, length, None, stream)
        finally:
            self.fills.release(h)

    async def _wait_for_own_fetch(self, h: OpenFill, index: int) -> PieceStream | None:
        """This node is getting the file too: its fetch of the piece may be about to start.

        Or it waits for a peer connection: then it goes next (a relay child waits for it).
        """
        if self.peer_reader is not None:
            self.peer_reader.promote(h.fill.key, index)
        stream = None
        deadline = time.monotonic() + RELAY_WAIT
        while stream is None and index not in h.fill.done and (left := deadline - time.monotonic()) > 0:
            await h.announced.wait(left)
            stream = h.streams.get(index)
        return stream

    async def _fetch_for_peer(self, h: OpenFill, index: int, origin: Origin, stream: PieceStream) -> None:
        try:
            await self.origin_reader.piece(h, index, origin, None, stream)
        except Exception as exc:  # noqa: BLE001 - a background task: the requesters see the stream fail and move on
            log.warning("piece %d of %s for a peer failed: %s", index, h.entry.path, exc)
        finally:
            self.fills.release(h)

    async def holds(self, keys: Sequence[str], piece_size: int) -> tuple[list[str], dict[str, list[int]]]:
        """Which files (fill keys) this node holds complete, and the verified pieces of those open here.

        For a peer deciding whom to ask first (``/peer/v1/have``): a piece held
        complete comes from a holder, whatever placement says. Only pieces that
        :meth:`serve` would answer from at once count (a blob cut in pieces of
        ``piece_size``, a recorded piece of an open partial file that came from
        the origin, or one whose origin fetch is running here, which :meth:`serve`
        follows as it lands); nothing is resolved or fetched.
        """
        complete: list[str] = []
        pieces: dict[str, list[int]] = {}
        for key in keys:
            digest = self.store.sources.get(FillKey(key))
            if digest is not None and self.store.has_blob(digest):
                if await self._blob_piece_size(digest) == piece_size:
                    complete.append(key)
                continue
            h = self.fills.get(key)
            if h is not None and not h.closed and h.entry.piece_size == piece_size:
                # Pieces that came from peers are left out: until the whole file is checked they are only
                # a peer's word, and a requester that took a lie from here would blame this node.
                own = [i for i in h.fill.done if i not in h.fill.peer_sources]
                # Pieces whose origin fetch is running here count too: a peer following that fetch (cut-through)
                # costs the origin nothing more, where taking the piece from the origin itself doubles it (a node
                # joining mid-storm owns a third of the pieces the others are fetching right now).
                own += [i for i, s in h.streams.items() if s.upstream is None and s.asked and not s.failed]
                if own:
                    pieces[key] = sorted(set(own))
        return complete, pieces

    async def _blob_piece_size(self, digest: str) -> int | None:
        size = self._meta_piece_size.get(digest)
        if size is None:
            meta = await self.store.read_meta(digest)
            value = meta.get("piece_size") if meta else None
            if not isinstance(value, int):
                return None
            size = self._meta_piece_size[digest] = value
        return size

    async def _blob_pieces(self, digest: str, entry: FileEntry) -> list[str] | None:
        pieces = self._meta_pieces.get(digest)
        if pieces is None:
            meta = await self.store.read_meta(digest)
            if not meta or meta.get("piece_size") != entry.piece_size:
                return None
            pieces = self._meta_pieces[digest] = list(meta["pieces"])
        return pieces if len(pieces) == entry.piece_count else None
