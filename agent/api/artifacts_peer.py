"""Artifacts between nodes: the peer routes that serve them and the requests that fetch them.

Routes (on the TCP ``--listen`` app, under ``/peer/v1/`` so the peer token
check of agent/api/peer.py applies; registered from agent/api/local.py)::

    GET /peer/v1/artifacts/entry?key=KEY&fp=FINGERPRINT_ID   200 the index entry (JSON), 404 none here
    GET /peer/v1/artifacts/blob?digest=XXH128                200 the bundle's bytes, 404 not an artifact here

A peer is only ever given index entries and the blobs they name, by digest;
never a path, never a model's blob (a digest must belong to an artifact entry).
The requester checks the entry it gets is for what it asked, then streams the
blob into its store while hashing it, and keeps it only if the xxh128 matches
the digest (agent/artifacts/index.py ``adopt``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from agent.artifacts.index import DIGEST_RE, FPID_RE, ArtifactIndex, Entry, check_key
from agent.api.peer import PEER
from client.errors import BadRequestError, CapacityError, IntegrityError

log = logging.getLogger(__name__)


def _index(request: web.Request) -> ArtifactIndex:
    from agent.api.artifacts import artifact_index

    service = request.app[PEER].service
    assert service is not None  # peer_auth answers 503 until the store is open
    return artifact_index(service)


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
    request.app[PEER].service.fetcher.peer_bytes_served += index.store.blob_sizes.get(digest, 0)  # type: ignore[union-attr]
    return web.FileResponse(index.store.blob_path(digest), headers={"Content-Type": "application/octet-stream"})


def add_artifact_peer_routes(app: web.Application) -> None:
    app.router.add_get("/peer/v1/artifacts/entry", entry)
    app.router.add_get("/peer/v1/artifacts/blob", blob)


# ---------------------------------------------------------------------- requester side


class ArtifactPeerError(Exception):
    """This peer could not provide the artifact; try the next."""


async def fetch_entry(client: Any, addr: str, key: str, fpid: str) -> Entry | None:
    """The peer's entry for (key, fingerprint id), None when it has none; ArtifactPeerError when it failed."""
    timeout = aiohttp.ClientTimeout(total=client.hedge_timeout + 5, sock_connect=client.hedge_timeout)
    try:
        async with client.session.get(
            f"http://{addr}/peer/v1/artifacts/entry", params={"key": key, "fp": fpid},
            headers=client.headers, timeout=timeout,
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise ArtifactPeerError(f"entry answered {resp.status}")
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
        raise ArtifactPeerError(f"{type(exc).__name__}: {exc}") from None
    try:
        found = Entry.from_json(data)
    except ValueError as exc:
        raise ArtifactPeerError(str(exc)) from None
    if found.key != key or found.fingerprint_id != fpid:
        raise ArtifactPeerError("answered an entry for another key or fingerprint")
    return found


async def fetch_blob(client: Any, addr: str, index: ArtifactIndex, found: Entry) -> str:
    """Stream the bundle of ``found`` from ``addr`` into the store; verified against its digest."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.hedge_timeout, sock_read=client.read_timeout)
    try:
        async with client.session.get(
            f"http://{addr}/peer/v1/artifacts/blob", params={"digest": found.digest},
            headers=client.headers, timeout=timeout,
        ) as resp:
            if resp.status != 200:
                raise ArtifactPeerError(f"blob answered {resp.status}")
            if resp.content_length != found.size:
                raise ArtifactPeerError(f"blob is {resp.content_length} bytes, the entry says {found.size}")
            return await index.adopt(resp.content.read, found.size, expect=found.digest)
    except CapacityError:
        raise  # this node is full: no other peer changes that
    except IntegrityError as exc:
        raise ArtifactPeerError(str(exc)) from None
    except (aiohttp.ClientError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
        raise ArtifactPeerError(f"{type(exc).__name__}: {exc}") from None
