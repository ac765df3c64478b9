"""Files of servers that ignore ``Range``, read as one sequential stream each.

Why: some Hub mirrors and proxies answer every range request with ``200`` and the
whole body (often chunked). Asking them for N ranges of a file would move the file
up to N times. Once the range client has seen that (``RangeIgnoredError``), every
range of a file from that server is cut from one GET of the whole body: ranges are
handed out in offset order as the stream passes them; a range behind the stream
(asked for late) starts the stream again from the beginning. No parallel ranges:
the server gives no other way.

Nothing about verification changes: the bytes go to the same sinks, which hash
each piece as it is written, and the fetcher checks the whole file against the
origin's digest before it is published (agent/fetch/fetcher.py).

Bodies come through the shared aiohttp session (which reads chunked bodies);
redirects are followed here, at most :data:`MAX_REDIRECTS`, never from https to
http, and to another origin only where the address policy allows it
(agent/origins/policy.py), as the range client does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp

from agent.errors import TransientOriginError
from agent.origins.policy import AddressPolicy, AddressRefusedError, downgrade
from client.errors import FetchFailedError

log = logging.getLogger(__name__)

# What agent/origins/base.py calls a Sink (consecutive chunks of a range, in order); spelled out here
# because base.py builds this reader (an import of base from here would be a circle).
Sink = Callable[[Sequence[bytes | memoryview]], Awaitable[None]]
CHUNK = 1024 * 1024  # bytes read (and handed to the sink) at once
IDLE_SECONDS = 30.0  # a stream nobody read from this long is closed
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class _Stream:
    """One whole-body GET of one file, and who waits for which offset of it."""

    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    waiting: list[int] = field(default_factory=list)  # offsets of the ranges waiting for the stream
    busy: bool = False
    resp: aiohttp.ClientResponse | None = None
    pos: int = 0  # offset of the next byte the response will give
    used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None


def origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class SequentialReader:
    """Whole-body streams per file (by key), for servers known to ignore Range (:meth:`mark`)."""

    def __init__(self, session: aiohttp.ClientSession, policy: AddressPolicy, read_timeout: float) -> None:
        self.session = session
        self.policy = policy
        self.read_timeout = read_timeout
        self._servers: set[tuple[str, str, int]] = set()
        self._streams: dict[str, _Stream] = {}

    def ignores_ranges(self, url: str) -> bool:
        return origin_of(url) in self._servers

    def mark(self, url: str) -> None:
        """The server of ``url`` ignores Range: its files are streamed from now on (logged once)."""
        server = origin_of(url)
        if server not in self._servers:
            self._servers.add(server)
            log.warning("%s://%s:%d ignores Range requests: reading each of its files as one stream "
                        "(no parallel ranges)", *server)

    async def read(
        self, key: str, url: str, headers: dict[str, str], offset: int, length: int, size: int, sink: Sink,
        *, what: str, check: Callable[[int, str], None],
    ) -> None:
        """Deliver bytes [offset, offset + length) of the file ``key`` (``size`` bytes at ``url``) to ``sink``.

        ``check(status, reason)`` maps an answer other than 200 to a typed error (it must raise).
        """
        self._sweep()
        st = self._streams.setdefault(key, _Stream())
        st.waiting.append(offset)
        try:
            async with st.cond:
                await st.cond.wait_for(lambda: not st.busy and min(st.waiting) == offset)
                st.busy = True
        finally:
            st.waiting.remove(offset)
        try:
            if st.resp is None or st.pos > offset:
                st.close()
                st.resp, st.pos = await self._open(url, headers, what, check), 0
            await self._skip(st, offset - st.pos, what)
            await self._pump(st, length, sink, what)
            if st.pos >= size:
                st.close()
        except BaseException:
            st.close()
            raise
        finally:
            st.used = time.monotonic()
            async with st.cond:
                st.busy = False
                st.cond.notify_all()
            if st.resp is None and not st.waiting and self._streams.get(key) is st:
                del self._streams[key]

    async def _open(
        self, url: str, headers: dict[str, str], what: str, check: Callable[[int, str], None]
    ) -> aiohttp.ClientResponse:
        headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        headers["Accept-Encoding"] = "identity"
        first = origin_of(url)
        for _ in range(MAX_REDIRECTS + 1):
            if origin_of(url) != first and not self.policy.allow_private:
                await self.policy.addresses(origin_of(url)[1], origin_of(url)[2], f"a redirect of {what!r}")
            try:
                resp = await self.session.get(
                    url, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout),
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise TransientOriginError(f"streaming {what!r}: {type(exc).__name__}: {exc}") from None
            if resp.status in REDIRECTS and "Location" in resp.headers:
                target = urljoin(url, resp.headers["Location"])
                resp.close()
                if downgrade(url, target):
                    raise AddressRefusedError(f"refusing a redirect of {what!r} from https to plain http")
                if origin_of(target) != origin_of(url):
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = target
                continue
            if resp.status != 200:
                reason = (await resp.content.read(2048)).decode("utf-8", "replace") if resp.status >= 400 else ""
                resp.close()
                check(resp.status, " ".join(reason.split()))
                raise FetchFailedError(f"origin answered {resp.status} to a whole-body GET of {what!r}")
            return resp
        raise FetchFailedError(f"{what}: more than {MAX_REDIRECTS} redirects from the origin")

    async def _read(self, st: _Stream, n: int, what: str) -> bytes:
        assert st.resp is not None
        try:
            async with asyncio.timeout(self.read_timeout):
                chunk = await st.resp.content.read(n)
        except TimeoutError:
            raise TransientOriginError(f"Timeout: no bytes of {what!r} for {self.read_timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransientOriginError(f"streaming {what!r}: {type(exc).__name__}: {exc}") from None
        if not chunk:
            raise TransientOriginError(f"the body of {what!r} ended at byte {st.pos}")
        st.pos += len(chunk)
        return chunk

    async def _skip(self, st: _Stream, count: int, what: str) -> None:
        while count > 0:
            count -= len(await self._read(st, min(CHUNK, count), what))

    async def _pump(self, st: _Stream, length: int, sink: Sink, what: str) -> None:
        while length > 0:
            chunk = await self._read(st, min(CHUNK, length), what)
            length -= len(chunk)
            await sink([chunk])

    def _sweep(self) -> None:
        """Close streams nobody read from for IDLE_SECONDS (a fill that was given up)."""
        now = time.monotonic()
        for key, st in list(self._streams.items()):
            if not st.busy and not st.waiting and now - st.used > IDLE_SECONDS:
                st.close()
                del self._streams[key]

    async def close(self) -> None:
        for st in self._streams.values():
            st.close()
        self._streams.clear()
