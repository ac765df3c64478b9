"""Walk an agent's cache directory and check what must hold after any crash.

- every file under ``blobs/`` is a regular file named by the xxh3-128 of its bytes
  (nothing partial or unverified under a final name);
- every artifact index entry (``artifacts/*/*.json``) whose blob is present names
  a blob of the entry's size (a published bundle is whole or absent, never torn);
- no temporary file is left under a final directory's name.

Returns the digests of the blobs found, so tests can check that what was
complete before a crash is still there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import xxhash

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def blob_digest(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_cache(cache_dir: Path) -> set[str]:
    """Assert the invariants above; return the set of blob digests present."""
    blobs = cache_dir / "blobs"
    found: set[str] = set()
    for p in blobs.iterdir() if blobs.exists() else ():
        assert p.is_file() and not p.is_symlink(), f"not a regular file under blobs/: {p}"
        assert HEX32.match(p.name), f"a non-digest name under blobs/: {p.name}"
        got = file_digest(p)
        assert got == p.name, f"blob {p.name} holds bytes hashing to {got}: a partial or torn file under a final name"
        found.add(p.name)
    for entry_file in (cache_dir / "artifacts").glob("*/*.json"):
        entry = json.loads(entry_file.read_text())
        blob = blobs / entry["digest"]
        if blob.exists():
            assert blob.stat().st_size == entry["size"], entry_file
    return found


def cache_files(cache_dir: Path) -> dict[str, int]:
    """Relative path -> size of every regular file (for before/after comparisons)."""
    return {
        os.path.relpath(os.path.join(d, f), cache_dir): os.lstat(os.path.join(d, f)).st_size
        for d, _, files in os.walk(cache_dir)
        for f in files
    }
