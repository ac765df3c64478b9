"""The agent's HTTP faces: the local API on a Unix socket, health on a TCP port.

Contract in docs/API.md. Long operations (prefetch, open, verify) answer with
an NDJSON stream that carries a progress line at least every second, so a
client can tell a busy agent from a dead one, and ends with ``complete`` or
``error``. Bad input is answered with a typed error and never stops the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.api.artifacts import add_artifact_routes
from agent.api.artifacts_peer import add_artifact_peer_routes
from agent.manifest import Manifest
from agent.metrics import METRICS, Metrics, add_metrics_route
from agent.metrics import of as metrics_of
from agent.service import ModelService, Progress
from agent.api.peer import PeerState, add_peer_routes, peer_auth
from agent.store.store import Store
from client.errors import HTTP_STATUS, BadRequestError, WarmstartError

log = logging.getLogger(__name__)

SERVICE: web.AppKey[ModelService] = web.AppKey("service", ModelService)
STORE: web.AppKey[Store] = web.AppKey("store", Store)
READY: web.AppKey[dict[str, bool]] = web.AppKey("ready", dict)
TICK_SECONDS = 0.5
MAX_BODY = 64 * 1024


def _error_response(exc: WarmstartError) -> web.Response:
    return web.json_response(exc.to_wire(), status=HTTP_STATUS.get(exc.kind, 500))


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Typed errors become JSON answers; anything unexpected is logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except WarmstartError as exc:
        log.info("%s %s -> %s: %s", request.method, request.path, exc.kind, exc)
        _count_error(request, exc)
        return _error_response(exc)
    except Exception as exc:  # the agent keeps serving whatever one request did
        log.exception("internal error on %s %s", request.method, request.path)
        error = WarmstartError(f"internal error: {type(exc).__name__}: {exc}")
        _count_error(request, error)
        return _error_response(error)


def _count_error(request: web.Request, exc: WarmstartError) -> None:
    if (metrics := metrics_of(request.app)) is not None:
        metrics.api_error(exc.kind)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    return data


def _ref_field(body: dict[str, Any]) -> str:
    ref = body.get("ref")
    if not isinstance(ref, str):
        raise BadRequestError('missing "ref" (a model reference string)')
    return ref


async def _stream(
    request: web.Request,
    progress: Progress | None,
    job: Awaitable[dict[str, Any]],
    head: dict[str, Any],
    updates: Callable[[], list[dict[str, Any]]] | None = None,
) -> web.StreamResponse:
    """Run ``job`` while streaming progress lines; finish with its result or its error.

    With ``updates``, its lines are sent as soon as a piece or a blob completes
    (not only every tick): a client that streams tensors waits on them.
    """
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def send(line: dict[str, Any]) -> None:
        await resp.write(json.dumps(line).encode() + b"\n")

    task = asyncio.ensure_future(job)
    try:
        await send(head)
        while not task.done():
            if updates is None:
                await asyncio.wait([task], timeout=TICK_SECONDS)
            else:
                for line in updates():
                    await send(line)
                change = asyncio.ensure_future(request.app[SERVICE].fetcher.wait_change(TICK_SECONDS))
                await asyncio.wait([task, change], return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
            if not task.done():
                await send(progress.snapshot() if progress else {"event": "progress"})
        try:
            result = task.result()
        except WarmstartError as exc:
            _count_error(request, exc)
            await send({"event": "error", **exc.to_wire()})
        except Exception as exc:
            log.exception("internal error in %s", request.path)
            error = WarmstartError(f"internal error: {exc}")
            _count_error(request, error)
            await send({"event": "error", **error.to_wire()})
        else:
            await send({"event": "complete", **result})
    except (ConnectionResetError, asyncio.CancelledError):
        # The requester went away; the fetch goes on (single flight) for whoever asks next.
        if not task.done():
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        raise
    await resp.write_eof()
    return resp


async def ensure_job(
    request: web.Request,
    pin: bool | None,
    with_files: bool,
    with_snapshot: bool = False,
    stream: bool = False,
    service: ModelService | None = None,
) -> web.StreamResponse:
    """Resolve the body's ref, make it whole, stream progress (the local API's and the peers' prefetch)."""
    service = service or request.app[SERVICE]
    ref, manifest = await service.resolve(_ref_field(await _body(request)))
    progress = service.progress(manifest)
    service.fetcher.metrics.count_lookup(service.store, service.fetcher, manifest)
    started = time.monotonic()
    head = {
        "event": "resolved",
        "ref": ref.base,
        "revision": manifest.revision,
        "total_bytes": manifest.total_size,
        "cached_bytes": progress.cached_at_start,
        "files": len(manifest.files),
    }

    async def job() -> dict[str, Any]:
        await service.ensure(ref, manifest, pin)
        out: dict[str, Any] = {
            "ref": ref.base,
            "revision": manifest.revision,
            "total_bytes": manifest.total_size,
            "fetched_bytes": manifest.total_size - progress.cached_at_start,
            "seconds": round(time.monotonic() - started, 3),
        }
        if with_files:
            service.fetcher.metrics.served_to_client(manifest.total_size)
            out["cache_dir"] = service.store.root
            out["files"] = [
                {"path": f.path, "size": f.size, "blob": f"blobs/{f.digest}"} for f in manifest.files
            ]
            if with_snapshot:  # only when asked: links are file work open_tensors does not need
                out["snapshot"] = await service.store.snapshot(ref, manifest)
        return out

    updates = None
    if stream:
        states = _FileStates(service, manifest)
        head["cache_dir"] = service.store.root
        head["file_states"] = states.changed()
        updates = states.lines
    return await _stream(request, progress, job(), head, updates)


