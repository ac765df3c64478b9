"""Compile artifacts in the node store: bundles as blobs, an index of (key, fingerprint) -> blob.

Layout under the cache root (beside the store's own, see agent/store/store.py):

    artifacts/<quoted key>/<fingerprint id>.json   {"key", "fingerprint", "fingerprint_id", "digest",
                                                    "size", "created", "publisher"}
    blobs/<xxh128>                                 the bundle itself, like any other blob

A bundle is an ordinary blob: named by the xxh128 of its bytes, counted in
capacity, evicted LRU like weights (an index entry whose blob went is treated
as absent, and filled again from a peer when one has it), re-hashed at start
if written after the last sync. Bytes arrive as a stream (the client's upload
over the local socket, or a peer's answer): they are written to
``partial/artifact-<random>.part`` while hashed, then renamed to their blob.

Publishing is "last complete wins": an upload becomes visible only once its
blob is whole, by an atomic replace of the index file, under a lock so the
file on disk and the memory agree on which one was last. The replaced bundle's
blob is deleted when no other entry names it and no reader holds it. Since a
compile_cache publisher bundles what it restored plus what it compiled, the
later bundle is normally a superset of the earlier one.

Files are written as the store writes its own (agent/store/safeio.py): no link
followed, explicit modes; a verified upload replaces a blob of the same name
(it may have rotted unnoticed), and a renamed-away upload is checked to still
be the file written.

Artifacts have no origin, so a node missing one asks its peers: the
rendezvous owner of the (key, fingerprint) first, then the others, for their
index entry, and then for the blob by digest, which is hashed as it arrives and
must match before it is stored (agent/api/artifacts_peer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.artifacts.signing import SHA256_RE, Signature
from agent.store.fill import write_json_atomic
from agent.store.safeio import ensure_dir
from agent.store.store import Store
from client.errors import BadRequestError, CapacityError
from client.fingerprint import check_fingerprint, fingerprint_id

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "artifacts"
MAX_KEY = 200
DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")
FPID_RE = re.compile(r"^[0-9a-f]{16}$")


def check_key(key: Any) -> str:
    """An artifact key: 1-200 printable characters, not ``.``/``..`` (it names a directory, quoted)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or not key.isprintable() or key in (".", ".."):
        raise BadRequestError(f"artifact key must be 1-{MAX_KEY} printable characters, got {key!r:.80}")
    return key


def _key_dir(key: str) -> str:
    return urllib.parse.quote(key, safe="")


@dataclass
class Entry:
    """One index record: the bundle published last for (key, fingerprint)."""

    key: str
    fingerprint: dict[str, str]
    digest: str
    size: int
    created: float
    publisher: str
    sha256: str = ""  # of the bundle's bytes: what a signature covers besides the xxh128 (signing.py)
    signature: str = ""  # base64 ed25519 by key ``signer``; empty: unsigned
    signer: str = ""
    fingerprint_id: str = ""

    def __post_init__(self) -> None:
        self.fingerprint_id = fingerprint_id(self.fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "fingerprint": self.fingerprint, "fingerprint_id": self.fingerprint_id,
            "digest": self.digest, "size": self.size, "created": self.created, "publisher": self.publisher,
            "sha256": self.sha256, "signature": self.signature, "signer": self.signer,
        }

    @property
    def sig(self) -> Signature:
        return Signature(self.signature, self.signer)

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        """Parse a record (from disk or a peer); ValueError when anything is off."""
        if not isinstance(data, dict):
            raise ValueError("entry must be an object")
        sig = Signature.from_json(data)
        sha256 = data.get("sha256", "")
        if not isinstance(sha256, str) or (sha256 and not SHA256_RE.match(sha256)):
            raise ValueError("bad artifact entry: sha256")
        try:
            entry = cls(
                key=check_key(data["key"]),
                fingerprint=check_fingerprint(data["fingerprint"]),
                digest=str(data["digest"]),
                size=int(data["size"]),
                created=float(data["created"]),
                publisher=str(data.get("publisher", "?"))[:200],
                sha256=sha256, signature=sig.signature, signer=sig.signer,
            )
        except (KeyError, TypeError, BadRequestError) as exc:
            raise ValueError(f"bad artifact entry: {exc}") from None
        if not DIGEST_RE.match(entry.digest) or entry.size < 0:
            raise ValueError("bad artifact entry: digest or size")
        return entry


