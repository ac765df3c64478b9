"""Cold-miss benchmark (issue 2): time to get a multi-shard model from S3 onto local disk.

Contenders, all against the same objects in a real S3 server (SeaweedFS on
loopback, tests.servers.seaweedfs), each round in a fresh destination on the
same disk. Every contender starts its clock through :func:`start_clock`: the
page cache is dropped (when we may), then ``--settle`` seconds pass, then the
clock starts. Whatever a contender prepares outside the clock (the agent's
start, a boto3 client) happens *before* the drop, so all contenders meet the
same memory state. That matters on this VM (virtio_balloon loaded): pages freed
a few seconds earlier make the next writes into the page cache up to 10x more
expensive than pages freed just before (bench/RESULTS.md "Cold miss: the
clock started unequally"). ``--settle 0`` is the bare-metal case; ``--settle 4``
makes every contender write into reclaimed memory.

- ``warmstart-cN``: a fresh ``agent serve`` (fresh cache dir, ``--connections N``)
  started *before* the clock; timed is ``python -m agent prefetch s3://bench/model``
  (the CLI, interpreter start included) until it exits; ``warmstart-c8-drop`` the same
  with ``--drop-behind`` (the fill writes back and drops the blobs from RAM as it verifies them),
  ``warmstart-c8-p32`` / ``-p64`` with 32 / 64 MiB pieces instead of 16 (fewer, longer requests);
- ``boto3-par``: ``client.download_file`` (s3transfer, default TransferConfig) per
  shard, one thread per shard; ``boto3-seq``: the same, one shard after another
  (client made before the clock: interpreter start and client creation are not timed);
- ``s5cmd``: ``s5cmd --endpoint-url URL cp 's3://bench/model/*' DEST/``;
- ``curl-seq``: one ``curl -s -o /dev/null`` per shard, one after another (the raw
  single-stream ceiling: nothing is written to disk); ``curl-par``: all shards at once;
  ``curl-par-files``: all shards at once into files in DEST, the machine's raw copy speed (no
  hashing, no verification, nothing but the transfer and the page-cache writes).

``--server-cpus 0`` pins the S3 server to CPU 0 and every contender to the other CPUs, as
if S3 were another machine (by default all share every CPU, and the server's CPU is most of
the work: bench/RESULTS.md).

Usage::

    python bench/cold_miss.py --size 1GiB --shards 4 --rounds 3

Writes bench/out/cold_miss-<time>.json (raw per-round numbers) and prints a
markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.units import parse_size  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.seaweedfs import SeaweedS3  # noqa: E402

BUCKET = "bench"
PREFIX = "model"
CHUNK = 64 << 20


def write_shard(path: Path, size: int, tensors: int = 4) -> int:
    """A valid safetensors file of about ``size`` bytes: ``tensors`` uint8 tensors of random bytes.

    Written header-first then os.urandom in 64 MiB chunks, so memory stays small.
    Returns the file's size.
    """
    per = size // tensors
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in range(tensors):
        header[f"layer{t}.weight"] = {"dtype": "U8", "shape": [per], "data_offsets": [off, off + per]}
        off += per
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = off
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
    return path.stat().st_size


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def start_clock(ctx: dict) -> float:
    """Delete the previous contender's output, drop the page cache, wait ``ctx["settle"]`` seconds,
    return the start time: one way for all, so every contender finds the same free memory."""
    previous = ctx.pop("previous", None)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    if not ctx["no_drop"]:
        ctx["dropped"] = drop_caches()
    if ctx["settle"]:
        time.sleep(ctx["settle"])
    return time.perf_counter()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process plus its waited-for children (boto3 threads, CLIs, s5cmd, curl)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pin_apart(server_pid: int, server_cpus: set[int]) -> None:
    """Every thread of the S3 server on ``server_cpus``; this process (and so every contender it
    starts from now on) on the other CPUs. Threads the server makes later inherit their maker's."""
    rest = set(os.sched_getaffinity(0)) - server_cpus
    if not rest or not server_cpus <= set(os.sched_getaffinity(0)):
        raise SystemExit(f"--server-cpus {sorted(server_cpus)} must leave CPUs for the contenders")
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), server_cpus)
    os.sched_setaffinity(0, rest)
    print(f"S3 server on CPUs {sorted(server_cpus)}, contenders on {sorted(rest)}", flush=True)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- contenders
