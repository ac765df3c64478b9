"""Peers benchmark (issue 4): N nodes start the same model at once behind rate-limited links.

Every node's agent runs in its own network namespace; the origin (a real S3
server, SeaweedFS) runs in another one; all of them hang off a bridge in a
"hub" namespace through veth pairs, so nothing here touches the machine's own
networking (the root namespace gets no link, no address, no route). Addresses
come from 198.18.0.0/15 only (origin 198.18.0.1, node i 198.18.1.i):

    origin-ns [198.18.0.1]--veth--+
    node1-ns  [198.18.1.1]--veth--+-- bridge (hub-ns)
    ...                           |
    nodeN-ns  [198.18.1.N]--veth--+

``tc tbf`` limits every node's link to the same rate in both directions (its
upload on the veth end inside the node's namespace, its download on the end
in the hub), and the origin's link likewise (``--origin-rate``, default the
node rate: the case where S3/NAT egress is what a cluster without peers waits
on).

Contenders, each with N fresh agents (fresh caches), all told to prefetch the
same ``s3://`` model at the same moment (a barrier; each call is what
``agent prefetch`` sends over the agent's Unix socket, minus the CLI's
interpreter start), timed until the slowest node's prefetch completes:

- ``peers``: ``agent serve --peers <all N nodes> --peer-token-file F``;
- ``nopeers``: the same agents without ``--peers`` (every node from the origin
  alone: a node cache without peers);
- and the limit: model size / node link rate (no node can receive faster).

Origin egress is the origin veth's ``tx_bytes`` (bytes on the wire, headers
included) read before and after: independent of the agents' own counters.
Every node's cache is checked bit-exact against the uploaded files (xxh3-128
of each blob file recomputed here); a run that is not bit-exact is a failure,
not a number. Per run it also records each node's upload and download bytes
(hub-side veth counters), the CPU of the agents, of the S3 server and of the
whole machine during the window, and a 0.2 s time series of every link's
counters (``bench/out/``) to see stalls.

Storm mode (``--storm cli|warmset``, issue 24): the moment that matters most is
when nodes scale up together. Every agent is spawned at the same instant (fresh
caches) and each node's prefetch starts the moment its own ``/readyz`` answers
(``cli``), or the agents start with a warm set listing the model (``warmset``)
and each node is done when its warm-set entry is ready. No waiting for a quiet
machine, for the peers to see each other, or for each other: times run from the
spawn, and origin egress is counted from before the spawn. ``--base-rev REV``
adds the contender ``base``: the same peers setup running the code at REV, side
by side (alternated) with ``peers`` (``--agent-rev``)::

    python bench/peers_netns.py --storm cli --nodes 3,8 --rounds 3 --origin-rate 0 --base-rev main

Usage (as root; takes ~15 minutes with the defaults)::

    python bench/peers_netns.py --nodes 2,4,8 --rounds 3
    python bench/peers_netns.py --cleanup          # remove namespaces left by a killed run

Writes bench/out/peers-<time>.json and bench/out/peers-latest.json (raw per-run
numbers), the agents' logs beside them, and prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.units import parse_size  # noqa: E402
from tests.servers.cache_check import file_digest  # noqa: E402
from tests.servers.proc import spawn_logged, stop_group  # noqa: E402
from tests.servers.seaweedfs import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, find_weed  # noqa: E402
from tests.servers.seaweedfs import s3_env as seaweed_s3_env  # noqa: E402

BUCKET = "bench"
PREFIX = "model"
NAME_BASE = "wsb"  # every namespace this benchmark makes is wsb<4 hex>-<role>
NAME_RE = re.compile(rf"^{NAME_BASE}[0-9a-f]{{4}}-(hub|o|n\d+)$")
ORIGIN_IP = "198.18.0.1"
AGENT_PORT = 7070
# weed binds P and P+10000 (gRPC) and names Unix sockets in /tmp after the gRPC ports;
# the tests pick P < 22000 (tests.servers.ports), so gRPC ports >= 32700 never share a socket name.
WEED_PORTS = {"master": 22700, "volume": 22701, "filer": 22702, "s3": 22703}
GRPC_OFFSET = 10_000
SAMPLE_S = 0.2


def node_ip(i: int) -> str:
    return f"198.18.1.{i + 1}"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {done.returncode}: {done.stderr.strip()}")
    return done


def nsexec(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


# ---------------------------------------------------------------------- the network


class Net:
    """The hub bridge, the origin's and the nodes' namespaces, veths and tc; :meth:`destroy` removes all of it."""

    def __init__(self, nodes: int, rate_mbit: float, origin_rate_mbit: float, burst: str, latency_ms: int) -> None:
        self.tag = f"{NAME_BASE}{secrets.token_hex(2)}"
        self.nodes = nodes
        self.rate = rate_mbit
        self.origin_rate = origin_rate_mbit
        self.burst = burst
        self.latency_ms = latency_ms
        self.hub = f"{self.tag}-hub"
        self.origin = f"{self.tag}-o"
        self.node_ns = [f"{self.tag}-n{i + 1}" for i in range(nodes)]
        self.made: list[str] = []  # namespaces created, in order

    # interface names (<= 15 chars): <tag><role>i inside the namespace, <tag><role>h in the hub
    def ifname(self, role: str, hub_side: bool) -> str:
        return f"{self.tag}{role}{'h' if hub_side else 'i'}"

    def origin_if(self, hub_side: bool = False) -> str:
        return self.ifname("o", hub_side)

    def node_if(self, i: int, hub_side: bool = False) -> str:
        return self.ifname(f"n{i + 1}", hub_side)

    def _addns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
           "rate", f"{mbit}mbit", "burst", self.burst, "latency", f"{self.latency_ms}ms")  # fmt: skip

    def _attach(self, ns: str, role: str, ip: str, mbit: float) -> None:
        inner, outer = self.ifname(role, False), self.ifname(role, True)
        # Both ends are created directly inside their namespaces: the root namespace never sees them.
        sh("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.hub)
        sh("ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/15", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")
        if mbit > 0:
            self._shape(ns, inner, mbit)  # what leaves the namespace: its upload
            self._shape(self.hub, outer, mbit)  # what the bridge sends it: its download

    def create(self) -> None:
        self._addns(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        self._addns(self.origin)
        self._attach(self.origin, "o", ORIGIN_IP, self.origin_rate)
        for i, ns in enumerate(self.node_ns):
            self._addns(ns)
            self._attach(ns, f"n{i + 1}", node_ip(i), self.rate)

    def counters(self, ns: str) -> dict[str, tuple[int, int]]:
        """{ifname: (rx_bytes, tx_bytes)} of every link in ``ns``."""
        out = json.loads(sh("ip", "-j", "-s", "-n", ns, "link", "show").stdout or "[]")
        return {d["ifname"]: (d["stats64"]["rx"]["bytes"], d["stats64"]["tx"]["bytes"]) for d in out if "stats64" in d}

    def tc_stats(self) -> dict[str, dict[str, int]]:
        """tbf drops/overlimits per shaped device (a sanity figure for the run log)."""
        res: dict[str, dict[str, int]] = {}
        for ns in [self.hub, self.origin, *self.node_ns]:
            out = json.loads(sh("tc", "-j", "-s", "-n", ns, "qdisc", "show", check=False).stdout or "[]")
            for q in out:
                if q.get("kind") == "tbf":
                    res[f"{ns}:{q['dev']}"] = {k: int(q.get(k, 0)) for k in ("bytes", "drops", "overlimits")}
        return res

    def destroy(self) -> None:
        for ns in reversed(self.made):
            kill_ns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs in one of our namespaces (only processes this benchmark started live there)."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for p in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)


def cleanup_leftovers() -> int:
    """Remove every namespace named like ours (wsb<4 hex>-hub/o/nK), killing what runs in it, and weed's sockets."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]
    ours = [n for n in names if NAME_RE.match(n)]
    # nodes first, the hub last (deleting a namespace deletes its veth ends and so their peers)
    ours.sort(key=lambda n: (n.endswith("-hub"), n))
    for ns in ours:
        kill_ns_pids(ns)
        sh("ip", "netns", "del", ns, check=False)
        print(f"removed namespace {ns}")
    remove_weed_sockets()
    return len(ours)


