"""Fetching compile-artifact bundles from peers: the requester's side of the artifact peer routes.

The routes are agent/api/artifacts_peer.py's. A peer is only ever asked for an
index entry by (key, fingerprint id), then for the blob by digest; the entry
must be for what was asked, and the blob is streamed into the store while it
is hashed and kept only if its xxh128 matches (agent/artifacts/index.py
``adopt``).
"""

from __future__ import annotations

import aiohttp

from agent.artifacts.index import ArtifactIndex, Entry
from agent.errors import ArtifactPeerError, ArtifactRefusedError
from agent.peers.client import PeerClient
from client.errors import CapacityError, IntegrityError


async def fetch_entry(client: PeerClient, addr: str, key: str, fpid: str) -> Entry | None:
    """The peer's entry for (key, fingerprint id), None when it has none; ArtifactPeerError when it failed."""
    timeout = aiohttp.ClientTimeout(total=client.hedge_timeout + 5, sock_connect=client.hedge_timeout)
    try:
        async with client.request(
            "GET", addr, "/peer/v1/artifacts/entry", params={"key": key, "fp": fpid}, timeout=timeout
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


async def fetch_blob(client: PeerClient, addr: str, index: ArtifactIndex, found: Entry) -> str:
    """Stream the bundle of ``found`` from ``addr`` into the store; verified against its digests.

    The xxh128 always; the SHA-256 too when the entry carries one (a signed
    entry must: agent/artifacts/signing.py). Bytes matching neither are
    refused (ArtifactRefusedError "digest_mismatch") and never stored.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.hedge_timeout, sock_read=client.read_timeout)
    got = 0
    try:
        async with client.request(
            "GET", addr, "/peer/v1/artifacts/blob", params={"digest": found.digest}, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise ArtifactPeerError(f"blob answered {resp.status}")
            if resp.content_length != found.size:
                raise ArtifactPeerError(f"blob is {resp.content_length} bytes, the entry says {found.size}")
            got = 0

            async def read(n: int) -> bytes:
                nonlocal got
                data = await resp.content.read(n)
                got += len(data)
                return data

            digest, _ = await index.adopt(read, found.size, expect=found.digest, expect_sha256=found.sha256 or None)
            return digest
    except CapacityError:
        raise  # this node is full: no other peer changes that
    except IntegrityError as exc:
        if got < found.size:  # cut short: the peer failed, it did not lie
            raise ArtifactPeerError(str(exc)) from None
        raise ArtifactRefusedError("digest_mismatch", str(exc)) from None
    except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as exc:
        raise ArtifactPeerError(f"{type(exc).__name__}: {exc}") from None
