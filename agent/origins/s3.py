"""S3 and S3-compatible object storage.

boto3/botocore do what they are made for: credentials (the standard chain, IRSA,
``AWS_ENDPOINT_URL`` and the config file included), listing and request signing.
Bytes move through aiohttp range requests on presigned URLs (the Range and
If-Match headers are not part of a presigned GET's signature), many at a time.
Every range carries ``If-Match: <ETag at resolve time>``, so pieces of two
different versions of an object can never be mixed.

S3 as it is run:

- **Regions.** A bucket in another region than the client's answers 301
  PermanentRedirect or 400 AuthorizationHeaderMalformed with an
  ``x-amz-bucket-region`` header. Listing and presigned range GETs both follow
  it once: the bucket's region is remembered and a client for it signs from
  then on. A second refusal ends in one error naming the bucket's region.
- **Addressing.** ``AWS_S3_ADDRESSING_STYLE`` (``auto``, ``path``, ``virtual``;
  the variable the AWS SDKs' ``s3.addressing_style`` setting goes by) picks
  bucket-in-host or bucket-in-path URLs; most S3-compatible servers want ``path``.
- **Credentials.** botocore's chain: environment keys, web identity (IRSA:
  ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``), EKS Pod Identity
  (``AWS_CONTAINER_CREDENTIALS_FULL_URI``), the shared files, the instance
  profile; none found means unsigned requests (public buckets). The DaemonSet
  settings for each are in docs/OPERATIONS.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

import aiohttp
import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import HttpOrigin, Sink, check_status
from agent.origins.cloud_http import b64_hex
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

log = logging.getLogger(__name__)

MAX_OBJECTS = 100_000
PRESIGN_SECONDS = 3600
ADDRESSING_STYLES = ("auto", "path", "virtual")
WRONG_REGION = (301, 400)  # PermanentRedirect, AuthorizationHeaderMalformed: both name the bucket's region


class _WrongRegion(Exception):
    """The bucket lives in ``region``; the request was signed for another."""

    def __init__(self, region: str) -> None:
        super().__init__(region)
        self.region = region


class S3Origin(HttpOrigin):
    scheme = "s3"

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        super().__init__(session, ranges)
        self._client: Any = None
        self._regional: dict[str, Any] = {}  # clients for buckets outside the default region, by region
        self._bucket_regions: dict[str, str] = {}  # buckets known to live elsewhere
        self._lock = asyncio.Lock()
        self._urls: dict[tuple[str, str], tuple[float, str]] = {}
        self._part_sizes: dict[tuple[str, str, str], int | None] = {}
        self._crc32c: dict[tuple[str, str, str], str | None] = {}

    async def client(self, bucket: str | None = None) -> Any:
        """The S3 client (for ``bucket``: one signing for the region the bucket is known to be in)."""
        region = self._bucket_regions.get(bucket or "")
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(_make_client)
            if region is None or region == self._client.meta.region_name:
                return self._client
            if region not in self._regional:
                self._regional[region] = await asyncio.to_thread(_make_client, region)
            return self._regional[region]

    def _moved(self, bucket: str, region: str) -> bool:
        """Remember that ``bucket`` is in ``region``; False when that was known already (do not loop)."""
        if not _REGION.fullmatch(region) or self._bucket_regions.get(bucket) == region:
            return False
        self._bucket_regions[bucket] = region
        self._urls = {k: v for k, v in self._urls.items() if k[0] != bucket}
        return True

    async def warm_up(self) -> None:
        """Build the client and load what the first prefetch would otherwise load from disk.

        botocore takes a few hundred ms to build a client (its service models).
        The first ListObjectsV2 paginator also lists botocore's 400-odd service
        directories, and the first request imports the idna codec: measured 0.2 s
        of a 1.8 s cold miss when those files had left the page cache (as they
        will on a node whose memory went to loading models).
        """
        s3 = await self.client()
        await asyncio.to_thread(_warm_up_client, s3)

    async def resolve(self, ref: ModelRef) -> Manifest:
        bucket, prefix = ref.location.split("/", 1)
        try:
            objects = await asyncio.to_thread(_list, await self.client(bucket), bucket, prefix)
        except _WrongRegion as moved:
            if not self._moved(bucket, moved.region):
                raise _region_error(bucket, moved.region) from None
            try:
                objects = await asyncio.to_thread(_list, await self.client(bucket), bucket, prefix)
            except _WrongRegion:
                raise _region_error(bucket, moved.region) from None
        files = [
            FileEntry(
                path=check_relative_path(rel, "object key"),
                size=size,
                source={"bucket": bucket, "key": key, "etag": etag},
            )
            for rel, key, size, etag in objects
        ]
        revision = listing_revision([(f.path, f.size, f.source["etag"]) for f in files])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(
                f"revision {ref.revision} of {ref.base} is not cached and the objects now have revision "
                f"{revision}; use {ref.base}@{revision} or the bare reference"
            )
        return Manifest(ref=ref.base, origin="s3", revision=revision, files=tuple(files), resolved_at=time.time())

    def without_digest(self, entry: FileEntry) -> bool:
        """No sha256 and an ETag that is no MD5 (plain or multipart): SSE-KMS, say."""
        etag = str(entry.source.get("etag", "")).strip('"').lower()
        return super().without_digest(entry) and not re.fullmatch(r"[0-9a-f]{32}(-[0-9]+)?", etag)

    async def etag_part_size(self, entry: FileEntry) -> int | None:
        """How to recompute this object's ETag: 0 for a plain MD5, the part size of a multipart upload.

        None when the ETag cannot be recomputed (not an MD5 at all, e.g. SSE-KMS,
        or parts of different sizes): then the origin offers no digest to check
        bytes from peers against, and the fetcher takes such a file from the
        origin only. The part size comes from HeadObject with PartNumber=1.
        """
        etag = entry.source.get("etag", "").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return 0
        m = re.fullmatch(r"[0-9a-f]{32}-([0-9]+)", etag)
        if not m:
            return None
        key = (entry.source["bucket"], entry.source["key"], etag)
        if key not in self._part_sizes:
            head = await self._head(entry, PartNumber=1)
            if head is None:
                return None  # not cached: a passing failure should not rule peers out for good
            try:
                part, parts = int(head["ContentLength"]), int(head.get("PartsCount") or 0)
            except (KeyError, ValueError):
                return None
            count = int(m.group(1))
            uniform = part > 0 and parts == count and -(-entry.size // part) == count
            self._part_sizes[key] = part if uniform else None
        return self._part_sizes[key]

    async def _head(self, entry: FileEntry, **params: str | int) -> dict[str, Any] | None:
        """``HeadObject`` of ``entry`` as listed (``IfMatch`` its ETag), with ``params``; None if it failed."""
        bucket, name = entry.source["bucket"], entry.source["key"]
        s3 = await self.client(bucket)
        try:
            head = await asyncio.to_thread(
                s3.head_object, Bucket=bucket, Key=name, IfMatch=entry.source.get("etag", ""), **params
            )
        except (ClientError, BotoCoreError):
            return None
        return dict(head)

    async def stored_crc32c(self, entry: FileEntry) -> str | None:
        """The object's whole-object CRC32C, when S3 keeps one (uploaded with it), as hex; else None.

        ``HeadObject`` with ``ChecksumMode=ENABLED`` and ``IfMatch`` the listed
        ETag (a replaced object answers 412: None, and the ETag rule decides). A
        ``COMPOSITE`` checksum (a checksum of the parts' checksums, ``...-N``) is
        not the object's own and is not used.
        """
        key = (entry.source["bucket"], entry.source["key"], str(entry.source.get("etag", "")))
        if key not in self._crc32c:
            head = await self._head(entry, ChecksumMode="ENABLED")
            if head is None:
                return None  # not cached: a passing failure should not decide for good
            value = head.get("ChecksumCRC32C")
            if head.get("ChecksumType") == "COMPOSITE" or not isinstance(value, str) or "-" in value:
                self._crc32c[key] = None
            else:
                try:
                    crc = b64_hex(value, "ChecksumCRC32C")
                except FetchFailedError as exc:
                    log.warning("%s: %s; checking peers' bytes by the ETag instead", entry.path, exc)
                    crc = None
                self._crc32c[key] = crc if crc is not None and len(crc) == 8 else None
        return self._crc32c[key]

    def host_key(self, entry: FileEntry) -> str:
        """One window per bucket: S3 scales (and throttles) request rates per bucket and prefix."""
        return f"s3://{entry.source['bucket']}"

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        key = (src["bucket"], src["key"])
        now = time.monotonic()
        cached = self._urls.get(key)
        if cached is None or cached[0] < now:
            s3 = await self.client(src["bucket"])
            url = await asyncio.to_thread(
                s3.generate_presigned_url,
                "get_object",
                Params={"Bucket": src["bucket"], "Key": src["key"]},
                ExpiresIn=PRESIGN_SECONDS,
            )
            cached = (now + PRESIGN_SECONDS / 2, url)
            self._urls[key] = cached
        return cached[1], {"If-Match": src["etag"]}

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        """A presigned range GET; a wrong-region answer re-signs for the bucket's region and asks once more."""
        bucket = entry.source["bucket"]
        for _ in range(2):
            signed_for = self._bucket_regions.get(bucket)  # None: the client's own region
            url, headers = await self.request_target(entry)
            head = await self.ranges.get_range(url, headers, offset, length, sink, what=entry.path)
            region = head.headers.get("x-amz-bucket-region", "")
            if head.status in WRONG_REGION and region:
                if region != signed_for:  # learned now, or by a request in flight beside this one
                    if self._moved(bucket, region):
                        log.info("bucket %s is in %s: signing its requests for that region", bucket, region)
                    continue
                raise _region_error(bucket, region)
            check_status(head.status, entry, head.reason)
            return
        raise _region_error(bucket, self._bucket_regions.get(bucket, "?"))


_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+){1,4}")  # us-east-1, eu-central-2, us-gov-west-1, cn-north-1