# Each takes (ctx, dest) and returns (seconds, extra-info dict); setup is outside the clock.


def run_warmstart(ctx: dict, dest: Path, connections: int, *extra: str, code: str | None = None) -> tuple[float, dict]:
    """``code``: another checkout's root, whose agent runs instead of this one's (``--baseline``)."""
    env = {**os.environ, **ctx["env"]}
    if code is not None:
        env["PYTHONPATH"] = code
    agent = AgentProcess(
        dest / "agentwork",
        env=env,
        capacity="20GiB",
        cache_dir=dest / "cache",
        extra_args=("--connections", str(connections), *extra),
    )
    agent.start()
    try:
        assert agent.pid is not None
        # A node's agent has been up long before a scaling event: let it finish building
        # its S3 client (a few hundred ms of botocore start-up) before the clock starts.
        deadline = time.monotonic() + 30
        while "origin clients ready" not in agent.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = start_clock(ctx)
        agent_cpu0, cli_cpu0 = proc_cpu(agent.pid), own_cpu()
        done = agent.cli("prefetch", f"s3://{BUCKET}/{PREFIX}", timeout=600)
        secs = time.perf_counter() - t0
        # the agent's CPU while it fetched, plus the CLI's (not the agent's start-up and shutdown)
        ctx["agent_cpu"] = proc_cpu(agent.pid) - agent_cpu0 + own_cpu() - cli_cpu0
        if done.returncode != 0:
            raise RuntimeError(
                f"prefetch failed rc={done.returncode}\n{done.stdout}\n{done.stderr}\n{agent.log_tail()}"
            )
        blobs = dir_bytes(dest / "cache" / "blobs")
        info = {"cli_stdout": done.stdout.strip(), "blob_bytes": blobs}
        if blobs < ctx["total"]:
            raise RuntimeError(f"agent cache has {blobs} blob bytes, want {ctx['total']}")
    finally:
        agent.close()
        log = agent.log_text()
        ctx.setdefault("agent_logs", []).append(log)
    return secs, info


