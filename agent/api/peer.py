"""The peer API on the TCP port (``/peer/v1/...``): pieces by (model, file, index), prefetch, ping.

Every route needs ``Authorization: Bearer <token>`` (the shared token of
``--peer-token-file``, compared in constant time); without a token file the
routes do not exist (404). What a requester names is never trusted: the owner
resolves the reference through its own ModelService (only s3/hf/https
references, never a node's local files), looks the file up in its own
manifest and answers 409 when the fill key, size or piece size differ from
its own. It can only ever send bytes of a blob or partial file of its cache.

A piece's answer is ``Content-Length: length + 32``: the piece's bytes, then
the owner's xxh3-128 of the piece in hex, as recorded when the owner verified
it. The hash goes last so a piece still arriving from the origin can be passed
on as it lands (cut-through) with one request and no chunked framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.api.common import ensure_job, flag, read_body, ref_field
from agent.artifacts.lookup import Artifacts
from agent.errors import BusyError
from agent.fetch.fetcher import PEER_SCHEMES, ServedPiece
from agent.manifest import Manifest
from agent.metrics import Metrics, Transfers
from agent.peers.tls import PeerTLS
from agent.refs import ModelRef, check_relative_path, parse_ref
from agent.selection import Selection
from agent.service import ModelService
from agent.singleflight import SingleFlight
from client.errors import BadReferenceError, BadRequestError, CapacityError, WarmstartError

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024  # bytes per loop.sendfile call: the counters move between calls
MOVE_TRIES = 3  # looks at a piece whose partial file was published while being served
MOVE_WAIT = 0.5
STALL_SECONDS = 30.0
MAX_SENDER = 300  # characters of a from= name worth looking up
MAX_HAVE_KEYS = 10000  # files one /peer/v1/have may ask about
MAX_KEY_LEN = 200  # characters of a fill key


def _nobody(addr: str) -> None:
    """No membership on this node (peer API on, no --peers/--peer-dns): nobody to mark alive."""


class PeerState:
    """What the peer routes need: the token from the start, the node's parts once its store is open."""

    def __init__(self, token: str | None, metrics: Metrics, tls: PeerTLS | None = None) -> None:
        self.token = token.encode() if token else None
        self.metrics = metrics
        self.tls = tls  # with --peer-tls-dir: the client's certificate is checked before the token
        self.service: ModelService | None = None
        self.artifacts: Artifacts | None = None
        self.me: str | None = None  # this node's name among its peers
        self.heard: Callable[[str], None] = _nobody  # a member spoke to this node (Membership.heard_from)
        self._resolving: SingleFlight[str, Manifest] = SingleFlight()

    def open(
        self, service: ModelService, artifacts: Artifacts, me: str | None, heard: Callable[[str], None] | None = None
    ) -> None:
        """The store is open: serve pieces, prefetches and artifacts from now on (503 before)."""
        self.service, self.artifacts, self.me = service, artifacts, me
        if heard is not None:
            self.heard = heard

    def heard_from(self, request: web.Request) -> None:
        """The request names its sender (``from=``): a member that asks is alive (bounded, untrusted text)."""
        sender = request.query.get("from", "")
        if sender and len(sender) <= MAX_SENDER:
            self.heard(sender)

    async def manifest(self, ref_base: str, revision: str) -> Manifest:
        """The manifest of ``ref_base@revision`` as this node resolves it (one resolve at a time per name)."""
        service = self.service
        assert service is not None  # peer_auth answers 503 until open()

        async def resolve() -> Manifest:
            return (await service.resolve(name))[1]

        name = f"{ref_base}@{revision}"
        return await self._resolving.run(name, resolve)


PEER: web.AppKey[PeerState] = web.AppKey("peer", PeerState)


