"""Azure Blob Storage (``az://ACCOUNT/CONTAINER/PREFIX``), through its REST API.

Listing is List Blobs (XML, every page by ``NextMarker``); bytes are ranged
GETs by the shared range client, each with ``If-Match: <ETag at resolve>`` so
pieces of two versions of a blob can never be mixed. A blob's ``Content-MD5``,
when its uploader set one, is checked on every fill (it is the only digest
Azure lists; ``x-ms-content-crc64`` is only sent on ranged answers, per range,
and is not used). A blob without one is checked against its own bytes only
and is never taken from peers.

Credentials, first that applies (:class:`AzureCredentials`), by the names the
``az`` CLI and Azure's SDKs read:

1. ``AZURE_STORAGE_CONNECTION_STRING``: its ``BlobEndpoint`` (Azurite's
   ``http://127.0.0.1:10000/devstoreaccount1``, or ``UseDevelopmentStorage=true``)
   and its ``SharedAccessSignature`` or ``AccountKey``.
2. ``AZURE_STORAGE_SAS_TOKEN``: a SAS appended to every request.
3. ``AZURE_STORAGE_KEY``: the account key. The agent signs no request with it;
   it makes an account SAS (read and list, blob service, one hour) and renews
   it, because the range client adds the Range header after the URL and
   headers are fixed, and a SharedKey signature covers the Range header.
4. Workload identity on AKS (``AZURE_FEDERATED_TOKEN_FILE``, ``AZURE_CLIENT_ID``,
   ``AZURE_TENANT_ID``, optional ``AZURE_AUTHORITY_HOST``): the projected
   service-account token is exchanged for an Entra ID token for
   ``https://storage.azure.com``.
5. None: anonymous (a container with public read access).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import HttpOrigin
from agent.origins.cloud_http import TokenCache, b64_hex, check_listing_status, fetch, token_exchange
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

MAX_OBJECTS = 100_000
PAGE_SIZE = 5000  # List Blobs' own maximum
API_VERSION = "2020-04-08"  # x-ms-version of every request and the sv of the SAS the agent makes
SAS_LIFETIME = 3600
# Azurite's well-known development account (public, in Microsoft's documentation).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CREDENTIALS_HINT = (
    "check AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_SAS_TOKEN / AZURE_STORAGE_KEY, or the workload "
    "identity's role assignment (Storage Blob Data Reader; docs/OPERATIONS.md, \"Azure Blob Storage\")"
)


@dataclass(frozen=True)
class AzureSettings:
    """Where an account's blob endpoint is and which credential to use, as read from the environment."""

    account: str  # the connection string's account ("" when none names one)
    endpoint: str  # "" : https://<account>.blob.core.windows.net
    sas: str
    key: str
    federated_token_file: str
    client_id: str
    tenant_id: str
    authority: str

    @classmethod
    def from_environ(cls, env: dict[str, str]) -> AzureSettings:
        conn = _parse_connection_string(env.get("AZURE_STORAGE_CONNECTION_STRING", ""))
        if conn.get("usedevelopmentstorage", "").lower() == "true":
            conn = {"accountname": DEV_ACCOUNT, "accountkey": DEV_KEY,
                    "blobendpoint": f"http://127.0.0.1:10000/{DEV_ACCOUNT}"}
        endpoint = conn.get("blobendpoint", "")
        if not endpoint and conn.get("accountname"):
            protocol = conn.get("defaultendpointsprotocol", "https")
            suffix = conn.get("endpointsuffix", "core.windows.net")
            endpoint = f"{protocol}://{conn['accountname']}.blob.{suffix}"
        in_conn = bool(conn)
        return cls(
            account=conn.get("accountname", ""),
            endpoint=endpoint.rstrip("/"),
            sas=(conn.get("sharedaccesssignature", "") if in_conn else env.get("AZURE_STORAGE_SAS_TOKEN", "")).lstrip(
                "?"
            ),
            key=conn.get("accountkey", "") if in_conn else env.get("AZURE_STORAGE_KEY", ""),
            federated_token_file=env.get("AZURE_FEDERATED_TOKEN_FILE", ""),
            client_id=env.get("AZURE_CLIENT_ID", ""),
            tenant_id=env.get("AZURE_TENANT_ID", ""),
            authority=env.get("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/").rstrip("/"),
        )


