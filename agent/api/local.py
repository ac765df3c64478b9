"""The local API on the Unix socket: what inference pods and the `agent` CLI ask of their node's agent.

Contract in docs/API.md. Routes: resolve, prefetch, open (with the blobs' paths
for the client to read itself), models, evict, verify, stats, prefetch-all, the
artifact routes (agent/api/artifacts.py) and the warm set's status
(agent/api/warm_set.py). Streaming and error handling are agent/api/common.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from aiohttp import web

from agent.api.artifacts import add_artifact_routes
from agent.api.common import (
    MAX_BODY,
    METRICS,
    SERVICE,
    ensure_job,
    errors_middleware,
    flag,
    read_body,
    ref_field,
    stream_job,
)
from agent.api.warm_set import add_warm_set_routes
from agent.artifacts.lookup import Artifacts
from agent.metrics import Metrics
from agent.peers.client import PeerClient
from agent.peers.membership import Membership
from agent.selection import DEFAULT, Selection
from agent.service import ModelService
from agent.warmset.reconciler import WarmSet
from client.errors import WarmstartError

PEERS: web.AppKey[tuple[Membership, PeerClient] | None] = web.AppKey("peers")


async def prefetch(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    ref, pin = ref_field(request, body), flag(body, "pin")
    return await ensure_job(request, request.app[SERVICE], request.app[METRICS], ref, pin, with_files=False,
                            selection=Selection.of_body(body))


async def open_model(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    snapshot = bool(flag(body, "snapshot"))
    stream = bool(flag(body, "stream"))
    return await ensure_job(
        request, request.app[SERVICE], request.app[METRICS], ref_field(request, body), None,
        with_files=True, with_snapshot=snapshot, stream=stream, selection=Selection.of_body(body),
    )


async def resolve(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    ref, manifest = await service.resolve(ref_field(request, await read_body(request)))
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
    return web.json_response(await service.evict(ref_field(request, await read_body(request))))


async def verify(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    ref, manifest = await service.resolve(ref_field(request, await read_body(request)))
    # Progress over what verify looks at: the files held now and the loader's (not the whole revision).
    held = frozenset(f.path for f in manifest.files if service.store.digest_of(f) is not None)
    loader = await service.chosen(manifest, DEFAULT)
    shown = Selection(paths=held | {f.path for f in loader or manifest.files})
    progress = service.progress(dataclasses.replace(manifest, files=shown.pick(manifest.files)))
    head = {"event": "resolved", "ref": ref.base, "revision": manifest.revision, "total_bytes": progress.total_bytes}
    return await stream_job(request, progress, service.verify(ref, manifest), head)


async def stats(request: web.Request) -> web.Response:
    """Byte counters (origin vs peers) and what this node knows of its peers."""
    out: dict[str, Any] = request.app[METRICS].transfers.to_json()
    peers = request.app[PEERS]
    out.update(peers[0].snapshot() if peers is not None else {"self": None, "peers": []})
    return web.json_response(out)


async def prefetch_all(request: web.Request) -> web.StreamResponse:
    """``agent prefetch --all-nodes``: this node and every live peer prefetch the same revision.

    The reference is resolved here first (so every node gets the same
    revision, and a bad reference fails once); each node then resolves it
    itself. A ``node`` line is sent as each node finishes or fails; the others go on.
    """
    service = request.app[SERVICE]
    body = await read_body(request)
    pin = flag(body, "pin")
    selection = Selection.of_body(body)
    ref, manifest = await service.resolve(ref_field(request, body), selection=selection)
    pinned_ref = f"{ref.base}@{manifest.revision}"
    membership, client = request.app[PEERS] or (None, None)
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
            await service.ensure(ref, manifest, pin, selection)
            record({"node": nodes[0], "status": "complete", "seconds": round(time.monotonic() - started, 3)})
        except WarmstartError as exc:
            record({"node": nodes[0], "status": "error", "message": str(exc)})

    async def there(addr: str) -> None:
        assert client is not None
        started = time.monotonic()
        try:
            last: dict[str, Any] = {}
            async for line in client.prefetch(addr, pinned_ref, pin, selection.to_body()):
                last = line
                if line.get("event") in ("complete", "error"):
                    break
            if last.get("event") == "complete":
                record({"node": addr, "status": "complete", "seconds": round(time.monotonic() - started, 3)})
            else:
                err = last.get("error") or {}
                message = err.get("message") if isinstance(err, dict) else None
                record({"node": addr, "status": "error", "message": message or "no complete line"})
        except Exception as exc:  # noqa: BLE001 - one node failing, however, never stops the others
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
    return await stream_job(request, None, job(), head, updates)


def local_app(
    service: ModelService,
    metrics: Metrics,
    artifacts: Artifacts,
    warm_set: WarmSet | None = None,
    peers: tuple[Membership, PeerClient] | None = None,
) -> web.Application:
    """The local API's app; ``peers`` (membership and client) when this node has peers."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[METRICS] = metrics
    app[PEERS] = peers
    app.router.add_get("/v1/stats", stats)
    app.router.add_post("/v1/prefetch-all", prefetch_all)
    app.router.add_post("/v1/resolve", resolve)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_post("/v1/open", open_model)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/evict", evict)
    app.router.add_post("/v1/verify", verify)
    add_artifact_routes(app, artifacts)
    add_warm_set_routes(app, warm_set)
    return app