def _boto3_client(ctx: dict):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=ctx["endpoint"],
        aws_access_key_id=ctx["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ctx["env"]["AWS_SECRET_ACCESS_KEY"],
        region_name=ctx["env"]["AWS_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


def run_boto3(ctx: dict, dest: Path, parallel: bool) -> tuple[float, dict]:
    s3 = _boto3_client(ctx)
    dest.mkdir(parents=True, exist_ok=True)
    keys = ctx["keys"]
    t0 = start_clock(ctx)
    if parallel:
        errors: list[BaseException] = []

        def one(k: str) -> None:
            try:
                s3.download_file(BUCKET, k, str(dest / Path(k).name))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    else:
        for k in keys:
            s3.download_file(BUCKET, k, str(dest / Path(k).name))
    secs = time.perf_counter() - t0
    got = dir_bytes(dest)
    if got != ctx["total"]:
        raise RuntimeError(f"boto3 wrote {got} bytes, want {ctx['total']}")
    return secs, {}


def run_s5cmd(ctx: dict, dest: Path) -> tuple[float, dict]:
    dest.mkdir(parents=True, exist_ok=True)
    s5 = str(Path(sys.executable).parent / "s5cmd")
    if not os.path.exists(s5):
        s5 = shutil.which("s5cmd") or "s5cmd"
    cmd = [s5, "--endpoint-url", ctx["endpoint"], "cp", f"s3://{BUCKET}/{PREFIX}/*", str(dest) + "/"]
    t0 = start_clock(ctx)
    done = subprocess.run(cmd, env={**os.environ, **ctx["env"]}, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"s5cmd failed: {done.stderr}")
    got = dir_bytes(dest)
    if got != ctx["total"]:
        raise RuntimeError(f"s5cmd wrote {got} bytes, want {ctx['total']}")
    return secs, {}


def run_curl(ctx: dict, dest: Path, parallel: bool, to_files: bool = False) -> tuple[float, dict]:
    urls = [f"{ctx['endpoint']}/{BUCKET}/{k}" for k in ctx["keys"]]
    base = ["curl", "-s", "-f", "-w", "%{size_download}\n"]
    outs_to = [str(dest / Path(k).name) if to_files else "/dev/null" for k in ctx["keys"]]
    t0 = start_clock(ctx)
    if parallel:
        procs = [
            subprocess.Popen([*base, "-o", o, u], stdout=subprocess.PIPE, text=True)
            for o, u in zip(outs_to, urls, strict=True)
        ]
        outs = [p.communicate()[0] for p in procs]
        rcs = [p.returncode for p in procs]
    else:
        outs, rcs = [], []
        for o, u in zip(outs_to, urls, strict=True):
            d = subprocess.run([*base, "-o", o, u], capture_output=True, text=True)
            outs.append(d.stdout)
            rcs.append(d.returncode)
    secs = time.perf_counter() - t0
    got = sum(int(o.strip() or 0) for o in outs)
    if any(rcs) or got != ctx["total"] or (to_files and dir_bytes(dest) != ctx["total"]):
        raise RuntimeError(f"curl rcs={rcs} got {got} bytes, want {ctx['total']}")
    return secs, {}


CONTENDERS = {
    "warmstart-c8": lambda c, d: run_warmstart(c, d, 8),
    # warmstart-c8 with the agent of another checkout (--baseline DIR): old and new code in one run
    "warmstart-base": lambda c, d: run_warmstart(c, d, 8, code=c["baseline"]),
    "warmstart-c16": lambda c, d: run_warmstart(c, d, 16),
    "warmstart-c8-drop": lambda c, d: run_warmstart(c, d, 8, "--drop-behind"),
    "warmstart-c8-p32": lambda c, d: run_warmstart(c, d, 8, "--piece-size", "32MiB"),
    "warmstart-c8-p64": lambda c, d: run_warmstart(c, d, 8, "--piece-size", "64MiB"),
    "boto3-par": lambda c, d: run_boto3(c, d, True),
    "boto3-seq": lambda c, d: run_boto3(c, d, False),
    "s5cmd": run_s5cmd,
    "curl-seq": lambda c, d: run_curl(c, d, False),
    "curl-par": lambda c, d: run_curl(c, d, True),
    "curl-par-files": lambda c, d: run_curl(c, d, True, to_files=True),
}


def table(results: dict[str, list[float]], rounds: list[dict], total: int) -> str:
    """Markdown: medians per contender, warmstart-c8's speedup over each, CPU seconds per GiB."""
    med = {k: statistics.median(v) for k, v in results.items() if v}
    ws = med.get("warmstart-c8")
    gib = total / 2**30
    lines = [
        "| contender | median s | min s | max s | GB/s (median) | warmstart-c8 speedup vs it "
        "| its CPU s/GiB | S3 server CPU s/GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in results.items():
        if not v:
            continue
        m = med[k]
        ratio = f"{m / ws:.2f}x" if ws else "-"
        ok = [r for r in rounds if r["contender"] == k and r["error"] is None]
        cpu = statistics.median(r["cpu_s"] for r in ok) / gib
        server = statistics.median(r["server_cpu_s"] for r in ok) / gib
        lines.append(
            f"| {k} | {m:.2f} | {min(v):.2f} | {max(v):.2f} | {total / m / 1e9:.2f} | {ratio} "
            f"| {cpu:.2f} | {server:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="total model size (default 1GiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(n for n in CONTENDERS if n != "warmstart-base"),
                    help="comma-separated contenders")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "work"))
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--server-cpus", default="",
                    help="pin the S3 server to these CPUs (e.g. 0) and every contender to the others, "
                         "as if S3 were another machine; default: all share every CPU")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between dropping the page cache and starting each contender's clock (default 0)")
    ap.add_argument("--baseline", default=None,
                    help="root of another checkout (e.g. a git worktree of an older commit): adds the contender "
                         "warmstart-base, warmstart-c8 run with that checkout's agent")
    args = ap.parse_args()

    names = [n for n in args.only.split(",") if n]
    if "warmstart-base" in names and not args.baseline:
        ap.error("warmstart-base needs --baseline DIR")
    for n in names:
        if n not in CONTENDERS:
            ap.error(f"unknown contender {n}; known: {', '.join(CONTENDERS)}")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    total_wanted = parse_size(args.size)
    per = total_wanted // args.shards

    t_gen = time.perf_counter()
    shards = []
    for i in range(args.shards):
        p = work / "src" / f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors"
        write_shard(p, per)
        shards.append(p)
    total = sum(p.stat().st_size for p in shards)
    print(f"generated {len(shards)} shards, {total} bytes in {time.perf_counter() - t_gen:.1f}s", flush=True)

    out_dir = ROOT / "bench" / "out"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with SeaweedS3(work / "seaweed") as sw:
        if args.server_cpus:
            pin_apart(sw.proc.pid, {int(c) for c in args.server_cpus.split(",")})
        sw.make_bucket(BUCKET)
        t_up = time.perf_counter()
        keys = []
        for p in shards:
            key = f"{PREFIX}/{p.name}"
            sw.upload_file(p, BUCKET, key)
            keys.append(key)
        print(f"uploaded in {time.perf_counter() - t_up:.1f}s to {sw.endpoint_url}", flush=True)
        for p in shards:  # the source copy is not needed any more: keep the disk (and cache) clean
            p.unlink()
        ctx: dict = {"endpoint": sw.endpoint_url, "env": sw.env, "keys": keys, "total": total,
                     "settle": args.settle, "no_drop": args.no_drop_caches, "baseline": args.baseline}

        results: dict[str, list[float]] = {n: [] for n in names}
        rounds: list[dict] = []
        dropped_all = True
        for r in range(args.rounds):
            # alternate the order each round so no contender always follows the same one
            order = names if r % 2 == 0 else list(reversed(names))
            for n in order:
                dest = work / f"dest-r{r}-{n}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                ctx.pop("agent_cpu", None)
                ctx["dropped"] = False
                cpu0, server0 = own_cpu(), proc_cpu(sw.proc.pid)
                try:
                    secs, info = CONTENDERS[n](ctx, dest)
                    info["cpu_s"] = ctx["agent_cpu"] if "agent_cpu" in ctx else own_cpu() - cpu0
                    info["server_cpu_s"] = proc_cpu(sw.proc.pid) - server0
                    err = None
                except Exception as exc:  # noqa: BLE001
                    secs, info, err = float("nan"), {}, str(exc)[-3000:]
                dropped = ctx["dropped"]
                dropped_all &= dropped
                if err is None:
                    results[n].append(secs)
                rec = {"round": r, "contender": n, "seconds": secs,
                       "gb_per_s": total / secs / 1e9 if err is None else None,
                       "page_cache_dropped": dropped, "error": err, **info}
                rounds.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "cli_stdout"}), flush=True)
                ctx["previous"] = dest  # deleted by the next start_clock, right before its clock
        shutil.rmtree(ctx.pop("previous", work / "none"), ignore_errors=True)
        agent_logs = ctx.get("agent_logs", [])

    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "time": stamp,
        "total_bytes": total,
        "shards": args.shards,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "page_cache_dropped": dropped_all,
        "settle_s": args.settle,
        "server_cpus": args.server_cpus,
        "medians": {k: statistics.median(v) for k, v in results.items() if v},
        "per_round": rounds,
    }
    out = out_dir / f"cold_miss-{stamp}.json"
    out.write_text(json.dumps(raw, indent=1))
    (out_dir / "cold_miss-latest.json").write_text(json.dumps(raw, indent=1))
    if agent_logs:
        (out_dir / f"cold_miss-{stamp}-agent.log").write_text("\n\n".join(agent_logs))
    print()
    print(table(results, rounds, total))
    print(f"\nraw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
