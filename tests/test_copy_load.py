"""``copy=True`` loads (client/copy_read.py): bit-exact with safetensors, cold or warm, and never a corrupt byte.

Each file is read once into one buffer of its own (O_DIRECT where its pages are
not in the page cache) and every piece is hashed from that buffer before a tensor
over it is handed out. Real agent, real SeaweedFS, the real all-MiniLM-L6-v2;
synthetic files for what MiniLM does not have (many dtypes, tensors misaligned for
their element type, tensors across read chunks, more than one piece).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import load_file

import client
from client.copy_read import FileCopy
from client.verify import BlobCheck, CorruptPieceError

MiB = 1024 * 1024
MODEL_FILE = "model.safetensors"
MODEL_SIZE = 90868376  # MiniLM's model.safetensors


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        assert torch.equal(_raw(got[name]), _raw(w)), f"{name} differs from safetensors"


def _drop_from_page_cache(path: Path) -> None:
    """Make one file cold: write back and drop its pages (this file only, not the machine's whole cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident_fraction(path: Path) -> float:
    """Share of ``path``'s pages in the page cache (``mincore`` over a fresh mapping)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            assert libc.mincore(addr, size, vec) == 0
            return sum(b & 1 for b in bytes(vec)) / len(vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _direct_io_works(path: Path) -> bool:
    """Whether this file system takes O_DIRECT opens (tmpfs does not: the loader then reads the plain way)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _write_mixed(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of many dtypes, some misaligned for their element type, some across 16 MiB chunks.

    Written by hand (safetensors itself aligns nothing either: the offsets are the
    file's). Returns the tensors it holds.
    """
    g = torch.Generator().manual_seed(5)
    specs: list[tuple[str, torch.Tensor]] = [
        ("odd.u8", torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g)),
        ("misaligned.f32", torch.randn(1000, generator=g)),  # at data offset 3
        ("misaligned.f64", torch.randn(77, generator=g, dtype=torch.float64)),
        ("empty.f16", torch.empty(0, 4, dtype=torch.float16)),
        ("big.bf16", torch.randn(9 * MiB, generator=g).to(torch.bfloat16)),  # 18 MiB: across a chunk boundary
        ("mid.i64", torch.randint(-(2**40), 2**40, (12345,), dtype=torch.int64, generator=g)),
        ("big.f32", torch.randn(5 * MiB + 7, generator=g)),  # 20 MiB: across the next boundary
        ("bool", torch.rand(1001, generator=g) > 0.5),
        ("tail.i8", torch.randint(-100, 100, (4099,), dtype=torch.int8, generator=g)),
    ]
    names = {torch.uint8: "U8", torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL", torch.int8: "I8"}  # fmt: skip
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name, t in specs:
        raw = bytes(_raw(t.contiguous()).numpy().tobytes())
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": offsets}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))
    return dict(specs)


def _piece_hashes(path: Path, piece_size: int) -> list[str]:
    data = path.read_bytes()
    return [xxhash.xxh3_128(data[i : i + piece_size]).hexdigest() for i in range(0, len(data), piece_size)]


def _copy_with_check(
    path: Path, piece_size: int, hashes: list[str], got: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """FileCopy of ``path`` checked against ``hashes``; appends to ``got`` each tensor as it is handed out."""
    fd = os.open(path, os.O_RDONLY)
    check = BlobCheck(fd, path.name, path.stat().st_size, piece_size, hashes, str(path))
    try:
        copier = FileCopy(fd, str(path), check=check)
        for item in copier.tensors(copier.header.tensors):
            got.append(item)
    finally:
        check.close()
        os.close(fd)
    return got


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_minilm_copies_bit_exact(agent_factory: Any, s3_model: Any, cold: bool) -> None:
    agent = agent_factory()
    assert agent.cli("prefetch", s3_model.ref).returncode == 0
    blob = next(p for p in (agent.cache_dir / "blobs").iterdir() if p.stat().st_size == MODEL_SIZE)
    if cold:
        _drop_from_page_cache(blob)
    else:
        blob.read_bytes()
    before = _resident_fraction(blob)

    got = client.open_tensors(s3_model.ref, socket=str(agent.socket_path), copy=True)

    _assert_same(got, load_file(str(s3_model.local_dir / MODEL_FILE)))
    after = _resident_fraction(blob)
    if cold and _direct_io_works(blob):
        assert before < 0.05, before
        # read with O_DIRECT straight into the buffer: the page cache was not filled on the way (header, edges only)
        assert after < 0.05, f"{after:.0%} of the blob came through the page cache"
    # memory of its own: writing to a copy changes neither the file nor a fresh load
    name = next(n for n, t in got.items() if t.numel() and t.is_floating_point())
    got[name].add_(1)
    again = client.open_tensors(s3_model.ref, socket=str(agent.socket_path), copy=True, names=[name])
    assert not torch.equal(_raw(again[name]), _raw(got[name]))


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_mixed_dtypes_and_misaligned_tensors_copy_bit_exact(tmp_path: Path, cold: bool) -> None:
    path = tmp_path / "mixed.safetensors"
    want = _write_mixed(path)
    if cold:
        _drop_from_page_cache(path)

    got = client.load_safetensors_file(path, copy=True)

    _assert_same(got, want)
    _assert_same(got, load_file(str(path)))
    for name in ("misaligned.f32", "misaligned.f64"):  # copied out to memory aligned for their type
        assert got[name].data_ptr() % got[name].dtype.itemsize == 0, name
    some = client.load_safetensors_file(path, copy=True, names=["mid.i64", "tail.i8"])
    _assert_same(some, {n: want[n] for n in ("mid.i64", "tail.i8")})


@pytest.mark.parametrize("piece_size", [1 * MiB, 3 * MiB + 4096, 0], ids=["1MiB", "3MiB+4KiB", "whole-file"])
def test_every_piece_checked_from_the_buffer(tmp_path: Path, piece_size: int) -> None:
    path = tmp_path / "mixed.safetensors"
    want = _write_mixed(path)
    size = path.stat().st_size
    piece_size = piece_size or size
    _drop_from_page_cache(path)

    got = dict(_copy_with_check(path, piece_size, _piece_hashes(path, piece_size), []))

    _assert_same(got, want)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_corrupt_byte_is_refused_and_nothing_over_it_handed_out(tmp_path: Path, where: str) -> None:
    path = tmp_path / "mixed.safetensors"
    want = _write_mixed(path)
    piece_size = 1 * MiB
    hashes = _piece_hashes(path, piece_size)  # recorded while the file was whole
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    at = header_end - 2 if where == "header" else 25 * MiB + 12345  # a space in the header; inside big.f32
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    _drop_from_page_cache(path)

    handed: list[tuple[str, torch.Tensor]] = []
    with pytest.raises(CorruptPieceError) as err:
        _copy_with_check(path, piece_size, hashes, handed)
    assert err.value.piece == at // piece_size
    if where == "header":
        assert handed == []
    for name, t in handed:  # whatever came before the error is whole and lies outside the bad piece
        assert torch.equal(_raw(t), _raw(want[name])), name
    assert "big.f32" not in dict(handed)


def _write_sharded(model: Path, shards: int = 3) -> dict[str, torch.Tensor]:
    """A local model of ``shards`` safetensors files (index included), each over two 16 MiB read chunks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    model.mkdir()
    weight_map: dict[str, str] = {}
    want: dict[str, torch.Tensor] = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {
            f"layers.{s}.w": torch.randn(5 * MiB + 3, generator=g).to(torch.bfloat16),  # 10 MiB
            f"layers.{s}.norm": torch.randn(4099, generator=g),
            f"layers.{s}.v": torch.randn(6 * MiB, generator=g),  # 24 MiB: across a chunk boundary
        }
        save_file(part, str(model / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        want |= part
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "config.json").write_text("{}")
    return want


def _copy_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("warmstart-copy")]


def test_a_sharded_model_reads_the_next_file_ahead_bit_exact(
    agent_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "sharded"
    want = _write_sharded(model)
    agent = agent_factory()
    assert agent.cli("prefetch", str(model)).returncode == 0
    blobs = [b for b in (agent.cache_dir / "blobs").rglob("*") if b.is_file() and b.stat().st_size > 16 * MiB]
    assert len(blobs) == 3
    for blob in blobs:
        _drop_from_page_cache(blob)
    # a record of when each file's reads start, beside the tensors handed out (FileCopy.start runs the real thing)
    events: list[str] = []
    real_start = FileCopy.start

    def start(self: FileCopy, infos: Any) -> None:
        events.append(f"start {self.name.rsplit('/', 1)[-1]}")
        real_start(self, infos)

    monkeypatch.setattr(FileCopy, "start", start)

    got: dict[str, torch.Tensor] = {}
    for name, t in client.iter_tensors(str(model), socket=str(agent.socket_path), copy=True):
        events.append(name)
        got[name] = t

    _assert_same(got, want)
    # the first call of each file's start (the one that started it; later ones find it started)
    starts = [events.index(f"start model-{s:05d}-of-00003.safetensors") for s in (1, 2, 3)]
    # each next file started reading before the previous file's last tensor was handed out
    last_of = {s: max(i for i, e in enumerate(events) if e.startswith(f"layers.{s}.")) for s in range(3)}
    assert starts[1] < last_of[0] and starts[2] < last_of[1], events
    assert _copy_threads() == []
    if _direct_io_works(blobs[0]):  # files read ahead come through O_DIRECT too: the page cache stays cold
        for blob in blobs:
            assert _resident_fraction(blob) < 0.05, f"{_resident_fraction(blob):.0%} of {blob.name} in the page cache"


def test_a_copy_load_stopped_early_lets_go_of_the_file_read_ahead(agent_factory: Any, tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    want = _write_sharded(model)
    agent = agent_factory()
    assert agent.cli("prefetch", str(model)).returncode == 0
    fds_before = len(os.listdir("/proc/self/fd"))

    tensors = client.iter_tensors(str(model), socket=str(agent.socket_path), copy=True)
    first = next(tensors)
    tensors.close()

    assert torch.equal(_raw(first[1]), _raw(want[first[0]]))
    assert _copy_threads() == [], "reader threads left behind"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "descriptors left open"
    # and the files can be taken again: nothing held
    assert sorted(client.open_tensors(str(model), socket=str(agent.socket_path), copy=True)) == sorted(want)
