"""A TCP relay in front of an origin: counts origin egress, throttles, pauses.

Why: "the origin sent each byte about once" and "kill the agent in the middle
of a fetch" are claims about the network, so tests put this relay between the
agent and a real origin (SeaweedFS, the HF endpoint) and read
:attr:`TcpRelay.bytes_down` (bytes that went from the origin to clients), or
slow the origin to a known rate so a fetch is reliably still running when the
test acts. It works on bytes, below HTTP, so it measures what really crossed
the wire (headers included) and cannot be bypassed by a client's retries.

The relay runs its own asyncio loop in a daemon thread; its properties and
knobs may be used from any thread. The rate limit is one token bucket shared by
all connections (the origin's link, not each connection, is what is slow).
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import threading
import time

from tests.servers.threaded import ThreadedServer

READ_SIZE = 256 * 1024
# A request head as a client writes it (one write per head): its line and its Range, if any.
_REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.S)
_RANGE = re.compile(rb"^range: *(bytes=[0-9,-]+)", re.I | re.M)


class TokenBucket:
    """Bytes per second with a small burst; ``take`` may go into debt and then sleeps it off.

    Debt rather than waiting for a full chunk's worth of tokens keeps big reads
    and tiny rates compatible: over any interval t the relay sends at most
    ``burst + rate * t`` plus one read.
    """

    def __init__(self, rate: float | None) -> None:
        self.rate: float | None = None
        self.burst = 0.0
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (use pause() to stop the flow)")
        self.rate = rate
        # 20 ms worth of bytes, at most 256 KiB: a throttled transfer cannot start with a big free burst.
        self.burst = min(rate / 50, 256 * 1024) if rate else 0.0
        self.tokens = min(self.tokens, self.burst)
        self.stamp = time.monotonic()

    def read_size(self) -> int:
        """How much to read at once: small enough at low rates that the flow stays smooth."""
        if self.rate is None:
            return READ_SIZE
        return int(max(1024, min(READ_SIZE, self.rate / 50)))

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class TcpRelay(ThreadedServer):
    """Listen on 127.0.0.1 (a free port), relay each connection to ``upstream_host:upstream_port``.

    ``rate`` (bytes/s) throttles the upstream-to-client direction when set.
    ``per_connection_rate`` (bytes/s) caps each connection on its own as well, as
    object stores do (S3 gives one connection tens of MB/s): only requests in
    parallel get more. ``delay`` (seconds) is a round trip: a new connection waits it
    before it reaches the upstream (the handshake), and every client-to-upstream write
    waits it before it is passed on, so each request's first byte comes at least one
    round trip after it was sent (bench/object_store.py: a store tens of ms away).
    ``sock``: listen on this socket instead (bound and listening already), e.g.
    one made inside a network namespace (tests/servers/netns.py): clients there
    reach an upstream in this process's namespace.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, rate: float | None = None, listen_host: str = "127.0.0.1",
        sock: socket.socket | None = None, capture: bool = False, per_connection_rate: float | None = None,
        delay: float = 0.0,
    ) -> None:
        self.per_connection_rate = per_connection_rate
        self.delay = delay
        self.upstream = (upstream_host, upstream_port)
        #: with ``capture``: every byte relayed, both directions, in arrival order (for "what went
        #: over the wire" assertions, e.g. that no credential crosses to a peer).
        self.captured: bytearray | None = bytearray() if capture else None
        self._bucket = TokenBucket(rate)
        self._lock = threading.Lock()
        self._bytes_down = 0
        self._bytes_up = 0
        self._connections = 0
        self._requests: list[tuple[int, str]] = []  # (connection number, "GET /path bytes=a-b")
        self._down_by_connection: collections.Counter[int] = collections.Counter()
        self._active: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        super().__init__(listen_host, 0, backlog=256, name="relay", sock=sock)

    # ------------------------------------------------------------------ public

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the relay, for origins spoken to over HTTP."""
        return f"http://{self.host}:{self.port}"

    @property
    def bytes_down(self) -> int:
        """Bytes relayed from the upstream to clients since the last reset (origin egress)."""
        with self._lock:
            return self._bytes_down

    @property
    def bytes_up(self) -> int:
        """Bytes relayed from clients to the upstream since the last reset."""
        with self._lock:
            return self._bytes_up

    @property
    def connections(self) -> int:
        """Client connections accepted since the last reset."""
        with self._lock:
            return self._connections

    @property
    def active_connections(self) -> int:
        return len(self._active)

    def reset_counters(self) -> None:
        with self._lock:
            self._bytes_down = self._bytes_up = self._connections = 0
            self._requests.clear()
            self._down_by_connection.clear()

    def traffic(self) -> str:
        """What went through since the last reset, for an assertion message: requests made more
        than once, and per connection the bytes sent down and the requests it carried."""
        with self._lock:
            requests, down = list(self._requests), dict(self._down_by_connection)
        repeated = {r: n for r, n in collections.Counter(r for _, r in requests).items() if n > 1}
        per_conn: dict[int, list[str]] = collections.defaultdict(list)
        for conn, r in requests:
            per_conn[conn].append(r)
        lines = [f"{len(requests)} requests, repeated: {repeated or 'none'}"]
        for conn in sorted(set(per_conn) | set(down)):
            lines.append(f"  connection {conn}: {down.get(conn, 0)} bytes down; {'; '.join(per_conn.get(conn, []))}")
        return "\n".join(lines)

    def set_rate(self, rate: float | None) -> None:
        """Change the shared limit (bytes/s; None = unlimited); applies to open connections at once."""
        self._call(lambda: self._bucket.set_rate(rate))

    def pause(self) -> None:
        """Stop moving bytes in both directions (connections stay open; new ones are accepted and stall)."""
        self._call(lambda: self._flowing.clear() if self._flowing else None)

    def resume(self) -> None:
        self._call(lambda: self._flowing.set() if self._flowing else None)

    def drop_connections(self) -> int:
        """Abort every open connection (both sides see a reset); returns how many there were."""

        async def drop() -> int:
            writers = list(self._writers)
            for w in writers:
                w.transport.abort()
            return len(writers)

        return self._on_loop(drop())

    # ------------------------------------------------------------------ loop side

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        self._on_loop(run())

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = list(self._active)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self._writers.add(client_w)
        with self._lock:
            self._connections += 1
            number = self._connections
        upstream_w: asyncio.StreamWriter | None = None
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            try:
                upstream_r, upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
            except (TimeoutError, OSError):
                return  # the client sees the connection close, as if the origin refused it
            upstream_w = upstream
            self._writers.add(upstream)
            own = TokenBucket(self.per_connection_rate) if self.per_connection_rate else None
            up = asyncio.create_task(self._pump(client_r, upstream, client_w, down=False, number=number))
            down = asyncio.create_task(self._pump(upstream_r, client_w, upstream, down=True, number=number, own=own))
            try:
                await asyncio.gather(up, down)
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._active.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: asyncio.StreamWriter, *, down: bool,
        number: int = 0, own: TokenBucket | None = None,
    ) -> None:
        """Copy one direction until EOF, then half-close the other side (HTTP keeps working).

        ``peer`` is the writer of the side ``reader`` belongs to: when either side
        fails, both are aborted so the opposite pump ends too.
        """
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                size = min(self._bucket.read_size(), own.read_size() if own else READ_SIZE) if down else READ_SIZE
                data = await reader.read(size)
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                if down:
                    await self._bucket.take(len(data))
                    if own is not None:
                        await own.take(len(data))
                elif self.delay:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()
                if writer.is_closing():  # aborted (drop_connections) or gone: asyncio would drop writes silently
                    raise ConnectionResetError("relay side closed")
                # Count before writing: a reader that has the bytes must already see them counted.
                with self._lock:
                    if down:
                        self._bytes_down += len(data)
                        self._down_by_connection[number] += len(data)
                    else:
                        self._bytes_up += len(data)
                        for m in _REQUEST.finditer(data):
                            r = _RANGE.search(m.group(3))
                            line = f"{m.group(1).decode()} {m.group(2).decode('latin-1').split('?')[0]}"
                            self._requests.append((number, f"{line} {r.group(1).decode()}" if r else line))
                    if self.captured is not None:
                        self.captured += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.transport.abort()
            peer.transport.abort()