@web.middleware
async def peer_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Peer routes: 404 with peers off, 401 without the right bearer token; other routes untouched."""
    if not request.path.startswith("/peer/"):
        return await handler(request)
    state = request.app[PEER]
    if state.token is None:
        raise web.HTTPNotFound(text="peer API is off on this node (no --peer-token-file)\n")
    problem = state.tls.client_problem(request.transport) if state.tls is not None else None
    if problem is not None:
        log.warning("peer request from %s refused: %s", request.remote, problem)
        raise web.HTTPForbidden(text=f"peer API needs a verified peer certificate: {problem}\n")
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.token):
        log.warning("peer request from %s refused: %s token", request.remote, "wrong" if token else "no")
        raise web.HTTPUnauthorized(text="peer token missing or wrong\n", headers={"WWW-Authenticate": "Bearer"})
    if state.service is None:
        raise web.HTTPServiceUnavailable(text="store not open yet\n")
    return await handler(request)


def _peer_ref(text: object, allow_revision: bool = False) -> ModelRef:
    ref = parse_ref(text)
    if ref.scheme not in PEER_SCHEMES:
        raise BadReferenceError(f"peers may only name {', '.join(PEER_SCHEMES)} references, not {ref.scheme}")
    if ref.revision and not allow_revision:
        raise BadReferenceError("give the revision as rev=, not in the reference")
    return ref


def _int(query: Any, name: str) -> int:
    try:
        return int(query[name])
    except (KeyError, ValueError):
        raise BadRequestError(f"query parameter {name!r} must be an integer") from None


async def ping(request: web.Request) -> web.Response:
    state = request.app[PEER]
    state.heard_from(request)
    return web.json_response({"ok": True, "node": state.me})


async def piece(request: web.Request) -> web.StreamResponse:
    state = request.app[PEER]
    service = state.service
    assert service is not None
    q = request.query
    ref = _peer_ref(q.get("ref"))
    await service.origins.check_peer_ref(ref)
    revision, path, key = q.get("rev", ""), q.get("path", ""), q.get("key", "")
    if not revision or not key:
        raise BadRequestError("rev and key are required")
    check_relative_path(path, "path")
    index, piece_size = _int(q, "index"), _int(q, "piece_size")
    relay, requester = q.get("relay") == "1", q.get("from", "")
    state.heard_from(request)
    manifest = await state.manifest(ref.base, revision)
    entry = next((f for f in manifest.files if f.path == path), None)
    if entry is None:
        raise web.HTTPNotFound(text=f"{path!r} is not a file of {ref.base}@{revision}\n")
    if entry.fill_key != key or entry.piece_size != piece_size or not 0 <= index < entry.piece_count:
        raise web.HTTPConflict(text="fill key, piece size or index differ from this node's manifest\n")
    if not await service.peer_checkable(ref, entry):
        raise web.HTTPConflict(text=f"{path!r} has no whole-file digest a peer could check; fetch it from the origin\n")
    for attempt in range(MOVE_TRIES):
        try:
            served = await service.serve_piece(ref, entry, index, relay=relay, requester=requester)
        except BusyError as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        except CapacityError as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        try:
            fd = await asyncio.to_thread(os.open, served.path, os.O_RDONLY)
        except FileNotFoundError:
            if attempt == MOVE_TRIES - 1:
                raise
            # The partial file is becoming its blob: renamed in the store's pool, counted as a
            # blob when that call returns. Look again once the fill is done (or shortly).
            await service.wait_change(MOVE_WAIT)
            continue
        try:
            return await _send(request, served, fd, relay)
        finally:
            await asyncio.to_thread(os.close, fd)
    raise WarmstartError("piece moved twice while being served")


async def _send(request: web.Request, served: ServedPiece, fd: int, relay: bool) -> web.StreamResponse:
    transfers = request.app[PEER].metrics.transfers
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Warmstart-Piece-Length": str(served.length)}
    )
    resp.content_length = served.length + 32
    writer = await resp.prepare(request)
    try:
        digest = _complete_digest(served)
        if digest is not None and _plain(request.transport):
            assert writer is not None  # prepared just now
            writer.send_headers()  # on the socket before the kernel sends the body past aiohttp's writer
            await _sendfile(request, served, fd, transfers, relay)
            await resp.write(digest.encode("ascii"))
            await resp.write_eof()
        else:
            await _copy(resp, served, fd, transfers, relay)
    except _Abort as exc:
        log.info("piece for %s cut short: %s", request.remote, exc)
        if request.transport is not None:
            request.transport.abort()  # the requester sees a short body and moves on
    except ConnectionError:
        # The requester went away (hedged to another owner). The body is short: the connection
        # cannot carry another response, so it is closed if it is not already.
        if request.transport is not None:
            request.transport.abort()
    return resp


class _Abort(Exception):
    """The piece cannot be completed; the response is cut off."""


def _complete_digest(served: ServedPiece) -> str | None:
    """The piece's digest when all its bytes are on disk (a verified piece, or a fetch here that has ended)."""
    if served.stream is None:
        return served.digest
    return served.stream.digest  # None while the piece is still arriving: relayed as it lands (_copy)


def _plain(transport: asyncio.Transport | None) -> bool:
    """Whether the requester's connection is plain TCP: the kernel can send file pages to it (not into TLS)."""
    return transport is not None and not transport.is_closing() and transport.get_extra_info("sslcontext") is None


