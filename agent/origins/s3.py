"""S3 and S3-compatible object storage.

boto3/botocore do what they are made for: credentials (the standard chain, IRSA,
``AWS_ENDPOINT_URL`` and the config file included), listing and request signing.
Bytes move through aiohttp range requests on presigned URLs (the Range and
If-Match headers are not part of a presigned GET's signature), many at a time.
Every range carries ``If-Match: <ETag at resolve time>``, so pieces of two
different versions of an object can never be mixed.
"""

from __future__ import annotations

import asyncio
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
from agent.origins.base import HttpOrigin
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

MAX_OBJECTS = 100_000
PRESIGN_SECONDS = 3600


class S3Origin(HttpOrigin):
    scheme = "s3"

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        super().__init__(session, ranges)
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._urls: dict[tuple[str, str], tuple[float, str]] = {}
        self._part_sizes: dict[tuple[str, str, str], int | None] = {}

    async def client(self) -> Any:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(_make_client)
        return self._client

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
        s3 = await self.client()
        objects = await asyncio.to_thread(_list, s3, bucket, prefix)
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
            s3 = await self.client()
            try:
                head = await asyncio.to_thread(
                    s3.head_object, Bucket=key[0], Key=key[1], PartNumber=1, IfMatch=entry.source["etag"]
                )
                part, parts = int(head["ContentLength"]), int(head.get("PartsCount") or 0)
            except (ClientError, BotoCoreError, KeyError, ValueError):
                return None  # not cached: a passing failure should not rule peers out for good
            count = int(m.group(1))
            uniform = part > 0 and parts == count and -(-entry.size // part) == count
            self._part_sizes[key] = part if uniform else None
        return self._part_sizes[key]

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        key = (src["bucket"], src["key"])
        now = time.monotonic()
        cached = self._urls.get(key)
        if cached is None or cached[0] < now:
            s3 = await self.client()
            url = await asyncio.to_thread(
                s3.generate_presigned_url,
                "get_object",
                Params={"Bucket": src["bucket"], "Key": src["key"]},
                ExpiresIn=PRESIGN_SECONDS,
            )
            cached = (now + PRESIGN_SECONDS / 2, url)
            self._urls[key] = cached
        return cached[1], {"If-Match": src["etag"]}


def _make_client() -> Any:
    session = boto3.session.Session()
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
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
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"s3://{bucket}/{prefix}"
        if code in ("NoSuchBucket",):
            raise ModelNotFoundError(f"bucket {bucket!r} does not exist ({where})") from None
        if code in ("404", "NoSuchKey", "NotFound") or status == 404:
            raise ModelNotFoundError(f"nothing at {where}: no object and no objects under {prefix}/") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise AccessDeniedError(f"S3 refused access to {where} ({code}): check credentials") from None
        raise FetchFailedError(f"S3 error listing {where}: {code or exc}") from None
    except BotoCoreError as exc:
        raise FetchFailedError(f"cannot reach S3 for s3://{bucket}/{prefix}: {exc}") from None
