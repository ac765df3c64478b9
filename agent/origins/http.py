"""A single file over plain HTTP(S): ``https://host/path/model.safetensors``.

Resolved with a HEAD request (size, ETag or Last-Modified as identity); pieces
are range GETs with ``If-Match`` on a strong ETag, so a file replaced at the
origin mid-fetch fails clearly instead of mixing versions.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import HttpOrigin, check_status
from agent.refs import ModelRef
from client.errors import FetchFailedError, ModelNotFoundError


class PlainHttpOrigin(HttpOrigin):
    scheme = "https"

    async def resolve(self, ref: ModelRef) -> Manifest:
        url = f"{ref.scheme}://{ref.location}"
        name = ref.location.rsplit("/", 1)[-1]
        probe = FileEntry(path=name, size=0)
        try:
            async with self.session.head(url, allow_redirects=True) as resp:
                check_status(resp.status, probe)
                size = resp.content_length
                etag = resp.headers.get("ETag", "")
                modified = resp.headers.get("Last-Modified", "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise FetchFailedError(f"cannot reach {url}: {exc}") from None
        if size is None:
            raise FetchFailedError(f"{url} has no Content-Length; cannot fetch it in pieces")
        source = {"url": url, "etag": etag, "modified": modified}
        revision = listing_revision([(name, size, [etag, modified])])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(f"revision {ref.revision} of {url} is not cached; the file is now {revision}")
        files = [FileEntry(path=name, size=size, source=source)]
        return Manifest(ref=ref.base, origin=ref.scheme, revision=revision, files=files, resolved_at=time.time())

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        etag = entry.source.get("etag", "")
        headers = {"If-Match": etag} if etag and not etag.startswith("W/") else {}
        return entry.source["url"], headers
