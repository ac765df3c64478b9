"""Issue 7, soak: a bounded run of mixed prefetch/open/evict/list traffic against one agent
while its peer restarts (SIGTERM or kill -9, alternately); the agent's RSS and open file
descriptors must stay flat.

Bounded: SOAK_SECONDS (default 60 in CI; docs/RELIABILITY.md has a 180 s run) of traffic, sampled every second
from /proc.
Flat: after a warm-up (the first 20% of the run), the median of the last quarter of the
samples is within 15% (RSS) and +20 (fds) of the median of the first quarter. The figures
are printed (run with -s) and recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import client
from client.errors import CapacityError, ModelNotFoundError, WarmstartError
from client.transport import AgentConnection
from tests.servers.ports import free_ports
from tests.servers.seaweedfs import SeaweedS3

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
TOKEN = "soak-peer-token-0123456789"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
# Not serial: its RSS and descriptor counts are the agent's own, whatever runs beside it; the opens that saw
# 'it kept moving' beside other tests were a client fault, fixed in client/stream.py (it now waits on the file's
# own names). Run alone it held the other workers idle for its 60 s.
def test_soak_mixed_traffic_with_a_restarting_peer_keeps_rss_and_fds_flat(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, tmp_path: Path
) -> None:
    seaweed.make_bucket("models")
    models: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(12):
        g = torch.Generator().manual_seed(500 + i)
        tensors = {f"w{j}": torch.randn(128 * 1024, generator=g) for j in range(4)}  # 2 MiB
        path = tmp_path / f"soak-{i}.safetensors"
        save_file(tensors, str(path))
        seaweed.upload_file(path, "models", f"soak/m{i}/model.safetensors")
        path.unlink()
        models[f"s3://models/soak/m{i}"] = tensors
    refs = sorted(models)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    pa, pb = free_ports(2)
    peers = f"127.0.0.1:{pa},127.0.0.1:{pb}"
    args = ("--peers", peers, "--peer-token-file", str(token), "--piece-size", "1MiB", "--peer-start-wait", "0")
    a = agent_factory("a", port=pa, capacity="14MiB", extra_args=args)
    b = agent_factory("b", port=pb, capacity="64MiB", extra_args=args)
    sock = str(a.socket_path)
    assert a.pid is not None
    pid = a.pid
    stop = threading.Event()
    counts = {"prefetch": 0, "open": 0, "evict": 0, "list": 0, "capacity": 0, "peer_restarts": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        conn = AgentConnection(sock, timeout=60)
        while not stop.is_set() and not failures:
            op = rng.choices(["prefetch", "open", "evict", "list"], weights=[3, 4, 2, 1])[0]
            ref = rng.choice(refs)
            try:
                if op == "prefetch":
                    for _ in conn.stream("POST", "/v1/prefetch", {"ref": ref, "pin": False}):
                        pass
                elif op == "open":
                    got = client.open_tensors(ref, socket=sock)
                    if not all(torch.equal(got[n], t) for n, t in models[ref].items()):
                        failures.append(f"{ref}: wrong bytes")
                    del got
                elif op == "evict":
                    with contextlib.suppress(ModelNotFoundError):  # not cached right now: fine
                        conn.request_json("POST", "/v1/evict", {"ref": ref})
                else:
                    conn.request_json("GET", "/v1/models")
            except CapacityError:
                with lock:
                    counts["capacity"] += 1
                continue
            except WarmstartError as exc:
                failures.append(f"{op} {ref}: {type(exc).__name__}: {exc}")
                return
            with lock:
                counts[op] += 1

    def restarter() -> None:
        kill = False
        while not stop.wait(12):
            b.restart(kill=kill)
            kill = not kill
            with lock:
                counts["peer_restarts"] += 1

    workers = [threading.Thread(target=traffic, args=(s,)) for s in range(2)]
    workers.append(threading.Thread(target=restarter))
    for w in workers:
        w.start()
    samples: list[tuple[float, int, int]] = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < SOAK_SECONDS and not failures:
            samples.append((time.monotonic() - start, _rss_kib(pid), _fds(pid)))
            time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=90)
    assert not failures, failures
    assert a.alive() and a.pid == pid  # the same process all along
    steady = samples[len(samples) // 5:]
    q = max(1, len(steady) // 4)
    first, last = steady[:q], steady[-q:]
    rss0, rss1 = statistics.median(s[1] for s in first), statistics.median(s[1] for s in last)
    fd0, fd1 = statistics.median(s[2] for s in first), statistics.median(s[2] for s in last)
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: {counts}; RSS MiB first-quarter median {rss0 / 1024:.1f}, last {rss1 / 1024:.1f} "
        f"(min {min(s[1] for s in samples) / 1024:.1f}, max {max(s[1] for s in samples) / 1024:.1f}); "
        f"fds first {fd0:.0f}, last {fd1:.0f} (min {min(s[2] for s in samples)}, max {max(s[2] for s in samples)})"
    )
    assert counts["open"] >= 20 and counts["prefetch"] >= 10 and counts["peer_restarts"] >= 2, counts
    assert rss1 <= rss0 * 1.15, (rss0, rss1)
    assert fd1 <= fd0 + 20, (fd0, fd1)
