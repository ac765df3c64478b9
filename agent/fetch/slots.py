"""Connection slots handed out in model order, not arrival order.

An ``asyncio.Semaphore`` admits waiters first come, first served, so the
pieces of a model's second shard can take every connection while the first
shard waits. A loader that consumes tensors in file order (and a prefetch
that reports "the front is ready") wants the opposite: of all the pieces
waiting, the lowest (flight, piece) goes next.

The number of slots may change while they are held (:meth:`OrderedSlots.resize`):
the origin's window per host grows and shrinks with measured throughput
(agent/fetch/concurrency.py). Shrinking never takes a slot away from a holder;
released slots are simply not handed on until fewer than the new size are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from typing import Any


class OrderedSlots:
    """At most ``n`` holders at once; waiters are admitted lowest ``key`` first."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("need at least one slot")
        self.size = n
        self.free = n  # below 0 after a shrink while more than the new size are held
        self._waiters: list[list[Any]] = []  # heap of [key, seq, future]
        self._seq = itertools.count()  # ties (and equal keys) keep arrival order
        self._named: dict[Any, list[Any]] = {}  # waiters that can be promoted, by name

    @property
    def held(self) -> int:
        """Slots held now."""
        return self.size - self.free

    @property
    def waiting(self) -> int:
        """Waiters not yet admitted (cancelled ones leave the count as they surface)."""
        return sum(1 for entry in self._waiters if not entry[2].done())

    def resize(self, n: int) -> None:
        """Allow ``n`` holders from now on; waiters are admitted at once if that makes room."""
        if n < 1:
            raise ValueError("need at least one slot")
        self.free += n - self.size
        self.size = n
        self._dispatch()

    async def acquire(self, key: Any, name: Any = None) -> None:
        """Wait for a slot (lowest ``key`` first); the caller must :meth:`release` it.

        ``name`` lets :meth:`promote` move this waiter up while it waits.
        """
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = [key, next(self._seq), fut]
        heapq.heappush(self._waiters, entry)
        if name is not None:
            self._named[name] = entry
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            raise
        finally:
            if name is not None and self._named.get(name) is entry:
                del self._named[name]

    @contextlib.asynccontextmanager
    async def hold(self, key: Any, name: Any = None) -> AsyncIterator[None]:
        """A slot for the block; ``name`` lets :meth:`promote` move this waiter up while it waits."""
        await self.acquire(key, name)
        try:
            yield
        finally:
            self.release()

    def promote(self, name: Any, key: Any) -> bool:
        """Give the waiter ``name`` the lower of its key and ``key``; False when no such waiter waits."""
        entry = self._named.get(name)
        if entry is None or entry[2].done():
            return False
        if key < entry[0]:
            entry[0] = key
            heapq.heapify(self._waiters)
        return True

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        self.free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free > 0 and self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():  # cancelled waiters stay in the heap until they surface here
                self.free -= 1
                fut.set_result(None)
