"""The partial files open in this process, shared by everyone filling or serving them.

A blob being filled has one :class:`OpenFill`: its :class:`~agent.store.fill.BlobFill`
(the partial file and its verified pieces), the one fetch task per piece that is
running, and the :class:`PieceStream` of each piece being received, which peers
may follow as its bytes land (cut-through). The flight filling the file and the
peers asking for its pieces (agent/fetch/piece_server.py) are its users; an
unused one stays open a little while (peers tend to ask for more of it), then is
closed. At most ``limit`` are open at once (each holds a file descriptor, and a
model may have tens of thousands of files): opening one more waits for room,
and idle ones give theirs back at once when someone waits. Touched only from
the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from collections.abc import Set as AbstractSet
from typing import Any

from agent.manifest import FileEntry
from agent.singleflight import SingleFlight
from agent.store.fill import BlobFill
from agent.store.store import Store

log = logging.getLogger(__name__)

FILL_LINGER = 30.0  # seconds an idle partial file stays open for peers asking for more of it


class Signal:
    """A broadcast wake-up: :meth:`wake` releases everyone waiting now; :meth:`wait` has a timeout."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class PieceStream(Signal):
    """A fetch of one piece in progress, for readers that pass the bytes on as they land.

    ``upstream`` is the peer the bytes come from (None: the origin).
    ``written`` is how many bytes from the piece's start are in the file;
    ``attempt`` changes when a try failed and the piece starts over (a reader
    that already sent bytes of the failed try gives up); ``digest`` is set once
    the piece is recorded, ``failed`` when it never will be. ``asked``: its
    bytes were asked of the origin (not only waiting for a request slot, where
    the piece may still be re-placed onto another node): peers may be told this
    node is getting it (``/peer/v1/have``), so a node joining mid-storm follows
    this fetch instead of taking the piece from the origin a second time.
    """

    def __init__(self, upstream: str | None = None) -> None:
        super().__init__()
        self.upstream = upstream
        self.written = 0
        self.attempt = 0
        self.digest: str | None = None
        self.failed = False
        self.asked = False


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

    @property
    def entry(self) -> FileEntry:
        return self.fill.entry

    def announce(self, index: int, upstream: str | None = None) -> PieceStream:
        """A fetch of piece ``index`` starts (from ``upstream``, or the origin): followers may join it."""
        stream = PieceStream(upstream)
        self.streams[index] = stream
        self.announced.wake()
        return stream

    def unannounce(self, index: int, stream: PieceStream) -> None:
        """The fetch behind ``stream`` ended: recorded (``digest`` set) or failed; followers are told."""
        stream.failed = stream.digest is None
        stream.wake()
        if self.streams.get(index) is stream:
            del self.streams[index]

    def track(self, index: int, task: asyncio.Task[None]) -> None:
        """``task`` fetches piece ``index`` now: whoever needs the piece waits on it instead of a second fetch."""
        self.tasks[index] = task
        task.add_done_callback(lambda t: self.tasks.pop(index, None) if self.tasks.get(index) is t else None)


class OpenFills:
    """The open partial files by fill key; opening one is single-flight, closing it waits for its last user."""

    def __init__(self, store: Store, limit: int) -> None:
        self.store = store
        self.limit = limit
        self._room = asyncio.Semaphore(limit)
        self._open: dict[str, OpenFill] = {}
        self._opening: SingleFlight[str, OpenFill] = SingleFlight()
        self._closing: set[asyncio.Future[None]] = set()  # held until done: the loop keeps weak references

    def __contains__(self, fill_key: object) -> bool:
        return fill_key in self._open

    def __len__(self) -> int:
        """Partial files open now (at most ``limit``)."""
        return len(self._open)

    def get(self, fill_key: str) -> OpenFill | None:
        """The open fill of ``fill_key``, if one is open now (no new user: look, do not hold)."""
        return self._open.get(fill_key)

    async def acquire(self, entry: FileEntry, protect: AbstractSet[str]) -> OpenFill:
        """The open fill of ``entry`` (opened, room made for it, if need be), with one more user."""
        h = self._open.get(entry.fill_key)
        if h is None:
            h = await self._opening.run(entry.fill_key, lambda: self._open_fill(entry, protect), f"open {entry.path}")
        h.users += 1
        if h.linger is not None:
            h.linger.cancel()
            h.linger = None
        return h

    async def _open_fill(self, entry: FileEntry, protect: AbstractSet[str]) -> OpenFill:
        if self._room.locked():
            self._close_idle_now()
        await self._room.acquire()
        try:
            fill, _ = await self.store.begin_fill(entry, protect)
        except BaseException:
            self._room.release()
            raise
        h = OpenFill(fill)
        self._open[entry.fill_key] = h
        return h

    def _close_idle_now(self) -> None:
        """Someone waits for room: the fills lingering unused give theirs back now, not in FILL_LINGER seconds."""
        for h in list(self._open.values()):
            if h.linger is not None and h.users == 0 and not h.tasks and not h.closed:
                h.linger.cancel()
                h.linger = None
                self._close_later(h)

    def release(self, h: OpenFill, close: bool = False) -> None:
        """One user less; an unused partial stays open a while (peers tend to ask for more of it).

        With ``close`` (a fill that failed) it is closed at once if nobody else
        uses it: a new attempt re-opens it and re-hashes its recorded pieces.
        """
        h.users -= 1
        if h.users == 0 and not h.closed and close and not h.tasks:
            self.retire(h)
            self._in_background(self.store.abandon_fill(h.fill))
        elif h.users == 0 and not h.closed:
            h.linger = asyncio.get_running_loop().call_later(FILL_LINGER, self._close_later, h)

    def retire(self, h: OpenFill) -> None:
        """The fill was published or discarded: its file handle is no longer ours to share (its room is free)."""
        if h.closed:
            return
        h.closed = True
        if self._open.get(h.fill.key) is h:
            del self._open[h.fill.key]
        self._room.release()

    def _close_later(self, h: OpenFill) -> None:
        self._in_background(self._close_idle(h))

    async def _close_idle(self, h: OpenFill) -> None:
        if h.users or h.closed or h.tasks:
            return
        self.retire(h)
        await self.store.abandon_fill(h.fill)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        closing = asyncio.ensure_future(work)
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
