"""What one write's size costs in the page cache (why agent/store/fill.py measures its write size, WriteSizer).

Writes 1 GiB (default) of random bytes into a new file with ``os.pwrite`` calls
of each size, after dropping the page cache and waiting ``--settle`` seconds,
and reports the CPU seconds per GiB the writes took (nearly all of it the
kernel's copy into page-cache folios). The kernel sizes new folios by the
write, so the figure shows whether large folios are dear on this machine: on a
VM whose host takes back free memory (virtio_balloon), writes of 2 MiB or more
cost several times what 1 MiB writes do once freed memory has been taken back
(``--settle 4``), and about the same right after the drop (``--settle 0``).

Usage (root, for drop_caches)::

    python bench/write_size.py --sizes 256KiB,1MiB,2MiB,4MiB --settle 0,4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.units import format_size, parse_size  # noqa: E402
from bench.cold_miss import drop_caches  # noqa: E402


def one(path: Path, total: int, size: int, settle: float, data: bytes) -> float:
    """CPU seconds per GiB of writing ``total`` bytes in ``size`` writes."""
    drop_caches()
    time.sleep(settle)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)[:size]
        before = os.times()
        for offset in range(0, total, size):
            os.pwrite(fd, view, offset)
        after = os.times()
    finally:
        os.close(fd)
        path.unlink()
    return (after.system - before.system + after.user - before.user) / (total / 2**30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", default="1GiB")
    ap.add_argument("--sizes", default="256KiB,1MiB,2MiB,4MiB")
    ap.add_argument("--settle", default="0,4", help="seconds between the drop and the writes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--path", default=str(ROOT / "bench" / "out" / "write_size.tmp"))
    args = ap.parse_args()
    total = parse_size(args.total)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    settles = [float(s) for s in args.settle.split(",")]
    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(max(sizes))
    results: dict[tuple[float, int], list[float]] = {}
    for r in range(args.rounds):
        for settle in settles:
            for size in sizes if r % 2 == 0 else reversed(sizes):
                results.setdefault((settle, size), []).append(one(path, total, size, settle, data))
    print("| write size | " + " | ".join(f"CPU s/GiB, settle {s:g} s" for s in settles) + " |")
    print("|---:|" + "---:|" * len(settles))
    for size in sizes:
        cells = [f"{statistics.median(results[(s, size)]):.2f}" for s in settles]
        print(f"| {format_size(size)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