def _region_error(bucket: str, region: str) -> FetchFailedError:
    return FetchFailedError(
        f"bucket {bucket!r} is in region {region} and refused requests signed for it; set AWS_REGION={region} "
        "(and AWS_ENDPOINT_URL to that region's endpoint, if one is set)"
    )


def addressing_style() -> str:
    """``AWS_S3_ADDRESSING_STYLE``, checked: auto (empty or unset), path or virtual."""
    style = os.environ.get("AWS_S3_ADDRESSING_STYLE", "").strip().lower() or "auto"
    if style not in ADDRESSING_STYLES:
        raise FetchFailedError(
            f"AWS_S3_ADDRESSING_STYLE={style!r} is not one of {', '.join(ADDRESSING_STYLES)}; fix the variable"
        )
    return style


def _make_client(region: str | None = None) -> Any:
    session = boto3.session.Session()
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
        s3={"addressing_style": addressing_style()},
    )
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    region = region or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
    return session.client("s3", region_name=region, config=config)


def _warm_up_client(s3: Any) -> None:
    """Load the paginator model and sign one URL offline (no request is sent)."""
    s3.get_paginator("list_objects_v2")
    s3.generate_presigned_url("get_object", Params={"Bucket": "warm-up", "Key": "warm-up"}, ExpiresIn=60)
    "warm-up.example".encode("idna")  # urllib3 imports the codec on a first request


