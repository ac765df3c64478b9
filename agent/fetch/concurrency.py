"""How many range requests one origin host gets at once, and how long they are: a window per host.

An object store gives each connection a limited rate (tens of MB/s) after tens
of milliseconds to first byte; throughput comes from many requests in flight.
How many is worth it depends on the store, the link and the node, so it is
found by measurement instead of set: each origin host (an S3 bucket, the Hub,
one https server) has a :class:`HostWindow` that

- starts at ``--connections`` requests,
- doubles while the bytes landing per step grow by at least 15% (:data:`GROWTH`)
  and the window is what limits them (requests waited for a slot),
- holds once a doubling no longer pays (the link, the store or this node is the limit),
- halves when the origin throttles (S3 503 SlowDown, 429, connection resets:
  ``TransientOriginError(throttle=True)``), at most once a step, and then probes again,
- never exceeds ``--origin-connections`` requests, nor ``--origin-inflight``
  bytes leased to requests that have not yet been written to their files.

The range size follows from the two and from what is wanted: the byte budget
divided by the window, and no more than the bytes still wanted from the host
divided by the window, so that what is wanted fills every slot
(:meth:`HostWindow.range_size`), between :data:`MIN_RANGE` and :data:`MAX_RANGE`,
a power of two. Without the second bound a 64 MiB model would go as a few 64 MiB
requests, the window would never be full, and it could never learn that more
requests pay (bench/RESULTS.md "Object store"). Eight requests on loopback SeaweedFS stay 64 MiB long (one
range costs the server less than several: bench/RESULTS.md "Cold miss"); 64
requests to a store that caps each connection are 8 MiB long, shorter than a
piece, so a piece arrives over several connections at once
(agent/fetch/origin_reader.py assembles them in order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.fetch.slots import Expectation, OrderedSlots

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_RANGE = 1 * MiB
MAX_RANGE = 64 * MiB
GROWTH = 1.15  # a doubling must bring this much more throughput to be followed by another
STEP_SECONDS = 0.5  # how long throughput is measured between decisions


class Lease:
    """``nbytes`` of a host's byte budget, held from admission until the bytes are written."""

    def __init__(self, window: HostWindow, nbytes: int) -> None:
        self.window, self.nbytes = window, nbytes
        self._slot = True

    def end_request(self) -> None:
        """The request is over (its bytes may still wait in memory): its connection slot goes to the next."""
        if self._slot:
            self._slot = False
            self.window.slots.release()

    def release(self) -> None:
        """The bytes are written (or dropped): give back the slot if still held, and the bytes."""
        self.end_request()
        if self.nbytes:
            self.window.give_bytes(self.nbytes)
            self.nbytes = 0


