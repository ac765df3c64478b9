"""Issue 7, load: 32 clients at once on one cold model (fetched once), 32 clients on 32
different cached models (all bit-exact), and eviction under capacity pressure while
readers hold tensors (a held blob is never removed, no reader ever sees wrong bytes).

Clients are threads of this process calling the real client against a real agent:
each open is its own socket connection and its own shared flock per blob, as in
separate pods (the agent cannot tell the difference), without 32 torch imports on 2 cores.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import client
from client.errors import CapacityError
from tests.servers.seaweedfs import SeaweedS3
from tests.test_agent_e2e import assert_bit_exact, expected_tensors

CLIENTS = 32
MiB = 1024 * 1024


def _relay(seaweed: SeaweedS3, relay_factory: Any) -> Any:
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    return relay_factory(host, int(port))


def _models(seaweed: SeaweedS3, tmp_path: Path, prefix: str, n: int, floats: int) -> dict[str, dict[str, torch.Tensor]]:
    """``n`` small safetensors models uploaded to s3://models/PREFIX/m<i>; ref -> tensors."""
    seaweed.make_bucket("models")
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {f"layer{j}.weight": torch.randn(floats // 4, generator=g) for j in range(4)}
        tensors["ids"] = torch.arange(i, i + 7, dtype=torch.int64)
        path = tmp_path / f"{prefix}-{i}.safetensors"
        save_file(tensors, str(path))
        seaweed.upload_file(path, "models", f"{prefix}/m{i}/model.safetensors")
        path.unlink()
        out[f"s3://models/{prefix}/m{i}"] = tensors
    return out


@pytest.mark.slow
def test_32_clients_on_one_cold_model_fetch_it_once(
    inproc_factory: Any, s3_model: Any, seaweed: SeaweedS3, relay_factory: Any
) -> None:
    relay = _relay(seaweed, relay_factory)
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": relay.url})
    want = expected_tensors(s3_model.local_dir)
    barrier = threading.Barrier(CLIENTS)

    def open_one(_: int) -> dict[str, torch.Tensor]:
        barrier.wait(timeout=30)
        return client.open_tensors(s3_model.ref, socket=str(agent.socket_path))

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(open_one, range(CLIENTS), timeout=240))
    for r in results:
        assert_bit_exact(r, want)
    model_bytes = sum(p.stat().st_size for p in s3_model.local_dir.rglob("*") if p.is_file())
    print(f"\n{CLIENTS} clients, one cold model: origin sent {relay.bytes_down / model_bytes:.3f}x the model")
    assert relay.bytes_down < 1.05 * model_bytes, f"{(relay.bytes_down, model_bytes)}\n{relay.traffic()}"


def test_32_clients_on_32_cached_models_all_bit_exact(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    models = _models(seaweed, tmp_path, "many", CLIENTS, floats=64 * 1024)
    relay = _relay(seaweed, relay_factory)
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": relay.url})
    sock = str(agent.socket_path)
    with ThreadPoolExecutor(8) as pool:  # fill the cache (8 at a time)
        list(pool.map(lambda ref: client.open_tensors(ref, socket=sock, copy=True), models, timeout=240))
    relay.reset_counters()
    barrier = threading.Barrier(CLIENTS)

    def open_one(ref: str) -> tuple[str, dict[str, torch.Tensor]]:
        barrier.wait(timeout=30)
        return ref, client.open_tensors(ref, socket=sock)

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(open_one, models, timeout=240))
    for ref, got in results:
        assert_bit_exact(got, models[ref])
    print(f"\n{CLIENTS} clients, {CLIENTS} cached models: bit-exact; origin bytes while opening {relay.bytes_down}")
    assert relay.bytes_down < 64 * 1024 * CLIENTS  # cached: at most the listings, no model bytes


def test_eviction_under_pressure_never_breaks_a_reader(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    # 10 models of ~4 MiB under a 16 MiB capacity: at most 4 fit, so almost every open evicts.
    models = _models(seaweed, tmp_path, "pressure", 10, floats=1024 * 1024)
    refs = sorted(models)
    agent = inproc_factory(capacity="16MiB")
    sock = str(agent.socket_path)
    stop = time.monotonic() + 15
    counts = {"opens": 0, "checks": 0, "capacity_refusals": 0}
    lock = threading.Lock()
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop and not failures:
            ref = rng.choice(refs)
            try:
                got = client.open_tensors(ref, socket=sock)
            except CapacityError:  # every blob that could go is held by another reader: a clear refusal
                with lock:
                    counts["capacity_refusals"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - collected; any other failure is a broken reader
                failures.append(f"{ref}: {type(exc).__name__}: {exc}")
                return
            with lock:
                counts["opens"] += 1
            # Hold the tensors a while (others evict meanwhile), checking them more than once.
            for _ in range(rng.randint(1, 3)):
                time.sleep(rng.uniform(0.05, 0.4))
                for name, t in models[ref].items():
                    if not torch.equal(got[name], t):
                        failures.append(f"{ref}:{name} changed under a reader")
                        return
                with lock:
                    counts["checks"] += 1
            del got

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    evictions = agent.log_text().count("to make room")
    print(f"pressure: {counts}, evictions {evictions}")
    assert counts["opens"] >= 10 and evictions >= 5, (counts, evictions)
    assert agent.alive() and agent.http_status("/livez") == 200
    used = sum(p.stat().st_size for p in (agent.cache_dir / "blobs").iterdir())
    assert used <= 16 * MiB
