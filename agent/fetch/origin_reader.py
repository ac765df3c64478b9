"""Pieces from the origin: range requests in model order, retried with backoff, recorded as they complete.

Up to ``connections`` origin requests run at once across the whole agent;
waiting requests are admitted in the order their files were asked for, then
piece order (agent/fetch/slots.py), so the front of a model lands first. One
request may cover a span of consecutive missing pieces (up to
:data:`ORIGIN_RANGE_MAX`): one long range costs the origin less than several
short ones (SeaweedFS served 64 MiB ranges in 0.7-0.75x the time and CPU of
16 MiB ones: bench/RESULTS.md "Cold miss"), while pieces stay the unit that is
hashed, recorded, followed and served to peers. Transient failures retry with
exponential backoff and full jitter, a bounded number of times; a try that
fails goes on from the first piece it did not complete.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from agent.errors import PieceMovedError, TransientOriginError
from agent.fetch.flight import Flight
from agent.fetch.open_fills import OpenFill, PieceStream
from agent.fetch.sinks import PieceSink, record_piece
from agent.fetch.slots import OrderedSlots
from agent.metrics import Metrics
from agent.origins import Origin
from agent.store.store import Store
from client.errors import FetchFailedError, IntegrityError

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0
# The most one origin range request asks for when a node fills without peers: several
# consecutive pieces in one request. SeaweedFS served the 1 GiB bench model in 64 MiB
# ranges in 0.7-0.75x the time and server CPU of 16 MiB ones (bench/RESULTS.md "Cold miss").
ORIGIN_RANGE_MAX = 64 * 1024 * 1024


class OriginReader:
    """The agent's origin requests: connection slots, spans, retries, and the pieces they record."""

    def __init__(
        self, store: Store, metrics: Metrics, connections: int, retries: int, changed: Callable[[], None]
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.retries = retries
        self.changed = changed  # a piece was recorded (wakes streaming readers)
        self._slots = OrderedSlots(connections)

    def span_from(self, h: OpenFill, index: int, flight: Flight) -> list[int]:
        """Piece ``index`` and the missing pieces right after it that nothing fetches yet (ORIGIN_RANGE_MAX in all)."""
        entry = h.entry
        span = [index]
        while (len(span) + 1) * entry.piece_size <= ORIGIN_RANGE_MAX:
            nxt = span[-1] + 1
            if nxt >= entry.piece_count or nxt in h.fill.done or nxt in h.tasks or nxt in flight.done_pieces:
                break
            span.append(nxt)
        return span

    async def piece(
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
        await self.span(h, [index], origin, flight, {index: stream or h.announce(index)}, first=first)

    async def span(
        self,
        h: OpenFill,
        indices: list[int],
        origin: Origin,
        flight: Flight | None,
        streams: dict[int, PieceStream],
        *,
        first: bool = False,
        still_mine: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Fetch consecutive pieces from the origin in one range request per try; readers may follow each.

        ``still_mine`` is asked once a connection slot is free, before the first
        request: False raises PieceMovedError (the piece has a peer source now;
        nothing was asked of the origin).

        Each piece is recorded as soon as its last byte is written. ``flight``
        is the fill that wants them (None: a peer's request or a repair).
        ``first``: ahead of this node's other pieces, as for a peer's request.
        An owner that fetches its own pieces first keeps the origin's link busy
        with every owner's pieces from the start, instead of only the pieces
        every node happens to want first (measured: bench/RESULTS.md "Peers").
        """
        fill = h.fill
        remaining = list(indices)
        last: Exception | None = None
        order = -1 if first or flight is None else flight.order  # -1: peers are (or will be) waiting on it
        transfers = self.metrics.transfers

        def landed(n: int) -> None:
            transfers.origin_bytes += n
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
                          remaining[0], remaining[-1], attempt + 1,
                          "own fill" if flight is not None else "for a peer or a repair")
                async with self._slots.hold((order, remaining[0])):
                    if still_mine is not None and not attempt and not await still_mine():
                        raise PieceMovedError(f"piece {remaining[0]} of {fill.entry.path} has a peer source now")
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
                h.unannounce(index, streams[index])


class _SpanSink:
    """One try of a run of consecutive pieces from the origin: each piece into its own PieceSink.

    Bytes are split at piece boundaries; a piece whose last byte is written is
    hashed, recorded (checked against the manifest) and announced complete
    before the next piece's bytes are taken. ``recorded`` counts the pieces
    this try completed.
    """

    def __init__(
        self,
        reader: OriginReader,
        h: OpenFill,
        indices: list[int],
        landed: Callable[[int], None],
        streams: dict[int, PieceStream],
        flight: Flight | None,
    ) -> None:
        self.reader, self.h, self.indices, self.landed = reader, h, indices, landed
        self.streams, self.flight = streams, flight
        self.recorded = 0
        self.piece = self._next_sink()
        self.since = time.monotonic()  # when the current piece was asked for, or the one before it ended

    def _next_sink(self) -> PieceSink:
        index = self.indices[self.recorded]
        offset = self.h.entry.piece_range(index)[0]
        return PieceSink(self.reader.store, self.h.fill, offset, self.landed, self.streams[index])

    def _room(self) -> int:
        return self.h.entry.piece_range(self.indices[self.recorded])[1] - self.piece.written

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
        await record_piece(self.reader.store, self.h.fill, index, digest)
        self.streams[index].digest = digest
        if self.flight is not None:
            self.flight.done_pieces.add(index)
        now = time.monotonic()
        self.reader.metrics.piece_fetched("origin", now - self.since)
        self.since = now
        self.reader.changed()
        self.recorded += 1
        if self.recorded < len(self.indices):
            self.piece = self._next_sink()

    async def complete(self) -> None:
        """After the range: record a last piece of zero bytes (an empty file's only piece)."""
        while self.recorded < len(self.indices) and self._room() == 0:
            await self._record()
        if self.recorded < len(self.indices):
            raise TransientOriginError(
                f"the origin's range ended {self._room()} bytes into piece {self.indices[self.recorded]}"
            )

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