@dataclass
class ArtifactIndex:
    """The node's artifact index and the glue to the store. Event-loop only; file work in the store's pool."""

    store: Store
    node: str = field(default_factory=socket.gethostname)
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    _loading: asyncio.Future[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def path(self, key: str, fpid: str) -> str:
        return self.store.path(ARTIFACTS_DIR, _key_dir(key), f"{fpid}.json")

    async def load(self) -> None:
        """Read the index from disk once (lazily, before the first artifact request is served)."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        self.entries.update(await self.store.run(self._scan))

    def _scan(self) -> dict[tuple[str, str], Entry]:
        root = ensure_dir(self.store.root, ARTIFACTS_DIR)  # (uploads cut off by a crash: Store.open removed them)
        out: dict[tuple[str, str], Entry] = {}
        for keydir in os.scandir(root):
            if not keydir.is_dir(follow_symlinks=False):
                continue
            for rec in os.scandir(keydir.path):
                if ".tmp" in rec.name:
                    os.unlink(rec.path)  # a record half-written when the agent was killed
                    continue
                if not rec.name.endswith(".json"):
                    continue
                try:
                    with open(rec.path, encoding="utf-8") as f:
                        entry = Entry.from_json(json.load(f))
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable artifact record %s: %s", rec.path, exc)
                    continue
                out[(entry.key, entry.fingerprint_id)] = entry
        return out

    def present(self, entry: Entry) -> bool:
        return self.store.has_blob(entry.digest)

    def get(self, key: str, fpid: str) -> Entry | None:
        """The entry for (key, fingerprint id) whose blob is here, else None."""
        entry = self.entries.get((key, fpid))
        return entry if entry is not None and self.present(entry) else None

    def listing(self, key: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entry in sorted(self.entries.values(), key=lambda e: (e.key, -e.created)):
            if key is None or entry.key == key:
                out.append({**entry.to_json(), "present": self.present(entry)})
        return out

    # -- bytes in -----------------------------------------------------------
    async def adopt(
        self, read: Callable[[int], Awaitable[bytes]], size: int, expect: str | None = None,
        expect_sha256: str | None = None,
    ) -> tuple[str, str]:
        """Store a bundle's ``size`` bytes from ``read`` as a blob (Store.adopt_stream): (xxh128, sha256)."""
        await self.load()
        return await self.store.adopt_stream(read, size, expect, expect_sha256)

    async def publish(self, key: str, fingerprint: dict[str, str], digest: str, size: int,
                      publisher: str | None = None, created: float | None = None, sha256: str = "",
                      sig: Signature | None = None) -> tuple[Entry, str | None]:
        """Make ``digest`` the entry for (key, fingerprint): atomic, last complete wins.

        Returns (entry, replaced digest).
        """
        await self.load()
        entry = Entry(key=check_key(key), fingerprint=fingerprint, digest=digest, size=size,
                      created=time.time() if created is None else created, publisher=publisher or self.node,
                      sha256=sha256, signature=sig.signature if sig else "", signer=sig.signer if sig else "")
        async with self._lock:  # disk and memory agree on which publish was last
            if not self.store.has_blob(digest):
                raise CapacityError(f"bundle {digest} was evicted before it could be published; push again")
            path = self.path(entry.key, entry.fingerprint_id)

            def write() -> None:
                ensure_dir(self.store.root, ARTIFACTS_DIR, _key_dir(entry.key))
                write_json_atomic(path, entry.to_json())

            await self.store.run(write)
            old = self.entries.get((entry.key, entry.fingerprint_id))
            self.entries[(entry.key, entry.fingerprint_id)] = entry
        replaced = old.digest if old is not None and old.digest != digest else None
        if (replaced and not any(e.digest == replaced for e in self.entries.values())
                and not await self.store.remove_blob(replaced)):
                log.info("replaced bundle %s is still being read; LRU eviction will take it later", replaced)
        log.info("artifact %s [%s] -> %s (%d bytes, from %s)", key, entry.fingerprint_id, digest, size,
                 entry.publisher)
        return entry, replaced

    async def remove(self, key: str, fpid: str | None = None) -> list[Entry]:
        """Drop the entries of ``key`` (one fingerprint, or all) and the blobs no other entry names."""
        await self.load()
        async with self._lock:
            gone = [e for (k, f), e in self.entries.items() if k == key and (fpid is None or f == fpid)]
            for e in gone:
                del self.entries[(e.key, e.fingerprint_id)]
            paths = [self.path(e.key, e.fingerprint_id) for e in gone]
            await self.store.run(_unlink_all, paths)
        for digest in {e.digest for e in gone}:
            if not any(e.digest == digest for e in self.entries.values()):
                await self.store.remove_blob(digest)
        return gone



def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