class HostWindow:
    """The requests one origin host gets at once (AIMD on measured throughput) and its byte budget."""

    def __init__(
        self,
        host: str,
        start: int,
        ceiling: int,
        budget: int,
        *,
        step_seconds: float = STEP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.ceiling = max(1, min(ceiling, budget // MIN_RANGE))
        self.budget = budget
        self.slots = OrderedSlots(max(1, min(start, self.ceiling)))
        self.step_seconds = step_seconds
        self.clock = clock
        self.inflight = 0  # bytes leased now
        self.demand = 0  # bytes wanted from this host and not yet leased (spans being fetched)
        self.peak_size = self.lowest_size = self.slots.size
        self.peak_inflight = 0
        self.throttles = 0
        self.rate = 0.0  # bytes per second over the last step
        self.state = "starting"
        self._room: list[asyncio.Future[None]] = []
        self._step_start = clock()
        self._step_bytes = 0
        self._limited = False  # a request waited for a slot during this step
        self._best: float | None = None  # the rate at the window before the last doubling
        self._growing = True
        self._last_throttle = -1e9

    @property
    def size(self) -> int:
        return self.slots.size

    def range_size(self) -> int:
        """Bytes per request: the budget, and what is still wanted, shared by the window (a power of two
        in [MIN_RANGE, MAX_RANGE])."""
        wanted = -(-self.demand // self.size) if self.demand else MAX_RANGE
        share = max(MIN_RANGE, min(MAX_RANGE, self.budget // self.size, wanted))
        return 1 << (share.bit_length() - 1)

    def want(self, nbytes: int) -> None:
        """``nbytes`` more are wanted from this host (negative: no longer wanted); they shape the range size."""
        self.demand = max(0, self.demand + nbytes)

    async def lease(self, key: Any, want: int, floor: int = 0, *, fulfils: Expectation | None = None) -> Lease:
        """A slot (lowest ``key`` first) and up to ``want`` bytes of budget; waits for both.

        ``fulfils``: the expectation this request was announced with (:meth:`OrderedSlots.expect`).
        ``floor``: no fewer bytes than this (or ``want``, if less), whatever the range size
        (whole pieces, where peers follow them as they land); rounded down to a multiple of it.

        The bytes are at most :meth:`range_size`, decided when the slot is given,
        so requests started after the window grew are shorter. The caller starts
        its request for exactly ``Lease.nbytes``.
        """
        if self.slots.free <= 0 or self.slots.waiting:
            self._limited = True
        await self.slots.acquire(key, fulfils=fulfils)
        if self.slots.free <= 0:
            self._limited = True  # every slot is busy: more slots might pay
        try:
            nbytes = min(want, self.range_size())
            if floor:
                nbytes = min(want, max(floor, nbytes // floor * floor))
            if want - nbytes < MIN_RANGE:  # no tail shorter than a range of its own
                nbytes = want
            nbytes = min(nbytes, self.budget)
            while self.inflight + nbytes > self.budget:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._room.append(fut)
                try:
                    await fut
                finally:
                    if fut in self._room:
                        self._room.remove(fut)
        except BaseException:
            self.slots.release()
            raise
        self.inflight += nbytes
        self.demand = max(0, self.demand - nbytes)
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        return Lease(self, nbytes)

    def give_bytes(self, nbytes: int) -> None:
        self.inflight -= nbytes
        room, self._room = self._room, []
        for fut in room:  # each re-checks; few wait at once (they hold slots)
            if not fut.done():
                fut.set_result(None)

    def landed(self, nbytes: int) -> None:
        """Bytes of a body arrived: count them, and at the end of a step decide the window."""
        self._step_bytes += nbytes
        now = self.clock()
        elapsed = now - self._step_start
        if elapsed < self.step_seconds:
            return
        rate = self._step_bytes / elapsed
        limited = self._limited or self.slots.waiting > 0 or self.slots.free <= 0
        self._step_start, self._step_bytes, self._limited = now, 0, False
        self.rate = rate
        if not limited:
            return  # not the window's doing: fewer requests wanted than allowed
        if not self._growing:
            return
        if self._best is None or rate >= self._best * GROWTH:
            self._best = rate if self._best is None else max(self._best, rate)
            if self.size < self.ceiling:
                self._resize(min(self.ceiling, self.size * 2))
                self.state = "growing"
            else:
                self.state = "at ceiling"
        else:
            self._growing = False
            self.state = "holding"

    def throttled(self) -> None:
        """The origin asked us to slow down: halve the window (once a step), then probe upward again."""
        self.throttles += 1
        now = self.clock()
        if now - self._last_throttle < self.step_seconds:
            return
        self._last_throttle = now
        self._resize(max(1, self.size // 2))
        self.state = "backed off"
        self._best = None  # measure afresh from the smaller window
        self._growing = True
        self._step_start, self._step_bytes, self._limited = now, 0, False

    def _resize(self, n: int) -> None:
        log.info("origin %s: %d requests in flight -> %d (%.0f MB/s over the last step)",
                 self.host, self.size, n, self.rate / 1e6)
        self.slots.resize(n)
        self.peak_size = max(self.peak_size, n)
        self.lowest_size = min(self.lowest_size, n)

    def snapshot(self) -> dict[str, Any]:
        """What ``agent stats`` shows for this host (``origin_hosts``)."""
        return {
            "host": self.host,
            "window": self.size,
            "ceiling": self.ceiling,
            "peak_window": self.peak_size,
            "lowest_window": self.lowest_size,
            "range_bytes": self.range_size(),
            "inflight_bytes": self.inflight,
            "peak_inflight_bytes": self.peak_inflight,
            "budget_bytes": self.budget,
            "rate_bps": round(self.rate),
            "throttles": self.throttles,
            "state": self.state,
        }
