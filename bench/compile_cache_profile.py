"""Where a peer restore's time goes, against the hand copy (issue 24 item 7).

    python bench/compile_cache_profile.py --rounds 6

Same two agents as bench/compile_cache.py (loopback, static peers, token,
``--artifact-trust signed``: A signs, B verifies) and the same ``small``
module. A compiles it cold once and publishes; then each round runs three
fresh processes, each with a fresh Inductor directory, in an order that
rotates every round and reverses after the third (so each contender takes
each position twice in six rounds, and a slot effect such as "right after a
cold compile" cannot favour one of them):

- ``peer``: B's copy is dropped first, then ``compile_cache(key)`` asks B,
  which fetches the bundle from A, checks digest and signature, stores it,
  and the client unpacks it (``publish=False``: nothing is timed after);
- ``hand``: ``TORCHINDUCTOR_CACHE_DIR`` = a ``copytree`` of A's directory made
  beforehand (not timed);
- ``hand+import``: the hand copy, plus ``import client`` and the fingerprint,
  to see whether the client's imports alone change the compile after them.

Why timestamps by wrapping: the restore is tens of milliseconds inside a
multi-second compile, so each step is stamped from the same clock as the
first output: ``import client``, fingerprint, the agent's ``/v1/artifacts/get``
(sent and answered: B's fetch from A, digest and signature check and store),
``Bundle.install`` (begin and end), entered, first output. Inductor's own
per-phase totals (``compilation_time_metrics``) show where the compile after
the restore spends its time. Raw rounds go to
``bench/out/compile_cache_profile-latest.json``.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compile_cache import WORKER, start_nodes, worker_env  # noqa: E402 - after the path insert, as in the other benches

PROF = r'''
import json, os, sys, time
t_start = time.perf_counter()
import torch
from torch._dynamo.utils import counters
MODEL_SRC
marks = {}
def mark(n): marks[n] = round(time.perf_counter() - t0, 4)
t0 = time.perf_counter()
if mode in ("peer", "hand+import"):
    import client
    mark("import_client")
    import importlib
    ccm, cb, ct = (importlib.import_module(n) for n in ("client.compile_cache", "client.bundles", "client.transport"))
    orig_req = ct.AgentConnection.request_json
    def req(self, *a, **k):
        mark("get_sent"); r = orig_req(self, *a, **k); mark("get_answered"); return r
    ct.AgentConnection.request_json = req
    orig_inst = cb.Bundle.install
    def inst(self, *a, **k):
        mark("install_begin"); r = orig_inst(self, *a, **k); mark("install_end"); return r
    cb.Bundle.install = inst
    orig_fp = ccm.current_fingerprint
    def fp(*a, **k):
        r = orig_fp(*a, **k); mark("fingerprint"); return r
    ccm.current_fingerprint = fp
if mode == "peer":
    cm = ccm.compile_cache(key, strict=True, publish=False)
    cc = cm.__enter__()
    mark("entered")
elif mode == "hand+import":
    ccm.current_fingerprint("torch-compile")
with torch.no_grad():
    y = torch.compile(model)(x)
mark("first_output")
from torch._dynamo.utils import compilation_time_metrics as ctm
print(json.dumps({"marks": marks, "first_output_s": marks["first_output"],
                  "phases": {k: round(sum(v), 4) for k, v in ctm.items()},
                  "fx": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
                  "import_torch_s": round(t0 - t_start, 3)}))
'''
_ARGS = "model_name, mode, key, mega_path, device = sys.argv[1:6]"
# the bench's module definitions verbatim, then its "small" module and input
PROF = PROF.replace("MODEL_SRC", _ARGS + WORKER.split("torch.manual_seed(0)")[0].split(_ARGS)[1]
                    + "torch.manual_seed(0)\nmodel, x = Stack([Attn(64)], 64).eval(), torch.randn(2, 16, 64)\n")
MODES = ("peer", "hand", "hand+import")


def _run(script: Path, text: str, mode: str, key: str, env: dict[str, str]) -> dict[str, Any]:
    if not script.exists():
        script.write_text(text)
    done = subprocess.run([sys.executable, str(script), "small", mode, key, "-", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-cc-prof-"))
    base = dict(os.environ)
    agents = start_nodes(work, "signed", base)
    a, b = agents
    res: list[dict[str, Any]] = []
    try:
        key = "prof-small-" + os.urandom(3).hex()
        cold = _run(work / "worker.py", WORKER, "cold", key, worker_env(base, work / "home-a", str(a.socket_path)))
        print(f"cold {cold['first_output_s']:.2f}s", flush=True)
        src = Path(cold["dir"])
        for r in range(args.rounds):
            order = list(MODES[r % 3:] + MODES[:r % 3])
            if r % 6 >= 3:
                order.reverse()
            row: dict[str, Any] = {}
            for pos, m in enumerate(order):
                run_dir = work / f"r{r}-{m}"
                if m == "peer":
                    b.cli("artifacts", "rm", key, check=True)  # so B fetches from A again
                    env = worker_env(base, run_dir / "home-b", str(b.socket_path))
                else:
                    shutil.copytree(src, run_dir / "hand", ignore=shutil.ignore_patterns("locks"))
                    env = worker_env(base, run_dir / "home-h", str(b.socket_path), run_dir / "hand")
                row[m] = _run(work / "prof.py", PROF, m, key, env) | {"pos": pos}
            res.append(row)
            print(f"round {r + 1} {order}: " + "; ".join(f"{m} {row[m]['first_output_s']:.2f}s {row[m]['marks']}"
                                                         for m in order), flush=True)
    finally:
        for ag in agents:
            ag.close()
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compile_cache_profile-latest.json").write_text(json.dumps(res, indent=1))
    for m in MODES:
        fo = [row[m]["first_output_s"] for row in res]
        print(f"{m}: median {statistics.median(fo):.2f}s, rounds {', '.join(f'{v:.2f}' for v in fo)}")
    print("peer / hand per round:", ", ".join(f"{row['peer']['first_output_s'] / row['hand']['first_output_s']:.2f}"
                                               for row in res))
    for step, (s0, s1) in {"import client": ("", "import_client"), "fingerprint": ("import_client", "fingerprint"),
                           "get (fetch, verify, store)": ("get_sent", "get_answered"),
                           "install (unpack)": ("install_begin", "install_end"), "whole restore": ("", "entered")
                           }.items():
        v = [row["peer"]["marks"][s1] - (row["peer"]["marks"][s0] if s0 else 0.0) for row in res]
        print(f"peer {step}: median {statistics.median(v) * 1000:.1f} ms ({min(v) * 1000:.1f}-{max(v) * 1000:.1f})")
    for k in sorted({k for row in res for m in MODES for k in row[m]["phases"]}):
        print(k, ", ".join(f"{m} {statistics.median(row[m]['phases'].get(k, 0.0) for row in res):.3f}s"
                           for m in MODES))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
