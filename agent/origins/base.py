"""What every origin does: resolve a reference to a manifest, and read byte ranges.

The fetcher (agent/fetch/fetcher.py) owns concurrency, retries and verification; an
origin only translates between its protocol and two calls. Failures worth
retrying (5xx, SlowDown, resets, stalls, short bodies) raise
:class:`TransientOriginError`; the rest raise the typed errors of
client/errors.py with a message a user can act on.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp

from agent.errors import RangeIgnoredError, TransientOriginError
from agent.manifest import FileEntry, Manifest
from agent.origins.sequential import SequentialReader
from agent.refs import ModelRef
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

if TYPE_CHECKING:
    from agent.origins.range_http import RangeClient

# A sink takes consecutive chunks of a range, in order (written with pwritev). The chunks
# are only valid until the sink returns (the range client reuses its buffers).
Sink = Callable[[Sequence[bytes | memoryview]], Awaitable[None]]
READ_BLOCK = 4 * 1024 * 1024  # bytes handed to the sink at once
MAX_CHUNKS = 512  # ... or this many chunks, whichever comes first (pwritev's IOV_MAX is 1024)
# ... or what came in this long, whichever comes first. A piece that peers follow as it lands
# (cut-through, agent/api/peer.py) is passed on only as fast as it is handed to the sink; on
# a slow flow (one of 16 sharing a 200 Mbit/s link gets 1.5 MB/s) a 4 MiB block would hold
# its first bytes back for 2.7 s (measured: bench/RESULTS.md "Peers").
FLUSH_SECONDS = 0.1



class Origin(abc.ABC):
    """One kind of model source (s3, gs, az, hf, http, file)."""

    scheme: str

    @abc.abstractmethod
    async def resolve(self, ref: ModelRef) -> Manifest:
        """List the files of ``ref`` at one revision, with sizes and identities."""

    @abc.abstractmethod
    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        """Deliver exactly ``length`` bytes of ``entry`` from ``offset`` to ``sink``, in order."""

    def host_key(self, entry: FileEntry) -> str:
        """Which origin host serves ``entry``: requests to one host share one window (agent/fetch/concurrency.py)."""
        return self.scheme

    async def etag_part_size(self, entry: FileEntry) -> int | None:
        """How to recompute the origin's ETag of ``entry`` (0: a plain MD5; else the multipart part size).

        None when the origin offers no such digest (the default): then only a
        sha256 or git blob id can check bytes taken from peers.
        """
        return None

    async def stored_crc32c(self, entry: FileEntry) -> str | None:
        """A whole-object CRC32C the store keeps beside the listing (hex), to check bytes from peers with.

        Cheaper than recomputing an ETag (MD5: 1.76 CPU s/GiB here, CRC32C 0.10;
        bench/RESULTS.md "The peer path's CPU"). None by default; S3 answers it
        from ``HeadObject`` with ``ChecksumMode=ENABLED``.
        """
        return None

    def without_digest(self, entry: FileEntry) -> bool:
        """Whether the origin gave no digest of ``entry`` to check its bytes against (only their own).

        False by default: a local directory's bytes are the node's own. Network origins say
        (:class:`HttpOrigin`: no sha256, git blob id, CRC32C or MD5; S3 also counts an MD5 ETag)."""
        return False

    async def warm_up(self) -> None:  # noqa: B027 - optional hook: most origins have nothing to warm up
        """One-time set-up a first request would otherwise wait for (building SDK clients)."""

    async def close(self) -> None:  # noqa: B027 - optional hook: most origins hold nothing to release
        """Release what the origin holds (sessions, clients)."""


class HttpOrigin(Origin):
    """An origin whose bytes come over HTTP range requests.

    Metadata (resolving, HEAD) goes through the shared aiohttp session; piece
    bodies through the shared :class:`~agent.origins.range_http.RangeClient`,
    which reads them into reused buffers instead of a new ``bytes`` per chunk.
    """

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        self.session = session
        self.ranges = ranges
        self.sequential = SequentialReader(session, ranges.policy, ranges.read_timeout)

    def without_digest(self, entry: FileEntry) -> bool:
        return not (entry.sha256 or entry.git_sha1 or entry.crc32c or entry.md5)

    @abc.abstractmethod
    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        """URL and headers (auth, If-Match) for GETs of ``entry``."""

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        url, headers = await self.request_target(entry)
        if not self.sequential.ignores_ranges(url):
            try:
                head = await self.ranges.get_range(url, headers, offset, length, sink, what=entry.path)
            except RangeIgnoredError as exc:
                self.sequential.mark(url)
                url = exc.url or url
            else:
                check_status(head.status, entry, head.reason)
                return
        await self.sequential.read(
            entry.fill_key, url, headers, offset, length, entry.size, sink, what=entry.path,
            check=lambda status, reason: check_status(status, entry, reason),
        )

    async def close(self) -> None:
        await self.sequential.close()


async def pump_body(content: aiohttp.StreamReader, length: int, sink: Sink) -> bytes:
    """Hand the next ``length`` bytes of a body to ``sink`` in batches; return what came past them.

    readchunk() hands over the parser's buffers as they are (readexactly would
    join them: one more copy of every byte). EOFError when the body ends early.
    """
    remaining = length
    extra = b""
    batch: list[bytes] = []
    batched = 0
    since = 0.0
    while remaining:
        chunk, _ = await content.readchunk()
        if not chunk:
            raise EOFError(f"body ended {remaining} bytes early")
        if len(chunk) > remaining:
            extra = chunk[remaining:]
            chunk = chunk[:remaining]
        if not batch:
            since = time.monotonic()
        batch.append(chunk)
        batched += len(chunk)
        remaining -= len(chunk)
        if (
            batched >= READ_BLOCK
            or len(batch) >= MAX_CHUNKS
            or not remaining
            or time.monotonic() - since >= FLUSH_SECONDS
        ):
            await sink(batch)
            batch, batched = [], 0
    return extra


async def peer_checkable(entry: FileEntry, origin: Origin) -> bool:
    """Whether a node that takes ``entry``'s pieces from peers can check them against the origin's own digest.

    The rule of the requesting side (agent/fetch/peer_reader.py ``PeerReader.allowed``):
    a sha256, git blob sha1 or CRC32C from the origin (in the listing, or a
    whole-object CRC32C the store keeps: :meth:`Origin.stored_crc32c`), or an S3
    ETag that is an MD5 (plain or multipart with equal parts). Without one,
    requesters never take the file from peers, so the serving side refuses its
    pieces too: they would be bytes nobody could check, fetched on a peer's say-so.
    """
    if entry.sha256 or entry.git_sha1 or entry.crc32c or await origin.etag_part_size(entry) is not None:
        return True  # the ETag first here: a plain MD5 needs no request to the store
    return await origin.stored_crc32c(entry) is not None


def check_status(status: int, entry: FileEntry, reason: str = "") -> None:
    """Map an origin's HTTP status to retry or a typed, final error."""
    if status in (200, 206):
        return
    detail = f" ({reason[:200]})" if reason else ""
    if status in (429, 503):  # S3's SlowDown is a 503: the origin asks for fewer requests at once
        raise TransientOriginError(f"origin answered {status} for {entry.path!r}{detail}", throttle=True)
    if status in (500, 502, 504):
        raise TransientOriginError(f"origin answered {status} for {entry.path!r}{detail}")
    if status == 404:
        raise ModelNotFoundError(f"{entry.path!r} is gone from the origin (404){detail}")
    if status in (401, 403):
        raise AccessDeniedError(f"origin refused access to {entry.path!r} ({status}): check credentials{detail}")
    if status == 412:
        raise FetchFailedError(
            f"{entry.path!r} changed at the origin since it was resolved (412); "
            "prefetch again to pick up the new revision"
        )
    raise FetchFailedError(f"origin answered {status} for {entry.path!r}{detail}")
