"""One blob being filled (a flight), and what peers must be told about where its bytes come from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.fetch.slots import Expectation
from agent.manifest import FileEntry, Manifest
from agent.peers.placement import PieceSpec


@dataclass(frozen=True)
class PeerContext:
    """Where a flight's bytes come from, as a peer must be told to check it itself."""

    ref: str  # the reference's base, e.g. s3://bucket/prefix
    revision: str
    scheme: str
    # every piece of the model, in model order, so that all nodes spread its owners evenly the same way
    pieces: tuple[PieceSpec, ...] = field(default=(), compare=False, hash=False, repr=False)
    # (fill key, index) -> position in ``pieces``
    positions: dict[tuple[str, int], int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, ref_base: str, scheme: str, manifest: Manifest) -> PeerContext:
        pieces = tuple((f.fill_key, i, f.piece_range(i)[1]) for f in manifest.files for i in range(f.piece_count))
        return cls(ref_base, manifest.revision, scheme, pieces, {(k, i): n for n, (k, i, _) in enumerate(pieces)})

    @property
    def model(self) -> tuple[str, tuple[PieceSpec, ...]] | None:
        """The model's name and pieces, as placement takes them (None: no pieces known)."""
        return (f"{self.ref}@{self.revision}", self.pieces) if self.pieces else None


@dataclass
class Flight:
    """One blob being filled; shared by everyone who asked for it.

    The readers (agent/fetch/origin_reader.py, peer_reader.py) count its bytes
    and pieces as they land; the API reads them for progress and for streaming
    clients (``partial`` and ``done_pieces``, kept on the event loop's side so
    they can be read safely). Pieces from peers join ``done_pieces`` only when
    the whole file checked out.
    """

    entry: FileEntry
    done_bytes: int = 0
    fetched_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    order: int = 0
    partial: str | None = None
    done_pieces: set[int] = field(default_factory=set)
    ctx: PeerContext | None = None
    use_peers: bool = False
    peer_pieces: dict[int, str] = field(default_factory=dict)  # index -> the peer that sent it
    joined_pieces: int = 0  # pieces another fetch here got first (one started for a peer that asked)
    # a whole-object CRC32C the store keeps (hex), which the finished file must match; asked only when
    # pieces may come from peers (PeerReader.allowed), in place of recomputing the ETag
    stored_crc32c: str | None = None
    # its first origin request, announced to its host's window while the file opens (OriginReader.expect)
    expected: Expectation | None = None
