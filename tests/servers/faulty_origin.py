"""An HTTP proxy in front of a real origin (SeaweedFS) that injects faults into data requests.

Why: "the origin answers 503 SlowDown / resets / stalls / sends fewer bytes than
it promised, and the agent retries, bounded, with backoff" is a claim about what
goes over HTTP, so the agent talks to a real server process through this proxy
(``AWS_ENDPOINT_URL`` = :attr:`FaultyOrigin.url`). Listing, HEAD and other
requests pass through untouched; ranged GETs (the bytes of pieces) take the next
fault from a queue, or a fault set for every request (:attr:`always`):

- ``"500"``: 500 InternalError (S3 XML);
- ``"503"``: 503 SlowDown (S3 XML, as S3 throttles);
- ``"reset"``: the connection is aborted before any answer;
- ``"stall"``: headers and half the body, then nothing until the client gives up;
- ``"short"``: the promised ``Content-Length``, half the body, then the connection closes;
- ``"429"``: 429 Too Many Requests (:data:`THROTTLES`, not in :data:`FAULTS`: the tests that run
  every fault of FAULTS expect S3's own answers).

:attr:`FaultyOrigin.max_in_flight` is the most ranged GETs it was answering at once (the
agent's request window, as the origin sees it).

:attr:`FaultyOrigin.region` set: the bucket "lives" in that region, as S3 sees it: any
request whose SigV4 credential scope names another region gets 301 PermanentRedirect
with ``x-amz-bucket-region`` (:attr:`FaultyOrigin.claimed_region`, the same by default),
as S3 answers a client configured for the wrong region. :attr:`FaultyOrigin.requests`
lists every request's method and path (path-style or virtual-hosted addressing shows there).

Every ranged GET is logged (time, range, fault) so tests can count tries and
measure the gaps between them (backoff). SeaweedFS here is anonymous, so the
forwarded (re-hosted) SigV4 signature is not checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.servers.threaded import ThreadedServer

FAULTS = ("500", "503", "reset", "stall", "short")
THROTTLES = ("503", "429")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class RangedGet:
    time: float
    path: str
    range: str
    fault: str | None


class FaultyOrigin(ThreadedServer):
    def __init__(self, upstream: str, *, stall_seconds: float = 60.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.stall_seconds = stall_seconds
        self.always: str | None = None  # a fault for every ranged GET
        self._queue: list[str] = []
        self._lock = threading.Lock()
        self._log: list[RangedGet] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self.region: str | None = None
        self.claimed_region: str | None = None
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Event
        super().__init__("127.0.0.1", 0, backlog=128, name="faulty-origin")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def inject(self, *faults: str) -> None:
        """Queue faults for the next ranged GETs, in order."""
        for f in faults:
            if f not in FAULTS + THROTTLES:
                raise ValueError(f"unknown fault {f!r}; one of {FAULTS + THROTTLES}")
        with self._lock:
            self._queue.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._log.clear()
            self.always = None
            self.max_in_flight = 0

    @property
    def ranged_gets(self) -> list[RangedGet]:
        with self._lock:
            return list(self._log)

    async def _start(self) -> None:
        self._closing = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _shutdown(self) -> None:
        self._closing.set()  # stalled answers end now, so cleanup does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _next_fault(self, request: web.Request) -> str | None:
        if request.method != "GET" or "Range" not in request.headers:
            return None
        with self._lock:
            fault = self._queue.pop(0) if self._queue else self.always
            self._log.append(RangedGet(time.monotonic(), request.path, request.headers["Range"], fault))
        return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ranged = request.method == "GET" and "Range" in request.headers
        if ranged:
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._answer(request)
        finally:
            if ranged:
                with self._lock:
                    self._in_flight -= 1

    def _signed_region(self, request: web.Request) -> str:
        scope = request.query.get("X-Amz-Credential", "")
        if not scope:
            auth = request.headers.get("Authorization", "")
            scope = auth.split("Credential=", 1)[1].split(",", 1)[0] if "Credential=" in auth else ""
        parts = scope.split("/")
        return parts[2] if len(parts) > 2 else ""

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        with self._lock:
            self.requests.append(f"{request.method} {request.path}")
        if self.region is not None and self._signed_region(request) != self.region:
            claimed = self.claimed_region or self.region
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code>'
                "<Message>The bucket you are attempting to access must be addressed using the specified "
                f"endpoint.</Message><Region>{claimed}</Region></Error>"
            )
            return web.Response(status=301, text=body, content_type="application/xml",
                                headers={"x-amz-bucket-region": claimed})
        fault = self._next_fault(request)
        if fault == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if fault in ("500", "503"):
            code, status = ("InternalError", 500) if fault == "500" else ("SlowDown", 503)
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected {code}</Message></Error>"
            )
            return web.Response(status=status, text=body, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        sent = await request.read()
        async with self._session.request(
            request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, data=sent or None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
        out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
        if fault not in ("stall", "short"):
            return web.Response(status=up.status, body=data, headers=out_headers)
        resp = web.StreamResponse(status=up.status, headers=out_headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        if fault == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.stall_seconds)
        assert request.transport is not None
        request.transport.abort()
        return resp
