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
hashed, recorded, followed and served to peers: requests are cut at piece
boundaries (a request covers whole pieces or lies inside one) and assembled
per piece (:class:`_Assembly`): each piece has its own write cursor and hash,
so the request at its piece's first unwritten byte goes straight to the file
whatever the other pieces are doing; only a request behind another one of the
same piece waits in memory (within the byte budget) until the piece reaches
it. Every byte is hashed once, in order within its piece, and a piece is
recorded as soon as all of it arrived and matched, possibly before the pieces
ahead of it.

A request that fails with a transient error goes on from its first byte not
received, with exponential backoff and full jitter, ``--retries`` tries in all
(then the fill fails); a span whose piece did not match is fetched again from
that piece, as many times.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agent.errors import PieceMovedError, TransientOriginError
from agent.fetch.concurrency import MIN_RANGE, HostWindow, Lease
from agent.fetch.flight import Flight
from agent.fetch.open_fills import OpenFill, PieceStream
from agent.fetch.sinks import PieceSink, record_piece
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

        def landed(n: int) -> None:
            transfers.origin_bytes += n
            if flight is not None:
                flight.done_bytes += n
                flight.fetched_bytes += n

        try:
            for attempt in range(self.retries):
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
                sink = _SpanSink(self, h, remaining, landed, streams, flight)
                runs = sink.runs()
                # Every origin fetch, for tracing where origin bytes go (a cluster should fetch
                # each piece from the origin about once): whose fill it is, which try.
                log.debug("origin ranges %s of %s (pieces %d-%d, try %d, %s)",
                          ", ".join(f"{a}-{b - 1}" for a, b in runs), fill.entry.path,
                          remaining[0], remaining[-1], attempt + 1,
                          "own fill" if flight is not None else "for a peer or a repair")
                try:
                    if runs:
                        assembly = _Assembly(self, window, origin, fill.entry, sink, (order, remaining[0]),
                                             whole_pieces, None if attempt else still_mine)
                        await assembly.run(runs)
                    await sink.complete()
                    return
                except (TransientOriginError, IntegrityError) as exc:
                    last = exc
                    self.metrics.fetch_error("origin", "transient")
                    sink.abandon()
                    remaining = sink.missing()  # a retry asks again only for these, from their first byte
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


class _Request:
    """One range request of a span: the bytes it received and those written to the file."""

    def __init__(self, offset: int, lease: Lease) -> None:
        self.offset, self.lease = offset, lease
        self.length = lease.nbytes
        self.received = 0
        self.written = 0
        self.parts: list[_Part] = []  # one per piece it covers, in byte order


class _Part:
    """The bytes of one request inside one piece, and those that arrived before their turn in the piece."""

    def __init__(self, request: _Request, piece: _Piece, start: int, end: int) -> None:
        self.request, self.piece, self.start, self.end = request, piece, start, end
        self.waiting: list[bytes] = []  # copies: the range client reuses its buffers


class _Piece:
    """One piece of a span's try: its own write cursor and hash (a PieceSink), the parts of requests in it."""

    def __init__(self, index: int, offset: int, length: int, sink: PieceSink) -> None:
        self.index, self.offset, self.length, self.sink = index, offset, length, sink
        self.parts: list[_Part] = []  # in byte order
        self.cursor = 0  # the first part not wholly written
        self.writing = False  # one coroutine writes this piece at a time, in order
        self.recorded = False

    @property
    def end(self) -> int:
        return self.offset + self.length


