"""The local API for compile artifacts (docs/API.md "Artifacts"), and the lookup that asks peers.

    POST /v1/artifacts/publish   body: the bundle's bytes (Content-Length);
                                 header X-Warmstart-Artifact: {"key", "fingerprint"}
    POST /v1/artifacts/get       {"key", "fingerprint", "peers": true} -> where the bundle's blob is
    GET  /v1/artifacts[?key=]    every entry, with whether its blob is still here
    POST /v1/artifacts/remove    {"key", "fingerprint_id"?}

The bundle's bytes come in as the request body, which the agent hashes and
writes once into its store (the client sends its file with ``sendfile``), so
it works for a pod that mounts the cache read-only. Going out, nothing passes
through the agent: ``get`` answers the blob's path and the client reads it
from the cache directly, holding a shared ``flock`` like a tensor reader.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from agent.artifacts.index import FPID_RE, ArtifactIndex, Entry, check_key
from agent.api.artifacts_peer import ArtifactPeerError, fetch_blob, fetch_entry
from agent.service import ModelService
from agent.peers.membership import rendezvous
from client.artifacts import HEADER
from client.errors import ArtifactNotFoundError, BadRequestError
from client.fingerprint import check_fingerprint, describe_diff, fingerprint_id

log = logging.getLogger(__name__)

SERVICE: web.AppKey[ModelService] = web.AppKey("artifact_service", ModelService)
MAX_HEADER = 16 * 1024


def artifact_index(service: ModelService) -> ArtifactIndex:
    """The node's one artifact index, kept beside its ModelService (the local and the peer app share it)."""
    index = getattr(service, "_artifact_index", None)
    if index is None:
        peers = service.fetcher.peers
        index = ArtifactIndex(service.store)
        if peers is not None:
            index.node = peers.me
        service._artifact_index = index  # type: ignore[attr-defined]
        service._artifact_lookups = {}  # type: ignore[attr-defined]
    return index


async def lookup(service: ModelService, key: str, fingerprint: dict[str, str], use_peers: bool) -> tuple[Entry, str]:
    """The entry for (key, fingerprint) with its blob here, fetched from a peer if need be: (entry, source)."""
    index = artifact_index(service)
    await index.load()
    fpid = fingerprint_id(fingerprint)
    found = index.get(key, fpid)
    if found is not None:
        await service.store.touch([found.digest])
        return found, "local"
    if use_peers and service.fetcher.peers is not None and service.fetcher.peer_client is not None:
        flights: dict[tuple[str, str], asyncio.Task[tuple[Entry, str] | None]] = service._artifact_lookups  # type: ignore[attr-defined]
        task = flights.get((key, fpid))
        if task is None:
            task = asyncio.ensure_future(_from_peers(service, index, key, fpid))
            flights[(key, fpid)] = task
            task.add_done_callback(lambda _t: flights.pop((key, fpid), None))
        got = await asyncio.shield(task)
        if got is not None:
            return got
    raise ArtifactNotFoundError(_not_found_message(index, key, fingerprint, use_peers and service.fetcher.peers is not None))


async def _from_peers(service: ModelService, index: ArtifactIndex, key: str, fpid: str) -> tuple[Entry, str] | None:
    """Ask the rendezvous owner of (key, fingerprint) first, then the other live peers."""
    membership, client = service.fetcher.peers, service.fetcher.peer_client
    assert membership is not None and client is not None
    order = [a for a in rendezvous(list(membership.live()) + [membership.me], f"artifact|{key}", int(fpid, 16))
             if a != membership.me]
    for addr in order:
        try:
            found = await fetch_entry(client, addr, key, fpid)
            if found is None:
                continue
            if not index.store.has_blob(found.digest):
                await fetch_blob(client, addr, index, found)
                service.fetcher.peer_bytes_received += found.size
            entry, _ = await index.publish(found.key, found.fingerprint, found.digest, found.size,
                                           publisher=found.publisher, created=found.created)
            log.info("artifact %s [%s] came from peer %s", key, fpid, addr)
            return entry, f"peer {addr}"
        except ArtifactPeerError as exc:
            log.warning("artifact %s [%s] from peer %s failed: %s", key, fpid, addr, exc)
    return None


