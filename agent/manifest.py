"""Manifests: the immutable file list of one resolved revision of a model.

A manifest is what an origin's ``resolve`` returns (sizes and the origin's own
identity of each file: ETag, sha256, mtime) and what the store completes as
blobs land (content digest and per-piece xxh3-128 hashes). It is saved as JSON
under ``manifests/<model key>/<revision>.json`` and is what the local API
hands clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from agent.config import DEFAULT_PIECE_SIZE


@dataclass
class FileEntry:
    """One file of a model.

    ``source`` holds what the origin needs to fetch it and what identifies the
    exact bytes at resolve time (ETag, version id, mtime...). ``sha256`` and
    ``git_sha1`` are the origin's own whole-file digests, checked when present.
    ``digest`` (xxh3-128 of the whole file, hex) and ``pieces`` are filled in
    once the blob is in the store.
    """

    path: str
    size: int
    source: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    git_sha1: str | None = None
    piece_size: int = DEFAULT_PIECE_SIZE
    digest: str | None = None
    pieces: list[str] | None = None

    @property
    def piece_count(self) -> int:
        return max(1, -(-self.size // self.piece_size))

    def piece_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        start = index * self.piece_size
        return start, max(0, min(self.piece_size, self.size - start))

    @property
    def fill_key(self) -> str:
        """Identity of the exact bytes this entry names, usable before they are fetched.

        A whole-file sha256 from the origin is content identity; otherwise the
        origin's identity of the object (ETag/version/mtime) stands in. Two
        entries with the same fill key are fetched once.
        """
        if self.sha256:
            return f"sha256-{self.sha256}"
        ident = json.dumps([self.size, self.piece_size, self.source], sort_keys=True)
        return "src-" + hashlib.sha256(ident.encode()).hexdigest()[:40]


@dataclass
class Manifest:
    """The resolved file list of one revision of a model reference."""

    ref: str
    origin: str
    revision: str
    files: list[FileEntry]
    resolved_at: float = 0.0

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = [FileEntry(**f) for f in data["files"]]
        return cls(
            ref=data["ref"],
            origin=data["origin"],
            revision=data["revision"],
            files=files,
            resolved_at=float(data.get("resolved_at", 0.0)),
        )


def listing_revision(items: list[tuple[str, int, Any]]) -> str:
    """A stable revision id for origins without one: a digest of (path, size, identity)."""
    blob = json.dumps(sorted(items, key=lambda t: t[0]), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
