"""The device ring (client/device_ring.py): batching, bit-exactness, early stops, memory bounds.

The ring's pipeline (plan, threaded positional reads into reused buffers,
copies out, hand-out order) runs the same on CPU with plain buffers, so it is
exercised here on every machine with rings far smaller than the tensors. The
CUDA specifics (pinned slots, the copy stream, events) run in the tests marked
``cuda`` when a GPU is present.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import client
from client.device_ring import DeviceRing, plan_batches
from client.safetensors_header import read_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {f"layer{i}.w": torch.randn(37 + i, 129, generator=g).to(torch.bfloat16) for i in range(6)}
    out["big"] = torch.randn(300_000, generator=g)  # 1.2 MB: many slots
    out["tiny"] = torch.tensor([1, 2, 3], dtype=torch.int8)
    out["empty"] = torch.empty(0, 3)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    return out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    return path


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def test_plan_covers_every_byte_once_within_slot_size(model: Path) -> None:
    with open(model, "rb") as f:
        infos = read_header(f.fileno(), name=str(model)).tensors
    for slot in (4096, 8192, 65536, 1 << 24):
        batches = plan_batches(infos, slot)
        assert all(0 < b.size <= slot for b in batches)
        covered: dict[int, int] = {}
        for b in batches:
            assert sum(n for _, n in b.reads) == b.size == sum(p.length for p in b.placements)
            for p in b.placements:
                assert p.dest_off == covered.get(p.index, 0)  # each tensor filled in order, no gap
                covered[p.index] = p.dest_off + p.length
        assert covered == {i: t.nbytes for i, t in enumerate(infos) if t.nbytes}
        finishes = [i for b in batches for i in b.finishes]
        assert sorted(finishes) == sorted(covered)
        if slot >= 1 << 24:  # everything fits: adjacent tensors merge into a single read
            assert len(batches) == 1 and len(batches[0].reads) == 1


@pytest.mark.parametrize("ring_bytes", [4 * 4096, 64 * 1024, 1 << 22])
def test_ring_load_is_bit_exact(model: Path, ring_bytes: int) -> None:
    want = load_file(str(model))
    with DeviceRing("cpu", ring_bytes=ring_bytes) as ring, open(model, "rb") as f:
        infos = read_header(f.fileno(), name=str(model)).tensors
        order = [name for name, _ in ring.load(f.fileno(), str(model), infos)]
        with open(model, "rb") as f2:
            got = dict(ring.load(f2.fileno(), str(model), infos))  # a ring is reusable
    assert sorted(order) == sorted(want)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        assert torch.equal(_raw(got[name]), _raw(w)), name


def test_ring_yields_in_file_order(model: Path) -> None:
    with open(model, "rb") as f:
        infos = read_header(f.fileno(), name=str(model)).tensors
        by_offset = [t.name for t in sorted(infos, key=lambda t: t.offset) if t.nbytes]
        with DeviceRing("cpu", ring_bytes=4 * 4096) as ring:
            got = [name for name, t in ring.load(f.fileno(), str(model), infos) if t.numel()]
    assert got == by_offset


def test_stopping_early_leaves_the_ring_usable(model: Path) -> None:
    """A consumer that breaks off (an exception in load_weights) must not leave reads in flight."""
    with open(model, "rb") as f:
        infos = read_header(f.fileno(), name=str(model)).tensors
        with DeviceRing("cpu", ring_bytes=4 * 4096) as ring:
            gen = ring.load(f.fileno(), str(model), infos)
            next(gen)
            next(gen)
            gen.close()  # type: ignore[attr-defined]  # load() is a generator; its annotation says Iterator
            again = dict(ring.load(f.fileno(), str(model), infos))
    assert len(again) == len(infos)


def test_meta_device_uses_the_ring_and_holds_no_file(model: Path) -> None:
    got = client.load_safetensors_file(model, device="meta", ring_bytes=8192)
    assert {t.device.type for t in got.values()} == {"meta"}


def test_ring_needs_two_slots() -> None:
    with pytest.raises(ValueError, match="2 slots"):
        DeviceRing("cpu", slots=1)


# ---------------------------------------------------------------------- memory bounds

_RSS_SCRIPT = r"""
import sys, torch, client

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

path, mode = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports do not count
base = status("VmRSS")
if mode == "keep":  # every tensor kept and touched: RSS should be about the model, not twice it
    kept = client.load_safetensors_file(path)
elif mode == "copy":
    kept = client.load_safetensors_file(path, copy=True)
else:  # through the ring, dropping each tensor: RSS should stay near the ring
    kept = {}
    for name, t in client.iter_safetensors_files([path], device="meta", ring_bytes=16 << 20):
        pass
touched = sum(int(t.max()) * 0 + t.numel() for t in kept.values())  # max reads every page
print(status("VmHWM") - base, touched)
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("rss") / "big.safetensors"
    tensors = {f"w{i}": torch.randint(0, 255, (16, 1 << 20), dtype=torch.uint8) for i in range(16)}  # 256 MiB
    save_file(tensors, str(path))
    return path, 256 << 20


def _peak_growth(path: Path, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), mode], capture_output=True, text=True, timeout=300, check=True
    )
    return int(out.stdout.split()[0])


@pytest.mark.parametrize("mode", ["keep", "copy"])
@pytest.mark.slow
def test_cpu_load_peak_rss_is_about_the_model_not_twice(big_model: tuple[Path, int], mode: str) -> None:
    path, size = big_model
    growth = _peak_growth(path, mode)
    # at least the model (else the measurement saw nothing), and far from twice it
    assert 0.9 * size < growth < 1.3 * size, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    )


def test_device_load_peak_rss_is_about_the_ring(big_model: tuple[Path, int]) -> None:
    path, size = big_model
    growth = _peak_growth(path, "ring")
    assert growth < 64 << 20, f"peak RSS grew by {growth / 2**20:.0f} MiB with a 16 MiB ring ({size >> 20} MiB model)"


# ---------------------------------------------------------------------- CUDA


def _peak_host() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ring_bytes", [4 * 4096, 1 << 22])
def test_cuda_ring_is_bit_exact_and_ordered_with_the_default_stream(model: Path, ring_bytes: int) -> None:
    want = load_file(str(model))
    got = {}
    for name, t in client.iter_safetensors_files([model], device="cuda", ring_bytes=ring_bytes):
        assert t.device.type == "cuda"
        got[name] = t.clone()  # consumed on the default stream right away: must see the finished copy
    for name, w in want.items():
        assert torch.equal(_raw(got[name]).cpu(), _raw(w)), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ring_uses_pinned_slots_and_a_side_stream() -> None:
    with DeviceRing("cuda", ring_bytes=1 << 20) as ring:
        assert all(b.is_pinned() for b in ring.buffers)
        assert ring.stream is not None and ring.stream != torch.cuda.current_stream()
