"""Client memory while loading a cached model (issue 3): peak RSS against what the caller keeps.

A multi-shard model (bench/load_cached.py's generator, default 4 GiB) is put
into a real agent's cache; then, for each way of loading, a fresh Python
process loads it through ``client`` and reports how much its peak RSS
(``VmHWM``, reset after imports through ``/proc/self/clear_refs``) grew, the
part of that which is file pages shared with the page cache (``RssFile``) and
the part that is its own memory (``RssAnon``), and the bytes it keeps:

- ``keep``: ``open_tensors(ref)``, every tensor kept and read (zero-copy views);
- ``keep-copy``: ``open_tensors(ref, copy=True)``, kept and read (memory of its own);
- ``iter-drop``: ``iter_tensors(ref)``, each tensor read and dropped;
- ``ring``: ``iter_tensors(ref, device="meta", ring_bytes=...)``, the device path
  through the pinned ring (the meta device stands in for a GPU; the host side
  is the same), each tensor dropped.

Page cache is dropped before each process (cold). Usage::

    python bench/load_rss.py --size 4GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cold_miss import drop_caches  # noqa: E402
from load_cached import INDEX, write_model  # noqa: E402

from agent.units import format_size, parse_size  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402

MODES = ("keep", "keep-copy", "iter-drop", "ring")

_CHILD = r"""
import json, sys, time, torch, client

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

ref, mode, ring = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS: imports do not count
base = {k: status(k) for k in ("VmRSS", "RssFile", "RssAnon")}
t0 = time.perf_counter()
kept = {}
if mode in ("keep", "keep-copy"):
    kept = client.open_tensors(ref, copy=mode == "keep-copy")
    for t in kept.values():
        t.max()  # read every page
else:
    device = "meta" if mode == "ring" else "cpu"
    for name, t in client.iter_tensors(ref, device=device, ring_bytes=ring):
        if device == "cpu":
            t.max()
        del t
secs = time.perf_counter() - t0
out = {"seconds": secs, "kept_bytes": sum(t.numel() * t.element_size() for t in kept.values()),
       "peak_growth": status("VmHWM") - base["VmRSS"]}
out |= {f"{k}_growth": status(k) - base[k] for k in ("RssFile", "RssAnon")}
print(json.dumps(out))
"""


def run_mode(ref: str, mode: str, ring: int, env: dict[str, str]) -> dict:
    drop_caches()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, ref, mode, str(ring)],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--ring", default="256MiB", help="ring_bytes of the device path (default 256MiB, the client's)")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "rss-work"))
    ap.add_argument("--reuse", action="store_true", help="keep a model and cache already in --workdir")
    args = ap.parse_args()

    work = Path(args.workdir)
    src = work / "model"
    if not (args.reuse and (src / INDEX).exists()):
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        write_model(src, parse_size(args.size), args.shards)
    agent = AgentProcess(work / "agent", capacity="64GiB", cache_dir=work / "cache")
    agent.start()
    try:
        agent.cli("prefetch", str(src), check=True, timeout=900)
        env = {**os.environ, "WARMSTART_SOCKET": str(agent.socket_path), "PYTHONPATH": str(ROOT)}
        total = json.loads((src / INDEX).read_text())["metadata"]["total_size"]
        rows = []
        for mode in MODES:
            rec = {"mode": mode, **run_mode(str(src), mode, parse_size(args.ring), env)}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    finally:
        agent.close()

    print(f"\nmodel: {format_size(total)} of tensors in {args.shards} shards; ring {args.ring}\n")
    print("| mode | kept | peak RSS growth | of it file pages / own memory (at the end) | peak / kept "
          "| seconds (cold, incl. reading every tensor) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['peak_growth'] / r['kept_bytes']:.2f}" if r["kept_bytes"] else "-"
        print(
            f"| {r['mode']} | {format_size(r['kept_bytes'])} | {format_size(r['peak_growth'])} "
            f"| {format_size(max(0, r['RssFile_growth']))} / {format_size(max(0, r['RssAnon_growth']))} "
            f"| {ratio} | {r['seconds']:.2f} |"
        )
    out = ROOT / "bench" / "out" / f"load_rss-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "size": total, "rows": rows}, indent=1))
    print(f"\nraw numbers: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
