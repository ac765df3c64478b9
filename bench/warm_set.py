"""Declarative warm set vs `agent prefetch --all-nodes` (issue 9): time from the change to all nodes ready.

    python bench/warm_set.py --nodes 2,4 --rounds 3 [--models 2 --size 96MiB]

A real SeaweedFS on loopback holds ``--models`` models of random bytes (two files
each). Per round, N, and contender, N fresh agents (fresh caches) start on loopback
ports with a static ``--peers`` list and a token, and wait until they see each other:

- ``warm-set``: every agent runs with ``--warm-set`` pointing at one file laid out
  like a mounted ConfigMap (``..data`` symlink), holding an empty set. The clock
  starts just before the ``..data`` swap to a set listing every model (pin: true)
  and stops when every agent's ``GET /v1/warm-set`` shows every entry ready.
- ``prefetch``: the same agents' counterpart: the clock starts before one
  ``agent prefetch --all-nodes --pin REF`` per model is launched (all at once, as
  an operator's script would) against node 0, and stops when all have exited 0.

Contender order alternates by round. Medians per N and the ratio warm-set/prefetch
(target: at most 1.1) are printed as a markdown table and written with every
round's numbers to ``bench/out/warm_set-<time>.json``. Every node's blobs are
checked bit-exact after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xxhash

from agent.units import format_size, parse_size
from client.transport import AgentConnection
from tests.servers.agent_proc import AgentProcess
from tests.servers.configmap import ConfigMapDir
from tests.servers.ports import free_ports
from tests.servers.seaweedfs import SeaweedS3

TOKEN = "bench-warm-set-token-0123456789abcdef"


def _cluster(work: Path, n: int, env: dict[str, str], extra: tuple[str, ...]) -> list[AgentProcess]:
    token = work / "token"
    token.write_text(TOKEN)
    ports = free_ports(n)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    agents = [
        AgentProcess(work / f"node{i}", name=f"node{i}", env=env, capacity="8GiB", port=p,
                     extra_args=("--peers", peers, "--peer-token-file", str(token), "--peer-start-wait", "0", *extra))
        for i, p in enumerate(ports)
    ]
    for a in agents:
        a.start(wait=False)
    for a in agents:
        a.wait_ready()
    deadline = time.monotonic() + 30
    while True:
        views = [AgentConnection(str(a.socket_path)).request_json("GET", "/v1/stats") for a in agents]
        if all(sum(p["alive"] for p in v["peers"]) == n - 1 for v in views):
            return agents
        if time.monotonic() > deadline:
            raise RuntimeError(f"peers did not see each other: {views}")
        time.sleep(0.1)



def run_warm_set(work: Path, n: int, env: dict[str, str], refs: list[str]) -> float:
    cm = ConfigMapDir(work / "cm")
    cm.write("models: []\n")
    agents = _cluster(work, n, env, ("--warm-set", str(cm.path)))
    try:
        text = "models:\n" + "".join(f"  - ref: {r}\n    pin: true\n" for r in refs)
        started = time.monotonic()
        cm.write(text)
        waiting = list(agents)
        while waiting:
            st = AgentConnection(str(waiting[0].socket_path)).request_json("GET", "/v1/warm-set")
            entries = st["entries"]
            if len(entries) == len(refs) and all(e["state"] == "ready" for e in entries):
                waiting.pop(0)
                continue
            if any(e["state"] == "failed" for e in entries):
                raise RuntimeError(f"{waiting[0].name}: {entries}")
            time.sleep(0.02)
        return time.monotonic() - started
    finally:
        for a in agents:
            a.close()


def run_prefetch(work: Path, n: int, env: dict[str, str], refs: list[str]) -> float:
    agents = _cluster(work, n, env, ())
    try:
        run_env = {**env, "WARMSTART_SOCKET": str(agents[0].socket_path)}
        started = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "agent", "prefetch", "--all-nodes", "--pin", r],
                                  env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in refs]
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"prefetch failed: {out}\n{err}")
        return time.monotonic() - started
    finally:
        for a in agents:
            a.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--size", default="96MiB", help="bytes per model (two files: 3/4 and 1/4)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    seaweed = SeaweedS3(root / "seaweed")
    seaweed.start()
    results: dict[str, Any] = {"nodes": sizes, "rounds": args.rounds, "models": args.models, "model_bytes": size,
                               "runs": []}
    try:
        seaweed.make_bucket("bench")
        refs, blobs = [], []
        src = root / "src"
        src.mkdir()
        for m in range(args.models):
            for name, part in (("model.safetensors", size * 3 // 4), ("extra.bin", size - size * 3 // 4)):
                data = os.urandom(part)
                (src / f"{m}-{name}").write_bytes(data)
                seaweed.upload_file(src / f"{m}-{name}", "bench", f"model{m}/{name}")
                blobs.append(data)
            refs.append(f"s3://bench/model{m}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_")}
        env.update(seaweed.env)
        contenders = {"warm-set": run_warm_set, "prefetch": run_prefetch}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for n in sizes:
                for name in order:
                    work = root / f"r{r}-n{n}-{name}"
                    work.mkdir()
                    seconds = contenders[name](work, n, env, refs)
                    # (agents are closed; check their caches on disk)
                    for i in range(n):
                        for data in blobs:
                            p = work / f"node{i}" / f"node{i}-cache" / "blobs" / xxhash.xxh3_128_hexdigest(data)
                            if p.read_bytes() != data:
                                raise AssertionError(f"{p} differs")
                    shutil.rmtree(work, ignore_errors=True)
                    results["runs"].append({"round": r, "nodes": n, "contender": name, "seconds": seconds})
                    print(f"round {r} N={n} {name}: {seconds:.2f}s", flush=True)
    finally:
        seaweed.stop()
        shutil.rmtree(root, ignore_errors=True)
    rows = ["| N | warm set (median s) | prefetch --all-nodes (median s) | ratio | target |", "|---|---|---|---|---|"]
    summary = {}
    for n in sizes:
        med = {c: statistics.median(x["seconds"] for x in results["runs"] if x["nodes"] == n and x["contender"] == c)
               for c in ("warm-set", "prefetch")}
        ratio = med["warm-set"] / med["prefetch"]
        summary[n] = {**med, "ratio": ratio}
        rows.append(f"| {n} | {med['warm-set']:.2f} | {med['prefetch']:.2f} | {ratio:.2f}x | "
                    f"{'met' if ratio <= 1.1 else 'MISSED'} (<= 1.1x) |")
    results["summary"] = summary
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"warm_set-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / "warm_set-latest.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.models} models x {format_size(size)}, {args.rounds} rounds\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
