"""One task in flight per key: concurrent callers for the same key share one run of the work.

The agent does this in many places (a blob's fill, a partial file's opening, a
peer's manifest resolve, an artifact lookup from peers, a model's placement):
the first caller starts the work as a task; later callers for the same key
await the same task. The task is shielded, so a caller that is cancelled (its
client went away) does not cancel the work others wait for; the entry goes
when the task ends, so the next call after that starts afresh (a failure is
not remembered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Tasks by key; :meth:`run` starts one or joins the one running."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}

    def start(self, key: K, work: Callable[[], Coroutine[Any, Any, T]], name: str | None = None) -> asyncio.Task[T]:
        """The task for ``key``: the running one, or one started now from ``work()``."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(work(), name=name)
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        return task

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]], name: str | None = None) -> T:
        """Await the result of the task for ``key`` (started if none runs); cancelling the caller leaves it running."""
        return await asyncio.shield(self.start(key, work, name))

    def get(self, key: K) -> asyncio.Task[T] | None:
        return self._tasks.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def tasks(self) -> list[asyncio.Task[T]]:
        return list(self._tasks.values())

    def _forget(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here: a failure nobody awaited is not logged as "never retrieved"
