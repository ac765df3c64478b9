"""No rotted byte is ever handed out: the client checks cached blobs against their piece hashes as it reads them.

Real agent, real SeaweedFS, the real all-MiniLM-L6-v2. A byte of a fully cached
blob is flipped on disk (what bit rot or a bad disk does); every way of loading
the model must then either return bit-exact tensors (the client found the bad
piece, the agent re-checked the blob, removed it and fetched it again) or raise
:class:`client.errors.IntegrityError` — never the corrupt tensor.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import load_file

import client
from client.errors import IntegrityError

MODEL_FILE = "model.safetensors"
MODEL_SIZE = 90868376  # MiniLM's model.safetensors
FLIP_AT = 40_000_000  # inside a weight's bytes, in a piece other than the first


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _weights_blob(agent: Any) -> Path:
    return next(p for p in (agent.cache_dir / "blobs").iterdir() if p.stat().st_size == MODEL_SIZE)


def _flip(path: Path, offset: int) -> None:
    """Invert one byte in place, as rot would (the page cache sees it too, like a re-read from a bad disk)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def _file_xxh128(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listed(agent: Any) -> dict[str, Any]:
    models = json.loads(agent.cli("ls", "--json", check=True).stdout)["models"]
    assert len(models) == 1, models
    return dict(models[0])


@pytest.fixture
def rotted(agent_factory: Any, s3_model: Any) -> tuple[Any, Any, Path]:
    """An agent with MiniLM fully cached whose weights blob then had one byte flipped."""
    agent = agent_factory()
    assert agent.cli("prefetch", s3_model.ref).returncode == 0
    blob = _weights_blob(agent)
    assert _listed(agent)["cached_bytes"] == _listed(agent)["total_size"]
    _flip(blob, FLIP_AT)
    assert _file_xxh128(blob) != blob.name
    return agent, s3_model, blob


def _load(how: str, ref: str, socket: str) -> dict[str, torch.Tensor]:
    if how == "open":
        return client.open_tensors(ref, socket=socket)
    if how == "copy":
        return client.open_tensors(ref, socket=socket, copy=True)
    if how == "iter":
        return {name: t.clone() for name, t in client.iter_tensors(ref, socket=socket)}
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["open", "iter", "copy"])
def test_a_rotted_blob_is_refetched_never_served(rotted: tuple[Any, Any, Path], how: str) -> None:
    agent, model, blob = rotted
    want = load_file(str(model.local_dir / MODEL_FILE))

    got = _load(how, model.ref, str(agent.socket_path))

    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_raw(got[name]), _raw(t)), f"{name}: a corrupt tensor was handed out"
    # the agent re-checked the blob, removed it and fetched it again: the file on disk is whole
    assert blob.exists() and _file_xxh128(blob) == blob.name
    listed = _listed(agent)
    assert listed["cached_bytes"] == listed["total_size"]
    assert "corrupt" in agent.log_text()


def test_the_device_ring_path_checks_too(rotted: tuple[Any, Any, Path]) -> None:
    """The GPU path (pinned ring, pread; ``meta`` stands in for the device here) finds the rot and gets it repaired."""
    agent, model, blob = rotted
    got = client.open_tensors(model.ref, socket=str(agent.socket_path), device="meta")
    assert len(got) == len(load_file(str(model.local_dir / MODEL_FILE)))
    assert _file_xxh128(blob) == blob.name  # repaired, which only happens if the ring's reads were checked


def test_a_stopped_iteration_keeps_what_it_yielded_and_resumes_after_repair(rotted: tuple[Any, Any, Path]) -> None:
    """iter_tensors yields the verified tensors before the bad piece once, then the rest after the repair."""
    agent, model, _ = rotted
    want = load_file(str(model.local_dir / MODEL_FILE))
    names = [name for name, _ in client.iter_tensors(model.ref, socket=str(agent.socket_path))]
    assert sorted(names) == sorted(want) and len(names) == len(set(names))


def test_a_mismatch_the_agent_cannot_repair_raises_integrity_error(agent_factory: Any, s3_model: Any) -> None:
    """The recorded piece hashes disagree with a blob the agent finds whole: the client refuses, in one line."""
    agent = agent_factory()
    assert agent.cli("prefetch", s3_model.ref).returncode == 0
    blob = _weights_blob(agent)
    meta_path = agent.cache_dir / "meta" / f"{blob.name}.json"
    meta = json.loads(meta_path.read_text())
    meta["pieces"][1] = "0" * 32
    os.chmod(meta_path, 0o644)
    meta_path.write_text(json.dumps(meta))

    for how in ("open", "iter", "copy"):
        with pytest.raises(IntegrityError) as caught:
            _load(how, s3_model.ref, str(agent.socket_path))
        message = str(caught.value)
        assert "\n" not in message and MODEL_FILE in message and "piece 1" in message, message


# ---------------------------------------------------------------- BlobCheck itself, on a real file
# (what the loader relies on, whichever way the checker reads: several threads, positional reads)

PIECE = 1 << 20


def _blob(tmp_path: Path, pieces: int, tail: int = 12345) -> tuple[Path, bytes, list[str]]:
    """A file of ``pieces`` whole pieces plus a short last one, and its recorded piece hashes."""
    data = os.urandom(pieces * PIECE + tail)
    path = tmp_path / xxhash.xxh3_128(data).hexdigest()
    path.write_bytes(data)
    hashes = [xxhash.xxh3_128(data[i : i + PIECE]).hexdigest() for i in range(0, len(data), PIECE)]
    return path, data, hashes


