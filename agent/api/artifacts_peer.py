"""Artifacts between nodes: the peer routes that serve them (the requests are agent/artifacts/peer_fetch.py).

Routes (on the TCP ``--listen`` app, under ``/peer/v1/`` so the peer token
check of agent/api/peer.py applies; registered from agent/api/local.py)::

    GET /peer/v1/artifacts/entry?key=KEY&fp=FINGERPRINT_ID   200 the index entry (JSON), 404 none here
    GET /peer/v1/artifacts/blob?digest=XXH128                200 the bundle's bytes, 404 not an artifact here

A peer is only ever given index entries and the blobs they name, by digest;
never a path, never a model's blob (a digest must belong to an artifact entry).
The requester checks the entry it gets is for what it asked, then streams the
blob into its store while hashing it, and keeps it only if the xxh128 matches
the digest (agent/artifacts/peer_fetch.py).
"""

from __future__ import annotations

import logging

from aiohttp import web

from agent.api.peer import PEER
from agent.artifacts.index import DIGEST_RE, FPID_RE, ArtifactIndex, check_key
from client.errors import BadRequestError

log = logging.getLogger(__name__)


def _index(request: web.Request) -> ArtifactIndex:
    artifacts = request.app[PEER].artifacts
    assert artifacts is not None  # peer_auth answers 503 until the store is open
    return artifacts.index


async def entry(request: web.Request) -> web.Response:
    index = _index(request)
    key = check_key(request.query.get("key"))
    fpid = request.query.get("fp", "")
    if not FPID_RE.match(fpid):
        raise BadRequestError("fp must be a fingerprint id (16 hex characters)")
    await index.load()
    found = index.get(key, fpid)
    if found is None:
        raise web.HTTPNotFound(text="no such artifact here\n")
    return web.json_response(found.to_json())


async def blob(request: web.Request) -> web.StreamResponse:
    index = _index(request)
    digest = request.query.get("digest", "")
    if not DIGEST_RE.match(digest):
        raise BadRequestError("digest must be an xxh128 (32 hex characters)")
    await index.load()
    if not index.store.has_blob(digest) or not any(e.digest == digest for e in index.entries.values()):
        raise web.HTTPNotFound(text="no such artifact blob here\n")
    # sendfile from the blob; an eviction meanwhile unlinks the name, the open file stays readable.
    request.app[PEER].metrics.transfers.peer_bytes_served += index.store.blob_size(digest)
    return web.FileResponse(index.store.blob_path(digest), headers={"Content-Type": "application/octet-stream"})


def add_artifact_peer_routes(app: web.Application) -> None:
    app.router.add_get("/peer/v1/artifacts/entry", entry)
    app.router.add_get("/peer/v1/artifacts/blob", blob)
