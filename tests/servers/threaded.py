"""An in-process server: a listening socket and an asyncio loop on a thread of its own.

The tests' HTTP endpoint and TCP relay both need one, driven from synchronous
test code: bind first (so the port is known and reserved), serve on the
thread, and on close run the server's own shutdown there, stop the loop and
join the thread, whatever state the loop is in.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")


class ThreadedServer(abc.ABC):
    """Subclasses set their own state, then call ``super().__init__``, which starts serving."""

    def __init__(
        self, host: str, port: int, *, backlog: int, name: str, start_timeout: float = 30.0,
        sock: socket.socket | None = None,
    ) -> None:
        if sock is None:  # else a listening socket made elsewhere (e.g. in another network namespace)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        self._sock = sock
        self.host, self.port = self._sock.getsockname()[:2]
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=start_timeout):
            raise RuntimeError(f"{name} did not start within {start_timeout:.0f} s")
        if self._start_error is not None:
            raise RuntimeError(f"{name} failed to start: {self._start_error!r}")

    @abc.abstractmethod
    async def _start(self) -> None:
        """Begin serving on ``self._sock`` (runs on the loop thread)."""

    @abc.abstractmethod
    async def _shutdown(self) -> None:
        """Stop serving and drop open connections (runs on the loop thread)."""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 (reported to the constructor, never left unhandled in the thread)
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def close(self) -> None:
        """Shut the server down, stop the loop and join the thread; idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._on_loop(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
