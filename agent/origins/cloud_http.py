"""What the GCS and Azure Blob origins share: metadata requests, bearer tokens, digests as hex.

Both clouds are spoken to over plain HTTP with the agent's own aiohttp session
(no cloud SDK: each would add tens of MB and its own thread pools for what is
a listing call and a token exchange). Bytes still move through the shared range
client (agent/origins/range_http.py), like S3's.

Digests: both clouds list an MD5 (GCS ``md5Hash``, Azure ``Content-MD5``) and GCS
a CRC32C, base64 of the raw bytes; the agent keeps them as hex. Measured through
the fill's hashing path (bench/digest_cost.py, bench/RESULTS.md "Digests a fill
checks"): CRC32C (the ``crc32c`` package, hardware instructions) 0.10 CPU s/GiB,
MD5 1.76, so a fill checks the CRC32C where there is one and the MD5 only where it is the sole digest or where pieces
came from peers (agent/store/fill.py ``origin_md5_only``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

MAX_METADATA_BYTES = 32 * 1024 * 1024  # a listing page or token answer larger than this is refused, not parsed
METADATA_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
TOKEN_MARGIN = 300.0  # a bearer token is renewed this many seconds before it expires


def b64_hex(value: object, what: str) -> str | None:
    """Hex of a base64 digest from a listing (None when absent or not base64: then it is not checked)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        raise FetchFailedError(f"the origin gave a malformed {what} {value[:64]!r}") from None


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    where: str,
    *,
    headers: dict[str, str] | None = None,
    data: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    """One metadata request: (status, headers, body); FetchFailedError when the server cannot be reached.

    The body is capped at MAX_METADATA_BYTES: an answer is untrusted and a
    listing page is far smaller.
    """
    try:
        async with session.request(
            method, url, headers=headers, data=data, timeout=METADATA_TIMEOUT, allow_redirects=False
        ) as resp:
            chunks: list[bytes] = []
            total = 0
            # read(n) returns what has arrived, not n bytes: the whole body is gathered chunk by chunk
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                if total > MAX_METADATA_BYTES:
                    raise FetchFailedError(f"{where}: the answer is larger than {MAX_METADATA_BYTES} bytes")
                chunks.append(chunk)
            return resp.status, dict(resp.headers), b"".join(chunks)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        bare = url.split("?", 1)[0]  # a SAS in the query is a secret: never in a message
        raise FetchFailedError(f"cannot reach {bare} for {where}: {type(exc).__name__}: {exc}") from None


def check_listing_status(status: int, body: bytes, where: str, hint: str) -> None:
    """Map a listing's status to a typed error naming ``where``; ``hint`` says which credentials to check."""
    if status == 200:
        return
    detail = body[:300].decode("utf-8", "replace").replace("\n", " ")
    if status == 404:
        raise ModelNotFoundError(f"nothing at {where} (404): {detail}")
    if status in (401, 403):
        raise AccessDeniedError(f"access to {where} refused ({status}): {hint}; {detail}")
    raise FetchFailedError(f"the origin answered {status} listing {where}: {detail}")


def parse_json(body: bytes, where: str) -> dict[str, Any]:
    """A JSON object from an answer, or FetchFailedError naming ``where``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        start = body[:120].decode("utf-8", "replace").replace("\n", " ")
        raise FetchFailedError(f"{where}: the answer is not JSON ({len(body)} bytes: {start!r})") from None
    if not isinstance(data, dict):
        raise FetchFailedError(f"{where}: the answer is not a JSON object")
    return data


async def token_exchange(
    session: aiohttp.ClientSession, url: str, form: dict[str, str], where: str, headers: dict[str, str] | None = None
) -> tuple[str, float]:
    """POST an OAuth2 form (or GET when ``form`` is empty) and return (access token, seconds it lives)."""
    method = "POST" if form else "GET"
    status, _, body = await fetch(session, method, url, where, headers=headers, data=form or None)
    if status != 200:
        detail = body[:300].decode("utf-8", "replace").replace("\n", " ")
        raise AccessDeniedError(f"{where}: the token endpoint {url} answered {status}: {detail}")
    data = parse_json(body, where)
    token = data.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise AccessDeniedError(f"{where}: the token endpoint {url} gave no usable access_token")
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    return token, lifetime


class TokenCache:
    """One bearer token, fetched by ``get_token`` on first use and again shortly before it expires.

    Concurrent requests wait for one exchange instead of each starting their own.
    """

    def __init__(self, get_token: Callable[[], Awaitable[tuple[str, float]]]) -> None:
        self._get_token = get_token
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                token, lifetime = await self._get_token()
                self._token = token
                self._renew_at = time.monotonic() + max(0.0, lifetime - TOKEN_MARGIN)
            return self._token
