"""Cold torch.compile versus compile with artifacts restored from a peer (issue 5).

    python bench/compile_cache.py --rounds 3 [--models small,mlp] [--device cuda]

Two real agents on loopback with a static peer list and a token, under
``--artifact-trust signed`` (the default here; ``--trust token`` for the old
behaviour): A signs what it publishes with an ed25519 key, B loads only what
that key signed (agent/artifacts/signing.py). Per round and
model, each contender is a fresh Python process with fresh Inductor
directories, timed from just before ``compile_cache`` is entered (or the cache
is loaded) to the first output of the compiled module (torch is imported and
the module built before the clock starts, the same for all):

- ``cold``: node A, ``compile_cache(key)`` finds nothing, compiles, publishes on exit
  (publish time reported apart; a new key per round so every cold run is cold);
- ``peer``: node B, ``compile_cache(key)`` fetches A's bundle over the peer API,
  installs it, compiles (restore included in the time);
- ``peer+mega``: the same with ``mega=True`` (also ``load_cache_artifacts`` of the
  bundle's Mega-Cache); B's copy is dropped first so it comes from A again;
- ``hand copy``: ``TORCHINDUCTOR_CACHE_DIR`` = a copy of A's directory made
  beforehand (the copy is not timed: a generous baseline);
- ``mega only``: empty Inductor dir, ``load_cache_artifacts`` of A's Mega-Cache.

Within a round they run in that order, except that every second round runs the
hand copy first, right after ``cold`` (where a run is slotted moves it by as
much as the restore costs). Every run reports Inductor's FX-graph and AOTAutograd cache counters, so a
fast run that did not hit is visible. One throwaway compile per model comes
first (a fresh venv spends seconds writing bytecode on its first compile).
Medians over rounds, ratios to ``cold``; raw rounds go to
``bench/out/compile_cache-<time>.json`` (and ``compile_cache-latest.json``).

``--device cuda``: module and input live on the GPU, so Inductor generates Triton
kernels (their cache lives under the fresh Inductor directory as well) and the
first output is waited for with ``torch.cuda.synchronize()`` before the clock stops.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = r'''
import json, os, sys, time
import torch
from torch._dynamo.utils import counters

model_name, mode, key, mega_path, device = sys.argv[1:6]

class Attn(torch.nn.Module):  # "small": a transformer-like block
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

class Block(torch.nn.Module):  # "mlp": the reference's 6-layer 256-wide MLP
    def __init__(self, d):
        super().__init__()
        self.ln, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))

class Stack(torch.nn.Module):
    def __init__(self, blocks, d):
        super().__init__()
        self.blocks, self.head = torch.nn.ModuleList(blocks), torch.nn.Linear(d, d)
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return torch.softmax(self.head(x), dim=-1)

torch.manual_seed(0)
if model_name == "small":
    model, x = Stack([Attn(64)], 64).eval(), torch.randn(2, 16, 64)
else:
    model, x = Stack([Block(256) for _ in range(6)], 256).eval(), torch.randn(8, 256)
model, x = model.to(device), x.to(device)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
out = {}
t0 = time.perf_counter()
if mode in ("cold", "peer", "peer+mega"):
    import client
    cm = client.compile_cache(key, strict=True, mega=(mode == "peer+mega"))
    cc = cm.__enter__()
    out["restore_s"] = time.perf_counter() - t0
    with torch.no_grad():
        y = torch.compile(model)(x)
    sync()
    out["first_output_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cm.__exit__(None, None, None)
    out["exit_s"] = time.perf_counter() - t1
    out.update(source=cc.source, files=cc.files_restored, dir=cc.inductor_dir, mega_loaded=cc.mega_loaded,
               published=cc.published and cc.published["digest"], bundle_bytes=cc.published and cc.published["size"])
else:
    if mode == "mega only":
        with open(mega_path, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
        out["restore_s"] = time.perf_counter() - t0
    with torch.no_grad():
        y = torch.compile(model)(x)
    sync()
    out["first_output_s"] = time.perf_counter() - t0
out["inductor"] = dict(counters["inductor"])
out["aot"] = dict(counters["aot_autograd"])
print(json.dumps(out))
'''

CONTENDERS = ("cold", "peer", "peer+mega", "hand copy", "mega only")


DEVICE = "cpu"  # --device; every worker compiles for it


def _worker(work: Path, model: str, mode: str, key: str, env: dict[str, str], mega: str = "-") -> dict[str, Any]:
    script = work / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    done = subprocess.run([sys.executable, str(script), model, mode, key, mega, DEVICE], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{model}/{mode} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def worker_env(base: dict[str, str], home: Path, socket: str | None, inductor: Path | None = None) -> dict[str, str]:
    """A worker's environment: its own cache home, a node's socket, and for a hand copy the Inductor directory."""
    env = {k: v for k, v in base.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(home)
    if socket:
        env["WARMSTART_SOCKET"] = socket
    if inductor is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    return env


def start_nodes(work: Path, trust: str, base: dict[str, str]) -> list[Any]:
    """Nodes A and B (started ``AgentProcess``es) on loopback, peers of each other with a token, under
    ``--artifact-trust trust``: A signs what it publishes, B trusts A's public key."""
    from tests.servers.agent_proc import AgentProcess
    from tests.servers.pki import make_signing_key
    from tests.servers.ports import free_ports

    token = work / "token"
    token.write_text("bench-token-" + os.urandom(8).hex())
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    private, public = make_signing_key(work / "keys")
    trust_args = ["--artifact-trust", trust, "--artifact-trusted-keys", str(public)]
    signing = [["--artifact-signing-key", str(private)], []]
    agents = [AgentProcess(work / f"node{i}", name=f"node{i}", port=p, env=base,
                           extra_args=["--peers", peers, "--peer-token-file", str(token), *trust_args, *signing[i],
                                       "--peer-start-wait", "0"])
              for i, p in enumerate(ports)]
    for agent in agents:
        agent.start()
    return agents


