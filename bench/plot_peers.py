"""Draw bench/peers.png from a peers_netns.py result: time to all-ready and origin egress vs N.

    python bench/plot_peers.py [bench/out/peers-latest.json] [-o bench/peers.png]

Left: seconds until the slowest of N nodes has the model (every run as a dot, hollow where other
processes were busy during it; the medians the benchmark reported as a line) for warmstart with
peers, without peers, and the limit (model size / node link rate);
the dotted line is the target 1.3x the limit. Middle: origin egress (the origin veth's tx bytes)
as a multiple of the model size, with the 1.1x target. Right: for the largest N with peers,
each node's cumulative download and upload over time in one run (the median one), to see how
evenly the upload work is spread and whether anything stalls.
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
LABELS = {"peers": "warmstart, peers", "nopeers": "warmstart, no peers (origin only)"}
COLORS = {"peers": "tab:blue", "nopeers": "tab:orange"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", nargs="?", default=str(ROOT / "bench" / "out" / "peers-latest.json"))
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "peers.png"))
    args = ap.parse_args()

    raw = json.loads(Path(args.result).read_text())
    runs = [r for r in raw["runs"] if r["error"] is None]
    nodes = raw["nodes"]
    limit = raw["limit_s"]
    contenders = [c for c in ("peers", "nopeers") if any(r["contender"] == c for r in runs)]
    timeline_run = None
    if "peers" in contenders:
        big = [r for r in runs if r["contender"] == "peers" and r["nodes"] == max(nodes) and r.get("timeline")
               and not r.get("disturbed")]
        if big:
            big.sort(key=lambda r: r["seconds"])
            timeline_run = big[len(big) // 2]

    ncols = 3 if timeline_run else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.4))
    ax_t, ax_e = axes[0], axes[1]
    for c in contenders:
        xs, meds, exs = [], [], []
        for n in nodes:
            rs = [r for r in runs if r["contender"] == c and r["nodes"] == n]
            if not rs:
                continue
            for disturbed in (False, True):  # hollow: other processes were busy during the run
                sel = [r for r in rs if bool(r.get("disturbed")) == disturbed]
                style = {"facecolors": "none", "edgecolors": COLORS[c]} if disturbed else {"color": COLORS[c]}
                ax_t.scatter([n] * len(sel), [r["seconds"] for r in sel], s=14, alpha=0.6, **style)
                ax_e.scatter([n] * len(sel), [r["origin_egress_x_model"] for r in sel], s=14, alpha=0.6, **style)
            # the medians the benchmark reported (disturbed runs left out where an undisturbed one exists)
            m = raw.get("medians", {}).get(f"{n}/{c}")
            xs.append(n)
            meds.append(m["seconds"] if m else statistics.median(r["seconds"] for r in rs))
            exs.append(m["egress_x_model"] if m else statistics.median(r["origin_egress_x_model"] for r in rs))
        ax_t.plot(xs, meds, "-o", color=COLORS[c], label=LABELS[c])
        ax_e.plot(xs, exs, "-o", color=COLORS[c], label=LABELS[c])
    ax_t.plot(nodes, [limit] * len(nodes), "-", color="tab:green", label="limit: model / node link rate")
    ax_t.plot(nodes, [1.3 * limit] * len(nodes), ":", color="tab:green", label="target: 1.3x limit")
    ax_e.plot(nodes, [1.1] * len(nodes), ":", color="tab:green", label="target: 1.1x model")
    mib = raw["model_bytes"] / 2**20
    rate = raw["node_rate_mbit"]
    ax_t.set(xlabel="nodes N", ylabel="seconds until every node is ready",
             title=f"{mib:.0f} MiB model, {rate:g} Mbit/s per node link", xticks=nodes)  # fmt: skip
    ax_e.set(xlabel="nodes N", ylabel="origin egress / model size", title="bytes the origin sent", xticks=nodes)
    ax_t.set_ylim(bottom=0)
    ax_e.set_ylim(bottom=0)
    ax_t.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)

    if timeline_run:
        ax = axes[2]
        tl = timeline_run["timeline"]
        n = timeline_run["nodes"]
        cmap = plt.get_cmap("tab10")
        for i in range(n):
            ax.plot(tl["t"], tl[f"node{i + 1}_down_mb"], "-", color=cmap(i % 10), lw=1.2, label=f"node{i + 1}")
            ax.plot(tl["t"], tl[f"node{i + 1}_up_mb"], "--", color=cmap(i % 10), lw=0.9)
        ax.plot(tl["t"], tl["origin_mb"], "-", color="black", lw=2, label="origin sent")
        ax.axvline(limit, color="tab:green", lw=1)
        ax.set(xlabel="seconds since the prefetch", ylabel="MB (solid: downloaded, dashed: uploaded)",
               title=f"N={n} with peers, round {timeline_run['round']} ({timeline_run['seconds']:.1f} s)")  # fmt: skip
        ax.set_xlim(0, timeline_run["seconds"] + 1)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
