"""Google Cloud Storage (``gs://BUCKET/PREFIX``), through its JSON API.

Listing is ``objects.list`` with the prefix (every page, ``nextPageToken``);
bytes are media downloads (``alt=media``) pinned to the object's
``generation`` as resolved, fetched by the shared range client like S3's, so
pieces of two versions of an object can never be mixed. Each object's
``crc32c`` is checked on every fill; its ``md5Hash`` (absent for composite
objects) is what bytes from peers are checked against (a CRC is no check
against a peer that lies). See agent/origins/cloud_http.py for the costs.

Credentials, first that applies (:class:`GoogleCredentials`), as Google's own
libraries look for them:

1. ``STORAGE_EMULATOR_HOST`` without ``GOOGLE_APPLICATION_CREDENTIALS``: an
   emulator (fake-gcs-server), no auth; the host is the endpoint either way.
2. ``GOOGLE_APPLICATION_CREDENTIALS`` naming a JSON key file: a service
   account (a JWT signed RS256 with its key, exchanged at its ``token_uri``)
   or an ``authorized_user`` (its refresh token exchanged).
3. The metadata server (GKE workload identity, or the node's service
   account): ``GCE_METADATA_HOST`` or ``metadata.google.internal``.
4. None of these answering: anonymous requests (public buckets only); the
   metadata server is asked again each minute.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import HttpOrigin
from agent.origins.cloud_http import (
    TOKEN_MARGIN,
    TokenCache,
    b64_hex,
    check_listing_status,
    fetch,
    parse_json,
    token_exchange,
)
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

log = logging.getLogger(__name__)

MAX_OBJECTS = 100_000
PAGE_SIZE = 1000  # objects.list's own maximum
GCS_ENDPOINT = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
JWT_LIFETIME = 3600
ANONYMOUS_RETRY = 60.0  # seconds between asks of a metadata server that did not answer
CREDENTIALS_HINT = (
    "check GOOGLE_APPLICATION_CREDENTIALS, or the workload identity binding of the node's Kubernetes "
    "service account (docs/OPERATIONS.md, \"Google Cloud Storage\")"
)


class GoogleCredentials:
    """The Authorization header GCS requests carry, from the first credential source that applies."""

    def __init__(self, session: aiohttp.ClientSession, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self.session = session
        self.emulator = bool(env.get("STORAGE_EMULATOR_HOST"))
        self.key_file = env.get("GOOGLE_APPLICATION_CREDENTIALS", "")
        self.metadata_host = env.get("GCE_METADATA_HOST", "metadata.google.internal")
        self._tokens = TokenCache(self._exchange)
        self._warned = False

    async def headers(self) -> dict[str, str]:
        if self.emulator and not self.key_file:
            return {}
        token = await self._tokens.token()
        return {"Authorization": f"Bearer {token}"} if token else {}  # "": anonymous, see _exchange

    async def _exchange(self) -> tuple[str, float]:
        if self.key_file:
            return await self._from_key_file()
        try:
            return await token_exchange(
                self.session,
                f"http://{self.metadata_host}/computeMetadata/v1/instance/service-accounts/default/token",
                {},
                "Google credentials from the metadata server",
                headers={"Metadata-Flavor": "Google"},
            )
        except FetchFailedError as exc:  # no metadata server: not on GCP; public buckets still answer
            if not self._warned:
                log.warning("no Google credentials (no GOOGLE_APPLICATION_CREDENTIALS, %s); gs:// requests go "
                            "unauthenticated (public buckets only) and the metadata server is asked again "
                            "each minute", exc)
                self._warned = True
            return "", ANONYMOUS_RETRY + TOKEN_MARGIN  # "": no token; a metadata server back later is used

    async def _from_key_file(self) -> tuple[str, float]:
        where = f"the Google credentials file {self.key_file}"
        try:
            text = await asyncio.to_thread(Path(self.key_file).read_text, encoding="utf-8")
            info = json.loads(text)
        except (OSError, ValueError) as exc:
            raise AccessDeniedError(f"cannot read {where}: {exc}") from None
        if not isinstance(info, dict):
            raise AccessDeniedError(f"{where} is not a JSON object")
        kind = info.get("type")
        if kind == "service_account":
            token_uri = _field(info, "token_uri", where)
            assertion = await asyncio.to_thread(_signed_jwt, info, token_uri, where)
            form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
            return await token_exchange(self.session, token_uri, form, where)
        if kind == "authorized_user":
            token_uri = str(info.get("token_uri") or "https://oauth2.googleapis.com/token")
            form = {
                "grant_type": "refresh_token",
                "client_id": _field(info, "client_id", where),
                "client_secret": _field(info, "client_secret", where),
                "refresh_token": _field(info, "refresh_token", where),
            }
            return await token_exchange(self.session, token_uri, form, where)
        raise AccessDeniedError(f"{where} has type {kind!r}; service_account and authorized_user are supported")


def _field(info: dict[str, Any], name: str, where: str) -> str:
    value = info.get(name)
    if not isinstance(value, str) or not value:
        raise AccessDeniedError(f"{where} lacks {name!r}")
    return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed_jwt(info: dict[str, Any], token_uri: str, where: str) -> str:
    """The service account's JWT bearer assertion (RFC 7523), signed RS256 with its private key (CPU: in a thread)."""
    try:
        key = serialization.load_pem_private_key(_field(info, "private_key", where).encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AccessDeniedError(f"{where}: private_key is not a PEM key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AccessDeniedError(f"{where}: private_key is not an RSA key")
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": str(info.get("private_key_id", ""))}
    claims = {"iss": _field(info, "client_email", where), "scope": SCOPE, "aud": token_uri,
              "iat": now, "exp": now + JWT_LIFETIME}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def gcs_endpoint(environ: dict[str, str] | None = None) -> str:
    """The JSON API's base URL: ``STORAGE_EMULATOR_HOST`` (with or without a scheme) or Google's."""
    host = (os.environ if environ is None else environ).get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not host:
        return GCS_ENDPOINT
    return host if "://" in host else f"http://{host}"


class GcsOrigin(HttpOrigin):
    scheme = "gs"

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        super().__init__(session, ranges)
        self.endpoint = gcs_endpoint()
        self.credentials = GoogleCredentials(session)

    def _object_url(self, bucket: str, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"

    async def resolve(self, ref: ModelRef) -> Manifest:
        bucket, prefix = ref.location.split("/", 1)
        where = f"gs://{bucket}/{prefix}"
        items = await self._list(bucket, prefix + "/", where)
        if not items:
            status, _, body = await fetch(self.session, "GET", self._object_url(bucket, prefix), where,
                                          headers=await self.credentials.headers())
            if status == 404:
                raise ModelNotFoundError(f"nothing at {where}: no object and no objects under {prefix}/")
            check_listing_status(status, body, where, CREDENTIALS_HINT)
            one = parse_json(body, where)
            one["name"] = prefix
            items = [(prefix.rsplit("/", 1)[-1], one)]
        files = [_entry(bucket, rel, obj, where) for rel, obj in items]
        revision = listing_revision([(f.path, f.size, f.source["generation"]) for f in files])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(
                f"revision {ref.revision} of {ref.base} is not cached and the objects now have revision "
                f"{revision}; use {ref.base}@{revision} or the bare reference"
            )
        return Manifest(ref=ref.base, origin="gs", revision=revision, files=tuple(files), resolved_at=time.time())

    async def _list(self, bucket: str, prefix: str, where: str) -> list[tuple[str, dict[str, Any]]]:
        """(path in model, object resource) of every object under ``prefix``, every page, sorted."""
        out: list[tuple[str, dict[str, Any]]] = []
        token = ""
        for _ in range(MAX_OBJECTS // PAGE_SIZE + 2):  # bounded: a server that never stops paging is refused
            query = {"prefix": prefix, "maxResults": str(PAGE_SIZE),
                     "fields": "items(name,size,generation,md5Hash,crc32c),nextPageToken"}
            if token:
                query["pageToken"] = token
            url = f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o?{urlencode(query)}"
            status, _, body = await fetch(self.session, "GET", url, where, headers=await self.credentials.headers())
            if status == 404:
                raise ModelNotFoundError(f"bucket {bucket!r} does not exist ({where})")
            check_listing_status(status, body, where, CREDENTIALS_HINT)
            page = parse_json(body, where)
            for obj in page.get("items") or []:
                name = obj.get("name") if isinstance(obj, dict) else None
                if not isinstance(name, str) or not name.startswith(prefix):
                    raise FetchFailedError(f"{where}: the listing names an object outside the prefix: {name!r}")
                if name.endswith("/"):
                    continue  # a "directory" placeholder
                out.append((name[len(prefix):], obj))
                if len(out) > MAX_OBJECTS:
                    raise FetchFailedError(f"{where} has more than {MAX_OBJECTS} objects")
            token = page.get("nextPageToken") or ""
            if not isinstance(token, str):
                raise FetchFailedError(f"{where}: the listing's nextPageToken is not a string")
            if not token:
                return sorted(out, key=lambda t: t[0])
        raise FetchFailedError(f"{where}: the listing did not end after {MAX_OBJECTS // PAGE_SIZE + 2} pages")

    async def etag_part_size(self, entry: FileEntry) -> int | None:
        """0 (a plain MD5 checks peers' bytes) when GCS gave the object's md5Hash; None for composite objects."""
        return 0 if entry.md5 else None

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        query = urlencode({"alt": "media", "generation": src["generation"]})
        return f"{self._object_url(src['bucket'], src['name'])}?{query}", await self.credentials.headers()


def _entry(bucket: str, rel: str, obj: dict[str, Any], where: str) -> FileEntry:
    """A FileEntry from an object resource (untrusted: every field is checked)."""
    try:
        size = int(obj["size"])
        generation = str(int(obj["generation"]))
    except (KeyError, TypeError, ValueError):
        raise FetchFailedError(f"{where}: object {obj.get('name')!r} has no valid size or generation") from None
    if size < 0:
        raise FetchFailedError(f"{where}: object {obj.get('name')!r} has a negative size")
    crc = b64_hex(obj.get("crc32c"), "crc32c")
    if crc is not None and len(crc) != 8:
        raise FetchFailedError(f"{where}: object {obj.get('name')!r} has a crc32c of {len(crc) // 2} bytes")
    md5 = b64_hex(obj.get("md5Hash"), "md5Hash")
    if md5 is not None and len(md5) != 32:
        raise FetchFailedError(f"{where}: object {obj.get('name')!r} has an md5Hash of {len(md5) // 2} bytes")
    return FileEntry(
        path=check_relative_path(rel, "object name"),
        size=size,
        source={"bucket": bucket, "name": obj["name"], "generation": generation},
        crc32c=crc,
        md5=md5,
    )
