"""A single file over plain HTTP(S): ``https://host/path/model.safetensors``.

Resolved with a HEAD request (size, ETag or Last-Modified as identity); pieces
are range GETs with ``If-Match`` on a strong ETag, so a file replaced at the
origin mid-fetch fails clearly instead of mixing versions.

The HEAD follows redirects itself, by the rules of the range client
(agent/origins/policy.py): never from https to http, and to another origin
only where the address policy allows the addresses its host resolves to; the
request then goes to exactly the address judged.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from agent.errors import TransientOriginError
from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import HttpOrigin, check_status
from agent.origins.policy import AddressPolicy, AddressRefusedError, downgrade
from agent.origins.range_http import MAX_REDIRECTS, REDIRECTS, RangeClient
from agent.refs import ModelRef
from client.errors import FetchFailedError, ModelNotFoundError

log = logging.getLogger(__name__)


class PlainHttpOrigin(HttpOrigin):
    scheme = "https"

    def __init__(
        self, session: aiohttp.ClientSession, ranges: RangeClient, policy: AddressPolicy | None = None
    ) -> None:
        super().__init__(session, ranges)
        self.policy = policy if policy is not None else AddressPolicy()

    async def resolve(self, ref: ModelRef) -> Manifest:
        url = f"{ref.scheme}://{ref.location}"
        name = ref.location.rsplit("/", 1)[-1]
        probe = FileEntry(path=name, size=0)
        try:
            size, etag, modified = await self._head(url, probe)
        except TransientOriginError as exc:  # 5xx or 429 from the HEAD: the origin is up but failing
            log.info("HEAD %s failed: %s", url, exc)
            raise FetchFailedError(f"{_without_port(url)} is failing ({exc}); try again later") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No errno or port in what may go back to a peer (an open port would read differently from a closed one).
            log.info("HEAD %s failed: %s: %s", url, type(exc).__name__, exc)
            raise FetchFailedError(f"cannot reach {_without_port(url)} (details in the agent's log)") from None
        if size is None:
            raise FetchFailedError(f"{url} has no Content-Length; cannot fetch it in pieces")
        source = {"url": url, "etag": etag, "modified": modified}
        revision = listing_revision([(name, size, [etag, modified])])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(f"revision {ref.revision} of {url} is not cached; the file is now {revision}")
        files = [FileEntry(path=name, size=size, source=source)]
        return Manifest(ref=ref.base, origin=ref.scheme, revision=revision, files=tuple(files), resolved_at=time.time())

    async def _head(self, url: str, probe: FileEntry) -> tuple[int | None, str, str]:
        """Size, ETag and Last-Modified of ``url``, following at most MAX_REDIRECTS redirects by the policy."""
        first = _origin_of(url)
        target, host_header, tls_name = url, None, None
        for _ in range(MAX_REDIRECTS + 1):
            headers: dict[str, str] | None = {"Host": host_header} if host_header else None
            async with self.session.head(
                target, allow_redirects=False, headers=headers, server_hostname=tls_name
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status not in REDIRECTS or location is None:
                    check_status(resp.status, probe)
                    return resp.content_length, resp.headers.get("ETag", ""), resp.headers.get("Last-Modified", "")
            following = urljoin(url, location)
            if downgrade(url, following):
                raise AddressRefusedError(f"refusing a redirect of {probe.path!r} from https to plain http")
            url = target = following
            host_header = tls_name = None
            if _origin_of(url) != first and not self.policy.allow_private:
                target, host_header, tls_name = await self._pinned(url, probe.path)
        raise FetchFailedError(f"{probe.path}: more than {MAX_REDIRECTS} redirects from the origin")

    async def _pinned(self, url: str, what: str) -> tuple[str, str | None, str | None]:
        """``url`` with its host replaced by an address the policy allows, with the Host header and TLS
        server name that keep the host's name; through a proxy, ``url`` as it is (the proxy connects)."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        addresses = await self.policy.addresses(host, port, f"a redirect of {what!r}")
        if not urllib.request.proxy_bypass(host) and urllib.request.getproxies().get(scheme):
            return url, None, None
        address = addresses[0]
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        return pinned, parts.netloc.rsplit("@", 1)[-1], host if scheme == "https" else None

    def host_key(self, entry: FileEntry) -> str:
        scheme, host, port = _origin_of(entry.source["url"])
        return f"{scheme}://{host}:{port}"

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        etag = entry.source.get("etag", "")
        headers = {"If-Match": etag} if etag and not etag.startswith("W/") else {}
        return entry.source["url"], headers


def _origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _without_port(url: str) -> str:
    """``url`` as scheme://host/path: the port is left out of messages that may reach a peer."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
