"""Asking other agents for pieces (and for prefetches): the requester's side of the peer API.

Every request carries the shared token and has bounded time: the answer's
headers must come within the hedge timeout (a dead or overloaded owner is left
for the next one quickly), and the body may not stall longer than the read
timeout. A piece's body is exactly its length, then 32 hex characters: the
owner's xxh3-128 of the piece as it recorded it when the bytes were verified
(docs/API.md). This module only moves and frames bytes; the fetcher hashes what
it writes and compares.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from agent.errors import PeerBusyError, PeerCutShortError, PeerDownError, PeerRefusedError, PeerSlowError
from agent.origins.base import Sink, pump_body

HASH_LEN = 32  # xxh3-128 hex
PING_TIMEOUT = 1.5








@dataclass(frozen=True)
class PieceRequest:
    """What a requester tells the owner: where the piece comes from, for the owner to check itself."""

    ref: str
    revision: str
    path: str
    fill_key: str
    piece_size: int
    index: int
    # Ask a relay parent (agent/peers/membership.py): serve only what you hold or are receiving, never
    # fetch it from the origin for me. ``requester`` names the asking member, so that a node
    # never follows a piece back to where its own copy comes from.
    relay: bool = False
    requester: str = ""

    def params(self) -> dict[str, str]:
        out = {
            "ref": self.ref,
            "rev": self.revision,
            "path": self.path,
            "key": self.fill_key,
            "piece_size": str(self.piece_size),
            "index": str(self.index),
        }
        if self.relay:
            out["relay"] = "1"
        if self.requester:
            out["from"] = self.requester
        return out


class PeerClient:
    def __init__(self, session: aiohttp.ClientSession, token: str, hedge_timeout: float, read_timeout: float) -> None:
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}
        self.hedge_timeout = hedge_timeout
        self.read_timeout = read_timeout

    async def ping(self, addr: str, sender: str = "") -> None:
        """Raise unless ``addr`` answers; ``sender`` (this node's name) tells it that this node is alive."""
        timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT)
        params = {"from": sender} if sender else None
        url = f"http://{addr}/peer/v1/ping"
        async with self.session.get(url, params=params, headers=self.headers, timeout=timeout) as resp:
            if resp.status != 200:
                raise PeerRefusedError(f"ping answered {resp.status}")
            await resp.read()

    async def fetch_piece(
        self, addr: str, req: PieceRequest, length: int, sink: Sink, on_answer: Callable[[], None] | None = None
    ) -> str:
        """Stream piece ``req.index`` (``length`` bytes) from ``addr`` into ``sink``; return the stated hash.

        ``on_answer`` is called once the peer has agreed to send the piece (200, the right length).
        """
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.hedge_timeout, sock_read=self.read_timeout)
        url = f"http://{addr}/peer/v1/piece"
        try:
            async with asyncio.timeout(self.hedge_timeout) as deadline:
                resp = await self.session.get(url, params=req.params(), headers=self.headers, timeout=timeout)
                deadline.reschedule(None)
        except TimeoutError:
            raise PeerSlowError(f"no answer within {self.hedge_timeout}s") from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise PeerDownError(f"{type(exc).__name__}: {exc}") from None
        async with resp:
            if resp.status != 200:
                body = (await _safe_read(resp))[:200]
                refused = PeerBusyError if resp.status >= 500 else PeerRefusedError
                raise refused(f"answered {resp.status}: {body}")
            if resp.content_length != length + HASH_LEN:
                raise PeerRefusedError(f"answered {resp.content_length} bytes for a {length}-byte piece")
            if on_answer is not None:
                on_answer()
            try:
                tail = await pump_body(resp.content, length, sink)
                if len(tail) < HASH_LEN:
                    tail += await resp.content.readexactly(HASH_LEN - len(tail))
                stated = tail[:HASH_LEN].decode("ascii", "replace")
            except TimeoutError:
                raise PeerSlowError(f"body stalled for {self.read_timeout}s") from None
            except (EOFError, asyncio.IncompleteReadError):
                raise PeerCutShortError("body ended before the piece hash") from None
            except (aiohttp.ClientError, ConnectionError, OSError) as exc:
                raise PeerCutShortError(f"{type(exc).__name__}: {exc}") from None
        return stated

    async def have(self, addr: str, keys: list[str], piece_size: int, sender: str = "") -> dict[str, object]:
        """Which of the files ``keys`` ``addr`` holds complete, and the verified pieces of those it is filling.

        The raw JSON object (``{"complete": [...], "pieces": {key: [...]}}``); the
        caller checks it (it is a peer's word). Bounded by the hedge timeout.
        """
        timeout = aiohttp.ClientTimeout(total=self.hedge_timeout)
        body = {"keys": keys, "piece_size": piece_size, "from": sender}
        try:
            async with self.session.post(
                f"http://{addr}/peer/v1/have", json=body, headers=self.headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise PeerRefusedError(f"have answered {resp.status}: {(await _safe_read(resp))[:200]}")
                data = await resp.json(content_type=None)
        except TimeoutError:
            raise PeerSlowError(f"have: no answer within {self.hedge_timeout}s") from None
        except (aiohttp.ClientError, ConnectionError, OSError, ValueError) as exc:
            raise PeerDownError(f"have: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise PeerRefusedError("have answered something other than a JSON object")
        return data

    async def prefetch(
        self, addr: str, ref: str, pin: bool | None, selection: dict[str, object] | None = None
    ) -> AsyncIterator[dict[str, object]]:
        """Ask ``addr`` to prefetch ``ref`` (the files ``selection``'s request fields pick); yield its NDJSON
        lines (progress, then complete or error)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)  # progress lines come every 0.5 s
        body: dict[str, object] = {"ref": ref, "pin": pin, **(selection or {})}
        try:
            async with self.session.post(
                f"http://{addr}/peer/v1/prefetch", json=body, headers=self.headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise PeerRefusedError(f"answered {resp.status}: {(await _safe_read(resp))[:300]}")
                async for raw in resp.content:
                    line = raw.strip()
                    if line:
                        yield json.loads(line)
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
            raise PeerDownError(f"{type(exc).__name__}: {exc}") from None


async def _safe_read(resp: aiohttp.ClientResponse) -> str:
    try:
        return (await resp.content.read(2048)).decode("utf-8", "replace").strip()
    except (aiohttp.ClientError, TimeoutError, ConnectionError):
        return ""
