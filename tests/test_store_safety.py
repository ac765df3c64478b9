"""What the agent writes under its cache root: never through a planted link, never world-writable, no leftovers.

Every break here was first reproduced on the old code (the test failed), then fixed:
a symlink at ``partial/<fill key>.part`` made the fill overwrite and publish an outside file;
under umask 000 the cache's directories and state files were world-writable; a state file
whose write hit a full disk left its ``.tmp`` file behind; and a refill of content whose blob
had rotted kept the rotten blob. Real files, a real tmpfs (we are root), a real agent process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import xxhash

from agent.config import MIN_PIECE_SIZE
from agent.manifest import FileEntry
from agent.store.fill import BlobFill, write_json_atomic
from client.errors import IntegrityError
from tests.servers.agent_proc import AgentProcess
from tests.test_store import MiB, Node, write_random

OUTSIDE = b"a file outside the cache that the agent must never touch\n"


def _outside_file(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(OUTSIDE)
    victim.chmod(0o640)
    return victim


def _writable_by_others(root: Path) -> list[str]:
    """Every entry under ``root`` (not root itself) that group or others may write: ``find -perm /022``.

    Symlinks are skipped: on Linux their own mode is always 0777 and means nothing.
    """
    bad = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
                bad.append(f"{os.path.relpath(path, root)} {oct(st.st_mode & 0o777)}")
    return sorted(bad)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path / "cache", 1 << 40)
    await n.start()
    yield n
    await n.stop()


def _rot(blob: Path, offset: int) -> None:
    """Bit rot the node has not noticed yet."""
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(offset)
        f.write(b"rot")


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------------ 1. symlinks are not followed


async def test_a_symlink_planted_at_the_partial_file_is_replaced_not_followed(node: Node, tmp_path: Path) -> None:
    data = write_random(tmp_path / "m" / "w.bin", 3 * MiB, seed=101)
    victim = _outside_file(tmp_path)
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    part = node.root / "partial" / f"{manifest.files[0].fill_key}.part"
    part.symlink_to(victim)
    await node.service.ensure(ref, manifest)
    assert victim.read_bytes() == OUTSIDE
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640
    blob = node.root / "blobs" / xxhash.xxh3_128_hexdigest(data)
    assert not blob.is_symlink() and blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert list((node.root / "partial").iterdir()) == []


def test_a_partial_file_swapped_for_a_symlink_before_publishing_is_not_published(tmp_path: Path) -> None:
    """The rename into blobs/ moves a name, not the file the fill holds: it checks they are the same file."""
    victim = _outside_file(tmp_path)
    partial, blobs = tmp_path / "partial", tmp_path / "blobs"
    partial.mkdir()
    blobs.mkdir()
    entry = FileEntry(path="w.bin", size=MIN_PIECE_SIZE + 7, source={}, piece_size=MIN_PIECE_SIZE)
    data = os.urandom(entry.size)
    fill = BlobFill(str(partial), entry)
    fill.open()
    fill.write(0, [data])
    for i in range(entry.piece_count):
        offset, length = entry.piece_range(i)
        fill.record_piece(i, xxhash.xxh3_128(data[offset : offset + length]).hexdigest())
    os.unlink(fill.path)
    os.symlink(victim, fill.path)
    with pytest.raises(IntegrityError, match="replaced"):
        fill.publish(str(blobs), fill.digests()["xxh128"], lambda pieces: None)
    assert list(blobs.iterdir()) == []
    assert victim.read_bytes() == OUTSIDE and stat.S_IMODE(victim.stat().st_mode) == 0o640
    assert list(partial.iterdir()) == []  # the link and the state file went with the discarded fill


async def test_a_symlinked_directory_in_the_cache_is_refused_with_a_clear_error(node: Node, tmp_path: Path) -> None:
    write_random(tmp_path / "m" / "w.bin", MiB, seed=102)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    shutil.rmtree(node.root / "manifests" / ref.key, ignore_errors=True)
    (node.root / "manifests" / ref.key).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError, match="symlink") as err:
        await node.store.save_manifest(ref, manifest)
    assert "\n" not in str(err.value) and ref.key in str(err.value)
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_planted_at_a_snapshot_is_replaced_by_the_real_snapshot(tmp_path: Path) -> None:
    from agent.store.snapshots import link_snapshot

    root = tmp_path / "cache"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "d1").write_bytes(b"one")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "a.json").write_bytes(b"not the model")
    (root / "snapshots" / "k").mkdir(parents=True)
    (root / "snapshots" / "k" / "rev").symlink_to(fake, target_is_directory=True)
    rel = link_snapshot(str(root), "k", "rev", [("a.json", "d1")])
    snap = root / rel
    assert not snap.is_symlink() and snap.is_dir()
    assert (snap / "a.json").read_bytes() == b"one"
    assert (fake / "a.json").read_bytes() == b"not the model"


# ------------------------------------------------------------------ 2. explicit modes


async def test_under_umask_000_nothing_in_the_cache_is_writable_by_others(tmp_path: Path, umask_000: None) -> None:
    from agent.artifacts.index import ArtifactIndex

    write_random(tmp_path / "m" / "w.bin", 2 * MiB, seed=103)
    write_random(tmp_path / "m" / "sub" / "dir" / "x.json", 1000, seed=104)
    n = Node(tmp_path / "deep" / "cache", 1 << 40)
    await n.start()
    try:
        ref, manifest = await n.service.resolve(str(tmp_path / "m"))
        done = await n.service.ensure(ref, manifest, True)
        assert await n.store.snapshot(ref, done) is not None
        await n.store.sync()
        index = ArtifactIndex(n.store, node="test")
        bundle = b"bundle bytes" * 1000
        sent = [bundle]

        async def read(_: int) -> bytes:
            return sent.pop() if sent else b""

        digest, _ = await index.adopt(read, len(bundle))
        await index.publish("k/ey", {"torch": "2"}, digest, len(bundle))
        # An interrupted fill leaves a partial file and its state behind.
        write_random(tmp_path / "big" / "w.bin", 3 * MiB, seed=105)
        _, big = await n.service.resolve(str(tmp_path / "big"))
        fill, _ = await n.store.begin_fill(big.files[0], set())
        await n.store.run(fill.write, 0, [b"x" * MIN_PIECE_SIZE])
        await n.store.run(fill.record_piece, 0, xxhash.xxh3_128_hexdigest(b"x" * MIN_PIECE_SIZE))
        await n.store.abandon_fill(fill)
    finally:
        await n.stop()
    assert (n.root / "partial" / f"{big.files[0].fill_key}.json").exists()
    assert _writable_by_others(tmp_path / "deep") == []
    assert stat.S_IMODE(os.stat(n.root / "blobs").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(n.root / "models" / f"{ref.key}.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(n.root / "blobs" / digest).st_mode) == 0o444


def test_a_real_agent_under_umask_000_leaves_nothing_writable_by_others(tmp_path: Path) -> None:
    write_random(tmp_path / "m" / "w.bin", 2 * MiB, seed=106)
    old = os.umask(0)  # the child inherits it
    try:
        agent = AgentProcess(tmp_path / "a", cache_dir=tmp_path / "a" / "cache")
        agent.start()
    finally:
        os.umask(old)
    try:
        agent.cli("prefetch", str(tmp_path / "m"), "--pin", check=True)
    finally:
        agent.close()
    assert list((agent.cache_dir / "blobs").iterdir())
    assert _writable_by_others(agent.cache_dir) == []


# ------------------------------------------------------------------ 3. no temp file survives a failure


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {done.stderr.decode()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_up(mnt: Path) -> None:
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_state_file_write_that_hits_a_full_disk_leaves_no_temp_file(tiny_tmpfs: Path) -> None:
    state = tiny_tmpfs / "fill.json"
    write_json_atomic(str(state), {"done": {}})
    _fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as err:
        write_json_atomic(str(state), {"done": {str(i): "0" * 32 for i in range(4000)}})
    assert err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tiny_tmpfs)) == ["fill.json", "filler"]
    assert json.loads(state.read_text()) == {"done": {}}


def test_a_piece_record_that_hits_a_full_disk_leaves_no_temp_file(tiny_tmpfs: Path) -> None:
    entry = FileEntry(path="w.bin", size=8 * 1024, source={}, piece_size=MIN_PIECE_SIZE)
    fill = BlobFill(str(tiny_tmpfs), entry)
    fill.open()
    fill.write(0, [b"y" * entry.size])
    _fill_up(tiny_tmpfs)
    with pytest.raises(OSError):
        fill.record_piece(0, "a" * 32 + "b" * 4000)  # a record too long to fit
    fill.close()
    assert not [p for p in os.listdir(tiny_tmpfs) if ".tmp" in p]


# ------------------------------------------------------------------ 4. a refill replaces a corrupt blob


async def test_a_refill_of_the_same_content_replaces_a_corrupt_blob(node: Node, tmp_path: Path) -> None:
    data = write_random(tmp_path / "m1" / "w.bin", 3 * MiB, seed=107)
    await node.prefetch(str(tmp_path / "m1"))
    blob = node.root / "blobs" / xxhash.xxh3_128_hexdigest(data)
    _rot(blob, MiB)
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")  # the same bytes under another name: filled anew
    await node.prefetch(str(tmp_path / "m2"))
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert list((node.root / "partial").iterdir()) == []


async def test_an_artifact_upload_replaces_a_corrupt_blob_of_the_same_bundle(node: Node, tmp_path: Path) -> None:
    from agent.artifacts.index import ArtifactIndex

    index = ArtifactIndex(node.store, node="test")
    bundle = os.urandom(100_000)
    digest = xxhash.xxh3_128_hexdigest(bundle)

    async def upload() -> str:
        sent = [bundle]

        async def read(_: int) -> bytes:
            return sent.pop() if sent else b""

        return (await index.adopt(read, len(bundle)))[0]

    assert await upload() == digest
    blob = node.root / "blobs" / digest
    _rot(blob, 0)
    assert await upload() == digest
    assert blob.read_bytes() == bundle and not blob.is_symlink()
