"""A peer that holds a model and refuses pieces with 503 (busy) a set number of times first.

Why: "a holder that refuses for a moment (busy, finishing the file) must not send
the file to the origin" is a claim about how an agent reacts to a real peer's
answers, and a real agent cannot be made busy on cue. This is a real HTTP server
speaking the peer protocol (docs/API.md "Peer API"): ``/peer/v1/ping``,
``/peer/v1/have`` (it says it holds every file it is asked about that it has
bytes for, by path, so it answers for every fill key) and ``/peer/v1/piece``
(the piece's bytes, then their xxh3-128 hex), with the bearer token checked.

Each piece is refused ``refusals`` times (503) before it is served; ``refusals``
of None refuses every request; after ``serve_limit`` pieces served it refuses
every request too. With ``lie`` it sends each piece with its bytes flipped and
states the hash of what it sent (a consistent liar: only the whole-file check
against the origin's digest catches it). Counters say what it answered.
"""

from __future__ import annotations

import threading
from collections import Counter

import xxhash
from aiohttp import web

from tests.servers.threaded import ThreadedServer


class FlakyPeer(ThreadedServer):
    """``files``: relative path -> bytes. Listens on ``host``:``port`` (give the port: peers are named by it)."""

    def __init__(self, files: dict[str, bytes], token: str, port: int, *, refusals: int | None = 2,
                 serve_limit: int | None = None, lie: bool = False, host: str = "127.0.0.1") -> None:
        self.files = files
        self.token = token
        self.refusals = refusals
        self.serve_limit = serve_limit
        self.lie = lie
        self._lock = threading.Lock()
        self._asked: Counter[tuple[str, int]] = Counter()
        self.refused = 0
        self.served = 0
        self.served_bytes = 0
        self.have_asked = 0
        self.pings_from: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        super().__init__(host, port, backlog=128, name="flaky-peer")

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/peer/v1/ping", self._ping)
        app.router.add_post("/peer/v1/have", self._have)
        app.router.add_get("/peer/v1/piece", self._piece)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"Bearer {self.token}"

    async def _ping(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        with self._lock:
            self.pings_from[request.query.get("from", "")] += 1
        return web.json_response({"ok": True, "node": self.addr})

    async def _have(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        body = await request.json()
        with self._lock:
            self.have_asked += 1
        return web.json_response({"complete": list(body.get("keys", [])), "pieces": {}})

    async def _piece(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.Response(status=401)
        q = request.query
        path, index, piece_size = q.get("path", ""), int(q.get("index", "-1")), int(q.get("piece_size", "0"))
        data = self.files.get(path)
        if data is None or piece_size <= 0 or not 0 <= index * piece_size < max(len(data), 1):
            return web.Response(status=404, text="no such piece here\n")
        with self._lock:
            self._asked[(path, index)] += 1
            refuse = self.refusals is None or self._asked[(path, index)] <= self.refusals
            refuse = refuse or (self.serve_limit is not None and self.served >= self.serve_limit)
            if refuse:
                self.refused += 1
            else:
                self.served += 1
        if refuse:
            return web.Response(status=503, text=f"piece {index} of {path!r}: busy, try again\n")
        piece = data[index * piece_size : (index + 1) * piece_size]
        if self.lie:
            piece = bytes(b ^ 0xFF for b in piece[:64]) + piece[64:]
        body = piece + xxhash.xxh3_128_hexdigest(piece).encode("ascii")
        with self._lock:
            self.served_bytes += len(piece)
        return web.Response(
            body=body, content_type="application/octet-stream", headers={"X-Warmstart-Piece-Length": str(len(piece))}
        )
