"""The local API for compile artifacts (docs/API.md "Artifacts"); the lookup is agent/artifacts/lookup.py.

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

import json
import logging
from typing import Any

from aiohttp import web

from agent.api.common import read_body
from agent.artifacts.index import FPID_RE, check_key
from agent.artifacts.lookup import Artifacts
from client.artifacts import HEADER
from client.errors import ArtifactNotFoundError, BadRequestError
from client.fingerprint import check_fingerprint

log = logging.getLogger(__name__)

ARTIFACTS: web.AppKey[Artifacts] = web.AppKey("artifacts", Artifacts)
MAX_HEADER = 16 * 1024


def _fingerprint(value: Any) -> dict[str, str]:
    try:
        return check_fingerprint(value)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


async def publish(request: web.Request) -> web.Response:
    artifacts = request.app[ARTIFACTS]
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
    entry, replaced = await artifacts.publish_upload(key, fingerprint, request.content.read, size)
    return web.json_response({**entry.to_json(), "replaced": replaced})


async def get(request: web.Request) -> web.Response:
    artifacts = request.app[ARTIFACTS]
    body = await read_body(request)
    key, fingerprint = check_key(body.get("key")), _fingerprint(body.get("fingerprint"))
    use_peers = body.get("peers", True)
    if not isinstance(use_peers, bool):
        raise BadRequestError('"peers" must be true or false')
    try:
        entry, source = await artifacts.lookup(key, fingerprint, use_peers)
    except ArtifactNotFoundError:
        artifacts.metrics.artifact_lookup(hit=False)
        raise
    artifacts.metrics.artifact_lookup(hit=source == "local")
    artifacts.metrics.served_to_client(entry.size)
    return web.json_response({
        "entry": entry.to_json(), "source": source,
        "cache_dir": artifacts.index.store.root, "blob": f"blobs/{entry.digest}",
    })


async def listing(request: web.Request) -> web.Response:
    index = request.app[ARTIFACTS].index
    await index.load()
    key = request.query.get("key")
    return web.json_response({
        "artifacts": index.listing(check_key(key) if key is not None else None),
        "used_bytes": index.store.used_bytes, "capacity_bytes": index.store.capacity,
    })


async def remove(request: web.Request) -> web.Response:
    body = await read_body(request)
    key = check_key(body.get("key"))
    fpid = body.get("fingerprint_id")
    if fpid is not None and (not isinstance(fpid, str) or not FPID_RE.match(fpid)):
        raise BadRequestError('"fingerprint_id" must be 16 hex characters')
    gone = await request.app[ARTIFACTS].index.remove(key, fpid)
    return web.json_response({"removed": [e.to_json() for e in gone]})


def add_artifact_routes(app: web.Application, artifacts: Artifacts) -> None:
    app[ARTIFACTS] = artifacts
    app.router.add_post("/v1/artifacts/publish", publish)
    app.router.add_post("/v1/artifacts/get", get)
    app.router.add_get("/v1/artifacts", listing)
    app.router.add_post("/v1/artifacts/remove", remove)