def _parse_connection_string(text: str) -> dict[str, str]:
    """``Key=Value;...`` with keys lowercased (a SAS value keeps its own ``=`` signs)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip().lower()] = value.strip()
    return out


def account_sas(account: str, key: str, now: float) -> str:
    """An account SAS (blob service; container and object; read and list) valid SAS_LIFETIME seconds from ``now``.

    The string to sign is that of service versions 2015-04-05 to 2020-12-05
    (no encryption scope line), matching ``sv=API_VERSION``.
    """
    try:
        secret = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise AccessDeniedError(f"the Azure account key for {account!r} is not base64") from None
    start = dt.datetime.fromtimestamp(now - 300, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    expiry = dt.datetime.fromtimestamp(now + SAS_LIFETIME, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = {"sv": API_VERSION, "ss": "b", "srt": "co", "sp": "rl", "st": start, "se": expiry, "spr": "https,http"}
    to_sign = "\n".join(
        [account, fields["sp"], fields["ss"], fields["srt"], fields["st"], fields["se"], "", fields["spr"],
         fields["sv"], ""]
    )
    fields["sig"] = base64.b64encode(hmac.new(secret, to_sign.encode(), hashlib.sha256).digest()).decode()
    return urlencode(fields)


class AzureCredentials:
    """The query string (SAS) and headers (bearer token) Azure requests carry, from the first source that applies."""

    def __init__(self, session: aiohttp.ClientSession, settings: AzureSettings) -> None:
        self.session = session
        self.settings = settings
        self._tokens = TokenCache(self._exchange)
        self._sas: tuple[float, str] = (0.0, "")

    def endpoint(self, account: str) -> str:
        s = self.settings
        if s.account and s.account != account:
            raise AccessDeniedError(
                f"AZURE_STORAGE_CONNECTION_STRING is for account {s.account!r}, the reference names {account!r}"
            )
        return s.endpoint or f"https://{account}.blob.core.windows.net"

    async def auth(self, account: str) -> tuple[str, dict[str, str]]:
        """(query string to append, or "", headers) for a request to ``account``."""
        s = self.settings
        headers = {"x-ms-version": API_VERSION}
        if s.sas:
            return s.sas, headers
        if s.key:
            now = time.time()
            if self._sas[0] <= now:
                self._sas = (now + SAS_LIFETIME / 2, account_sas(s.account or account, s.key, now))
            return self._sas[1], headers
        if s.federated_token_file and s.client_id and s.tenant_id:
            headers["Authorization"] = f"Bearer {await self._tokens.token()}"
        return "", headers

    async def _exchange(self) -> tuple[str, float]:
        s = self.settings
        where = "Azure workload identity (AZURE_FEDERATED_TOKEN_FILE)"
        try:  # read again each time: the kubelet rotates the projected token
            assertion = (await asyncio.to_thread(Path(s.federated_token_file).read_text, encoding="utf-8")).strip()
        except OSError as exc:
            raise AccessDeniedError(f"{where}: cannot read {s.federated_token_file}: {exc}") from None
        form = {
            "client_id": s.client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "grant_type": "client_credentials",
            "scope": "https://storage.azure.com/.default",
        }
        url = f"{s.authority}/{quote(s.tenant_id, safe='')}/oauth2/v2.0/token"
        return await token_exchange(self.session, url, form, where)


class AzureOrigin(HttpOrigin):
    scheme = "az"

    def __init__(
        self, session: aiohttp.ClientSession, ranges: RangeClient, environ: dict[str, str] | None = None
    ) -> None:
        super().__init__(session, ranges)
        self.credentials = AzureCredentials(session, AzureSettings.from_environ(dict(environ or os.environ)))

    async def resolve(self, ref: ModelRef) -> Manifest:
        account, container, prefix = ref.location.split("/", 2)
        where = f"az://{account}/{container}/{prefix}"
        base = f"{self.credentials.endpoint(account)}/{container}"
        items = await self._list(account, base, prefix + "/", where)
        if not items:
            sas, headers = await self.credentials.auth(account)
            url = f"{base}/{quote(prefix, safe='/~')}" + (f"?{sas}" if sas else "")
            status, got, body = await fetch(self.session, "HEAD", url, where, headers=headers)
            if status == 404:
                raise ModelNotFoundError(f"nothing at {where}: no blob and no blobs under {prefix}/")
            check_listing_status(status, body, where, CREDENTIALS_HINT)
            low = {k.lower(): v for k, v in got.items()}
            props = {"Content-Length": low.get("content-length"), "Etag": low.get("etag"),
                     "Content-MD5": low.get("content-md5")}
            items = [(prefix.rsplit("/", 1)[-1], prefix, props)]
        files = [_entry(account, container, rel, name, props, where) for rel, name, props in items]
        revision = listing_revision([(f.path, f.size, f.source["etag"]) for f in files])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(
                f"revision {ref.revision} of {ref.base} is not cached and the blobs now have revision "
                f"{revision}; use {ref.base}@{revision} or the bare reference"
            )
        return Manifest(ref=ref.base, origin="az", revision=revision, files=tuple(files), resolved_at=time.time())

    async def _list(
        self, account: str, base: str, prefix: str, where: str
    ) -> list[tuple[str, str, dict[str, str | None]]]:
        """(path in model, blob name, properties) of every blob under ``prefix``, every page, sorted."""
        out: list[tuple[str, str, dict[str, str | None]]] = []
        marker = ""
        for _ in range(MAX_OBJECTS // PAGE_SIZE + 2):  # bounded: a server that never stops paging is refused
            query = {"restype": "container", "comp": "list", "prefix": prefix, "maxresults": str(PAGE_SIZE)}
            if marker:
                query["marker"] = marker
            sas, headers = await self.credentials.auth(account)
            url = f"{base}?{urlencode(query)}" + (f"&{sas}" if sas else "")
            status, _, body = await fetch(self.session, "GET", url, where, headers=headers)
            if status == 404:
                raise ModelNotFoundError(f"container {base.rsplit('/', 1)[-1]!r} does not exist ({where})")
            check_listing_status(status, body, where, CREDENTIALS_HINT)
            blobs, marker = await asyncio.to_thread(_parse_list, body, where)
            for name, props in blobs:
                if not name.startswith(prefix):
                    raise FetchFailedError(f"{where}: the listing names a blob outside the prefix: {name!r}")
                if name.endswith("/"):
                    continue
                out.append((name[len(prefix):], name, props))
                if len(out) > MAX_OBJECTS:
                    raise FetchFailedError(f"{where} has more than {MAX_OBJECTS} blobs")
            if not marker:
                return sorted(out, key=lambda t: t[0])
        raise FetchFailedError(f"{where}: the listing did not end after {MAX_OBJECTS // PAGE_SIZE + 2} pages")

    async def etag_part_size(self, entry: FileEntry) -> int | None:
        """0 (a plain MD5 checks peers' bytes) when the blob has a Content-MD5; None otherwise."""
        return 0 if entry.md5 else None

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        sas, headers = await self.credentials.auth(src["account"])
        url = f"{self.credentials.endpoint(src['account'])}/{src['container']}/{quote(src['name'], safe='/~')}"
        return url + (f"?{sas}" if sas else ""), {**headers, "If-Match": src["etag"]}


def _parse_list(body: bytes, where: str) -> tuple[list[tuple[str, dict[str, str | None]]], str]:
    """(blob name, properties) of one List Blobs page, and its NextMarker ("" on the last page)."""
    try:
        root = ET.fromstring(body)  # untrusted, but capped in size; expat refuses entity expansion bombs
    except ET.ParseError as exc:
        raise FetchFailedError(f"{where}: the listing is not XML: {exc}") from None
    blobs: list[tuple[str, dict[str, str | None]]] = []
    for blob in root.iterfind("./Blobs/Blob"):
        name = blob.findtext("Name")
        if not name:
            raise FetchFailedError(f"{where}: the listing has a blob without a name")
        props = blob.find("Properties")
        tags = ("Content-Length", "Etag", "Content-MD5")
        blobs.append((name, {tag: props.findtext(tag) if props is not None else None for tag in tags}))
    return blobs, root.findtext("NextMarker") or ""


def _entry(account: str, container: str, rel: str, name: str, props: dict[str, str | None], where: str) -> FileEntry:
    """A FileEntry from a blob's listed properties (untrusted: every field is checked)."""
    try:
        size = int(props.get("Content-Length") or "")
    except ValueError:
        raise FetchFailedError(f"{where}: blob {name!r} has no valid Content-Length") from None
    etag = props.get("Etag") or ""
    if etag and not etag.startswith('"'):
        etag = f'"{etag}"'  # the listing gives it bare, a HEAD quoted: one form, as If-Match wants it
    if size < 0 or not etag or any(c in etag for c in "\r\n"):
        raise FetchFailedError(f"{where}: blob {name!r} has no valid size or ETag")
    md5 = b64_hex(props.get("Content-MD5"), "Content-MD5")
    if md5 is not None and len(md5) != 32:
        raise FetchFailedError(f"{where}: blob {name!r} has a Content-MD5 of {len(md5) // 2} bytes")
    source: dict[str, Any] = {"account": account, "container": container, "name": name, "etag": etag}
    return FileEntry(path=check_relative_path(rel, "blob name"), size=size, source=source, md5=md5)
