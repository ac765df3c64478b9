"""Draw bench/cold_miss.png from a cold_miss.py result: seconds per contender, every round and the median.

    python bench/plot_cold_miss.py [bench/out/cold_miss-latest.json] [-o bench/cold_miss.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", nargs="?", default=str(ROOT / "bench" / "out" / "cold_miss-latest.json"))
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "cold_miss.png"))
    args = ap.parse_args()

    raw = json.loads(Path(args.result).read_text())
    rounds = [r for r in raw["per_round"] if r["error"] is None]
    names = list(dict.fromkeys(r["contender"] for r in rounds))
    medians = {n: statistics.median(r["seconds"] for r in rounds if r["contender"] == n) for n in names}
    names.sort(key=medians.__getitem__)
    gib = raw["total_bytes"] / 2**30

    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.6))
    colors = ["tab:green" if n.startswith("warmstart") else "tab:gray" if n.startswith("curl") else "tab:blue"
              for n in names]  # fmt: skip
    ax.barh(names, [medians[n] for n in names], color=colors, alpha=0.75)
    for i, n in enumerate(names):
        xs = [r["seconds"] for r in rounds if r["contender"] == n]
        ax.scatter(xs, [i] * len(xs), color="black", s=10, zorder=3)
        ax.text(max(xs), i, f"  median {medians[n]:.2f} s ({gib / medians[n]:.2f} GiB/s)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to have every byte (median bar, rounds as dots; lower is better)")
    ax.set_title(
        f"Cold miss: {gib:.1f} GiB in {raw['shards']} shards from SeaweedFS S3 on loopback, "
        f"{raw['cpus']} CPUs, {raw['rounds']} rounds",
        fontsize=9,
    )
    ax.set_xlim(0, max(r["seconds"] for r in rounds) * 1.35)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