def _hits(r: dict[str, Any]) -> str:
    ind, aot = r["inductor"], r["aot"]
    return (f"fx hit {ind.get('fxgraph_cache_hit', 0)} miss {ind.get('fxgraph_cache_miss', 0)}, "
            f"aot hit {aot.get('autograd_cache_hit', 0)} miss {aot.get('autograd_cache_miss', 0)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="small,mlp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--device", default="cpu", help="cpu (default: Inductor's C++ kernels) or cuda[:N] (Triton)")
    ap.add_argument("--trust", default="signed", choices=("signed", "token"),
                    help="--artifact-trust of both agents (signed: A holds the signing key, B the public key)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {DEVICE}: torch {torch.__version__} sees no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="ws-cc-bench-"))
    base = dict(os.environ)
    agents = start_nodes(work, args.trust, base)
    a, b = agents
    models = args.models.split(",")
    raw: dict[str, list[dict[str, Any]]] = {f"{m}/{c}": [] for m in models for c in CONTENDERS}
    try:
        for m in models:
            t = time.perf_counter()
            _worker(work, m, "hand copy", "-", worker_env(base, work / "warmup-home", None, work / f"warmup-{m}"))
            print(f"warm-up compile of {m}: {time.perf_counter() - t:.1f}s", flush=True)
        for r in range(args.rounds):
            for m in models:
                key = f"bench-{m}-{r}-{os.urandom(3).hex()}"
                run = work / f"r{r}-{m}"
                res: dict[str, dict[str, Any]] = {}
                res["cold"] = _worker(work, m, "cold", key, worker_env(base, run / "home-a", str(a.socket_path)))
                src = Path(res["cold"]["dir"])
                t = time.perf_counter()
                shutil.copytree(src, run / "hand", ignore=shutil.ignore_patterns("locks"))
                copy_s = time.perf_counter() - t
                # Alternate which of hand copy and peer runs right after the cold compile: the slot
                # alone moves a run by as much as the restore's cost (bench/RESULTS.md, issue 24 item 7).
                hand_first = r % 2 == 1
                hand_env = worker_env(base, run / "home-h", None, run / "hand")
                if hand_first:
                    res["hand copy"] = _worker(work, m, "hand copy", key, hand_env)
                res["peer"] = _worker(work, m, "peer", key, worker_env(base, run / "home-b", str(b.socket_path)))
                b.cli("artifacts", "rm", key, check=True)  # so peer+mega comes from A again
                res["peer+mega"] = _worker(work, m, "peer+mega", key,
                                           worker_env(base, run / "home-b2", str(b.socket_path)))
                if not hand_first:
                    res["hand copy"] = _worker(work, m, "hand copy", key, hand_env)
                with client_bundle(a, key) as mega:
                    res["mega only"] = _worker(work, m, "mega only", key,
                                               worker_env(base, run / "home-m", None, run / "mega-ind"), mega)
                res["hand copy"]["copy_s"] = copy_s
                res["hand copy"]["hand_first"] = hand_first
                for c in CONTENDERS:
                    raw[f"{m}/{c}"].append(res[c])
                print(f"round {r + 1} {m}{' (hand copy first)' if hand_first else ''}: " + "; ".join(
                    f"{c} {res[c]['first_output_s']:.2f}s ({_hits(res[c])})" for c in CONTENDERS), flush=True)
    finally:
        for ag in agents:
            ag.close()
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"compile_cache-{stamp}.json").write_text(json.dumps(raw, indent=1))
    (out_dir / "compile_cache-latest.json").write_text(json.dumps(raw, indent=1))
    print(f"\nraw: bench/out/compile_cache-{stamp}.json (device {DEVICE}, --artifact-trust {args.trust})\n")
    print("| model | contender | first output, median s | vs cold | restore s | cache counters (last round) |")
    print("|---|---|---:|---:|---:|---|")
    for m in models:
        cold = statistics.median(x["first_output_s"] for x in raw[f"{m}/cold"])
        for c in CONTENDERS:
            rs = raw[f"{m}/{c}"]
            med = statistics.median(x["first_output_s"] for x in rs)
            restore = statistics.median(x.get("restore_s", 0.0) for x in rs)
            print(f"| {m} | {c} | {med:.2f} | {cold / med:.1f}x | {restore:.2f} | {_hits(rs[-1])} |")
        bundle = raw[f"{m}/cold"][-1].get("bundle_bytes") or 0
        publish = statistics.median(x.get("exit_s", 0.0) for x in raw[f"{m}/cold"])
        copy = statistics.median(x["copy_s"] for x in raw[f"{m}/hand copy"])
        ratios = ", ".join(f"{p['first_output_s'] / h['first_output_s']:.2f}"
                           for p, h in zip(raw[f"{m}/peer"], raw[f"{m}/hand copy"], strict=True))
        print(f"| {m} | (bundle {bundle / 1e6:.1f} MB; publish on exit {publish:.2f}s; "
              f"hand copytree {copy:.2f}s) | | | | |")
        print(f"| {m} | (peer / hand copy per round: {ratios}) | | | | |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


class client_bundle:
    """The Mega-Cache bytes of A's bundle for ``key``, written to a file for the ``mega only`` worker."""

    def __init__(self, agent: Any, key: str) -> None:
        self.agent, self.key = agent, key

    def __enter__(self) -> str:
        from client.artifacts import list_artifacts, open_bundle

        (entry,) = list_artifacts(self.key, socket=str(self.agent.socket_path))["artifacts"]
        with open_bundle(self.key, entry["fingerprint"], socket=str(self.agent.socket_path), peers=False) as (_, b):
            data = b.read("mega.bin") or b""
        self.path = self.agent.workdir / f"{self.key}-mega.bin"
        self.path.write_bytes(data)
        return str(self.path)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