class _Assembly:
    """One try of a span: requests of the window's range size in flight at once, each piece written in order.

    A request is admitted by the host window (a slot and its bytes of the
    budget), in byte order within the span, and cut at piece boundaries: it
    covers whole pieces, or lies inside one. Each piece has its own write
    cursor and hash, so the request at the first unwritten byte of its piece
    hands its bytes straight to the piece (written and hashed in place) without
    waiting for the pieces before it; only a request behind another one of the
    same piece keeps its bytes in memory until the piece reaches it (the copies
    that cost CPU when a span was written in one byte order: bench/RESULTS.md
    "Object store"). Within a piece bytes are written in order, so peers relay a
    piece as it lands; a piece is recorded as soon as its last byte is written.
    A request's bytes go back to the budget once written; its slot as soon as
    its answer ended. A transient failure retries the request from its first
    missing byte (``retries`` tries); the span fails if one runs out.
    """

    def __init__(
        self,
        reader: OriginReader,
        window: HostWindow,
        origin: Origin,
        entry: FileEntry,
        sink: _SpanSink,
        key: tuple[int, int],
        whole_pieces: bool = False,
        still_mine: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.reader, self.window, self.origin, self.entry, self.sink = reader, window, origin, entry, sink
        self.key, self.whole_pieces, self.still_mine = key, whole_pieces, still_mine
        self.requests: list[_Request] = []

    def _cut(self, pos: int, run_end: int, size: int) -> int:
        """Bytes of the request at ``pos`` for range size ``size``: whole pieces, or up to its piece's end.

        No request ends less than MIN_RANGE before the end of what it is cut from
        (the run of pieces, or its piece): that tail goes with it.
        """
        piece_size = self.entry.piece_size
        piece_start = pos // piece_size * piece_size
        if self.whole_pieces or (pos == piece_start and size >= piece_size):
            nbytes, limit = max(piece_size, size // piece_size * piece_size), run_end
        else:
            nbytes, limit = size, min(piece_start + piece_size, run_end)
        nbytes = min(nbytes, limit - pos)
        return limit - pos if limit - pos - nbytes < MIN_RANGE else nbytes

    async def run(self, runs: list[tuple[int, int]]) -> None:
        """Fetch the byte ranges ``runs`` (each a run of consecutive pieces of the span)."""
        total = sum(end - offset for offset, end in runs)
        asked = 0
        self.window.want(total)
        try:
            async with asyncio.TaskGroup() as tg:
                for offset, end in runs:
                    pos = offset
                    while pos < end:
                        lease = await self.window.lease(
                            (*self.key, pos), end - pos, cut=functools.partial(self._cut, pos, end)
                        )
                        if self.still_mine is not None and not asked and not await self.still_mine():
                            lease.release()
                            raise PieceMovedError(
                                f"{self.entry.path}: the piece at byte {offset} has a peer source now"
                            )
                        if not asked:
                            self.sink.asked()
                        asked += lease.nbytes
                        request = _Request(pos, lease)
                        self._place(request)
                        self.requests.append(request)
                        tg.create_task(self._fetch(request))
                        pos += request.length
        except BaseExceptionGroup as group:
            raise _first(group) from None
        finally:
            self.window.want(-(total - asked))  # what this try will no longer ask for
            for request in self.requests:
                request.lease.release()
                for part in request.parts:
                    part.waiting.clear()

    def _place(self, request: _Request) -> None:
        """Give ``request`` a part in each piece it covers (in that piece's byte order)."""
        pos, end = request.offset, request.offset + request.length
        while pos < end:
            piece = self.sink.piece_at(pos)
            part = _Part(request, piece, pos, min(end, piece.end))
            piece.parts.append(part)
            request.parts.append(part)
            pos = part.end

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

    async def _deliver(self, request: _Request, chunks: Sequence[bytes | memoryview]) -> None:
        n = sum(len(c) for c in chunks)
        if request.received + n > request.length:
            raise TransientOriginError("origin sent more bytes than the range holds")
        pos = request.offset + request.received
        request.received += n
        self.window.landed(n)
        if len(request.parts) == 1:
            await self._offer(request.parts[0], chunks)
            return
        views = [memoryview(c) for c in chunks]  # split at piece boundaries
        for part in request.parts:
            if not views:
                break
            if pos >= part.end:
                continue
            take, room = [], part.end - pos
            while views and room:
                view = views[0]
                if len(view) <= room:
                    take.append(views.pop(0))
                else:
                    take.append(view[:room])
                    views[0] = view[room:]
                room -= len(take[-1])
                pos += len(take[-1])
            await self._offer(part, take)

    async def _offer(self, part: _Part, chunks: Sequence[bytes | memoryview]) -> None:
        """Bytes of ``part``: written now if the part is where its piece's writing is, else kept."""
        piece = part.piece
        if piece.writing or piece.cursor >= len(piece.parts) or piece.parts[piece.cursor] is not part:
            part.waiting.extend(bytes(c) for c in chunks)
            self.window.kept_bytes += sum(len(c) for c in chunks)
            return
        piece.writing = True
        try:
            await self._drain(piece)  # what this part kept before its turn came
            await self._write(part, chunks)
            await self._drain(piece)
        finally:
            piece.writing = False

    async def _drain(self, piece: _Piece) -> None:
        """Write kept bytes from the piece's cursor on; move past parts wholly written."""
        while piece.cursor < len(piece.parts):
            head = piece.parts[piece.cursor]
            if head.waiting:
                batch, head.waiting = head.waiting, []
                await self._write(head, batch)
                continue
            if piece.sink.pos < head.end:
                return
            piece.cursor += 1

    async def _write(self, part: _Part, chunks: Sequence[bytes | memoryview]) -> None:
        """Write and hash bytes of ``part`` at its piece's cursor; a request wholly written gives its bytes back."""
        request = part.request
        before = part.piece.sink.pos
        await self.sink.write(part.piece, chunks)
        request.written += part.piece.sink.pos - before
        if request.written == request.length:
            request.lease.release()


def _first(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


class _SpanSink:
    """One try of a run of pieces from the origin: each piece into its own PieceSink, recorded when whole.

    A piece whose last byte is written is hashed, recorded (checked against
    the manifest) and announced complete at once, whatever the pieces before
    it are doing. :meth:`missing` lists the pieces this try did not record.
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
        self.pieces: dict[int, _Piece] = {}
        for index in indices:
            offset, length = h.entry.piece_range(index)
            sink = PieceSink(reader.store, h.fill, offset, landed, streams[index])
            self.pieces[index] = _Piece(index, offset, length, sink)
        self.since = time.monotonic()  # when the span was asked for, or its last piece before ended

    def runs(self) -> list[tuple[int, int]]:
        """The byte ranges of the pieces, consecutive ones together (a retry's pieces may have gaps)."""
        runs: list[tuple[int, int]] = []
        for index in self.indices:
            piece = self.pieces[index]
            if not piece.length:
                continue
            if runs and runs[-1][1] == piece.offset:
                runs[-1] = (runs[-1][0], piece.end)
            else:
                runs.append((piece.offset, piece.end))
        return runs

    def piece_at(self, pos: int) -> _Piece:
        return self.pieces[pos // self.h.entry.piece_size]

    def asked(self) -> None:
        """The span's first request is going out: its pieces come from the origin here, peers may follow them."""
        for index in self.indices:
            self.streams[index].asked = True

    async def write(self, piece: _Piece, chunks: Sequence[bytes | memoryview]) -> None:
        """Write and hash ``chunks`` at ``piece``'s cursor; record the piece once it is whole."""
        if piece.recorded or piece.sink.written + sum(len(c) for c in chunks) > piece.length:
            raise TransientOriginError("origin sent more bytes than the pieces asked for")
        await piece.sink(chunks)
        if piece.sink.written == piece.length:
            await self._record(piece)

    async def _record(self, piece: _Piece) -> None:
        digest = piece.sink.hasher.hexdigest()
        await record_piece(self.reader.store, self.h.fill, piece.index, digest)
        piece.recorded = True
        self.streams[piece.index].digest = digest
        if self.flight is not None:
            self.flight.done_pieces.add(piece.index)
        now = time.monotonic()
        self.reader.metrics.piece_fetched("origin", now - self.since)
        self.since = now
        self.reader.changed()

    def missing(self) -> list[int]:
        """The pieces this try did not record, in order."""
        return [index for index in self.indices if not self.pieces[index].recorded]

    async def complete(self) -> None:
        """After the requests: record a last piece of zero bytes (an empty file's only piece)."""
        for index in self.indices:
            piece = self.pieces[index]
            if not piece.recorded and piece.sink.written == piece.length:
                await self._record(piece)
        missing = self.missing()
        if missing:
            piece = self.pieces[missing[0]]
            raise TransientOriginError(
                f"the origin's range ended {piece.length - piece.sink.written} bytes into piece {piece.index}"
            )

    def abandon(self) -> None:
        """This try failed: un-count the bytes of the pieces it did not complete; their followers start over."""
        missing = self.missing()
        for index in missing:
            piece = self.pieces[index]
            if not piece.sink.written and index != missing[0]:
                continue  # nothing of it was written: no follower has anything to drop
            if self.flight is not None:
                self.flight.done_bytes -= piece.sink.written
            stream = self.streams[index]
            stream.attempt += 1
            stream.written = 0
            stream.wake()
