"""Connection slots handed out in model order, not arrival order.

An ``asyncio.Semaphore`` admits waiters first come, first served, so the
pieces of a model's second shard can take every connection while the first
shard waits. A loader that consumes tensors in file order (and a prefetch
that reports "the front is ready") wants the opposite: of all the pieces
waiting, the lowest (flight, piece) goes next.
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
        self.free = n
        self._waiters: list[list[Any]] = []  # heap of [key, seq, future]
        self._seq = itertools.count()  # ties (and equal keys) keep arrival order
        self._named: dict[Any, list[Any]] = {}  # waiters that can be promoted, by name

    @contextlib.asynccontextmanager
    async def hold(self, key: Any, name: Any = None) -> AsyncIterator[None]:
        """A slot for the block; ``name`` lets :meth:`promote` move this waiter up while it waits."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = [key, next(self._seq), fut]
            heapq.heappush(self._waiters, entry)
            if name is not None:
                self._named[name] = entry
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed over just as we were cancelled: pass it on
                raise
            finally:
                if name is not None and self._named.get(name) is entry:
                    del self._named[name]
        try:
            yield
        finally:
            self._release()

    def promote(self, name: Any, key: Any) -> bool:
        """Give the waiter ``name`` the lower of its key and ``key``; False when no such waiter waits."""
        entry = self._named.get(name)
        if entry is None or entry[2].done():
            return False
        if key < entry[0]:
            entry[0] = key
            heapq.heapify(self._waiters)
        return True

    def _release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():  # cancelled waiters stay in the heap until they surface here
                fut.set_result(None)
                return
        self.free += 1
