"""Where a piece's bytes land, from the origin or from a peer: one way for both.

Each batch of a body is written at its place in the partial file and hashed
(xxh3-128) in the same pass on the store's threads; then the piece's
followers are woken and the bytes are counted. A piece is recorded only when
all of it arrived and, if the manifest already knows its hash, matched
(:func:`record_piece`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import xxhash

from agent.fetch.open_fills import PieceStream
from agent.store.fill import BlobFill
from agent.store.store import Store


async def record_piece(store: Store, fill: BlobFill, index: int, digest: str, source: str | None = None) -> None:
    """Record a written, hashed piece (from peer ``source``, None: the origin); the whole-file hash follows later.

    The whole-file hash follows in the pool, without holding the caller.
    """
    await store.run(fill.record_piece, index, digest, source)
    store.run_later(fill.follow)


class PieceSink:
    """One try of one piece: bytes written in place and hashed; ``written`` is what this try put in the file."""

    def __init__(
        self,
        store: Store,
        fill: BlobFill,
        offset: int,
        landed: Callable[[int], None],
        stream: PieceStream | None = None,
    ) -> None:
        self.store, self.fill, self.offset, self.landed = store, fill, offset, landed
        self.stream = stream
        self.hasher = xxhash.xxh3_128()
        self.pos = offset

    @property
    def written(self) -> int:
        return self.pos - self.offset

    async def __call__(self, chunks: Sequence[bytes | memoryview]) -> None:
        n = await self.store.run(_write_and_hash, self.fill, self.pos, chunks, self.hasher)
        self.pos += n
        if self.stream is not None:
            self.stream.written = self.written
            self.stream.wake()
        self.landed(n)


def _write_and_hash(
    fill: BlobFill, offset: int, chunks: Sequence[bytes | memoryview], hasher: xxhash.xxh3_128
) -> int:
    fill.write(offset, chunks)
    for chunk in chunks:
        hasher.update(chunk)
    return sum(len(c) for c in chunks)
