"""Connection slots handed out in model order, not arrival order.

An ``asyncio.Semaphore`` admits waiters first come, first served, so the
pieces of a model's second shard can take every connection while the first
shard waits. A loader that consumes tensors in file order (and a prefetch
that reports "the front is ready") wants the opposite: of all the pieces
waiting, the lowest (flight, piece) goes next.

Admission by key alone is not enough when slots are free: whoever asks first
takes them, and which file's first request asks first depends on which
partial file a thread happened to open first (measured: in one run of five
the second shard's span took both of two slots before the first shard asked,
and its first tensor came after 2.1 s of 4.1 s instead of 0.7 s). A request
known to be on its way is therefore announced with :meth:`OrderedSlots.expect`:
until it arrives, is withdrawn, or a short grace passes, no higher key takes a
free slot.

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


class Expectation:
    """A request of ``key`` announced to :class:`OrderedSlots` before it asks (see :meth:`OrderedSlots.expect`)."""

    def __init__(self, slots: OrderedSlots, key: Any, timer: asyncio.TimerHandle | None = None) -> None:
        self.slots, self.key, self.timer = slots, key, timer

    def withdraw(self) -> None:
        """It will not come (or no longer matters): higher keys may take free slots again. Idempotent."""
        self.slots._withdraw(self, dispatch=True)


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
        self._expected: set[Expectation] = set()  # requests on their way: higher keys wait for them

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

    def expect(self, key: Any, grace: float) -> Expectation:
        """A request of ``key`` is on its way: keep free slots from higher keys until it arrives.

        It arrives when :meth:`acquire` is called with ``fulfils=`` the returned
        expectation; :meth:`Expectation.withdraw` drops it; after ``grace``
        seconds it drops itself, so a request held up elsewhere (a file waiting
        for room to open) leaves the slots idle for no longer than that.
        """
        expectation = Expectation(self, key)
        expectation.timer = asyncio.get_running_loop().call_later(grace, expectation.withdraw)
        self._expected.add(expectation)
        return expectation

    def _withdraw(self, expectation: Expectation, *, dispatch: bool) -> None:
        if expectation in self._expected:
            self._expected.discard(expectation)
            if expectation.timer is not None:
                expectation.timer.cancel()
            if dispatch:
                self._dispatch()

    def _blocked(self, key: Any) -> bool:
        """A lower request is on its way (expected), so ``key`` may not take a free slot yet."""
        return any(expected.key < key for expected in self._expected)

    async def acquire(self, key: Any, name: Any = None, *, fulfils: Expectation | None = None) -> None:
        """Wait for a slot (lowest ``key`` first); the caller must :meth:`release` it.

        ``name`` lets :meth:`promote` move this waiter up while it waits.
        ``fulfils``: the expectation this request was announced with (it now
        competes by its own key).
        """
        if fulfils is not None:
            self._withdraw(fulfils, dispatch=False)  # not yet: this request goes first if it is the lowest
        if self.free > 0 and not self._waiters and not self._blocked(key):
            self.free -= 1
            if fulfils is not None:
                self._dispatch()  # higher keys it held back may take what is left
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = [key, next(self._seq), fut]
        heapq.heappush(self._waiters, entry)
        if name is not None:
            self._named[name] = entry
        self._dispatch()  # free slots held for an expected request may be this one's now
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
            self._dispatch()
        return True

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        self.free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free > 0 and self._waiters:
            key, _, fut = self._waiters[0]
            if not fut.done() and self._blocked(key):
                return  # the free slots wait for a lower request on its way
            heapq.heappop(self._waiters)
            if not fut.done():  # cancelled waiters stay in the heap until they surface here
                self.free -= 1
                fut.set_result(None)
