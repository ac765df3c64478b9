"""CPU the owner spends serving pieces to a peer: seconds of the agent process per 512 MiB sent.

One agent (a process, peer API on, plain HTTP) holds a model file fetched from
SeaweedFS; this script asks it for every piece of the file over and over, as a
peer would (``GET /peer/v1/piece`` with the token, keep-alive, one at a time),
until ``--bytes`` went out, and reads the agent's user+system CPU from
/proc/PID/stat before and after. A first pass (not counted) puts the blob in
the page cache, so the figure is the serving path's, not the disk's.

``--agent-root`` runs the agent from another source tree (e.g. an export of
the previous commit) for a before/after on the same machine:

    git archive HEAD~1 | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/peer_serve_cpu.py --agent-root /tmp/base --rounds 3
    python bench/peer_serve_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.manifest import Manifest  # noqa: E402
from agent.units import format_size, parse_size  # noqa: E402
from bench.cold_miss import proc_cpu  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.seaweedfs import SeaweedS3  # noqa: E402

TOKEN = "bench-peer-token-0123456789abcdef"
BUCKET = "bench"
REF = f"s3://{BUCKET}/serve/model"


def serve_pass(conn: http.client.HTTPConnection, base: dict[str, str], entry: object, want: int) -> int:
    """Ask for pieces in order (wrapping around) until ``want`` bytes came back; returns the bytes read."""
    got = 0
    count = entry.piece_count  # type: ignore[attr-defined]
    index = 0
    while got < want:
        path = "/peer/v1/piece?" + urllib.parse.urlencode({**base, "index": str(index % count)})
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"piece {index % count}: {r.status} {r.read()[:200]!r}")
        while chunk := r.read(4 * 1024 * 1024):
            got += len(chunk)
        index += 1
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128MiB", help="the model file (default 128MiB)")
    ap.add_argument("--bytes", default="512MiB", help="bytes served per round (default 512MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agent-root", default=str(ROOT), help="source tree the agent runs from")
    args = ap.parse_args()
    size, want = parse_size(args.size), parse_size(args.bytes)
    work = Path(tempfile.mkdtemp(prefix="peer-serve-cpu-"))
    try:
        src = work / "model"
        with open(src, "wb") as f:
            for _ in range(0, size, 1 << 20):
                f.write(os.urandom(min(1 << 20, size)))
            f.truncate(size)
        token = work / "token"
        token.write_text(TOKEN)
        with SeaweedS3(work / "weed") as sw:
            sw.make_bucket(BUCKET)
            sw.upload_file(src, BUCKET, "serve/model")
            env = {**os.environ, **sw.env, "PYTHONPATH": args.agent_root}
            agent = AgentProcess(work / "agent", env=env, capacity="8GiB",
                                 extra_args=("--peer-token-file", str(token)))
            agent.start()
            try:
                agent.cli("prefetch", REF, check=True)
                (mfile,) = (agent.cache_dir / "manifests").rglob("*.json")
                manifest = Manifest.from_json(json.loads(mfile.read_text()))
                (entry,) = manifest.files
                base = {"ref": REF, "rev": mfile.stem, "path": entry.path, "key": entry.fill_key,
                        "piece_size": str(entry.piece_size)}
                assert agent.pid is not None
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
                serve_pass(conn, base, entry, size)  # warm: page cache, connection, code paths
                rows = []
                for r in range(args.rounds):
                    c0, t0 = proc_cpu(agent.pid), time.monotonic()
                    got = serve_pass(conn, base, entry, want)
                    c1, t1 = proc_cpu(agent.pid), time.monotonic()
                    per512 = (c1 - c0) * (512 << 20) / got
                    rows.append((per512, got / (t1 - t0)))
                    print(json.dumps({"round": r, "bytes": got, "agent_cpu_s": round(c1 - c0, 3),
                                      "cpu_s_per_512MiB": round(per512, 3),
                                      "MiB_per_s": round(got / (t1 - t0) / (1 << 20), 1)}), flush=True)
                conn.close()
            finally:
                agent.stop()
        cpu = statistics.median(c for c, _ in rows)
        rate = statistics.median(b for _, b in rows)
        print(f"\nagent from {args.agent_root}: {format_size(size)} file, {format_size(want)} per round, "
              f"{args.rounds} rounds; median {cpu:.3f} CPU s / 512 MiB, {rate / (1 << 20):.0f} MiB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