async def _sendfile(request: web.Request, served: ServedPiece, fd: int, transfers: Transfers, relay: bool) -> None:
    """The piece's bytes from the page cache to the socket with sendfile(2): no copy through Python.

    Why: reading each MiB into a bytes object on a thread and writing it through
    aiohttp cost the owner ~6x the CPU per byte (bench/RESULTS.md). sendfile
    itself runs on the event loop (asyncio's native path); the pages are asked
    for on a thread first (WILLNEED) so that it seldom waits on the disk. Sent in
    SENDFILE_CHUNK slices so the counters move as the piece goes, as with _copy.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the requester went away")
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(_will_need, fd, served.offset, served.length)
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as file:  # loop.sendfile takes a file object
        sent = 0
        while sent < served.length:
            if transport.is_closing():
                raise ConnectionResetError("the requester went away")
            want = min(served.length - sent, SENDFILE_CHUNK)
            n = await loop.sendfile(transport, file, served.offset + sent, want)
            if n != want:
                raise _Abort("short read from the cache")  # the file ended early: a truncated blob
            sent += n
            transfers.peer_bytes_served += n
            if relay:
                transfers.peer_bytes_relayed += n


def _will_need(fd: int, offset: int, length: int) -> None:
    """Start reading the piece's pages into the page cache (a hint; some filesystems ignore or refuse it)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


async def _copy(resp: web.StreamResponse, served: ServedPiece, fd: int, transfers: Transfers, relay: bool) -> None:
    """The piece read on a thread and written through aiohttp: over TLS, and for a piece still arriving here."""
    sent = 0
    stream = served.stream
    attempt = stream.attempt if stream is not None else 0
    while sent < served.length:
        if stream is not None and stream.digest is None:
            if stream.attempt != attempt or stream.failed:
                raise _Abort("the fetch of this piece here failed")
            ready = stream.written
            if ready <= sent:
                await stream.wait(STALL_SECONDS)
                continue
        else:
            ready = served.length
        n = min(ready - sent, READ_CHUNK)
        data = await asyncio.to_thread(os.pread, fd, n, served.offset + sent)
        if len(data) != n:
            raise _Abort("short read from the cache")
        await resp.write(data)
        sent += n
        transfers.peer_bytes_served += n
        if relay:
            transfers.peer_bytes_relayed += n
    digest = served.digest
    if stream is not None:
        while stream.digest is None and not stream.failed:
            await stream.wait(STALL_SECONDS)
        if stream.digest is None or stream.attempt != attempt:
            raise _Abort("the fetch of this piece here failed")
        digest = stream.digest
    assert digest is not None
    await resp.write(digest.encode("ascii"))
    await resp.write_eof()


async def have(request: web.Request) -> web.Response:
    """Which of the named files (fill keys) this node holds complete, and the pieces of those it fills that it
    verified or is receiving from the origin now (a piece request follows such a fetch as it lands).

    Body: ``{"keys": [fill key, ...], "piece_size": N, "from": member}``. The
    requester asks holders first, whatever placement says (agent/fetch/peer_reader.py).
    """
    state = request.app[PEER]
    assert state.service is not None
    body = await read_body(request)
    keys, piece_size, sender = body.get("keys"), body.get("piece_size"), body.get("from")
    if not isinstance(keys, list) or len(keys) > MAX_HAVE_KEYS or not all(
        isinstance(k, str) and 0 < len(k) <= MAX_KEY_LEN for k in keys
    ):
        raise BadRequestError(f'"keys" must be a list of at most {MAX_HAVE_KEYS} fill keys')
    if isinstance(piece_size, bool) or not isinstance(piece_size, int) or piece_size <= 0:
        raise BadRequestError('"piece_size" must be a positive integer')
    if isinstance(sender, str) and 0 < len(sender) <= MAX_SENDER:
        state.heard(sender)
    complete, pieces = await state.service.held_for_peer(keys, piece_size)
    return web.json_response({"complete": complete, "pieces": pieces})


async def prefetch(request: web.Request) -> web.StreamResponse:
    """Prefetch on this node for a peer (``agent prefetch --all-nodes``): the local API's NDJSON stream."""
    state = request.app[PEER]
    assert state.service is not None
    body = await read_body(request)
    ref = ref_field(request, body)
    await state.service.check_peer_ref(_peer_ref(ref, allow_revision=True))
    return await ensure_job(request, state.service, state.metrics, ref, flag(body, "pin"), with_files=False,
                            selection=Selection.of_body(body))


def add_peer_routes(app: web.Application, state: PeerState) -> None:
    app[PEER] = state
    app.router.add_get("/peer/v1/ping", ping)
    app.router.add_get("/peer/v1/piece", piece)
    app.router.add_post("/peer/v1/prefetch", prefetch)
    app.router.add_post("/peer/v1/have", have)