def remove_weed_sockets() -> None:
    for port in WEED_PORTS.values():
        for p in (port, port + GRPC_OFFSET):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


# ---------------------------------------------------------------------- the model and the origin


def write_shard(path: Path, size: int, shard: int, seed: int, tensors: int = 4) -> dict[str, str]:
    """A valid safetensors file of about ``size`` seeded random bytes in ``tensors`` uint8 tensors; returns their names.

    Seeded, so every run of the benchmark has the same blobs and so the same rendezvous owners: with a
    few pieces per node, which node owns how many decides how much it has to upload.
    """
    import random

    rng = random.Random(seed * 1000 + shard)
    per = size // tensors
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    names = [f"layers.{shard}.{t}.weight" for t in range(tensors)]
    for t, name in enumerate(names):
        header[name] = {"dtype": "U8", "shape": [per], "data_offsets": [t * per, (t + 1) * per]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = per * tensors
        while left:
            n = min(64 << 20, left)
            f.write(rng.randbytes(n))
            left -= n
    return dict.fromkeys(names, path.name)


def make_model(src: Path, size: int, shards: int, seed: int) -> None:
    """``shards`` safetensors shards, their index and a config.json: the layout of a sharded HF model."""
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        weight_map.update(write_shard(src / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", size // shards, i, seed))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (src / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "hidden_size": 4096}, indent=1))


def s3_env() -> dict[str, str]:
    return seaweed_s3_env(f"http://{ORIGIN_IP}:{WEED_PORTS['s3']}")


def start_origin(net: Net, work: Path) -> subprocess.Popen[bytes]:
    """``weed server`` (flags as in tests.servers.seaweedfs) inside the origin namespace, on 198.18.0.1."""
    d = work / "seaweed"
    d.mkdir(parents=True, exist_ok=True)
    remove_weed_sockets()
    p = WEED_PORTS
    cmd = nsexec(net.origin, find_weed(), "server", f"-dir={d}", f"-ip={ORIGIN_IP}", "-ip.bind=0.0.0.0",
                 f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                 "-s3", f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=50",
                 "-volume.preStopSeconds=0")  # fmt: skip
    return spawn_logged(cmd, d / "weed.log", banner=time.strftime("%H:%M:%S"), cwd=d)


def upload_helper(src: str, timeout: float) -> int:
    """Runs inside the origin namespace: wait for weed, make the bucket, upload the model (over its loopback)."""
    import urllib.error
    import urllib.request

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    master = f"http://127.0.0.1:{WEED_PORTS['master']}/dir/status"
    s3url = f"http://127.0.0.1:{WEED_PORTS['s3']}"
    while True:
        try:
            with urllib.request.urlopen(master, timeout=2) as r:
                topo = json.load(r).get("Topology") or {}
            if int(topo.get("Free", 0) or 0) > 0:
                with urllib.request.urlopen(s3url + "/", timeout=2):
                    break
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            print("weed not ready", file=sys.stderr)
            return 1
        time.sleep(0.2)
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=s3url, aws_access_key_id=DUMMY_ACCESS_KEY, aws_secret_access_key=DUMMY_SECRET_KEY,
        region_name=REGION,
        config=Config(retries={"max_attempts": 8, "mode": "standard"}, s3={"addressing_style": "path"}),
    )  # fmt: skip
    for attempt in range(60):  # the first writes after start can fail and leave the bucket half-made
        with contextlib.suppress(ClientError, BotoCoreError):
            with contextlib.suppress(ClientError):
                s3.create_bucket(Bucket=BUCKET)
            s3.head_bucket(Bucket=BUCKET)
            break
        if time.monotonic() > deadline:
            print("cannot create bucket", file=sys.stderr)
            return 1
        time.sleep(min(0.1 * 2**attempt, 1.0))
    for p in sorted(Path(src).iterdir()):
        s3.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")
    print(json.dumps(sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"])))
    return 0


# ---------------------------------------------------------------------- measuring


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat; iowait and idle are not busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    total = sum(f[:8])
    return total - idle, total


def wait_quiet(pids: list[int], max_cores: float, timeout: float) -> tuple[float, float]:
    """Wait (bounded) until what else runs on this machine uses under ``max_cores`` over 2 s.

    This machine is shared (others run tests and benchmarks on its 2 cores); a run that starts
    while they are busy measures them, not the agents. Returns (seconds waited, last other-cores figure).
    """
    t0 = time.monotonic()
    while True:
        b0, c0 = machine_cpu()[0], sum(proc_cpu(p) for p in pids)
        time.sleep(2.0)
        b1, c1 = machine_cpu()[0], sum(proc_cpu(p) for p in pids)
        other = ((b1 - b0) / os.sysconf("SC_CLK_TCK") - (c1 - c0)) / 2.0
        if other < max_cores or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, other


def softirq_cpu() -> float:
    return int(Path("/proc/stat").read_text().splitlines()[0].split()[7]) / os.sysconf("SC_CLK_TCK")


def start_sampler(net: Net, path: Path) -> subprocess.Popen[bytes]:
    """A small process in the hub namespace printing every link's (rx, tx) bytes every SAMPLE_S s (CLOCK_MONOTONIC)."""
    code = (
        "import os,sys,time,json\n"
        "d='/sys/class/net'\n"
        "while True:\n"
        "  row={'t':time.monotonic()}\n"
        "  for n in os.listdir(d):\n"
        "    if n.startswith(sys.argv[1]):\n"
        "      s=d+'/'+n+'/statistics/'\n"
        "      row[n]=[int(open(s+'rx_bytes').read()),int(open(s+'tx_bytes').read())]\n"
        "  print(json.dumps(row),flush=True)\n"
        f"  time.sleep({SAMPLE_S})\n"
    )
    return spawn_logged(nsexec(net.hub, sys.executable, "-c", code, net.tag), path, banner="sampler", cwd=path.parent)


def read_samples(path: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if t0 - 0.5 <= r["t"] <= t1 + 0.5:
                    rows.append(r)
    return rows


def stalls(
    rows: list[dict[str, Any]], ifname: str, col: int, t_start: float, t_end: float, min_s: float
) -> list[list[float]]:
    """Intervals (relative to t_start) of at least ``min_s`` in which counter ``col`` of ``ifname`` did not move."""
    out, since, last = [], None, None
    for r in rows:
        if ifname not in r or not t_start <= r["t"] <= t_end:
            continue
        v = r[ifname][col]
        if last is not None and v - last < 1500 * 4:  # a few packets of acks is still a stall
            since = since if since is not None else r["t"] - SAMPLE_S
        else:
            if since is not None and r["t"] - since >= min_s:
                out.append([round(since - t_start, 2), round(r["t"] - t_start, 2)])
            since = None
        last = v
    if since is not None and t_end - since >= min_s:
        out.append([round(since - t_start, 2), round(t_end - t_start, 2)])
    return out


# ---------------------------------------------------------------------- one run


def export_agent(rev: str, dest: Path) -> tuple[Path, str]:
    """The agent code the nodes run: ``tree`` is this working tree as it is; otherwise ``git archive REV agent
    client`` into ``dest`` (so edits in progress in the tree do not leak into a measurement). Returns (path, label)."""
    if rev == "tree":
        dirty = subprocess.run(["git", "status", "--porcelain", "agent", "client"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()  # fmt: skip
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        return ROOT, f"{head}{'+uncommitted' if dirty else ''} (working tree)"
    sha = sh("git", "-C", str(ROOT), "rev-parse", "--short", rev).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "agent", "client"], capture_output=True,
                             check=True, timeout=60).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return dest, sha


def agent_has_peers_flags(env: dict[str, str]) -> bool:
    out = subprocess.run([sys.executable, "-m", "agent", "serve", "--help"], capture_output=True, text=True,
                         timeout=60, cwd="/", env=env).stdout  # fmt: skip
    return "--peers" in out and "--peer-token-file" in out


def agent_env(code: Path) -> dict[str, str]:
    drop = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_") and k not in drop}
    env.update(s3_env())
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(code)  # before the venv's editable install of this tree
    return env


def agent_stats(sock: Path) -> dict[str, Any] | None:
    """The agent's own byte counters and peer states (GET /v1/stats), or None where this agent has none."""
    from client.transport import AgentConnection

    try:
        return AgentConnection(str(sock), timeout=5).request_json("GET", "/v1/stats")
    except Exception:  # noqa: BLE001
        return None


def prefetch(sock: Path, ref: str, out: dict[str, Any], barrier: threading.Barrier | None) -> None:
    """One node's prefetch: what ``agent prefetch REF`` sends, from a thread released with the others."""
    import io

    from agent.cli.main import _follow
    from client.transport import AgentConnection

    conn = AgentConnection(str(sock))
    try:
        if barrier is not None:
            barrier.wait(timeout=60)
        out["t_start"] = time.monotonic()
        res = _follow(conn.stream("POST", "/v1/prefetch", {"ref": ref, "pin": False}), io.StringIO())
        out["t_done"] = time.monotonic()
        out["result"] = {k: v for k, v in res.items() if not isinstance(v, (list, dict))}
    except BaseException as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"


def node_ready(ns: str, ip: str) -> bool:
    code = sh(*nsexec(ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
                      f"http://{ip}:{AGENT_PORT}/readyz"), check=False).stdout  # fmt: skip
    return code == "200"


def storm_node(
    ns: str, ip: str, sock: Path, proc: subprocess.Popen[bytes], mode: str, ref: str, out: dict[str, Any],
    budget: float,
) -> None:
    """Storm mode, one node: wait for its own /readyz, then prefetch at once (``cli``) or wait for its warm set."""
    from client.transport import AgentConnection

    deadline = time.monotonic() + budget
    try:
        while not (sock.exists() and node_ready(ns, ip)):
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("not ready in time")
            time.sleep(0.05)
        out["t_ready"] = time.monotonic()
        if mode == "cli":
            prefetch(sock, ref, out, None)
            return
        conn = AgentConnection(str(sock), timeout=5)
        while time.monotonic() < deadline:
            entries = conn.request_json("GET", "/v1/warm-set").get("entries", [])
            if entries and all(e.get("state") == "ready" for e in entries):
                out["t_done"] = time.monotonic()
                return
            if any(e.get("state") == "failed" for e in entries):
                raise RuntimeError(f"warm set failed: {entries}")
            time.sleep(0.1)
        raise RuntimeError("warm set not ready in time")
    except BaseException as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"


def verify_node(cache: Path, want: dict[str, int]) -> str | None:
    """None if the node's blobs hold exactly the model's contents (multiset of xxh3-128 digests), else why not."""
    have: dict[str, int] = {}
    blobs = cache / "blobs"
    if not blobs.is_dir():
        return "no blobs directory"
    for p in blobs.iterdir():
        if p.is_file():
            d = file_digest(p)
            have[d] = have.get(d, 0) + 1
    missing = {d: n for d, n in want.items() if have.get(d, 0) < n}
    if missing:
        return f"{len(missing)} of {len(want)} model files missing or not bit-exact ({len(have)} blobs held)"
    return None


def run_once(ctx: dict[str, Any], n: int, contender: str, rnd: int) -> dict[str, Any]:
    net: Net = ctx["net"]
    args = ctx["args"]
    run_dir = ctx["work"] / f"r{rnd}-n{n}-{contender}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    peers = ",".join(f"{node_ip(i)}:{AGENT_PORT}" for i in range(n))
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[Path] = []
    logs: list[Path] = []
    rec: dict[str, Any] = {"round": rnd, "nodes": n, "contender": contender, "error": None}
    if args.quiet_cores > 0:
        waited, other = wait_quiet([ctx["weed"].pid, ctx["sampler"].pid], args.quiet_cores, args.quiet_timeout)
        rec["quiet_wait_s"], rec["other_cores_before"] = round(waited, 1), round(other, 2)
    try:
        for i in range(n):
            d = run_dir / f"node{i + 1}"
            d.mkdir()
            sock = d / "agent.sock"
            cmd = [sys.executable, "-m", "agent", "serve", "--cache-dir", str(d / "cache"), "--socket", str(sock),
                   "--listen", f"{node_ip(i)}:{AGENT_PORT}", "--capacity", "8GiB", *args.agent_arg]  # fmt: skip
            if contender in ("peers", "base"):
                cmd += ["--peers", peers, "--peer-token-file", str(ctx["token_file"])]
            if args.storm == "warmset":
                cmd += ["--warm-set", str(ctx["warm_set"])]
            logs.append(d / "agent.log")
            env = ctx["base_env"] if contender == "base" else ctx["env"]
            if args.storm and i == 0:
                storm_before = (net.counters(net.hub), net.counters(net.origin), proc_cpu(ctx["weed"].pid),
                                machine_cpu(), softirq_cpu(), time.monotonic())  # fmt: skip
            procs.append(spawn_logged(nsexec(net.node_ns[i], *cmd), logs[-1], banner=contender, cwd=d, env=env))
            socks.append(sock)
        if args.storm:
            return storm_finish(ctx, rec, n, run_dir, procs, socks, storm_before)
        deadline = time.monotonic() + 90
        for i, p in enumerate(procs):  # ready: socket up, S3 client built, /readyz answers on the node's address
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"node{i + 1} agent exited with {p.returncode}:\n{logs[i].read_text()[-3000:]}")
                if socks[i].exists() and "origin clients ready" in logs[i].read_text(errors="replace"):
                    code = sh(*nsexec(net.node_ns[i], "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      "-m", "2", f"http://{node_ip(i)}:{AGENT_PORT}/readyz"),
                              check=False).stdout  # fmt: skip
                    if code == "200":
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node{i + 1} agent not ready in 90 s:\n{logs[i].read_text()[-3000:]}")
                time.sleep(0.1)
        if contender == "peers":  # a node's agent has been up long enough to see its peers alive
            while time.monotonic() < deadline:
                st = [agent_stats(sk) for sk in socks]
                if all(x is None for x in st):
                    break  # no stats endpoint: nothing to wait on
                if all(x is not None and all(p.get("alive") for p in x.get("peers", [])) for x in st):
                    break
                time.sleep(0.2)
        time.sleep(args.settle)

        before_hub, before_o = net.counters(net.hub), net.counters(net.origin)
        cpu0 = [proc_cpu(p.pid) for p in procs]
        w0, busy0, soft0 = proc_cpu(ctx["weed"].pid), machine_cpu(), softirq_cpu()
        outs: list[dict[str, Any]] = [{} for _ in range(n)]
        barrier = threading.Barrier(n + 1)
        threads = [threading.Thread(target=prefetch, args=(socks[i], ctx["ref"], outs[i], barrier), daemon=True)
                   for i in range(n)]  # fmt: skip
        for t in threads:
            t.start()
        barrier.wait(timeout=60)
        t0 = time.monotonic()
        budget = args.run_timeout or max(120.0, 4 * n * ctx["limit_s"])
        for t in threads:
            t.join(timeout=max(0.0, t0 + budget - time.monotonic()))
        t_end = time.monotonic()
        cpu1 = [proc_cpu(p.pid) for p in procs]
        w1, busy1, soft1 = proc_cpu(ctx["weed"].pid), machine_cpu(), softirq_cpu()
        after_hub, after_o = net.counters(net.hub), net.counters(net.origin)
        stats = [agent_stats(sk) for sk in socks]

        errors = [
            f"node{i + 1}: {o.get('error', 'no answer in time')}" for i, o in enumerate(outs) if "t_done" not in o
        ]
        done = [o["t_done"] - t0 for o in outs if "t_done" in o]
        oif = net.origin_if()
        origin_tx = after_o[oif][1] - before_o[oif][1]
        per_node = []
        for i in range(n):
            h = net.node_if(i, hub_side=True)
            per_node.append({
                "seconds": round(outs[i]["t_done"] - t0, 3) if "t_done" in outs[i] else None,
                "download_bytes": after_hub[h][1] - before_hub[h][1],  # the hub sends the node what it downloads
                "upload_bytes": after_hub[h][0] - before_hub[h][0],
                "agent_cpu_s": round(cpu1[i] - cpu0[i], 2),
                "result": outs[i].get("result"),
                "agent_stats": stats[i],
            })  # fmt: skip
        wall = t_end - t0
        busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        busiest = max(max(p["upload_bytes"] for p in per_node), ctx["total"])
        rec.update({
            "seconds": max(done) if len(done) == n else None,
            # no node can finish before the busiest uploader has sent its bytes (nor before it got the model)
            "busiest_upload_bound_s": busiest * 8 / (args.rate * 1e6),
            "first_done_s": min(done) if done else None,
            "origin_egress_bytes": origin_tx,
            "origin_egress_x_model": origin_tx / ctx["total"],
            "per_node": per_node,
            "agents_cpu_s": round(sum(cpu1) - sum(cpu0), 2),
            "s3_server_cpu_s": round(w1 - w0, 2),
            "machine_busy_frac": round(busy, 3),
            "softirq_cpu_s": round(soft1 - soft0, 2),
            "machine_busy_cpu_s": round((busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK"), 2),
            # what else ran (the kernel's non-softirq work for the links, other users of this machine)
            "other_cpu_s": round((busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK") - (sum(cpu1) - sum(cpu0)) - (w1 - w0)
                                 - (soft1 - soft0), 2),
            "loadavg_before": os.getloadavg()[0],
            "window_s": round(wall, 3),
        })  # fmt: skip
        rec["other_cores"] = round(rec["other_cpu_s"] / wall, 2)
        rec["disturbed"] = rec["other_cores"] > args.max_other_cores
        rows = read_samples(ctx["samples"], t0, t_end)
        rec["stalls"] = {
            f"node{i + 1}": s for i in range(n)
            if (s := stalls(rows, net.node_if(i, True), 1, t0, t0 + (per_node[i]["seconds"] or wall), args.stall_s))
        }  # fmt: skip
        rec["timeline"] = compress_timeline(rows, net, n, t0)
        if errors:
            rec["error"] = "; ".join(errors)
        else:
            bad = [f"node{i + 1}: {why}" for i in range(n)
                   if (why := verify_node(run_dir / f"node{i + 1}" / "cache", ctx["want"]))]
            if bad:
                rec["error"] = "NOT BIT-EXACT: " + "; ".join(bad)
        rec["verified"] = rec["error"] is None
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
    finally:
        for p in procs:
            stop_group(p, 5.0)
        keep = ctx["out_dir"] / f"peers-{ctx['stamp']}-logs" / run_dir.name
        keep.mkdir(parents=True, exist_ok=True)
        for i, lg in enumerate(logs):
            with contextlib.suppress(OSError):
                shutil.copy(lg, keep / f"node{i + 1}.log")
        shutil.rmtree(run_dir, ignore_errors=True)
    return rec


def storm_finish(
    ctx: dict[str, Any], rec: dict[str, Any], n: int, run_dir: Path, procs: list[subprocess.Popen[bytes]],
    socks: list[Path], before: tuple[Any, ...],
) -> dict[str, Any]:
    """Storm mode, after the spawn: every node on its own from readiness; counters from before the spawn."""
    net: Net = ctx["net"]
    args = ctx["args"]
    before_hub, before_o, w0, busy0, soft0, t0 = before
    outs: list[dict[str, Any]] = [{} for _ in range(n)]
    budget = args.run_timeout or max(120.0, 4 * n * ctx["limit_s"])
    threads = [threading.Thread(target=storm_node, args=(net.node_ns[i], node_ip(i), socks[i], procs[i], args.storm,
                                                           ctx["ref"], outs[i], budget), daemon=True)
               for i in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, t0 + budget + 5 - time.monotonic()))
    t_end = time.monotonic()
    cpu = [proc_cpu(p.pid) for p in procs]
    w1, busy1, soft1 = proc_cpu(ctx["weed"].pid), machine_cpu(), softirq_cpu()
    after_hub, after_o = net.counters(net.hub), net.counters(net.origin)
    stats = [agent_stats(sk) for sk in socks]
    oif = net.origin_if()
    origin_tx = after_o[oif][1] - before_o[oif][1]
    errors = [f"node{i + 1}: {o.get('error', 'no answer in time')}" for i, o in enumerate(outs) if "t_done" not in o]
    done = [o["t_done"] - t0 for o in outs if "t_done" in o]
    per_node = []
    for i in range(n):
        h = net.node_if(i, hub_side=True)
        per_node.append({
            "seconds": round(outs[i]["t_done"] - t0, 3) if "t_done" in outs[i] else None,
            "ready_s": round(outs[i]["t_ready"] - t0, 3) if "t_ready" in outs[i] else None,
            "download_bytes": after_hub[h][1] - before_hub[h][1],
            "upload_bytes": after_hub[h][0] - before_hub[h][0],
            "agent_cpu_s": round(cpu[i], 2),
            "agent_stats": stats[i],
        })  # fmt: skip
    busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    rec.update({
        "storm": args.storm,
        "seconds": max(done) if len(done) == n else None,
        "busiest_upload_bound_s": max(max(p["upload_bytes"] for p in per_node), ctx["total"]) * 8 / (args.rate * 1e6),
        "first_done_s": min(done) if done else None,
        # from the first node ready to the last one done: the spawn-to-ready part is interpreter and
        # store start-up, which a loaded machine stretches by seconds and which is not the storm's
        "ready_to_done_s": (max(done) - min(o["t_ready"] - t0 for o in outs if "t_ready" in o))
        if len(done) == n else None,
        "origin_egress_bytes": origin_tx,
        "origin_egress_x_model": origin_tx / ctx["total"],
        "per_node": per_node,
        "agents_cpu_s": round(sum(cpu), 2),
        "s3_server_cpu_s": round(w1 - w0, 2),
        "machine_busy_frac": round(busy, 3),
        "softirq_cpu_s": round(soft1 - soft0, 2),
        "loadavg_before": os.getloadavg()[0],
        "window_s": round(t_end - t0, 3),
        "other_cores": 0.0,
        "disturbed": False,
    })  # fmt: skip
    if errors:
        rec["error"] = "; ".join(errors)
    else:
        bad = [f"node{i + 1}: {why}" for i in range(n)
               if (why := verify_node(run_dir / f"node{i + 1}" / "cache", ctx["want"]))]
        if bad:
            rec["error"] = "NOT BIT-EXACT: " + "; ".join(bad)
    rec["verified"] = rec["error"] is None
    return rec


def compress_timeline(rows: list[dict[str, Any]], net: Net, n: int, t0: float) -> dict[str, Any]:
    """Per-SAMPLE_S cumulative MB each node downloaded/uploaded and the origin sent, from t0."""
    if not rows:
        return {}
    base = rows[0]
    names = {f"node{i + 1}": net.node_if(i, True) for i in range(n)}
    o = net.origin_if(True)
    tl: dict[str, Any] = {"t": [round(r["t"] - t0, 2) for r in rows]}
    for k, ifn in names.items():
        tl[k + "_down_mb"] = [round((r[ifn][1] - base[ifn][1]) / 1e6, 1) for r in rows]
        tl[k + "_up_mb"] = [round((r[ifn][0] - base[ifn][0]) / 1e6, 1) for r in rows]
    tl["origin_mb"] = [round((r[o][0] - base[o][0]) / 1e6, 1) for r in rows]
    return tl


def check_links(net: Net, ctx: dict[str, Any]) -> dict[str, Any]:
    """Time one curl of the first shard origin -> node1, and node1 -> node2 (a plain HTTP server in node1's ns)."""
    key = ctx["keys"][0]
    size = ctx["sizes"][key]
    res: dict[str, Any] = {"bytes": size}
    url = f"http://{ORIGIN_IP}:{WEED_PORTS['s3']}/{BUCKET}/{key}"
    fmt = "%{size_download} %{time_total}"
    got, secs = sh(*nsexec(net.node_ns[0], "curl", "-sf", "-o", "/dev/null", "-w", fmt, url),
                   timeout=120).stdout.split()
    res["origin_to_node1_mbit"] = int(got) * 8 / float(secs) / 1e6
    if len(net.node_ns) > 1:
        srv = subprocess.Popen(nsexec(net.node_ns[0], sys.executable, "-m", "http.server", "8099", "--bind", node_ip(0),
                                      "--directory", str(ctx["src"])),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://{node_ip(0)}:8099/{Path(key).name}"
            for _ in range(50):
                d = sh(*nsexec(net.node_ns[1], "curl", "-sf", "-o", "/dev/null", "-w", fmt, url),
                       check=False, timeout=120)
                if d.returncode == 0:
                    got, secs = d.stdout.split()
                    res["node1_to_node2_mbit"] = int(got) * 8 / float(secs) / 1e6
                    break
                time.sleep(0.1)
        finally:
            stop_group(srv, 2.0)  # type: ignore[arg-type]
    return res


# ---------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]], limit_s: float) -> dict[str, Any]:
    """Medians per N/contender over the runs without errors; disturbed runs count only where nothing else ran."""
    ok = [r for r in runs if r["error"] is None]
    clean = {(r["nodes"], r["contender"]) for r in ok if not r.get("disturbed")}
    out: dict[str, Any] = {}
    for r in ok:
        if r.get("disturbed") and (r["nodes"], r["contender"]) in clean:
            continue
        k = f"{r['nodes']}/{r['contender']}"
        out.setdefault(k, {"seconds": [], "egress_x": [], "cpu_busy": [], "agents_cpu_s": [], "bound": [],
                           "disturbed": 0})
        out[k]["disturbed"] += bool(r.get("disturbed"))
        out[k]["bound"].append(r["busiest_upload_bound_s"])
        out[k]["seconds"].append(r["seconds"])
        out[k]["egress_x"].append(r["origin_egress_x_model"])
        out[k]["cpu_busy"].append(r["machine_busy_frac"])
        out[k]["agents_cpu_s"].append(r["agents_cpu_s"])
    med = {}
    for k, v in out.items():
        med[k] = {
            "seconds": statistics.median(v["seconds"]), "min_s": min(v["seconds"]), "max_s": max(v["seconds"]),
            "x_limit": statistics.median(v["seconds"]) / limit_s, "egress_x_model": statistics.median(v["egress_x"]),
            "machine_busy": statistics.median(v["cpu_busy"]), "agents_cpu_s": statistics.median(v["agents_cpu_s"]),
            "busiest_upload_bound_s": statistics.median(v["bound"]),
            "egress_min": min(v["egress_x"]), "egress_max": max(v["egress_x"]),
            "runs": len(v["seconds"]), "disturbed_runs": v["disturbed"],
        }  # fmt: skip
    return med


def table(med: dict[str, Any], nodes: list[int], limit_s: float) -> str:
    lines = [
        "| N | all-ready peers s | no-peers s | limit s | peers / limit | no-peers / limit "
        "| origin egress peers (x model) | no-peers (x model) | busiest uploader bound, peers s "
        "| machine CPU busy peers / no-peers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(k: str, f: str) -> str:
        m = med.get(k)
        if not m:
            return "-"
        if f == "s":
            star = " (disturbed)" if m["disturbed_runs"] else ""
            return f"{m['seconds']:.2f} ({m['min_s']:.2f}-{m['max_s']:.2f}){star}"
        if f == "x":
            return f"{m['x_limit']:.2f}x"
        if f == "e":
            return f"{m['egress_x_model']:.2f}"
        if f == "u":
            return f"{m['busiest_upload_bound_s']:.2f}"
        return f"{100 * m['machine_busy']:.0f}%"

    if any(k.endswith("/base") for k in med):  # storm mode with --base-rev: the code before beside the code now
        lines = [
            "| N | origin egress now (x model, min-max) | before (x model, min-max) | slowest node now s "
            "| before s | limit s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n in nodes:
            p, b = med.get(f"{n}/peers"), med.get(f"{n}/base")

            def eg(m: dict[str, Any] | None) -> str:
                return f"{m['egress_x_model']:.2f} ({m['egress_min']:.2f}-{m['egress_max']:.2f})" if m else "-"

            def sec(m: dict[str, Any] | None) -> str:
                return f"{m['seconds']:.2f}" if m else "-"

            lines.append(f"| {n} | {eg(p)} | {eg(b)} | {sec(p)} | {sec(b)} | {limit_s:.2f} |")
        return "\n".join(lines)
    for n in nodes:
        p, q = f"{n}/peers", f"{n}/nopeers"
        lines.append(f"| {n} | {cell(p, 's')} | {cell(q, 's')} | {limit_s:.2f} | {cell(p, 'x')} | {cell(q, 'x')} "
                     f"| {cell(p, 'e')} | {cell(q, 'e')} | {cell(p, 'u')} "
                     f"| {cell(p, 'b')} / {cell(q, 'b')} |")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4,8", help="comma-separated N (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="peers,nopeers", help="contenders: peers,nopeers")
    ap.add_argument("--size", default="256MiB", help="model size (default 256MiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="the model's random bytes (default 0)")
    ap.add_argument("--rate", type=float, default=200.0, help="each node's link, Mbit/s, both directions (default 200: "
                    "at N=8 with peers the agents then leave a quarter of this 2-core machine idle)")
    ap.add_argument("--origin-rate", type=float, default=None,
                    help="the origin's link, Mbit/s (default: --rate; 0: unlimited)")
    ap.add_argument("--burst", default="256kb", help="tbf burst (default 256kb)")
    ap.add_argument("--latency-ms", type=int, default=50, help="tbf queue, as latency (default 50)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between all agents ready and the prefetch")
    ap.add_argument("--run-timeout", type=float, default=0.0, help="per-run bound, s (default max(120, 4 x N x limit))")
    ap.add_argument("--stall-s", type=float, default=1.0, help="report a node's download pausing this long")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="before each run wait until other processes use under this many cores (0: do not wait)")
    ap.add_argument("--quiet-timeout", type=float, default=120.0, help="the longest that wait may take, s")
    ap.add_argument("--max-other-cores", type=float, default=0.6,
                    help="a run during which other processes used more cores than this is disturbed: a peers run is "
                         "repeated; disturbed runs are left out of the medians where an undisturbed one exists")
    ap.add_argument("--retries", type=int, default=2,
                    help="repeats of a disturbed peers run (default 2; no-peers runs wait on the origin's link, "
                         "not on CPU, and are kept)")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra `agent serve` argument (repeatable)")
    ap.add_argument("--agent-rev", default="HEAD",
                    help="git revision of agent/ and client/ the nodes run (exported), or `tree` for the working tree")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "peers-work"))
    ap.add_argument("--storm", choices=("cli", "warmset"), default=None,
                    help="start all agents at once; prefetch at each node's readiness (cli) or start with a warm set")
    ap.add_argument("--base-rev", default=None,
                    help="git revision to run side by side as the contender `base` (peers on, its own defaults)")
    ap.add_argument("--cleanup", action="store_true", help="remove namespaces a killed run left, and exit")
    ap.add_argument("--upload-helper", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.upload_helper:
        return upload_helper(args.upload_helper, 120)
    if os.geteuid() != 0:
        ap.error("needs root (ip netns, tc)")
    if args.cleanup:
        print(f"removed {cleanup_leftovers()} namespaces")
        return 0
    nodes = sorted({int(x) for x in args.nodes.split(",") if x})
    names = [c for c in args.only.split(",") if c]
    if args.storm and args.only == ap.get_default("only"):
        names = ["peers"]  # a storm is about peers: the origin-only contender has nothing to show there
    for c in names:
        if c not in ("peers", "nopeers"):
            ap.error(f"unknown contender {c}")
    if args.base_rev:
        names.append("base")
    origin_rate = args.rate if args.origin_rate is None else args.origin_rate

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    code, code_label = export_agent(args.agent_rev, work / "agent-code")
    env = agent_env(code)
    base_env, base_label = env, None
    if args.base_rev:
        base_code, base_label = export_agent(args.base_rev, work / "base-code")
        base_env = agent_env(base_code)
        print(f"base code: {base_label}", flush=True)
    if "peers" in names and not agent_has_peers_flags(env):
        ap.error(f"the agent at {code_label} has no --peers/--peer-token-file (agent serve --help); "
                 "run with --only nopeers")
    print(f"agent code: {code_label}", flush=True)
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    src = work / "src"
    make_model(src, parse_size(args.size), args.shards, args.seed)
    sizes = {f"{PREFIX}/{p.name}": p.stat().st_size for p in sorted(src.iterdir())}
    total = sum(sizes.values())
    want: dict[str, int] = {}
    for p in src.iterdir():
        d = file_digest(p)
        want[d] = want.get(d, 0) + 1
    limit_s = total * 8 / (args.rate * 1e6)
    print(f"model: {len(sizes)} files, {total} bytes; node link {args.rate} Mbit/s, "
          f"origin {origin_rate or 'unlimited'} Mbit/s; limit {limit_s:.2f} s", flush=True)  # fmt: skip
    token = work / "peer-token"
    token.write_text(secrets.token_hex(32) + "\n")
    token.chmod(0o600)

    net = Net(max(nodes), args.rate, origin_rate, args.burst, args.latency_ms)
    procs: list[subprocess.Popen[bytes]] = []

    def teardown() -> None:
        for p in procs:
            with contextlib.suppress(Exception):
                stop_group(p, 1.0)
        procs.clear()
        net.destroy()
        remove_weed_sockets()

    atexit.register(teardown)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below and atexit
    runs: list[dict[str, Any]] = []
    try:
        net.create()
        print(f"namespaces: {', '.join(net.made)}", flush=True)
        weed = start_origin(net, work)
        procs.append(weed)
        up = subprocess.run(nsexec(net.origin, sys.executable, str(Path(__file__).resolve()), "--upload-helper",
                                   str(src)),
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        if up.returncode != 0:
            weed_log = (work / "seaweed" / "weed.log").read_text()[-3000:]
            raise RuntimeError(f"upload failed: {up.stderr[-3000:]}\n{weed_log}")
        keys = json.loads(up.stdout.strip().splitlines()[-1])
        samples = out_dir / f"peers-{stamp}-links.ndjson"
        sampler = start_sampler(net, samples)
        procs.append(sampler)
        ctx: dict[str, Any] = {
            "net": net, "args": args, "work": work, "src": src, "keys": [k for k in keys if k.endswith(".safetensors")],
            "sizes": sizes, "total": total, "want": want, "limit_s": limit_s, "token_file": token, "weed": weed,
            "ref": f"s3://{BUCKET}/{PREFIX}", "env": env, "sampler": sampler, "out_dir": out_dir, "stamp": stamp,
            "samples": samples, "base_env": base_env, "warm_set": work / "warm-set.yaml",
        }  # fmt: skip
        (work / "warm-set.yaml").write_text(f"models:\n  - ref: s3://{BUCKET}/{PREFIX}\n    pin: false\n")
        links = check_links(net, ctx)
        print(f"shaping check (one curl of {links['bytes']} bytes): "
              f"origin->node1 {links['origin_to_node1_mbit']:.0f} Mbit/s, "
              f"node1->node2 {links.get('node1_to_node2_mbit', 0):.0f} Mbit/s (tbf rate {args.rate})",
              flush=True)  # fmt: skip

        for rnd in range(args.rounds):
            for j, n in enumerate(nodes):
                order = names if (rnd + j) % 2 == 0 else list(reversed(names))
                for c in order:
                    for attempt in range(1 + args.retries):
                        rec = run_once(ctx, n, c, rnd)
                        rec["attempt"] = attempt
                        runs.append(rec)
                        brief = {k: rec.get(k) for k in ("round", "nodes", "contender", "seconds",
                                                         "origin_egress_x_model",
                                                         "agents_cpu_s", "s3_server_cpu_s", "machine_busy_frac",
                                                         "other_cores", "quiet_wait_s", "error")}  # fmt: skip
                        brief["node_s"] = [p["seconds"] for p in rec.get("per_node", [])]
                        brief["up_mb"] = [round(p["upload_bytes"] / 1e6) for p in rec.get("per_node", [])]
                        brief["origin_mb"] = [round((p.get("agent_stats") or {}).get("origin_bytes", 0) / 1e6)
                                              for p in rec.get("per_node", [])]  # fmt: skip
                        brief["bound_s"] = rec.get("busiest_upload_bound_s")
                        brief["stalls"] = rec.get("stalls")
                        print(json.dumps(brief), flush=True)
                        if not rec.get("disturbed") or c not in ("peers", "base"):
                            break
                        print(f"  (disturbed: other processes used {rec['other_cores']} cores during the run)",
                              flush=True)
    finally:
        tcs = {}
        with contextlib.suppress(Exception):
            tcs = net.tc_stats()
        teardown()

    med = summarize(runs, limit_s)
    raw = {
        "command": " ".join(["bench/peers_netns.py", *sys.argv[1:]]),
        "time": stamp,
        "agent_code": code_label,
        "base_code": base_label,
        "storm": args.storm,
        "cpus": os.cpu_count(),
        "model_bytes": total,
        "files": sizes,
        "node_rate_mbit": args.rate,
        "origin_rate_mbit": origin_rate,
        "tbf": {"burst": args.burst, "latency_ms": args.latency_ms},
        "limit_s": limit_s,
        "link_check": links,
        "nodes": nodes,
        "rounds": args.rounds,
        "medians": med,
        "tc_at_end": tcs,
        "runs": runs,
    }
    out = out_dir / f"peers-{stamp}.json"
    out.write_text(json.dumps(raw, indent=1))
    (out_dir / "peers-latest.json").write_text(json.dumps(raw, indent=1))
    print()
    print(table(med, nodes, limit_s))
    failed = [r for r in runs if r["error"] is not None]
    print(f"\n{len(runs) - len(failed)} of {len(runs)} runs ok; raw numbers: {out}")
    for r in failed:
        print(f"FAILED round {r['round']} N={r['nodes']} {r['contender']}: {r['error'][:500]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