class _FileStates:
    """Where each file of a manifest can be read while it fills, as lines for a streaming client.

    A file is ``blob`` (complete and verified), ``partial`` with the pieces
    verified so far (bytes of other pieces are not to be read), or neither yet.
    Only files whose state changed since the last call are returned.
    """

    def __init__(self, service: ModelService, manifest: Manifest) -> None:
        self.service = service
        self.manifest = manifest
        self._sent: dict[str, tuple[Any, ...]] = {}

    def changed(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.manifest.files:
            state: dict[str, Any] = {"path": entry.path, "size": entry.size, "piece_size": entry.piece_size}
            digest = self.service.store.digest_of(entry)
            flight = self.service.fetcher.flights.get(entry.fill_key)
            if digest is not None:
                state["blob"] = f"blobs/{digest}"
            elif flight is not None and flight.partial is not None:
                state["partial"] = flight.partial
                state["done"] = sorted(flight.done_pieces)
            key = (state.get("blob"), state.get("partial"), len(state.get("done", ())))
            if self._sent.get(entry.path) != key:
                self._sent[entry.path] = key
                out.append(state)
        return out

    def lines(self) -> list[dict[str, Any]]:
        files = self.changed()
        return [{"event": "files", "files": files}] if files else []


read_body = _body


def _flag(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequestError(f'"{name}" must be true or false')
    return value


async def prefetch(request: web.Request) -> web.StreamResponse:
    return await ensure_job(request, _flag(await _body(request), "pin"), with_files=False)


async def open_model(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    snapshot = bool(_flag(body, "snapshot"))
    stream = bool(_flag(body, "stream"))
    return await ensure_job(request, None, with_files=True, with_snapshot=snapshot, stream=stream)


async def resolve(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    ref, manifest = await service.resolve(_ref_field(await _body(request)))
    files = [
        {"path": f.path, "size": f.size, "cached": service.store.digest_of(f) is not None} for f in manifest.files
    ]
    return web.json_response(
        {"ref": ref.base, "revision": manifest.revision, "total_size": manifest.total_size, "files": files}
    )


async def list_models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({
        "models": await service.list_models(),
        "used_bytes": service.store.used_bytes,
        "capacity_bytes": service.store.capacity,
    })


async def evict(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(await service.evict(_ref_field(await _body(request))))


async def verify(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    ref, manifest = await service.resolve(_ref_field(await _body(request)))
    head = {"event": "resolved", "ref": ref.base, "revision": manifest.revision, "total_bytes": manifest.total_size}
    return await _stream(request, service.progress(manifest), service.verify(ref, manifest), head)


async def stats(request: web.Request) -> web.Response:
    """Byte counters (origin vs peers) and what this node knows of its peers."""
    service = request.app[SERVICE]
    out: dict[str, Any] = dict(service.fetcher.stats())
    peers = service.fetcher.peers
    out.update(peers.snapshot() if peers is not None else {"self": None, "peers": []})
    return web.json_response(out)


async def prefetch_all(request: web.Request) -> web.StreamResponse:
    """``agent prefetch --all-nodes``: this node and every live peer prefetch the same revision.

    The reference is resolved here first (so every node gets the same
    revision, and a bad reference fails once); each node then resolves it
    itself. A ``node`` line is sent as each node finishes or fails; the others go on.
    """
    service = request.app[SERVICE]
    body = await _body(request)
    pin = _flag(body, "pin")
    ref, manifest = await service.resolve(_ref_field(body))
    pinned_ref = f"{ref.base}@{manifest.revision}"
    membership, client = service.fetcher.peers, service.fetcher.peer_client
    nodes = [membership.me] if membership is not None else ["self"]
    peers = membership.live() if membership is not None else []
    skipped = [a for a in (membership.peers if membership is not None else {}) if a not in peers]
    results: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []

    def record(line: dict[str, Any]) -> None:
        results.append(line)
        pending.append({"event": "node", **line})

    async def here() -> None:
        started = time.monotonic()
        try:
            await service.ensure(ref, manifest, pin)
            record({"node": nodes[0], "status": "complete", "seconds": round(time.monotonic() - started, 3)})
        except WarmstartError as exc:
            record({"node": nodes[0], "status": "error", "message": str(exc)})

    async def there(addr: str) -> None:
        assert client is not None
        started = time.monotonic()
        try:
            last: dict[str, Any] = {}
            async for line in client.prefetch(addr, pinned_ref, pin):
                last = line
                if line.get("event") in ("complete", "error"):
                    break
            if last.get("event") == "complete":
                record({"node": addr, "status": "complete", "seconds": round(time.monotonic() - started, 3)})
            else:
                err = last.get("error") or {}
                message = err.get("message") if isinstance(err, dict) else None
                record({"node": addr, "status": "error", "message": message or "no complete line"})
        except Exception as exc:  # one node failing never stops the others
            record({"node": addr, "status": "error", "message": f"{type(exc).__name__}: {exc}"})

    async def job() -> dict[str, Any]:
        await asyncio.gather(here(), *(there(a) for a in peers))
        failed = [r["node"] for r in results if r["status"] != "complete"]
        return {"ref": ref.base, "revision": manifest.revision, "nodes": results, "failed": failed,
                "skipped": skipped}

    def updates() -> list[dict[str, Any]]:
        out = list(pending)
        pending.clear()
        return out

    head = {"event": "resolved", "ref": ref.base, "revision": manifest.revision, "total_bytes": manifest.total_size,
            "files": len(manifest.files), "nodes": nodes + peers, "skipped": skipped}
    return await _stream(request, None, job(), head, updates)


def local_app(service: ModelService) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[METRICS] = service.fetcher.metrics
    app.router.add_get("/v1/stats", stats)
    app.router.add_post("/v1/prefetch-all", prefetch_all)
    app.router.add_post("/v1/resolve", resolve)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_post("/v1/open", open_model)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/evict", evict)
    app.router.add_post("/v1/verify", verify)
    add_artifact_routes(app, service)
    return app


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[READY].get("store"):
        return web.Response(text="ready\n")
    return web.Response(text="store not open yet\n", status=503)


def node_app(ready: dict[str, bool], peer: PeerState | None = None, metrics: Metrics | None = None) -> web.Application:
    """The TCP face: health, metrics, and the peer API (agent/api/peer.py; 404 unless a peer token is set)."""
    app = web.Application(middlewares=[errors_middleware, peer_auth], client_max_size=MAX_BODY)
    app[READY] = ready
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    add_peer_routes(app, peer or PeerState(None))
    add_artifact_peer_routes(app)
    add_metrics_route(app, metrics if metrics is not None else Metrics())
    return app
