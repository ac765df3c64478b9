"""``iter_tensors`` holds every blob it reads from until the iteration ends: no eviction under a running load.

A real in-process agent with a real S3 origin (SeaweedFS) and a model of three
shards. The iteration takes one tensor of the first shard, then the model is
evicted (``agent evict``, what capacity pressure does blob by blob): the agent
must find every shard "open by a reader" and keep it, and the iteration must go
on to the end, bit-exact, without a ``BlobEvictedError`` it could not act on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import client
from tests.servers.seaweedfs import SeaweedS3

SHARDS = 3


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _upload_model(seaweed: SeaweedS3, tmp_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """``SHARDS`` shards of 4 MiB with an index; returns the tensors as safetensors loads them."""
    g = torch.Generator().manual_seed(5)
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    want: dict[str, torch.Tensor] = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {f"layers.{shard}.{i}.weight": torch.randn(256, 1024, generator=g).half() for i in range(8)}
        save_file(tensors, str(src / name))
        want.update(load_file(str(src / name)))
        weight_map.update(dict.fromkeys(tensors, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    seaweed.make_bucket("models")
    for p in sorted(src.iterdir()):
        seaweed.upload_file(p, "models", f"{prefix}/{p.name}")
    return want


@pytest.mark.parametrize("copy", [False, True])
def test_an_evict_during_iteration_keeps_every_shard_and_the_load_completes(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path, copy: bool
) -> None:
    ref = f"s3://models/holds-{int(copy)}"
    want = _upload_model(seaweed, tmp_path, ref.removeprefix("s3://models/"))
    agent = inproc_factory()
    agent.cli("prefetch", ref, check=True)
    shard_blobs = {p.name for p in (agent.cache_dir / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20}
    assert len(shard_blobs) == SHARDS

    tensors = client.iter_tensors(ref, socket=str(agent.socket_path), copy=copy)
    name, first = next(tensors)
    got = {name: first.clone()}
    del first

    out = json.loads(agent.cli("evict", ref, "--json", check=True).stdout)
    kept = {k["digest"]: k["reason"] for k in out["kept"]}
    # every shard is held from the start, not just the one being read
    assert shard_blobs <= set(kept), out
    assert all("open by a reader" in kept[d] for d in shard_blobs), out
    on_disk = {p.name for p in (agent.cache_dir / "blobs").rglob("*") if p.is_file()}
    assert shard_blobs <= on_disk

    for name, t in tensors:  # no BlobEvictedError: the blobs are still there
        got[name] = t.clone()
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert torch.equal(_raw(got[n]), _raw(w)), n

    # once the iteration ended (and no tensor maps a blob), the locks are gone: evict now frees them
    del tensors, t
    import gc

    gc.collect()
    for digest in shard_blobs:
        path = next((agent.cache_dir / "blobs").rglob(digest))
        fd = os.open(path, os.O_RDONLY)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if a reader still holds it
        finally:
            os.close(fd)


def _lockable(path: Path) -> bool:
    """Whether the agent could take the blob for deletion now (no reader holds a shared flock)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_blob_evicted_before_the_iteration_holds_it_is_opened_again(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the hold cannot close: evicted between the agent's answer and the client's lock.

    The test times it: the real ``agent evict`` runs right after the agent answered
    the first open and before the client locks. Nothing was handed out yet, so the
    iteration opens the model again (the agent fetches it back) instead of raising.
    """
    from client.stream import ModelStream

    ref = "s3://models/holds-race"
    want = _upload_model(seaweed, tmp_path, "holds-race")
    agent = inproc_factory()
    agent.cli("prefetch", ref, check=True)
    original = ModelStream.hold
    calls: list[int] = []

    def evict_then_hold(self: ModelStream, paths: list[str]) -> None:
        calls.append(len(paths))
        if len(calls) == 1:
            out = json.loads(agent.cli("evict", ref, "--json", check=True).stdout)
            assert out["kept"] == [], out  # nothing held yet: all gone
        original(self, paths)

    monkeypatch.setattr(ModelStream, "hold", evict_then_hold)
    got = {n: t.clone() for n, t in client.iter_tensors(ref, socket=str(agent.socket_path))}
    assert calls == [SHARDS, SHARDS]
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert torch.equal(_raw(got[n]), _raw(w)), n


def test_an_iteration_dropped_before_its_first_tensor_lets_go(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """``iter_tensors`` holds at the call; a generator never started must not keep the blobs locked."""
    import gc

    ref = "s3://models/holds-drop"
    _upload_model(seaweed, tmp_path, "holds-drop")
    agent = inproc_factory()
    agent.cli("prefetch", ref, check=True)
    blobs = [p for p in (agent.cache_dir / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    tensors = client.iter_tensors(ref, socket=str(agent.socket_path))
    assert not any(_lockable(p) for p in blobs)  # held from the call on
    del tensors
    gc.collect()
    assert all(_lockable(p) for p in blobs)

    tensors = client.iter_tensors(ref, socket=str(agent.socket_path))
    next(tensors)
    tensors.close()  # closed after the first tensor (a clone-free one maps its shard: dropped here too)
    gc.collect()
    assert all(_lockable(p) for p in blobs)
