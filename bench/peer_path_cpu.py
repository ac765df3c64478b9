"""CPU per GiB of the peer path (serving + receiving) against the origin path's, in one run (issue 24 item 3).

    python bench/peer_path_cpu.py --size 512MiB --rounds 3

SeaweedFS on loopback holds a model (``--size`` in ``--shards`` safetensors-free
files of random bytes). Each round, alternating which goes first:

- ``origin``: a fresh agent (no peers) prefetches the model from SeaweedFS; its
  CPU (user + system, all threads, from /proc) is the origin path's;
- ``peer`` (``--crc32c``: the objects are put with their CRC32C, which the
  store keeps, and B checks the peer's bytes against it instead of the ETag):
  a fresh agent B whose one peer, A, holds the model complete
  prefetches it; A's CPU (serving) plus B's (receiving) is the peer path's.
  B still reads the manifest from the origin (its listing), but every byte
  must come from A: the round fails if B's ``warmstart_fetched_bytes{source="origin"}``
  is not 0.

The S3 server's own CPU is left out of both (it stands for the object store,
not for anything the agents do). The model is in the page cache for both paths
(SeaweedFS's files and A's blobs were just written or read), so the figures are
the agents' CPU, not the disk's. Ratios are peer / origin per round; medians of
the rounds. Raw rounds: ``bench/out/peer_path_cpu-<time>.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import crc32c

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.units import format_size, parse_size  # noqa: E402
from bench.cold_miss import proc_cpu  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.ports import free_ports  # noqa: E402
from tests.servers.seaweedfs import SeaweedS3  # noqa: E402

TOKEN = "bench-peer-token-0123456789abcdef"
BUCKET = "bench"
REF = f"s3://{BUCKET}/peerpath"
GiB = 1 << 30


def fetched(agent: AgentProcess, source: str) -> float:
    """The agent's ``warmstart_fetched_bytes{source=...}`` from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^warmstart_fetched_bytes_total{{source="{source}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def timed_prefetch(agent: AgentProcess, others: list[AgentProcess]) -> tuple[float, float, float]:
    """Prefetch ``REF`` with ``agent``; (its CPU s, the others' CPU s, wall s)."""
    assert agent.pid is not None and all(o.pid is not None for o in others)
    c0, o0, t0 = proc_cpu(agent.pid), sum(proc_cpu(o.pid) for o in others if o.pid), time.monotonic()
    agent.cli("prefetch", REF, check=True, timeout=600)
    t1 = time.monotonic()
    c1, o1 = proc_cpu(agent.pid), sum(proc_cpu(o.pid) for o in others if o.pid)
    return c1 - c0, o1 - o0, t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512MiB", help="the model (default 512MiB)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crc32c", action="store_true",
                    help="put each object with its CRC32C (S3 keeps it): peers' bytes are checked against it, "
                         "not against the ETag's MD5")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="peer-path-cpu-"))
    rows: list[dict[str, float | int | str]] = []
    try:
        src = work / "model"
        src.mkdir()
        per = -(-size // args.shards)
        for k in range(args.shards):
            with open(src / f"shard-{k}.bin", "wb") as f:
                left = min(per, size - k * per)
                while left > 0:
                    f.write(os.urandom(min(1 << 24, left)))
                    left -= min(1 << 24, left)
        token = work / "token"
        token.write_text(TOKEN)
        with SeaweedS3(work / "weed") as sw:
            sw.make_bucket(BUCKET)
            for p in sorted(src.iterdir()):
                if args.crc32c:
                    data = p.read_bytes()
                    value = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
                    sw.client().put_object(Bucket=BUCKET, Key=f"peerpath/{p.name}", Body=data, ChecksumCRC32C=value)
                else:
                    sw.upload_file(p, BUCKET, f"peerpath/{p.name}")
            env = {**os.environ, **sw.env}
            pa, *_ = free_ports(1)
            holder = AgentProcess(work / "a", env=env, capacity="64GiB", name="a", port=pa,
                                  extra_args=("--peer-token-file", str(token)))
            holder.start()
            try:
                holder.cli("prefetch", REF, check=True, timeout=600)
                for r in range(args.rounds):
                    order = ("origin", "peer") if r % 2 == 0 else ("peer", "origin")
                    row: dict[str, float | int | str] = {"round": r, "first": order[0]}
                    for kind in order:
                        pb, *_ = free_ports(1, also_free_at=(pa,))
                        extra: tuple[str, ...] = ()
                        if kind == "peer":
                            extra += ("--peer-token-file", str(token), "--peers", f"127.0.0.1:{pa},127.0.0.1:{pb}")
                        node = AgentProcess(work / f"{kind}{r}", env=env, capacity="64GiB", name=f"{kind}{r}",
                                            port=pb, extra_args=extra)
                        node.start()
                        try:
                            if kind == "peer":
                                own, other, wall = timed_prefetch(node, [holder])
                                if fetched(node, "origin"):
                                    raise SystemExit(f"round {r}: the peer node took bytes from the origin")
                                row.update(peer_receive_cpu_s=own, peer_serve_cpu_s=other, peer_s=wall,
                                           peer_cpu_s=own + other)
                            else:
                                own, _, wall = timed_prefetch(node, [])
                                row.update(origin_cpu_s=own, origin_s=wall)
                        finally:
                            node.stop()
                            shutil.rmtree(node.cache_dir, ignore_errors=True)
                    row["ratio"] = float(row["peer_cpu_s"]) / float(row["origin_cpu_s"])
                    rows.append(row)
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                          flush=True)
            finally:
                holder.stop()
        gib = size / GiB

        def med(key: str) -> float:
            return statistics.median(float(x[key]) for x in rows)

        checked = "the store's CRC32C" if args.crc32c else "the ETag (MD5)"
        print(f"\n{format_size(size)} in {args.shards} files, {args.rounds} rounds alternated, peers' bytes checked "
              f"against {checked}; CPU s per GiB, medians:")
        print(f"  origin path (one agent receiving):   {med('origin_cpu_s') / gib:.2f}  ({med('origin_s'):.2f} s wall)")
        print(f"  peer path (B receiving + A serving): {med('peer_cpu_s') / gib:.2f}  ({med('peer_s'):.2f} s wall)")
        print(f"    receiving {med('peer_receive_cpu_s') / gib:.2f}, serving {med('peer_serve_cpu_s') / gib:.2f}")
        ratios = ", ".join(f"{float(x['ratio']):.2f}" for x in rows)
        print(f"  peer / origin per round: {ratios}; median {med('ratio'):.2f}")
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / f"peer_path_cpu-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