def _list(s3: Any, bucket: str, prefix: str) -> list[tuple[str, str, int, str]]:
    """(path in model, key, size, etag) of every object under ``prefix/``, or the object ``prefix``."""
    try:
        out: list[tuple[str, str, int, str]] = []
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue  # a "directory" marker
                out.append((key[len(prefix) + 1 :], key, int(obj["Size"]), obj["ETag"]))
                if len(out) > MAX_OBJECTS:
                    raise FetchFailedError(f"s3://{bucket}/{prefix} has more than {MAX_OBJECTS} objects")
        if out:
            return sorted(out)
        head = s3.head_object(Bucket=bucket, Key=prefix)
        return [(prefix.rsplit("/", 1)[-1], prefix, int(head["ContentLength"]), head["ETag"])]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        where = f"s3://{bucket}/{prefix}"
        region = str(meta.get("HTTPHeaders", {}).get("x-amz-bucket-region", ""))
        if status in WRONG_REGION and region:
            raise _WrongRegion(region) from None
        if code in ("NoSuchBucket",):
            raise ModelNotFoundError(f"bucket {bucket!r} does not exist ({where})") from None
        if code in ("404", "NoSuchKey", "NotFound") or status == 404:
            raise ModelNotFoundError(f"nothing at {where}: no object and no objects under {prefix}/") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise AccessDeniedError(f"S3 refused access to {where} ({code}): check credentials") from None
        raise FetchFailedError(f"S3 error listing {where}: {code or exc}") from None
    except BotoCoreError as exc:
        raise FetchFailedError(f"cannot reach S3 for s3://{bucket}/{prefix}: {exc}") from None
