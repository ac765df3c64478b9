"""Object-store benchmark (issue 20): a model from an S3 server that is far away and caps each connection.

Real object stores give each connection a limited rate after tens of ms to first
byte; throughput comes from many requests in flight. Here: SeaweedFS on this
machine, reached from a network namespace of its own over a veth pair
(198.18.0.1 <-> 198.18.0.2, both ends ``tc tbf`` at ``--link`` , 1 Gbit by
default) through a userspace relay (tests/servers/relay.py) that gives every
connection a round trip of ``RTT`` (handshake, and before each request reaches
the server) and its own rate cap of a fraction of the link. This kernel has no
``netem`` and no ``fq`` qdisc (``tc qdisc add ... netem`` / ``fq maxrate``:
"Specified qdisc kind is unknown"), hence the relay.

Settings: ``rtt20-cap16`` (20 ms, each connection 1/16 of the link) and
``rtt50-cap64`` (50 ms, 1/64). Contenders, run inside the namespace, alternated
round by round, each into a fresh directory on the same disk:

- ``agent``: a fresh ``agent serve`` at its defaults (started before the clock),
  timed ``agent prefetch s3://bench/model``; its ``agent stats`` after the round
  says what the request window settled on;
- ``boto3``: ``download_file`` at default TransferConfig, one thread per file;
- ``s5cmd``: ``s5cmd cp 's3://bench/model/*' DEST/`` at defaults; ``s5cmd-c32``: with
  ``--concurrency 32`` (parts per file in flight) and ``--part-size 8`` (MiB);
- ``obstore``: obstore's ``get_range_async``, 8 MiB ranges, 32 in flight per file,
  written with ``os.pwrite``;
- ``curl``: every 8 MiB range of every file as its own request, ``curl --parallel
  --parallel-max 64`` (unsigned; SeaweedFS here is anonymous), into part files.

The limit is the link: total bytes / link rate. CPU is the contender's own
(user + system of the process tree; the agent's server process counted too).

``--engine``: the range client (agent/origins/range_http.py) against obstore as
the engine of one download on loopback (no shaping): the same 64 MiB ranges,
8 in flight, bytes handed to a sink that drops them; wall and CPU seconds.

Usage::

    python bench/object_store.py --rounds 3              # both shaped settings
    python bench/object_store.py --engine --rounds 5

Writes bench/out/object_store-<time>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cold_miss import proc_cpu  # noqa: E402
from tests.servers.ports import free_port  # noqa: E402
from tests.servers.relay import TcpRelay  # noqa: E402
from tests.servers.seaweedfs import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, SeaweedS3  # noqa: E402

MiB = 1024 * 1024
BUCKET, PREFIX = "bench", "model"
SERVER_IP, CLIENT_IP = "198.18.0.1", "198.18.0.2"
SETTINGS = {"rtt20-cap16": (0.020, 16), "rtt50-cap64": (0.050, 64)}
CONTENDERS = ("agent", "boto3", "s5cmd", "s5cmd-c32", "obstore", "curl")
RANGE = 8 * MiB


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


class Link:
    """A client namespace joined to this one by a veth pair, both ends shaped with tbf."""

    def __init__(self, mbit: int) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.host_if, self.ns_if = f"wstobj{tag}", f"wso{tag}a", f"wso{tag}b"
        self.mbit = mbit

    def __enter__(self) -> Link:
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            sh("ip", "link", "set", self.ns_if, "netns", self.ns)
            sh("ip", "addr", "add", f"{SERVER_IP}/30", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            sh("ip", "-n", self.ns, "addr", "add", f"{CLIENT_IP}/30", "dev", self.ns_if)
            sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
            sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            for args in (("dev", self.host_if), ("-n", self.ns, "dev", self.ns_if)):
                ns_args = args[:2] if args[0] == "-n" else ()
                dev = args[-1]
                sh("tc", *ns_args, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{self.mbit}mbit",
                   "burst", "1mb", "latency", "100ms")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def make_model(seaweed: SeaweedS3, files: int, size: int, work: Path) -> list[tuple[str, int]]:
    seaweed.make_bucket(BUCKET)
    s3 = seaweed.client()
    out = []
    for i in range(files):
        path = work / f"shard-{i}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(64 * MiB, left)
                f.write(os.urandom(n))
                left -= n
        key = f"{PREFIX}/model-{i:05d}-of-{files:05d}.safetensors"
        s3.upload_file(str(path), BUCKET, key)
        path.unlink()
        out.append((key, size))
    return out


# ---------------------------------------------------------------------- contenders (run in the namespace)


def client_boto3(endpoint: str, dest: str, keys: list[str]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    threads = [threading.Thread(target=s3.download_file, args=(BUCKET, k, os.path.join(dest, k.rsplit("/", 1)[1])))
               for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def client_obstore(endpoint: str, dest: str, keys: list[str], sizes: list[int]) -> None:
    from obstore import get_range_async
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region=REGION, access_key_id=DUMMY_ACCESS_KEY,
                    secret_access_key=DUMMY_SECRET_KEY, client_options={"allow_http": True})

    async def one(key: str, size: int) -> None:
        fd = os.open(os.path.join(dest, key.rsplit("/", 1)[1]), os.O_WRONLY | os.O_CREAT, 0o644)
        sem = asyncio.Semaphore(32)

        async def part(start: int) -> None:
            async with sem:
                data = await get_range_async(store, key, start=start, end=min(size, start + RANGE))
                await asyncio.to_thread(os.pwrite, fd, memoryview(data), start)

        try:
            await asyncio.gather(*(part(s) for s in range(0, size, RANGE)))
        finally:
            os.close(fd)

    async def run() -> None:
        await asyncio.gather(*(one(k, s) for k, s in zip(keys, sizes, strict=True)))

    asyncio.run(run())


def run_client(kind: str, endpoint: str, dest: str, model: list[tuple[str, int]]) -> None:
    keys, sizes = [k for k, _ in model], [s for _, s in model]
    if kind == "boto3":
        client_boto3(endpoint, dest, keys)
    elif kind == "obstore":
        client_obstore(endpoint, dest, keys, sizes)
    else:
        raise SystemExit(f"unknown client {kind}")


class Bench:
    def __init__(self, link: Link, endpoint: str, model: list[tuple[str, int]], work: Path) -> None:
        self.link, self.endpoint, self.model, self.work = link, endpoint, model, work
        self.env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "PYTHONPATH": str(ROOT)}

    def timed(self, cmd: list[str], extra_pid: int | None = None) -> tuple[float, float]:
        cpu0, extra0 = children_cpu(), proc_cpu(extra_pid) if extra_pid else 0.0
        t0 = time.perf_counter()
        done = subprocess.run([*self.link.prefix(), *cmd], env=self.env, capture_output=True, text=True,
                              timeout=600)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[:4]}... failed: {done.stderr[-2000:]}")
        cpu = children_cpu() - cpu0 + ((proc_cpu(extra_pid) - extra0) if extra_pid else 0.0)
        return wall, cpu

    def run(self, kind: str) -> dict[str, Any]:
        dest = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.work))
        try:
            if kind == "agent":
                return self._agent(dest)
            if kind.startswith("s5cmd"):
                tuned = ["--concurrency", "32", "--part-size", "8"] if kind == "s5cmd-c32" else []
                cmd = [shutil.which("s5cmd") or "s5cmd", "--endpoint-url", self.endpoint, "cp", *tuned,
                       f"s3://{BUCKET}/{PREFIX}/*", f"{dest}/"]
            elif kind == "curl":
                cmd = ["curl", "-s", "-f", "--parallel", "--parallel-max", "64"]
                for i, (key, size) in enumerate(self.model):
                    for n, start in enumerate(range(0, size, RANGE)):
                        end = min(size, start + RANGE) - 1
                        cmd += ["-r", f"{start}-{end}", "-o", str(dest / f"{i}.{n}"), f"{self.endpoint}/{BUCKET}/{key}"]
            else:
                cmd = [sys.executable, __file__, "--client", kind, "--endpoint", self.endpoint, "--dest", str(dest),
                       "--model", json.dumps(self.model)]
            wall, cpu = self.timed(cmd)
            got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            return {"seconds": wall, "cpu": cpu, "bytes": got}
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _agent(self, dest: Path) -> dict[str, Any]:
        sock = dest / "agent.sock"
        env = {**self.env, "WARMSTART_SOCKET": str(sock)}
        server = subprocess.Popen(
            [*self.link.prefix(), sys.executable, "-m", "agent", "serve", "--cache-dir", str(dest / "cache"),
             "--socket", str(sock), "--listen", f"127.0.0.1:{free_port()}", "--capacity", "8GiB"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(dest / "agent.log", "w"),  # noqa: SIM115
        )
        try:
            deadline = time.monotonic() + 60
            while not sock.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"agent did not start: {(dest / 'agent.log').read_text()[-2000:]}")
                time.sleep(0.1)
            time.sleep(1.0)  # origin clients warm up in the background
            self.env["WARMSTART_SOCKET"] = str(sock)
            wall, cpu = self.timed([sys.executable, "-m", "agent", "prefetch", f"s3://{BUCKET}/{PREFIX}"], server.pid)
            stats = subprocess.run([sys.executable, "-m", "agent", "stats", "--json"], env=env, capture_output=True,
                                   text=True, timeout=30)
            hosts = json.loads(stats.stdout).get("origin_hosts", []) if stats.returncode == 0 else []
            got = sum(p.stat().st_size for p in (dest / "cache" / "blobs").iterdir())
            return {"seconds": wall, "cpu": cpu, "bytes": got, "origin_hosts": hosts}
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def shaped(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",")
    results: dict[str, Any] = {"load_before": Path("/proc/loadavg").read_text().strip(), "settings": {}}
    with SeaweedS3(work / "weed") as seaweed:
        model = make_model(seaweed, args.files, args.file_size, work)
        total = sum(s for _, s in model)
        upstream = seaweed.endpoint_url.rsplit(":", 1)
        with Link(args.link_mbit) as link:
            for setting in args.settings.split(","):
                rtt, share = SETTINGS[setting]
                link_bytes = args.link_mbit * 1e6 / 8
                listen = socket_on(SERVER_IP)
                relay = TcpRelay(upstream[0].removeprefix("http://"), int(upstream[1]), sock=listen,
                                 per_connection_rate=link_bytes / share, delay=rtt)
                try:
                    bench = Bench(link, f"http://{SERVER_IP}:{relay.port}", model, work)
                    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                    for r in range(args.rounds):
                        order = names[r % len(names):] + names[: r % len(names)]
                        for name in order:
                            res = bench.run(name)
                            res["load"] = Path("/proc/loadavg").read_text().split()[0]
                            rounds[name].append(res)
                            print(f"{setting} round {r + 1} {name}: {res['seconds']:.2f}s cpu {res['cpu']:.2f}s "
                                  f"load {res['load']}" + (f" window {res['origin_hosts']}" if "origin_hosts" in res
                                                           else ""), flush=True)
                finally:
                    relay.close()
                results["settings"][setting] = {"rtt": rtt, "share": share, "limit_seconds": total / link_bytes,
                                                "total_bytes": total, "rounds": rounds}
    results["load_after"] = Path("/proc/loadavg").read_text().strip()
    return results


def socket_on(host: str) -> Any:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(512)
    return s


def table(results: dict[str, Any]) -> str:
    lines = []
    for setting, r in results["settings"].items():
        limit, total = r["limit_seconds"], r["total_bytes"]
        med = {n: statistics.median(x["seconds"] for x in v) for n, v in r["rounds"].items() if v}
        cpu = {n: statistics.median(x["cpu"] for x in v) / (total / 1024**3) for n, v in r["rounds"].items() if v}
        lines.append(f"\n{setting} (RTT {r['rtt'] * 1000:.0f} ms, each connection 1/{r['share']} of the link; "
                     f"limit {limit:.2f} s)\n")
        lines.append("| contender | median s | MB/s | x link | agent vs it | CPU s/GiB |")
        lines.append("|---|---|---|---|---|---|")
        for n, s in med.items():
            vs = f"{s / med['agent']:.2f}x" if "agent" in med else "-"
            lines.append(f"| {n} | {s:.2f} | {total / s / 1e6:.0f} | {limit / s:.2f} | {vs} | {cpu[n]:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- engine: range client vs obstore


def engine(args: argparse.Namespace) -> dict[str, Any]:
    from agent.origins.range_http import RangeClient

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    size = args.file_size
    out: dict[str, Any] = {"load_before": Path("/proc/loadavg").read_text().strip(), "rounds": {"range_client": [],
                                                                                                  "obstore": []}}
    with SeaweedS3(work / "weed-engine") as seaweed:
        (key, _), = make_model(seaweed, 1, size, work)
        url = f"{seaweed.endpoint_url}/{BUCKET}/{key}"
        span = 64 * MiB

        async def with_range_client() -> int:
            client = RangeClient(30.0)
            got = 0

            async def sink(chunks: Any) -> None:
                nonlocal got
                got += sum(len(c) for c in chunks)

            sem = asyncio.Semaphore(8)

            async def part(start: int) -> None:
                async with sem:
                    await client.get_range(url, {}, start, min(span, size - start), sink, what=key)

            await asyncio.gather(*(part(s) for s in range(0, size, span)))
            await client.close()
            return got

        async def with_obstore() -> int:
            from obstore import get_range_async
            from obstore.store import S3Store

            store = S3Store(BUCKET, endpoint=seaweed.endpoint_url, region=REGION, access_key_id=DUMMY_ACCESS_KEY,
                            secret_access_key=DUMMY_SECRET_KEY, client_options={"allow_http": True})
            sem = asyncio.Semaphore(8)
            got = 0

            async def part(start: int) -> None:
                nonlocal got
                async with sem:
                    data = await get_range_async(store, key, start=start, end=min(size, start + span))
                    got += len(memoryview(data))

            await asyncio.gather(*(part(s) for s in range(0, size, span)))
            return got

        for r in range(args.rounds):
            order = [("range_client", with_range_client), ("obstore", with_obstore)]
            if r % 2:
                order.reverse()
            for name, fn in order:
                c0, t0 = time.process_time(), time.perf_counter()
                got = asyncio.run(fn())
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                assert got == size, (name, got)
                out["rounds"][name].append({"seconds": wall, "cpu": cpu})
                print(f"engine round {r + 1} {name}: {wall:.2f}s cpu {cpu:.2f}s", flush=True)
    out["load_after"] = Path("/proc/loadavg").read_text().strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--file-size", type=lambda v: int(v) * MiB, default=128 * MiB, help="MiB per file (128)")
    ap.add_argument("--link-mbit", type=int, default=1000)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "object_store"))
    ap.add_argument("--engine", action="store_true", help="range client vs obstore on loopback")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        run_client(args.client, args.endpoint, args.dest, [tuple(m) for m in json.loads(args.model)])
        return
    results = engine(args) if args.engine else shaped(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench" / "out" / f"object_store{'-engine' if args.engine else ''}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    if args.engine:
        for n, v in results["rounds"].items():
            print(f"{n}: median {statistics.median(x['seconds'] for x in v):.2f} s, "
                  f"CPU {statistics.median(x['cpu'] for x in v):.2f} s")
    else:
        print(table(results))


if __name__ == "__main__":
    main()
