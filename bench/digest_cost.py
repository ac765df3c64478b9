"""What each whole-file digest costs a fill (why gs:// fills check the CRC32C and not the MD5).

Hashes one file that is in the page cache through the fill's own path
(agent/store/fill.py ``hash_file``: read-only mmap windows handed to the
hashers as memoryviews), once per digest per round, digests alternated within
each round, and reports the median CPU seconds per GiB (this thread's user +
system time). ``google-crc32c`` is measured too when it is installed: it takes
``bytes`` only, so each window is copied first (what using it would cost).

Usage::

    python bench/digest_cost.py --size 512MiB --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import crc32c  # noqa: E402
import xxhash  # noqa: E402

from agent.store.fill import hash_file  # noqa: E402
from agent.units import parse_size  # noqa: E402


class _CopyingGoogleCrc:
    """google-crc32c fed as it must be: a bytes copy of every window."""

    def __init__(self) -> None:
        import google_crc32c  # type: ignore[import-not-found]  # optional: measured only when installed

        self.h = google_crc32c.Checksum()

    def update(self, data: Any) -> None:
        self.h.update(bytes(data))


def contenders() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        "xxh3-128 (always)": xxhash.xxh3_128,
        "crc32c (package crc32c)": crc32c.CRC32CHash,
        "md5": hashlib.md5,
        "sha256": hashlib.sha256,
    }
    try:
        _CopyingGoogleCrc()
        out["crc32c (google-crc32c, bytes copy)"] = _CopyingGoogleCrc
    except ImportError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size)
    runs: dict[str, list[float]] = {name: [] for name in contenders()}
    with tempfile.NamedTemporaryFile(dir=ROOT / "bench") as f:
        f.write(os.urandom(size))
        f.flush()
        fd = f.fileno()
        hash_file(fd, 0, size, [])  # in the page cache before the first round
        for r in range(args.rounds):
            names = list(runs)
            order = names[r % len(names):] + names[: r % len(names)]  # alternate who goes first
            for name in order:
                h = contenders()[name]()
                before = time.thread_time()
                hash_file(fd, 0, size, [h])
                runs[name].append((time.thread_time() - before) / (size / 2**30))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"CPU s/GiB, median of {args.rounds} alternated rounds over {args.size} (min-max); load {load}")
    base = statistics.median(runs["crc32c (package crc32c)"])
    for name, values in runs.items():
        med = statistics.median(values)
        print(f"  {name:38s} {med:6.3f}  ({min(values):.3f}-{max(values):.3f})  {med / base:5.1f}x crc32c")
    return 0


if __name__ == "__main__":
    sys.exit(main())
