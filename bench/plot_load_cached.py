"""Draw bench/load_cached.png from a load_cached.py result: GB/s per contender, cold and warm, rounds and median.

    python bench/plot_load_cached.py [bench/out/load_cached-latest.json] [-o bench/load_cached.png]
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


def color(name: str) -> str:
    return "tab:green" if name.startswith("ws-") else "tab:gray" if name.startswith("pread") else "tab:blue"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", nargs="?", default=str(ROOT / "bench" / "out" / "load_cached-latest.json"))
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "load_cached.png"))
    args = ap.parse_args()

    raw = json.loads(Path(args.result).read_text())
    rounds = [r for r in raw["per_round"] if r["error"] is None]
    names = list(dict.fromkeys(r["contender"] for r in rounds))
    temps = [t for t in ("cold", "warm") if any(r["temp"] == t for r in rounds)]
    gib = raw["total_bytes"] / 2**30

    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 0.5 * len(names) + 1.8), sharey=True)
    axes = [axes] if len(temps) == 1 else list(axes)
    for ax, temp in zip(axes, temps, strict=True):
        speeds = {n: [r["gb_per_s"] for r in rounds if r["contender"] == n and r["temp"] == temp] for n in names}
        med = {n: statistics.median(v) for n, v in speeds.items() if v}
        shown = [n for n in names if n in med]
        ax.barh(shown, [med[n] for n in shown], color=[color(n) for n in shown], alpha=0.75)
        for i, n in enumerate(shown):
            ax.scatter(speeds[n], [i] * len(speeds[n]), color="black", s=10, zorder=3)
            ax.text(max(speeds[n]), i, f"  {med[n]:.2f}", va="center", fontsize=8)
        ax.set_title(f"{temp} ({'page cache dropped' if temp == 'cold' else 'files in page cache'})", fontsize=9)
        ax.set_xlabel("GB/s into one preallocated buffer (median bar, rounds as dots; higher is better)", fontsize=8)
        ax.set_xlim(0, max(max(v) for v in speeds.values() if v) * 1.25)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"Load from the node cache: {gib:.2f} GiB, {raw['tensors']} tensors in {raw['shards']} shards, "
        f"{raw['cpus']} CPUs, {raw['rounds']} rounds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