def _not_found_message(index: ArtifactIndex, key: str, fingerprint: dict[str, str], asked_peers: bool) -> str:
    where = "on this node or its peers" if asked_peers else "on this node"
    others = [e for e in index.entries.values() if e.key == key]
    if not others:
        return f"no artifact {key!r} {where}"
    lines = [f"no artifact {key!r} for this fingerprint ({fingerprint_id(fingerprint)}) {where}; this node has:"]
    for e in others:
        if e.fingerprint_id == fingerprint_id(fingerprint):
            lines.append(f"  {e.fingerprint_id}: same fingerprint, but its bundle was evicted")
        else:
            lines.append(f"  {e.fingerprint_id}: differs in {describe_diff(fingerprint, e.fingerprint)}")
    return "\n".join(lines)


def _fingerprint(value: Any) -> dict[str, str]:
    try:
        return check_fingerprint(value)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


async def publish(request: web.Request) -> web.Response:
    service: ModelService = request.app[SERVICE]
    raw = request.headers.get(HEADER, "")
    try:
        meta = json.loads(raw) if 0 < len(raw) <= MAX_HEADER else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise BadRequestError(f"header {HEADER} must carry a JSON object with key and fingerprint")
    key, fingerprint = check_key(meta.get("key")), _fingerprint(meta.get("fingerprint"))
    size = request.content_length
    if size is None:
        raise BadRequestError("publish needs a Content-Length (the bundle's size)")
    index = artifact_index(service)
    digest = await index.adopt(request.content.read, size)
    entry, replaced = await index.publish(key, fingerprint, digest, size)
    return web.json_response({**entry.to_json(), "replaced": replaced})


async def get(request: web.Request) -> web.Response:
    service: ModelService = request.app[SERVICE]
    body = await _body(request)
    key, fingerprint = check_key(body.get("key")), _fingerprint(body.get("fingerprint"))
    use_peers = body.get("peers", True)
    if not isinstance(use_peers, bool):
        raise BadRequestError('"peers" must be true or false')
    try:
        entry, source = await lookup(service, key, fingerprint, use_peers)
    except ArtifactNotFoundError:
        service.fetcher.metrics.artifact_lookup(hit=False)
        raise
    service.fetcher.metrics.artifact_lookup(hit=source == "local")
    service.fetcher.metrics.served_to_client(entry.size)
    return web.json_response({
        "entry": entry.to_json(), "source": source,
        "cache_dir": service.store.root, "blob": f"blobs/{entry.digest}",
    })


async def listing(request: web.Request) -> web.Response:
    service: ModelService = request.app[SERVICE]
    index = artifact_index(service)
    await index.load()
    key = request.query.get("key")
    return web.json_response({
        "artifacts": index.listing(check_key(key) if key is not None else None),
        "used_bytes": service.store.used_bytes, "capacity_bytes": service.store.capacity,
    })


async def remove(request: web.Request) -> web.Response:
    service: ModelService = request.app[SERVICE]
    body = await _body(request)
    key = check_key(body.get("key"))
    fpid = body.get("fingerprint_id")
    if fpid is not None and (not isinstance(fpid, str) or not FPID_RE.match(fpid)):
        raise BadRequestError('"fingerprint_id" must be 16 hex characters')
    gone = await artifact_index(service).remove(key, fpid)
    return web.json_response({"removed": [e.to_json() for e in gone]})


async def _body(request: web.Request) -> dict[str, Any]:
    from agent.api.local import read_body

    return await read_body(request)


def add_artifact_routes(app: web.Application, service: ModelService) -> None:
    app[SERVICE] = service
    app.router.add_post("/v1/artifacts/publish", publish)
    app.router.add_post("/v1/artifacts/get", get)
    app.router.add_get("/v1/artifacts", listing)
    app.router.add_post("/v1/artifacts/remove", remove)
