"""Time to the first tensor of a cold model over a slow link: streaming against waiting for the whole model.

What an inference server feels at start-up on a node whose cache lacks the
model: the weights come from S3 (SeaweedFS here) through a link limited to
``--rate`` (a real TCP relay with a token bucket, tests/servers/relay.py). Each
contender starts cold (fresh agent and cache, page cache dropped) and consumes
every tensor by copying it into one preallocated buffer (a stand-in for device
memory). Contenders:

- ``warmstart-stream``: ``client.iter_tensors(ref)``, tensors as their pieces verify;
- ``warmstart-whole``: ``agent prefetch`` then ``client.open_tensors`` (the model first, then the load);
- ``boto3+safetensors``: ``download_file`` of every file (s3transfer, through the same link), then
  ``safetensors.torch.load_file`` shard by shard.

Reported per contender: seconds to the first tensor and to the last, medians
over alternated rounds. The link is the bottleneck by design, so "last" is
about the same for all; "first" is what streaming changes.

    . .venv/bin/activate && python bench/first_tensor.py --size 256MiB --rate 64MiB --rounds 3
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

import torch  # noqa: E402
from cold_miss import drop_caches  # noqa: E402

import client  # noqa: E402
from agent.units import format_size, parse_size  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.relay import TcpRelay  # noqa: E402
from tests.servers.seaweedfs import SeaweedS3  # noqa: E402

BUCKET = "bench"
PREFIX = "streamed"


class Sink:
    """One preallocated buffer every tensor is copied into, back to back (touched before the clock)."""

    def __init__(self, total: int) -> None:
        self.buf = torch.ones(total, dtype=torch.uint8)
        self.pos = 0
        self.first: float | None = None

    def take(self, t: torch.Tensor, t0: float) -> None:
        flat = t.reshape(-1).view(torch.uint8)
        self.buf[self.pos : self.pos + flat.numel()].copy_(flat)
        self.pos += flat.numel()
        if self.first is None:
            self.first = time.perf_counter() - t0


def make_model(work: Path, size: int, shards: int) -> tuple[Path, int]:
    """``shards`` safetensors files of 16 random uint8 tensors each, plus the shard index."""
    from safetensors.torch import save_file

    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    per = size // shards // 16
    weight_map: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.{t}.weight": torch.randint(0, 256, (per,), dtype=torch.uint8, generator=g) for t in range(16)
        }
        save_file(tensors, str(src / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, per * 16 * shards


def run_stream(ctx: dict[str, Any], work: Path) -> tuple[float, float]:
    agent = ctx["start_agent"](work)
    try:
        sink = Sink(ctx["tensor_bytes"])
        t0 = time.perf_counter()
        for _, t in client.iter_tensors(f"s3://{BUCKET}/{PREFIX}", socket=str(agent.socket_path)):
            sink.take(t, t0)
        return sink.first or 0.0, time.perf_counter() - t0
    finally:
        agent.close()


def run_whole(ctx: dict[str, Any], work: Path) -> tuple[float, float]:
    agent = ctx["start_agent"](work)
    try:
        sink = Sink(ctx["tensor_bytes"])
        t0 = time.perf_counter()
        done = agent.cli("prefetch", f"s3://{BUCKET}/{PREFIX}", timeout=600)
        if done.returncode:
            raise RuntimeError(done.stderr)
        for t in client.open_tensors(f"s3://{BUCKET}/{PREFIX}", socket=str(agent.socket_path)).values():
            sink.take(t, t0)
        return sink.first or 0.0, time.perf_counter() - t0
    finally:
        agent.close()


def run_boto3(ctx: dict[str, Any], work: Path) -> tuple[float, float]:
    import boto3
    from safetensors.torch import load_file

    s3 = boto3.session.Session().client("s3", endpoint_url=ctx["relay_url"], region_name=ctx["env"]["AWS_REGION"],
                                        aws_access_key_id=ctx["env"]["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=ctx["env"]["AWS_SECRET_ACCESS_KEY"])
    dest = work / "boto3"
    dest.mkdir(parents=True, exist_ok=True)
    sink = Sink(ctx["tensor_bytes"])
    t0 = time.perf_counter()
    for name in ctx["files"]:
        s3.download_file(BUCKET, f"{PREFIX}/{name}", str(dest / name))
    for name in ctx["files"]:
        if name.endswith(".safetensors"):
            for t in load_file(str(dest / name)).values():
                sink.take(t, t0)
    return sink.first or 0.0, time.perf_counter() - t0


CONTENDERS = {"warmstart-stream": run_stream, "warmstart-whole": run_whole, "boto3+safetensors": run_boto3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rate", default="64MiB", help="link rate per second (default 64MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "first_tensor"))
    args = ap.parse_args()
    size, rate = parse_size(args.size), parse_size(args.rate)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, tensor_bytes = make_model(work, size, args.shards)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in CONTENDERS}
    with SeaweedS3(work / "seaweed") as sw:
        sw.make_bucket(BUCKET)
        files = sorted(p.name for p in src.iterdir())
        for name in files:
            sw.upload_file(src / name, BUCKET, f"{PREFIX}/{name}")
        shutil.rmtree(src)
        host, port = sw.endpoint_url.removeprefix("http://").split(":")
        relay = TcpRelay(host, int(port), rate=rate)
        env = {**os.environ, **sw.env, "AWS_ENDPOINT_URL": relay.url}
        runs = iter(range(10**6))

        def start_agent(where: Path) -> AgentProcess:
            agent = AgentProcess(where / f"agent{next(runs)}", env=env, capacity="20GiB")
            agent.start()
            deadline = time.monotonic() + 30
            while "origin clients ready" not in agent.log_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            return agent

        ctx = {"start_agent": start_agent, "tensor_bytes": tensor_bytes, "files": files, "env": sw.env,
               "relay_url": relay.url}
        try:
            for r in range(args.rounds):
                order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
                for name in order:
                    where = work / f"r{r}-{name}"
                    where.mkdir(parents=True)
                    drop_caches()
                    first, last = CONTENDERS[name](ctx, where)
                    results[name].append((first, last))
                    line = {"round": r, "contender": name, "first_s": round(first, 3), "last_s": round(last, 3)}
                    print(json.dumps(line), flush=True)
                    shutil.rmtree(where, ignore_errors=True)
        finally:
            relay.close()
    print(f"\n{format_size(size)} in {args.shards} shards over a {format_size(rate)}/s link, "
          f"{args.rounds} rounds, medians\n")
    print("| contender | first tensor s | last tensor s |\n|---|---:|---:|")
    for name, rows in results.items():
        first = statistics.median(f for f, _ in rows)
        last = statistics.median(last for _, last in rows)
        print(f"| {name} | {first:.2f} | {last:.2f} |")
    out = ROOT / "bench" / "out" / f"first_tensor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"size": size, "shards": args.shards, "rate": rate, "rounds": args.rounds,
                               "results": dict(results.items())}, indent=1))
    print(f"\nraw: {out}")


if __name__ == "__main__":
    main()