def _checker(path: Path, size: int, piece_size: int, hashes: list[str]) -> Any:
    from client.verify import BlobCheck

    fd = os.open(path, os.O_RDONLY)
    try:
        return BlobCheck(fd, path.name, size, piece_size, hashes, "test/model.safetensors")
    finally:
        os.close(fd)  # the checker keeps a descriptor of its own (the loader may close its one first)


def test_blob_check_passes_good_pieces_and_refuses_the_bad_one(tmp_path: Path, monkeypatch: Any) -> None:
    """Bytes before a rotted piece pass; any range touching it raises, naming the piece, whichever thread hashed it."""
    from client import verify

    monkeypatch.setattr(verify, "CHUNK", 64 << 10)  # several reads per piece
    monkeypatch.setattr(verify, "AHEAD", 2 * PIECE)  # the rotted piece is not read before it is near
    path, data, hashes = _blob(tmp_path, 11)
    _flip(path, 9 * PIECE + 4321)
    check = _checker(path, len(data), PIECE, hashes)
    try:
        for i in range(6):
            check.ensure(i * PIECE, PIECE)  # pieces 0-5 are intact
        for offset, nbytes in ((9 * PIECE + 4321, 1), (8 * PIECE, PIECE + 1), (0, len(data))):
            with pytest.raises(verify.CorruptPieceError) as caught:
                check.ensure(offset, nbytes)
            assert caught.value.piece == 9 and caught.value.blob == path.name
            assert "piece 9" in str(caught.value) and "\n" not in str(caught.value)
    finally:
        check.close()


def test_blob_check_of_an_unrecorded_blob_hashes_the_whole_file(tmp_path: Path, monkeypatch: Any) -> None:
    """No piece record: one piece, the file's name, read in many positional reads; one flipped byte fails it."""
    from client import verify

    monkeypatch.setattr(verify, "CHUNK", 64 << 10)
    path, data, _ = _blob(tmp_path, 3)
    check = _checker(path, len(data), len(data), [path.name])
    try:
        check.ensure(len(data) - 1, 1)
    finally:
        check.close()
    _flip(path, 2 * PIECE)
    check = _checker(path, len(data), len(data), [path.name])
    try:
        with pytest.raises(verify.CorruptPieceError):
            check.ensure(0, 8)
    finally:
        check.close()


def test_blob_check_of_a_blob_shorter_than_recorded_raises_corrupt_piece(tmp_path: Path, monkeypatch: Any) -> None:
    """A file truncated under the checker is a corrupt piece (a typed error the client repairs), not a crash."""
    from client import verify

    monkeypatch.setattr(verify, "AHEAD", PIECE)
    path, data, hashes = _blob(tmp_path, 4)
    os.truncate(path, 3 * PIECE + 100)
    check = _checker(path, len(data), PIECE, hashes)
    try:
        check.ensure(0, PIECE)
        check.ensure(PIECE, PIECE)
        with pytest.raises(verify.CorruptPieceError) as caught:
            check.ensure(3 * PIECE, 200)
        assert caught.value.piece in (3, 4) and "truncated" in str(caught.value), caught.value
    finally:
        check.close()


def test_blob_check_of_an_empty_blob_answers(tmp_path: Path) -> None:
    """An empty file is checked like any other (its name must be the hash of nothing), not waited on forever."""
    from client import verify

    empty = tmp_path / xxhash.xxh3_128(b"").hexdigest()
    empty.write_bytes(b"")
    check = _checker(empty, 0, 1, [empty.name])
    try:
        check.ensure(0, 8)
    finally:
        check.close()
    misnamed = tmp_path / ("0" * 32)
    misnamed.write_bytes(b"")
    check = _checker(misnamed, 0, 1, [misnamed.name])
    try:
        with pytest.raises(verify.CorruptPieceError):
            check.ensure(0, 8)
    finally:
        check.close()


def _wait_checked(check: Any, pieces: slice) -> None:
    deadline = time.monotonic() + 10
    while not all(check._ok[pieces]) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time enough to go further, were it allowed to


def test_blob_check_reads_ahead_of_the_loader_only_so_far(tmp_path: Path, monkeypatch: Any) -> None:
    """The checker threads hash up to AHEAD bytes past the furthest piece asked for: no further, and no less
    (a range of pieces already checked moves that point too, or read-ahead would stall and the loader wait)."""
    from client import verify

    monkeypatch.setattr(verify, "AHEAD", 4 * PIECE)
    path, data, hashes = _blob(tmp_path, 40)
    check = _checker(path, len(data), PIECE, hashes)
    try:
        check.ensure(0, 1)  # the furthest piece asked for: 0; read-ahead: pieces 1-4
        _wait_checked(check, slice(0, 5))
        assert all(check._ok[:5]) and not any(check._ok[5:]), check._ok
        check.ensure(3 * PIECE, 1)  # already checked; read-ahead now reaches piece 7
        _wait_checked(check, slice(0, 8))
        assert all(check._ok[:8]) and not any(check._ok[8:]), check._ok
        check.ensure(len(data) - 1, 1)  # a jump: the last piece is checked at once
        assert check._ok[-1]
    finally:
        check.close()
