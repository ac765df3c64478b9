"""Pieces from the origin: range requests in model order, many per host, retried, recorded as they complete.

Each origin host has a window of requests in flight (agent/fetch/concurrency.py:
it grows while throughput grows, halves when the origin throttles, within
``--origin-connections`` and a byte budget ``--origin-inflight``); waiting
requests are admitted in the order their files were asked for, then byte
order (agent/fetch/slots.py), so the front of a model lands first.

A fetch covers a span of consecutive missing pieces (up to
:data:`ORIGIN_RANGE_MAX`), cut into requests of the window's range size: one
long range costs a local server less than several short ones (SeaweedFS served
64 MiB ranges in 0.7-0.75x the time and CPU of 16 MiB ones: bench/RESULTS.md
"Cold miss"), while a store that caps each connection's rate is only filled by
many shorter ones, several inside one piece. Pieces stay the unit that is
hashed, recorded, followed and served to peers: the requests of a span are
assembled in byte order (:class:`_Assembly`): the first one not yet written
goes straight to the file, the ones after it wait in memory (within the byte
budget) until it is done, so every byte is hashed once, in order, and a piece
is recorded only when all of it arrived and matched.

A request that fails with a transient error goes on from its first byte not
received, with exponential backoff and full jitter, ``--retries`` tries in all
(then the fill fails); a span whose piece did not match is fetched again from
that piece, as many times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agent.errors import PieceMovedError, TransientOriginError
from agent.fetch.concurrency import HostWindow, Lease
from agent.fetch.flight import Flight
from agent.fetch.open_fills import OpenFill, PieceStream
from agent.fetch.sinks import PieceSink, record_piece
from agent.fetch.slots import Expectation
from agent.manifest import FileEntry
from agent.metrics import Metrics
from agent.origins import Origin
from agent.store.store import Store
from client.errors import FetchFailedError, IntegrityError

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0
# The most one origin fetch (a span of consecutive pieces) covers when a node fills without
# peers; it is cut into requests of the host window's range size (64 MiB at the start on
# loopback: bench/RESULTS.md "Cold miss").
ORIGIN_RANGE_MAX = 64 * 1024 * 1024
DEFAULT_CEILING = 128
DEFAULT_INFLIGHT = 512 * 1024 * 1024
# The longest free connection slots wait for an earlier file's first request (OriginReader.expect): its
# partial file opens on a thread, milliseconds; a file waiting for room to open must not idle them longer.
EXPECT_GRACE = 1.0


class OriginReader:
    """The agent's origin requests: a window per host, spans, retries, and the pieces they record."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        connections: int,
        retries: int,
        changed: Callable[[], None],
        *,
        ceiling: int = DEFAULT_CEILING,
        inflight: int = DEFAULT_INFLIGHT,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.retries = retries
        self.changed = changed  # a piece was recorded (wakes streaming readers)
        self.start, self.ceiling, self.inflight = connections, max(connections, ceiling), inflight
        self._windows: dict[str, HostWindow] = {}

    def window(self, host: str) -> HostWindow:
        """The window of ``host`` (made at its first request)."""
        window = self._windows.get(host)
        if window is None:
            window = self._windows[host] = HostWindow(host, self.start, self.ceiling, self.inflight)
        return window

    def hosts(self) -> list[dict[str, Any]]:
        """What each origin host's window settled on (``agent stats`` ``origin_hosts``)."""
        return [w.snapshot() for w in self._windows.values()]

    def expect(self, flight: Flight, origin: Origin) -> None:
        """``flight`` will ask its host soon (its file is being opened): hold free slots from later files' requests.

        Flights are numbered in the order their files were asked for, but each
        opens its partial file on a thread first, and the second shard opened
        first would take every free slot with its span (agent/fetch/slots.py).
        Called when the flight is made, before any await.
        """
        window = self.window(origin.host_key(flight.entry))
        flight.expected = window.slots.expect((flight.order,), EXPECT_GRACE)

    @staticmethod
    def settle(flight: Flight) -> None:
        """``flight`` will not ask the origin as announced (done, failed, or its pieces come from peers)."""
        if flight.expected is not None:
            flight.expected.withdraw()
            flight.expected = None

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
        """Fetch one piece from the origin into the partial file, with retries; readers may follow it.

        In one request (peers follow it as it lands, in order), however short the host's ranges are.
        """
        await self.span(
            h, [index], origin, flight, {index: stream or h.announce(index)}, first=first, whole_pieces=True
        )

    async def span(
        self,
        h: OpenFill,
        indices: list[int],
        origin: Origin,
        flight: Flight | None,
        streams: dict[int, PieceStream],
        *,
        first: bool = False,
        whole_pieces: bool = False,
        still_mine: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Fetch consecutive pieces from the origin; readers may follow each as it lands.

        ``still_mine`` is asked once the first request's connection slot is held,
        before any byte is asked for: False raises PieceMovedError (the piece has
        a peer source now; nothing was asked of the origin).

        ``whole_pieces``: no request shorter than a piece. Where peers follow pieces
        as they land (cut-through), a piece cut into parallel requests reaches them
        only as fast as its first part (measured: a 8 MiB piece in 1 MiB parts over a
        2 MiB/s origin had passed 0.3 MiB on when the origin had sent 3 MiB;
        tests/test_peers.py cut-through).

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
        window = self.window(origin.host_key(fill.entry))
        fulfils = None
        if flight is not None and order == flight.order:  # the flight's own request: it was expected
            fulfils, flight.expected = flight.expected, None

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
                # Every origin fetch, for tracing where origin bytes go (a cluster should fetch
                # each piece from the origin about once): whose fill it is, which try.
                log.debug("origin range %d-%d of %s (pieces %d-%d, try %d, %s)", offset, end - 1, fill.entry.path,
                          remaining[0], remaining[-1], attempt + 1,
                          "own fill" if flight is not None else "for a peer or a repair")
                try:
                    if end > offset:
                        assembly = _Assembly(self, window, origin, fill.entry, sink, (order, remaining[0]),
                                             fill.entry.piece_size if whole_pieces else 0,
                                             None if attempt else still_mine)
                        await assembly.run(offset, end, None if attempt else fulfils)
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
            if fulfils is not None:
                fulfils.withdraw()  # no request went out (nothing to fetch, or cancelled before it asked)
            for index in indices:
                h.unannounce(index, streams[index])


class _Request:
    """One range request of a span: its bytes, and those that arrived before their turn to be written."""

    def __init__(self, offset: int, lease: Lease) -> None:
        self.offset, self.lease = offset, lease
        self.length = lease.nbytes
        self.received = 0
        self.waiting: list[bytes] = []  # copies: the range client reuses its buffers
        self.done = False


class _Assembly:
    """One try of a span: requests of the window's range size in flight at once, written in byte order.

    A request is admitted by the host window (a slot and its bytes of the
    budget), in byte order within the span. The request at the write cursor
    hands its bytes straight to the span's sink (written and hashed in
    place); later ones keep theirs in memory until every request before them
    is written. A request's bytes go back to the budget once written; its slot
    as soon as its answer ended. A transient failure retries the request from
    its first missing byte (``retries`` tries); the span fails if one runs out.
    """

    def __init__(
        self,
        reader: OriginReader,
        window: HostWindow,
        origin: Origin,
        entry: FileEntry,
        sink: _SpanSink,
        key: tuple[int, int],
        floor: int = 0,
        still_mine: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.reader, self.window, self.origin, self.entry, self.sink = reader, window, origin, entry, sink
        self.key, self.floor, self.still_mine = key, floor, still_mine
        self.requests: list[_Request] = []
        self.cursor = 0  # the first request not wholly written
        self.writing = False  # one coroutine writes at a time, in order

    async def run(self, offset: int, end: int, fulfils: Expectation | None = None) -> None:
        """Fetch bytes ``offset`` to ``end``; ``fulfils``: the window was told the first request is coming."""
        pos = offset
        self.window.want(end - offset)
        try:
            async with asyncio.TaskGroup() as tg:
                while pos < end:
                    lease = await self.window.lease((*self.key, pos), end - pos, self.floor, fulfils=fulfils)
                    fulfils = None  # only the first request was announced
                    if self.still_mine is not None and pos == offset and not await self.still_mine():
                        lease.release()
                        raise PieceMovedError(f"{self.entry.path}: the piece at byte {offset} has a peer source now")
                    if pos == offset:
                        self.sink.asked()
                    request = _Request(pos, lease)
                    self.requests.append(request)
                    tg.create_task(self._fetch(request))
                    pos += request.length
        except BaseExceptionGroup as group:
            raise _first(group) from None
        finally:
            self.window.want(-(end - pos))  # what this try will no longer ask for
            for request in self.requests:
                request.lease.release()
                request.waiting.clear()

    async def _fetch(self, request: _Request) -> None:
        tries = self.reader.retries
        metrics = self.reader.metrics
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            start = request.offset + request.received
            try:
                with metrics.fetch_running("origin"):
                    await self.origin.read_range(
                        self.entry, start, request.length - request.received, lambda c: self._deliver(request, c)
                    )
                break
            except TransientOriginError as exc:
                if exc.throttle:
                    self.window.throttled()
                metrics.fetch_error("origin", "transient")  # every failed try, as a span's tries count them
                if attempt + 1 == tries:
                    metrics.fetch_error("origin", "failed")
                    piece = (request.offset + request.received) // self.entry.piece_size
                    message = f"{self.entry.path!r}: piece {piece} failed {tries} times, last: {exc}"
                    raise FetchFailedError(message) from None
                log.warning("range %d-%d of %s failed (attempt %d/%d) at byte %d, going on from there: %s",
                            request.offset, request.offset + request.length - 1, self.entry.path, attempt + 1, tries,
                            request.offset + request.received, exc)
        if request.received != request.length:
            raise TransientOriginError(
                f"{self.entry.path!r}: the origin's range ended {request.length - request.received} bytes early"
            )
        request.lease.end_request()
        request.done = True
        await self._write()

    async def _deliver(self, request: _Request, chunks: Sequence[bytes | memoryview]) -> None:
        n = sum(len(c) for c in chunks)
        if request.received + n > request.length:
            raise TransientOriginError("origin sent more bytes than the range holds")
        request.received += n
        self.window.landed(n)
        if self.writing or request is not self.requests[self.cursor]:
            request.waiting.extend(bytes(c) for c in chunks)
            return
        self.writing = True
        try:
            await self._drain()  # what this request kept before its turn came
            await self.sink(chunks)
            await self._drain()
        finally:
            self.writing = False

    async def _write(self) -> None:
        """A request ended: write what waited behind it, unless another coroutine is writing."""
        if self.writing:
            return
        self.writing = True
        try:
            await self._drain()
        finally:
            self.writing = False

    async def _drain(self) -> None:
        """Write kept bytes from the cursor on; move past requests wholly written (their bytes go back)."""
        while self.cursor < len(self.requests):
            head = self.requests[self.cursor]
            if head.waiting:
                batch, head.waiting = head.waiting, []
                await self.sink(batch)
                continue
            if not head.done:
                return
            head.lease.release()
            self.cursor += 1


def _first(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


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

    def asked(self) -> None:
        """The span's first request is going out: its pieces come from the origin here, peers may follow them."""
        for index in self.indices[self.recorded :]:
            self.streams[index].asked = True

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
