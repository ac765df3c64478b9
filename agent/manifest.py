"""Manifests: the immutable file list of one resolved revision of a model.

A manifest is what an origin's ``resolve`` returns (sizes and the origin's own
identity of each file: ETag, sha256, mtime). Manifests and their entries are
frozen: the service makes a new one with this agent's piece size
(:meth:`Manifest.with_piece_size`) and, once the blobs are whole, a completed
one with each file's content digest and per-piece xxh3-128 hashes
(:meth:`Manifest.completed`). It is saved as JSON under
``manifests/<model key>/<revision>.json`` and is what the local API hands
clients.

Typed strings: a :data:`BlobDigest` names a blob's bytes (xxh3-128 hex, its
file name under ``blobs/``); a :data:`FillKey` names the bytes an origin object
will turn out to have, before they are fetched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, NewType

from agent.config import DEFAULT_PIECE_SIZE

BlobDigest = NewType("BlobDigest", str)
FillKey = NewType("FillKey", str)


class Blob(NamedTuple):
    """A file made whole: its content digest, and its piece hashes when known (None: in ``meta/``)."""

    digest: BlobDigest
    pieces: tuple[str, ...] | None


@dataclass(frozen=True)
class FileEntry:
    """One file of a model.

    ``source`` holds what the origin needs to fetch it and what identifies the
    exact bytes at resolve time (ETag, version id, mtime...). ``sha256``,
    ``git_sha1``, ``crc32c`` and ``md5`` (hex) are the origin's own whole-file
    digests, checked when present (md5 only where it is the only one: it costs
    ten times a CRC32C per byte; see agent/store/fill.py ``origin_md5_only``).
    ``digest`` (xxh3-128 of the whole file, hex) and ``pieces`` are filled in
    once the blob is in the store.
    """

    path: str
    size: int
    source: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    git_sha1: str | None = None
    crc32c: str | None = None
    md5: str | None = None
    piece_size: int = DEFAULT_PIECE_SIZE
    digest: BlobDigest | None = None
    pieces: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.pieces is not None and not isinstance(self.pieces, tuple):
            object.__setattr__(self, "pieces", tuple(self.pieces))

    @property
    def piece_count(self) -> int:
        return max(1, -(-self.size // self.piece_size))

    def piece_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        start = index * self.piece_size
        return start, max(0, min(self.piece_size, self.size - start))

    @cached_property
    def fill_key(self) -> FillKey:
        """Identity of the exact bytes this entry names, usable before they are fetched.

        A whole-file sha256 from the origin is content identity; otherwise the
        origin's identity of the object (ETag/version/mtime) stands in. Two
        entries with the same fill key are fetched once.
        """
        if self.sha256:
            return FillKey(f"sha256-{self.sha256}")
        ident = json.dumps([self.size, self.piece_size, self.source], sort_keys=True)
        return FillKey("src-" + hashlib.sha256(ident.encode()).hexdigest()[:40])


@dataclass(frozen=True)
class Manifest:
    """The resolved file list of one revision of a model reference."""

    ref: str
    origin: str
    revision: str
    files: tuple[FileEntry, ...]
    resolved_at: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.files, tuple):
            object.__setattr__(self, "files", tuple(self.files))

    def with_piece_size(self, piece_size: int, digests: Mapping[FillKey, BlobDigest]) -> Manifest:
        """This manifest fetched in ``piece_size`` pieces; files already stored (``digests``) carry their digest."""
        files = []
        for entry in self.files:
            sized = dataclasses.replace(entry, piece_size=piece_size, digest=None, pieces=None)
            files.append(dataclasses.replace(sized, digest=digests.get(sized.fill_key)))
        return dataclasses.replace(self, files=tuple(files))

    def completed(self, blobs: Mapping[FillKey, Blob]) -> Manifest:
        """This manifest with each file's digest (and piece hashes where known) from ``blobs``, by fill key."""
        files = []
        for entry in self.files:
            blob = blobs.get(entry.fill_key)
            if blob is not None:
                entry = dataclasses.replace(
                    entry, digest=blob.digest, pieces=blob.pieces if blob.pieces is not None else entry.pieces
                )
            files.append(entry)
        return dataclasses.replace(self, files=tuple(files))

    @property
    def complete(self) -> bool:
        """Whether every file has its digest and piece hashes (as saved once its blobs were whole)."""
        return all(f.digest is not None and f.pieces is not None for f in self.files)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "origin": self.origin, "revision": self.revision, "resolved_at": self.resolved_at,
            "files": [
                {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)} for entry in self.files
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = [FileEntry(**f) for f in data["files"]]
        return cls(
            ref=data["ref"],
            origin=data["origin"],
            revision=data["revision"],
            files=tuple(files),
            resolved_at=float(data.get("resolved_at", 0.0)),
        )


def listing_revision(items: list[tuple[str, int, Any]]) -> str:
    """A stable revision id for origins without one: a digest of (path, size, identity)."""
    blob = json.dumps(sorted(items, key=lambda t: t[0]), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
