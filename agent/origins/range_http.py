"""HTTP/1.1 range GETs whose bodies land straight in reused buffers.

Why not aiohttp for these bodies: its parser copies every body byte into a new
``bytes`` object (``PyBytes_FromStringAndSize`` in ``cb_on_body``), and those
objects are fresh memory each time. perf put that copy and its page faults at
about a fifth of the agent's CPU during a cold miss (bench/RESULTS.md "Cold
miss: a body path without copies"). Here the socket is read with ``recv_into``
(asyncio's ``BufferedProtocol``) into a few 1 MiB buffers per connection, each
handed to the sink as it fills and reused once the sink has written and hashed
it, so a body byte is copied once, kernel to buffer, before the write.

Only what origin range requests need: GET with a ``Range``, keep-alive
connections per (scheme, host, port), TLS with the system's trust store,
redirects (at most :data:`MAX_REDIRECTS`, ``Authorization`` dropped when the
redirect leaves the origin, as the Hugging Face hub's CDN redirects need; never
from https to http, and to another origin only where the
:class:`~agent.origins.policy.AddressPolicy` allows its resolved addresses),
``Content-Length`` bodies, and the standard proxy environment (``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``, as boto3 and huggingface_hub read it): https
through a ``CONNECT`` tunnel, http in absolute form. No chunked bodies for 2xx
answers (a clear error). Resolving, listing and HEAD requests stay on aiohttp.

Two behaviours of Hub mirrors and CDNs are handled here: a ``200`` answer that is
not exactly the range (a server that ignores ``Range``, chunked or not) raises
``RangeIgnoredError`` for the origin to read the file as one stream
(agent/origins/sequential.py); and the URL a redirect led to (a CDN's signed URL)
is remembered per requested URL and asked directly for the next ranges until it
expires or is refused, then signed anew (:meth:`RangeClient.get_range`).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import collections
import contextlib
import logging
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qsl, unquote, urljoin, urlsplit

from agent.errors import RangeIgnoredError, TransientOriginError
from agent.origins.base import FLUSH_SECONDS, Sink
from agent.origins.policy import AddressPolicy, AddressRefusedError, downgrade
from client.errors import FetchFailedError

log = logging.getLogger(__name__)

# Body buffers: large enough that the sink (a thread hop per call) runs about
# once per MiB; the fill splits them into its own smaller writes.
BUFFER_SIZE = 1024 * 1024
BUFFERS_PER_CONNECTION = 6  # read ahead of the sink by at most this many buffers, then pause reading
SPARE_BUFFERS = 64  # buffers kept between answers for the next ones, shared by all connections
MAX_HEAD = 64 * 1024  # status line and headers
MAX_REASON = 2048  # bytes of an error body kept for the message
MAX_REDIRECTS = 5
IDLE_SECONDS = 10.0  # a kept-alive connection unused this long is closed, not reused
CONNECT_TIMEOUT = 10.0
REDIRECTS = (301, 302, 303, 307, 308)
SIGNED_REFUSALS = (401, 403, 410)  # a remembered redirect target answering these has expired: sign anew
SIGNED_MARGIN = 30.0  # seconds before a signed URL's expiry that it is no longer used
MAX_SIGNED = 4096  # redirect targets remembered (one per file of the models being fetched)


class BufferPool:
    """Body buffers kept for reuse, shared by every connection of a client (at most SPARE_BUFFERS).

    Reusing them is the point: a new 1 MiB buffer is fresh memory, and writing into
    it page-faults 256 times. Connections hold buffers only while reading an answer,
    so idle connections hold none.
    """

    def __init__(self) -> None:
        self._spare: list[bytearray] = []

    def take(self) -> bytearray:
        return self._spare.pop() if self._spare else bytearray(BUFFER_SIZE)

    def reserve(self, count: int) -> None:
        """Have ``count`` buffers (at most SPARE_BUFFERS) ready before the first answer needs them.

        The agent calls this at start-up: allocating and faulting in a few dozen MiB
        costs about 40 ms of CPU here, which otherwise lands on the event loop in the
        middle of the first cold miss, the one a scaling event waits for.
        """
        while len(self._spare) < min(count, SPARE_BUFFERS):
            self._spare.append(bytearray(BUFFER_SIZE))

    def give(self, buf: bytearray) -> None:
        if len(self._spare) < SPARE_BUFFERS:
            self._spare.append(buf)


@dataclass
class Head:
    """Status and headers of an answer (header names lower-case); ``url``: the URL that answered."""

    status: int
    headers: dict[str, str]
    reason: str = ""
    url: str = ""

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection, one request at a time, reading into the current answer's buffers.

    States: ``head`` (bytes go to a scratch buffer until the blank line),
    ``hold`` (the head is parsed; reading pauses until the caller decides what
    to do with the body), ``body`` (bytes go into body buffers, at most
    ``remaining``), ``idle`` (between requests: any byte is a protocol error).
    """

    def __init__(self, buffers: BufferPool) -> None:
        self.buffers = buffers
        self.transport: asyncio.Transport | None = None
        self.state = "idle"
        self.error: BaseException | None = None
        self.eof = False
        self.origin: tuple[str, str, int] = ("", "", 0)  # (scheme, host, port) it was opened for
        self.public = False  # it reaches an address the policy allows (a redirect may reuse it)
        self.idle_since = time.monotonic()
        self._scratch = bytearray(MAX_HEAD)  # the head's bytes land here, not in a body buffer
        self._head = bytearray()
        self._early = b""  # body bytes that arrived with the head
        self._remaining = 0
        self.held = 0  # body buffers taken from the pool and not given back (at most BUFFERS_PER_CONNECTION)
        self._buf: bytearray | None = None
        self._fill = 0
        self._since = 0.0
        self._ready: collections.deque[tuple[bytearray, int]] = collections.deque()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.head: Head | None = None

    # -- asyncio.BufferedProtocol -------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == "body" and self._buf is not None:
            end = min(len(self._buf), self._fill + self._remaining)
            return memoryview(self._buf)[self._fill : end]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == "body" and self._buf is not None:
            self._body_bytes(nbytes)
        elif self.state == "head":
            self._head += self._scratch[:nbytes]
            self._parse_head()
        else:
            self._fail(FetchFailedError("origin sent bytes nobody asked for"))

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    # -- reading the head ----------------------------------------------------
    def _parse_head(self) -> None:
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(FetchFailedError(f"origin's answer head is over {MAX_HEAD} bytes"))
            return
        raw, self._early = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._fail(TransientOriginError(f"origin answered with a malformed status line {lines[0][:80]!r}"))
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if parts[0] == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
            headers["connection"] = "close"
        self.head = Head(int(parts[1]), headers)
        self.state = "hold"
        self._pause()
        self._wake()

    # -- reading the body ----------------------------------------------------
    def start_body(self, length: int) -> None:
        """Read the next ``length`` bytes into body buffers (after :attr:`head` was checked)."""
        self.state = "body"
        self._remaining = length
        self._ready.clear()
        if not self._new_buffer():  # every buffer is free between answers: only a bug gets here
            raise AssertionError("no free body buffer at the start of an answer")
        early, self._early = self._early, b""
        if early:
            if len(early) > length:
                self._fail(TransientOriginError("origin sent more bytes than the range holds"))
                return
            assert self._buf is not None
            self._buf[: len(early)] = early
            self._body_bytes(len(early))
        self._resume()

    def _new_buffer(self) -> bool:
        """Take a body buffer from the pool; False when this connection's share is all with the sink."""
        if self.held >= BUFFERS_PER_CONNECTION:
            return False
        self._buf = self.buffers.take()
        self.held += 1
        self._fill = 0
        return True

    def _body_bytes(self, nbytes: int) -> None:
        assert self._buf is not None
        if not self._fill:
            self._since = time.monotonic()
        self._fill += nbytes
        self._remaining -= nbytes
        if (
            self._fill == len(self._buf)
            or not self._remaining
            or time.monotonic() - self._since >= FLUSH_SECONDS
        ):
            self._ready.append((self._buf, self._fill))
            self._buf = None
            if not self._remaining:
                self.state = "idle"
            elif not self._new_buffer():
                self._pause()  # the sink is behind: let TCP push back on the origin
            self._wake()

    def release(self, buf: bytearray) -> None:
        """The sink is done with ``buf``: read into it again, or give it back to the pool."""
        if self.state == "body" and self._buf is None and self.error is None:
            self._buf, self._fill = buf, 0
            self._resume()
        else:
            self.held -= 1
            self.buffers.give(buf)

    async def chunks(self, read_timeout: float) -> AsyncIterator[list[tuple[bytearray, int]]]:
        """Yield what arrived since the last time (full or flushed buffers), until the body is complete."""
        while True:
            if self._ready:
                batch = list(self._ready)
                self._ready.clear()
                yield batch
                if self.state != "body" and not self._ready:
                    return
                continue
            if self.state != "body":
                return
            self._check_broken(f"body ended {self._remaining} bytes short of its content length")
            await self._wait(read_timeout)

    # -- waiting -------------------------------------------------------------
    async def wait_head(self, read_timeout: float) -> Head:
        while self.state == "head":
            self._check_broken("connection closed before an answer")
            await self._wait(read_timeout)
        assert self.head is not None
        return self.head

    async def _wait(self, read_timeout: float) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(read_timeout):
                await self._waiter
        except TimeoutError:
            raise TransientOriginError(f"Timeout: no bytes from the origin for {read_timeout:g}s") from None
        finally:
            self._waiter = None

    def _check_broken(self, what: str) -> None:
        if self.error is not None:
            if isinstance(self.error, (FetchFailedError, TransientOriginError)):
                raise self.error
            raise TransientOriginError(f"{what}: {type(self.error).__name__}: {self.error}")
        if self.eof:
            raise TransientOriginError(what)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.close()
        self._wake()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def tls_started(self, transport: asyncio.BaseTransport) -> None:
        """Go on over ``transport`` (TLS inside a proxy's tunnel); start_tls resumed reading."""
        self.transport = cast(asyncio.Transport, transport)
        self.state, self._paused, self._early = "idle", False, b""

    # -- requests ------------------------------------------------------------
    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.state, self.head, self.error, self._early = "head", None, None, b""
        self.transport.write(request)

    @property
    def reusable(self) -> bool:
        return (
            self.state == "idle"
            and self.error is None
            and not self.eof
            and self.transport is not None
            and not self.transport.is_closing()
            and time.monotonic() - self.idle_since < IDLE_SECONDS
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy from ``HTTPS_PROXY``/``HTTP_PROXY``; ``auth`` is the Proxy-Authorization value."""

    host: str
    port: int
    auth: str | None

    @classmethod
    def parse(cls, url: str) -> Proxy | None:
        if not url:
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise FetchFailedError(f"unsupported proxy {url!r}: only http:// proxies")
        auth = None
        if parts.username is not None:
            raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(raw).decode()
        return cls(parts.hostname, parts.port or 80, auth)


class RangeClient:
    """Range GETs over kept-alive HTTP/1.1 connections; one per agent, shared by the HTTP origins."""

    def __init__(
        self, read_timeout: float, connect_timeout: float = CONNECT_TIMEOUT, *, policy: AddressPolicy | None = None
    ) -> None:
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.policy = policy if policy is not None else AddressPolicy()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}  # kept-alive, per origin
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self.buffers = BufferPool()
        self._proxies: dict[tuple[str, str, int], Proxy | None] = {}  # the proxy decision, per origin
        self._signed: dict[str, tuple[str, float | None]] = {}  # URL -> (where it redirected, that URL's expiry)

    async def get_range(
        self, url: str, headers: dict[str, str], offset: int, length: int, sink: Sink, *, what: str
    ) -> Head:
        """GET ``length`` bytes of ``url`` from ``offset`` into ``sink``; return the answer's head.

        A 2xx answer must be exactly the range (206 with the matching
        Content-Range, or a 200 of exactly ``length`` bytes from offset 0; a
        200 of anything else raises RangeIgnoredError); any other status is
        returned with its reason and no body read, for the caller to map
        (agent/origins/base.py check_status). ``what`` names the file in errors.

        ``url`` itself is trusted (the operator's endpoint, or a reference
        already judged); a redirect to another origin is judged by the policy
        on the addresses it resolves to, and one from https to http refused.

        Where ``url`` redirected (a hub's CDN with a signed URL), the next
        ranges go straight to where it led (:meth:`signed_target`), saving a
        round trip each, until that URL expires (its expiry parameter) or is
        refused (401/403/410): then ``url`` is asked again, which signs anew.
        """
        target = self.signed_target(url)
        if target is not None:
            head = await self._get_range(target, headers, offset, length, sink, what=what, first=url)
            if head.status not in SIGNED_REFUSALS:
                return head
            self._signed.pop(url, None)
            log.info("the redirect target of %r was refused (%d): asking the origin again", what, head.status)
        return await self._get_range(url, headers, offset, length, sink, what=what)

    def signed_target(self, url: str) -> str | None:
        """The URL ``url`` last redirected to, while its expiry parameter (if any) is more than
        SIGNED_MARGIN seconds away; None otherwise."""
        known = self._signed.get(url)
        if known is None:
            return None
        target, expires = known
        if expires is not None and time.time() > expires - SIGNED_MARGIN:
            del self._signed[url]
            return None
        return target

    async def _get_range(
        self, url: str, headers: dict[str, str], offset: int, length: int, sink: Sink, *, what: str,
        first: str | None = None,
    ) -> Head:
        """One range GET of ``url``, following redirects. ``first``: the trusted URL this one stands for
        (a remembered redirect target): judged and without Authorization when it is another origin."""
        start = url
        headers = {**headers, "Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        origin = _origin_of(first or url)
        judge = _origin_of(url) != origin and not self.policy.allow_private
        if _origin_of(url) != origin:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        first_origin = origin
        for _ in range(MAX_REDIRECTS + 1):
            conn, head = await self._request(url, headers, judge, what)
            if head.status in REDIRECTS and "location" in head.headers:
                conn.close()  # a redirect's body is never needed; a new connection is cheaper than reading it
                target = urljoin(url, head.headers["location"])
                if downgrade(url, target):
                    raise AddressRefusedError(f"refusing a redirect of {what!r} from https to plain http")
                if _origin_of(target) != _origin_of(url):
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = target
                judge = _origin_of(url) != first_origin and not self.policy.allow_private
                continue
            head.url = url
            if head.status not in (200, 206):
                head.reason = await self._reason(conn, head)
                return head
            try:
                self._check_range(head, offset, length, what)
                await self._pump(conn, length, sink)
            except BaseException:
                conn.close()
                raise
            self._put_back(conn, head)
            if url != start and first is None:
                self._remember_redirect(start, url)
            return head
        raise FetchFailedError(f"{what}: more than {MAX_REDIRECTS} redirects from the origin")

    def _remember_redirect(self, url: str, target: str) -> None:
        """Ask ``target`` directly for ``url``'s next ranges (at most MAX_SIGNED URLs remembered)."""
        if len(self._signed) >= MAX_SIGNED:
            self._signed.pop(next(iter(self._signed)))
        self._signed[url] = (target, signed_expiry(target))

    @staticmethod
    def _check_range(head: Head, offset: int, length: int, what: str) -> None:
        if head.status == 200 and not (
            offset == 0 and head.content_length == length and "transfer-encoding" not in head.headers
        ):
            raise RangeIgnoredError(f"origin ignored the Range header for {what!r}", head.url)
        if "transfer-encoding" in head.headers or head.content_length is None:
            raise FetchFailedError(f"origin sent {what!r} without a Content-Length; a range must have one")
        if head.status == 206:
            if not head.headers.get("content-range", "").startswith(f"bytes {offset}-{offset + length - 1}/"):
                raise TransientOriginError(f"unexpected Content-Range {head.headers.get('content-range')!r}")
            if head.content_length != length:
                raise TransientOriginError(
                    f"{what!r}: a {length}-byte range came with Content-Length {head.content_length}"
                )

    async def _pump(self, conn: _Connection, length: int, sink: Sink) -> None:
        conn.start_body(length)
        async for batch in conn.chunks(self.read_timeout):
            try:
                await sink([memoryview(buf)[:n] for buf, n in batch])
            finally:
                for buf, _ in batch:
                    conn.release(buf)

    # -- connections ---------------------------------------------------------
    async def _request(
        self, url: str, headers: dict[str, str], judge: bool = False, what: str = ""
    ) -> tuple[_Connection, Head]:
        """Send a GET for ``url`` and wait for the answer's head.

        With ``judge``, the host's addresses must pass the policy first, and the
        request goes only over a connection to an allowed address.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchFailedError(f"cannot fetch {url!r}: only http:// and https:// URLs")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        key = _origin_of(url)
        proxy = self._proxy(key)
        if proxy is not None and key[0] == "http":
            target = f"http://{host}{target}"  # absolute form: the proxy forwards it
        given = {name.lower() for name in headers}
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
        if proxy is not None and key[0] == "http" and proxy.auth:
            lines.append(f"Proxy-Authorization: {proxy.auth}")
        if "user-agent" not in given:
            lines.append("User-Agent: warmstart")
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0") or ":" in name or name.lower() == "host":
                raise FetchFailedError(f"refusing to send header {name!r}: a Host, a line break or a colon")
            lines.append(f"{name}: {value}")
        request = _encode_head(lines)
        addresses = None
        if judge:
            addresses = await self.policy.addresses(key[1], key[2], f"a redirect of {what!r}")
        # A kept-alive connection the server closed meanwhile fails before any answer:
        # send once more on a new connection (only then; any answer is the answer).
        for reused in (True, False):
            conn = self._take_idle(key, judge) if reused else await self._connect(key, addresses)
            if conn is None:
                continue
            conn.send(request)
            try:
                head = await conn.wait_head(self.read_timeout)
            except TransientOriginError:
                conn.close()
                if reused and (conn.eof or conn.error is not None):
                    continue  # closed before answering: the server had dropped the idle connection
                raise
            except BaseException:
                conn.close()
                raise
            return conn, head
        raise AssertionError("unreachable")

    def _take_idle(self, key: tuple[str, str, int], judge: bool = False) -> _Connection | None:
        """A kept-alive connection to ``key``; with ``judge``, only one known to reach an allowed address."""
        idle = self._idle.get(key, [])
        for conn in reversed(idle):
            if not conn.reusable:
                idle.remove(conn)
                conn.close()
            elif not judge or conn.public:
                idle.remove(conn)
                return conn
        return None

    async def _connect(self, key: tuple[str, str, int], addresses: list[str] | None = None) -> _Connection:
        """A new connection to ``key``: to one of ``addresses`` (already judged) when given, else to the name.

        Why a failure says so little: its message may go back to a peer, and
        errno or timing detail would tell an open port from a closed one. The
        detail goes to the agent's log.
        """
        if self._closed:
            raise FetchFailedError("the agent is shutting down")
        scheme, host, port = key
        tls = self._tls() if scheme == "https" else None
        proxy = self._proxy(key)
        via = f" through the proxy {proxy.host}" if proxy else ""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    conn = await self._open(host, port, tls, addresses)
                    peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
                    conn.public = peer is not None and self.policy.allows(str(peer[0]))
                    if addresses is not None and not conn.public:  # only a bug (or a local route) gets here
                        conn.close()
                        raise AddressRefusedError(f"refusing a connection to {host}: not a public address")
                else:
                    _, conn = await loop.create_connection(lambda: _Connection(self.buffers), proxy.host, proxy.port)
                    if tls is not None:
                        await self._tunnel(conn, proxy, host, port, tls)
                    conn.public = addresses is not None  # judged on this node's own lookup: the proxy connects
        except ssl.SSLCertVerificationError as exc:
            raise FetchFailedError(f"TLS certificate of {host} is not trusted: {exc.verify_message}") from None
        except (TimeoutError, OSError) as exc:
            detail = f"no connection after {self.connect_timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
            log.info("cannot connect to %s:%d%s: %s", host, port, via, detail)
            raise TransientOriginError(
                f"cannot connect to {scheme}://{host}{via} (details in the agent's log)"
            ) from None
        conn.origin = key
        return conn

    async def _open(self, host: str, port: int, tls: ssl.SSLContext | None, addresses: list[str] | None) -> _Connection:
        """Connect straight to ``host``, or to the first of ``addresses`` that answers (TLS still checks ``host``)."""
        loop = asyncio.get_running_loop()
        server_hostname = host if tls else None
        if addresses is None:
            _, conn = await loop.create_connection(
                lambda: _Connection(self.buffers), host, port, ssl=tls, server_hostname=server_hostname
            )
            return conn
        last: OSError | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.buffers), address, port, ssl=tls, server_hostname=server_hostname
                )
                return conn
            except ssl.SSLCertVerificationError:
                raise
            except OSError as exc:
                last = exc
        assert last is not None  # addresses is never empty
        raise last

    async def _tunnel(self, conn: _Connection, proxy: Proxy, host: str, port: int, tls: ssl.SSLContext) -> None:
        """CONNECT through ``proxy`` to host:port, then TLS with the origin inside the tunnel."""
        lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
        if proxy.auth:
            lines.append(f"Proxy-Authorization: {proxy.auth}")
        conn.send(_encode_head(lines))
        try:
            head = await conn.wait_head(self.connect_timeout)
        except BaseException:
            conn.close()
            raise
        if head.status != 200:
            conn.close()
            what = f"the proxy {proxy.host} refused a tunnel to {host} ({head.status})"
            if head.status in (407, 403):
                raise FetchFailedError(f"{what}: check the proxy's credentials in HTTPS_PROXY")
            raise TransientOriginError(what)
        assert conn.transport is not None
        inner = await asyncio.get_running_loop().start_tls(conn.transport, conn, tls, server_hostname=host)
        if inner is None:  # typeshed allows it; CPython's start_tls returns the TLS transport or raises
            conn.close()
            raise TransientOriginError(f"TLS to {host} through the proxy {proxy.host} did not start")
        conn.tls_started(inner)

    def _proxy(self, key: tuple[str, str, int]) -> Proxy | None:
        """The proxy for an origin, or None (none set, or NO_PROXY names it): read from the
        environment once per origin, not on every request (proxy_bypass scans os.environ)."""
        if key not in self._proxies:
            scheme, host, port = key
            bypass = urllib.request.proxy_bypass(f"{host}:{port}") or urllib.request.proxy_bypass(host)
            self._proxies[key] = None if bypass else Proxy.parse(urllib.request.getproxies().get(scheme, ""))
        return self._proxies[key]

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # system trust store; SSL_CERT_FILE/SSL_CERT_DIR honoured
        return self._ssl

    def _put_back(self, conn: _Connection, head: Head) -> None:
        conn.idle_since = time.monotonic()
        self._sweep()
        if "close" in head.headers.get("connection", "").lower() or not conn.reusable or self._closed:
            conn.close()
            return
        self._idle.setdefault(conn.origin, []).append(conn)

    def _sweep(self) -> None:
        """Close kept-alive connections idle too long, to every origin (a file's CDN host is used once)."""
        for key, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.reusable:
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def _reason(self, conn: _Connection, head: Head) -> str:
        """Up to MAX_REASON bytes of an error body, as one line; the connection is not reused."""
        try:
            size = head.content_length
            if size is None or "transfer-encoding" in head.headers:
                return ""
            size = min(size, MAX_REASON)
            if not size:
                return ""
            conn.start_body(size)
            body = bytearray()
            with contextlib.suppress(TransientOriginError, FetchFailedError):
                async with asyncio.timeout(min(self.read_timeout, 5.0)):
                    async for batch in conn.chunks(self.read_timeout):
                        for buf, n in batch:
                            body += buf[:n]
            return " ".join(body.decode("utf-8", "replace").split())
        except TimeoutError:
            return ""
        finally:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def signed_expiry(url: str) -> float | None:
    """When a signed URL stops working (Unix time), from its query: ``X-Amz-Date`` + ``X-Amz-Expires``
    (S3 presigned, the hub's CDN), or ``Expires`` / ``expires`` / ``exp`` (CloudFront and others: Unix
    time). None when it says nothing (it is used until refused); garbage counts as nothing."""
    query = {k.lower(): v for k, v in parse_qsl(urlsplit(url).query)}
    try:
        if "x-amz-date" in query and "x-amz-expires" in query:
            signed = calendar.timegm(time.strptime(query["x-amz-date"], "%Y%m%dT%H%M%SZ"))
            return float(signed + int(query["x-amz-expires"]))
        for name in ("expires", "exp"):
            if name in query and query[name].isdigit():
                return float(query[name])
    except (ValueError, OverflowError):
        return None
    return None


def _encode_head(lines: list[str]) -> bytes:
    """A request line and headers, as sent."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "strict")


def _origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port
