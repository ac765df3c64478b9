"""The store, fetcher and model service in-process, on real files and a real tmpfs.

The local-directory origin is a real origin (it is how NFS-hosted models are
served), so these tests exercise the full fill path: pieces, hashing, resume,
publish, dedup, capacity and eviction, without network servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import xxhash

from agent.config import MIN_PIECE_SIZE
from agent.fetch.fetcher import Fetcher
from agent.fetch.flight import PeerContext
from agent.fetch.peer_reader import PeerReader
from agent.manifest import FileEntry
from agent.metrics import Metrics
from agent.origins import Origins
from agent.origins.base import Sink
from agent.origins.local import LocalOrigin
from agent.peers.client import PeerClient
from agent.peers.membership import Membership
from agent.service import ModelService
from agent.store.store import Store
from client.errors import CapacityError, FetchFailedError, IntegrityError, ModelNotFoundError

MiB = 1024 * 1024


def write_random(path: Path, size: int, seed: int) -> bytes:
    data = (xxhash.xxh3_128_digest(seed.to_bytes(8, "little")) * (size // 16 + 1))[:size]
    data = bytes(b ^ (i * 131 % 251) for i, b in enumerate(data[: 64 * 1024])) + data[64 * 1024 :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` over ``path`` at ``offset`` in place: damage on disk. Blocking: async tests run it in a thread."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class Node:
    """An agent's in-process core around one cache directory."""

    def __init__(self, root: Path, capacity: int, connections: int = 4, drop_behind: bool = False) -> None:
        self.pool = ThreadPoolExecutor(8)
        self.root = root
        self.capacity = capacity
        self.connections = connections
        self.drop_behind = drop_behind
        self.stopped = False

    async def start(self) -> ModelService:
        self.session = aiohttp.ClientSession()
        self.store = Store(str(self.root), self.capacity, self.pool, self.drop_behind)
        await self.store.open()
        self.origins = Origins(self.session, self.pool, read_timeout=30.0)
        self.fetcher = Fetcher(self.store, Metrics(), connections=self.connections, retries=3)
        self.service = ModelService(self.store, self.fetcher, self.origins, MIN_PIECE_SIZE)
        return self.service

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.origins.close()
        await self.session.close()
        self.pool.shutdown(wait=True)

    async def prefetch(self, ref: str, pin: bool | None = None) -> None:
        r, m = await self.service.resolve(ref)
        await self.service.ensure(r, m, pin)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path / "cache", 1 << 40)
    await n.start()
    yield n
    await n.stop()


async def test_blob_named_by_content_and_stored_once(node: Node, tmp_path: Path) -> None:
    a = write_random(tmp_path / "m1" / "model.safetensors", 5 * MiB + 123, seed=1)
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")  # same bytes, another model
    (tmp_path / "m2" / "extra.json").write_text("{}")
    await node.prefetch(str(tmp_path / "m1"))
    await node.prefetch(str(tmp_path / "m2"))
    blobs = sorted(os.listdir(node.root / "blobs"))
    assert len(blobs) == 2  # the shared shard once, plus extra.json
    digest = xxhash.xxh3_128_hexdigest(a)
    assert digest in blobs
    assert (node.root / "blobs" / digest).read_bytes() == a
    assert not os.access(node.root / "blobs" / digest, os.W_OK) or os.geteuid() == 0
    assert (os.stat(node.root / "blobs" / digest).st_mode & 0o222) == 0
    meta = json.loads((node.root / "meta" / f"{digest}.json").read_text())
    assert len(meta["pieces"]) == 6
    assert os.listdir(node.root / "partial") == []


class FlakyLocal(LocalOrigin):
    """A local origin that dies after delivering ``budget`` bytes (a crash stand-in)."""

    def __init__(self, pool: ThreadPoolExecutor, budget: int) -> None:
        super().__init__(pool)
        self.budget = budget
        self.delivered = 0

    async def read_range(self, entry, offset, length, sink: Sink) -> None:  # type: ignore[no-untyped-def]
        async def counted(chunks: Sequence[bytes | memoryview]) -> None:
            n = sum(len(c) for c in chunks)
            if self.delivered + n > self.budget:  # deliver up to the budget, then die
                rest = self.budget - self.delivered
                self.delivered = self.budget
                if rest > 0:
                    await sink([b"".join(chunks)[:rest]])
                raise FetchFailedError("simulated permanent origin failure")
            self.delivered += n
            await sink(chunks)

        await super().read_range(entry, offset, length, counted)


async def test_interrupted_fill_resumes_with_only_missing_pieces(tmp_path: Path) -> None:
    # One request at a time: with several in flight, which pieces are whole when the origin
    # dies depends on the order their bytes came in (parts after the first unwritten one are
    # held in memory and dropped, never recorded), and this test wants some pieces recorded.
    node = Node(tmp_path / "cache", 1 << 40, connections=1)
    await node.start()
    data = write_random(tmp_path / "m" / "w.bin", 10 * MiB, seed=2)
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    flaky = FlakyLocal(node.pool, budget=int(4.5 * MiB))
    node.origins._by_scheme["file"] = flaky
    with pytest.raises(FetchFailedError):
        await node.service.ensure(ref, manifest)
    assert os.listdir(node.root / "blobs") == []  # nothing partial is published

    # A new process on the same cache: it fetches only what is missing.
    await node.stop()  # waits for I/O threads still recording pieces
    state = json.loads(next((node.root / "partial").glob("*.json")).read_text())
    assert 1 <= len(state["done"]) <= 5
    again = Node(node.root, 1 << 40)
    await again.start()
    counting = FlakyLocal(again.pool, budget=1 << 40)
    again.origins._by_scheme["file"] = counting
    ref, manifest = await again.service.resolve(str(tmp_path / "m"))
    await again.service.ensure(ref, manifest)
    assert counting.delivered == (10 - len(state["done"])) * MiB
    assert (again.root / "blobs" / xxhash.xxh3_128_hexdigest(data)).read_bytes() == data
    await again.stop()


class _Killed(Exception):
    """Stands in for a kill -9 at one point of the publish: nothing after it runs."""


@pytest.mark.parametrize("moment", ["before-rename", "after-rename"])
async def test_a_kill_on_either_side_of_publishing_keeps_the_complete_file(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A fill that was complete is never fetched again, wherever a crash cut its publish short.

    Before the rename the partial file is whole and is published by the next process; after
    it, the next process must find the blob by the origin object's key (its source record)."""
    data = write_random(tmp_path / "m" / "w.bin", 3 * MiB, seed=4)
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        if moment == "after-rename":
            real_rename(src, dst)
        raise _Killed(moment)

    monkeypatch.setattr("agent.store.fill.os.rename", rename)
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    with pytest.raises(_Killed):
        await node.service.ensure(ref, manifest)
    await node.stop()
    monkeypatch.setattr("agent.store.fill.os.rename", real_rename)

    again = Node(node.root, 1 << 40)
    await again.start()
    try:
        counting = FlakyLocal(again.pool, budget=1 << 40)
        again.origins._by_scheme["file"] = counting
        ref, manifest = await again.service.resolve(str(tmp_path / "m"))
        await again.service.ensure(ref, manifest)
        assert counting.delivered == 0
        assert (again.root / "blobs" / xxhash.xxh3_128_hexdigest(data)).read_bytes() == data
        assert list((again.root / "partial").iterdir()) == []
    finally:
        await again.stop()


async def test_a_peer_asking_while_the_placement_is_prepared_does_not_get_a_piece_fetched_twice(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's request for a piece this node owns, arriving while the node's own fill waits for
    the model's placement (computed in a thread), starts an origin fetch of the piece here; the
    fill must join that fetch, not start a second one (CI saw every piece of one owner twice)."""
    data = write_random(tmp_path / "m" / "w.bin", 4 * MiB, seed=5)
    _, manifest = await node.service.resolve(str(tmp_path / "m"))
    (entry,) = manifest.files
    entry = dataclasses.replace(entry, sha256=hashlib.sha256(data).hexdigest())  # lets a fill take peers' pieces
    members = Membership("127.0.0.1:1", static=["127.0.0.1:2"])
    await members.refresh()  # the other member is not up: this node owns every piece
    client = PeerClient(node.session, "t" * 16, hedge_timeout=1.0, read_timeout=5.0)
    node.fetcher = Fetcher(
        node.store, Metrics(), 4, 3, PeerReader(node.store, node.fetcher.metrics, members, client, 4)
    )
    origin = FlakyLocal(node.pool, budget=1 << 40)  # here only counting what the origin sent
    preparing = asyncio.Event()
    real_prepare = members.prepare

    async def slow_prepare(model):  # type: ignore[no-untyped-def]
        preparing.set()
        await asyncio.sleep(0.3)  # a busy thread pool, as on a loaded machine
        await real_prepare(model)

    monkeypatch.setattr(members, "prepare", slow_prepare)
    ctx = PeerContext.of("s3://bucket/m", "s3", manifest)
    fill = asyncio.create_task(node.fetcher.ensure_blob(entry, origin, set(), ctx))
    await asyncio.wait_for(preparing.wait(), 10)
    served = await node.fetcher.serve_piece(entry, 2, origin, requester="127.0.0.1:2")
    assert served.stream is not None  # an origin fetch for the peer, started here
    digest, _ = await asyncio.wait_for(fill, 30)
    assert digest == xxhash.xxh3_128_hexdigest(data)
    assert origin.delivered == len(data)  # each piece once


async def test_torn_piece_is_refetched_on_resume(node: Node, tmp_path: Path) -> None:
    data = write_random(tmp_path / "m" / "w.bin", 4 * MiB, seed=3)
    n = Node(tmp_path / "cache1", 1 << 40, connections=1)  # one piece at a time: deterministic
    await n.start()
    try:
        ref, manifest = await n.service.resolve(str(tmp_path / "m"))
        n.origins._by_scheme["file"] = FlakyLocal(n.pool, budget=3 * MiB)
        with pytest.raises(FetchFailedError):
            await n.service.ensure(ref, manifest)
        state = json.loads(next((n.root / "partial").glob("*.json")).read_text())
        assert sorted(state["done"]) == ["0", "1", "2"]
        part = next((n.root / "partial").glob("*.part"))
        # Damage a recorded piece, as a power loss could.
        await asyncio.to_thread(overwrite, part, MiB + 10, b"\xff\xff")
        counting = FlakyLocal(n.pool, budget=1 << 40)
        n.origins._by_scheme["file"] = counting
        await n.service.ensure(ref, manifest)
        assert counting.delivered == 2 * MiB  # piece 1 (damaged) and piece 3 (never fetched)
        assert (n.root / "blobs" / xxhash.xxh3_128_hexdigest(data)).read_bytes() == data
    finally:
        await n.stop()


async def test_lru_eviction_spares_pinned_and_open_blobs(tmp_path: Path) -> None:
    n = Node(tmp_path / "cache", capacity=10 * MiB)
    await n.start()
    try:
        for name, seed in (("pinned", 10), ("held", 11), ("old", 12)):
            write_random(tmp_path / name / "w.bin", 3 * MiB, seed)
        await n.prefetch(str(tmp_path / "pinned"), pin=True)
        await n.prefetch(str(tmp_path / "old"))
        await asyncio.sleep(0.05)
        await n.prefetch(str(tmp_path / "held"))
        held = n.root / "blobs" / next(iter(await n.store.model_digests(n.store.models[_key(n, tmp_path / "held")])))
        old_digest = next(iter(await n.store.model_digests(n.store.models[_key(n, tmp_path / "old")])))
        # Make "held" the least recently used, then hold it open as a client would.
        os.utime(held, (1, os.stat(held).st_mtime))
        fd = os.open(held, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            write_random(tmp_path / "new" / "w.bin", 3 * MiB, seed=13)
            await n.prefetch(str(tmp_path / "new"))
        finally:
            os.close(fd)
        remaining = set(os.listdir(n.root / "blobs"))
        assert held.name in remaining  # open by a reader: kept although least recent
        assert old_digest not in remaining  # unpinned, unheld: evicted
        assert len(remaining) == 3 and n.store.evictions == 1

        # Nothing evictable is big enough: a clear capacity error, not a corrupt cache.
        write_random(tmp_path / "huge" / "w.bin", 9 * MiB, seed=14)
        fcntl.flock(fd2 := os.open(held, os.O_RDONLY), fcntl.LOCK_SH)
        try:
            with pytest.raises(CapacityError, match="capacity exceeded"):
                await n.prefetch(str(tmp_path / "huge"))
        finally:
            os.close(fd2)
        assert os.listdir(n.root / "partial") == []
    finally:
        await n.stop()


def _key(n: Node, path: Path) -> str:
    from agent.refs import parse_ref

    return parse_ref(str(path)).key


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {done.stderr.decode()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_is_a_clear_error_and_cache_stays_usable(tmp_path: Path, tmpfs: Path) -> None:
    n = Node(tmpfs / "cache", capacity=1 << 40)  # capacity says yes, the disk says no
    await n.start()
    try:
        small = write_random(tmp_path / "small" / "w.bin", 2 * MiB, seed=20)
        await n.prefetch(str(tmp_path / "small"))
        write_random(tmp_path / "big" / "w.bin", 12 * MiB, seed=21)
        with pytest.raises(CapacityError, match="disk full"):
            await n.prefetch(str(tmp_path / "big"))
        assert os.listdir(n.root / "partial") == []
        assert (n.root / "blobs" / xxhash.xxh3_128_hexdigest(small)).read_bytes() == small
        await n.prefetch(str(tmp_path / "small"))  # still serving
    finally:
        await n.stop()


async def test_corrupt_blob_after_unsynced_restart_is_dropped(node: Node, tmp_path: Path) -> None:
    data = write_random(tmp_path / "m" / "w.bin", 2 * MiB, seed=30)
    await node.prefetch(str(tmp_path / "m"))
    digest = xxhash.xxh3_128_hexdigest(data)
    blob = node.root / "blobs" / digest
    os.chmod(blob, 0o644)
    await asyncio.to_thread(overwrite, blob, 0, b"\0" * 16)  # a torn write the power loss left behind
    await node.stop()
    again = Node(node.root, 1 << 40)  # no sync happened: the blob is re-checked
    await again.start()
    assert not blob.exists() and again.store.has_blob(digest) is False
    await again.prefetch(str(tmp_path / "m"))
    assert blob.read_bytes() == data
    await asyncio.sleep(0.2)
    await again.store.sync()
    await again.stop()
    third = Node(node.root, 1 << 40)
    await third.start()
    assert third.store.reverified == 0  # synced: not hashed again
    assert third.store.has_blob(digest)
    await third.stop()


async def test_verify_detects_and_repairs(node: Node, tmp_path: Path) -> None:
    data = write_random(tmp_path / "m" / "w.bin", 3 * MiB, seed=40)
    await node.prefetch(str(tmp_path / "m"))
    blob = node.root / "blobs" / xxhash.xxh3_128_hexdigest(data)
    os.chmod(blob, 0o644)
    await asyncio.to_thread(overwrite, blob, 2 * MiB, b"rot")
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    result = await node.service.verify(ref, manifest)
    assert result == {"checked": 1, "corrupt": 1, "repaired": 1, "without_origin_digest": []}
    assert blob.read_bytes() == data


async def test_piece_hash_mismatch_against_manifest_fails_the_fill(node: Node, tmp_path: Path) -> None:
    write_random(tmp_path / "m" / "w.bin", 2 * MiB, seed=50)
    await node.prefetch(str(tmp_path / "m"))
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    assert manifest.files[0].pieces and len(manifest.files[0].pieces) == 2
    await node.service.evict(str(tmp_path / "m"))
    good = manifest.files[0]
    assert good.pieces is not None
    bad = dataclasses.replace(good, pieces=(good.pieces[0], "0" * 32))  # disagrees with what the origin sends
    manifest = dataclasses.replace(manifest, files=(bad,))
    with pytest.raises(FetchFailedError) as err:
        await node.service.ensure(ref, manifest)
    assert "piece 1" in str(err.value)
    assert os.listdir(node.root / "blobs") == []
    assert isinstance(IntegrityError("x"), FetchFailedError)


async def test_missing_path_and_changed_file(node: Node, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        await node.service.resolve(str(tmp_path / "nope"))
    write_random(tmp_path / "m" / "w.bin", MiB, seed=60)
    ref, manifest = await node.service.resolve(str(tmp_path / "m"))
    write_random(tmp_path / "m" / "w.bin", MiB, seed=61)
    os.utime(tmp_path / "m" / "w.bin", ns=(1, 1))
    with pytest.raises(FetchFailedError, match="changed since it was resolved"):
        await node.service.ensure(ref, manifest)


def test_snapshot_links_are_atomic_relative_and_swept(tmp_path: Path) -> None:
    from agent.store.snapshots import link_snapshot, sweep_unfinished

    root = tmp_path / "cache"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "d1").write_bytes(b"one")
    (root / "blobs" / "d2").write_bytes(b"two")
    rel = link_snapshot(str(root), "k", "rev", [("a.json", "d1"), ("sub/dir/b.bin", "d2")])
    snap = root / rel
    assert (snap / "a.json").read_bytes() == b"one" and (snap / "sub/dir/b.bin").read_bytes() == b"two"
    assert os.readlink(snap / "sub/dir/b.bin") == "../../../../../blobs/d2"
    assert oct(snap.stat().st_mode & 0o777) == oct(0o755)
    # An object store may hold "x" and "x/y"; no directory can. Nothing half-built is left behind.
    with pytest.raises(OSError):
        link_snapshot(str(root), "k", "rev2", [("x", "d1"), ("x/y", "d2")])
    assert sorted(p.name for p in (root / "snapshots" / "k").iterdir()) == ["rev"]
    # A crash mid-build leaves a hidden directory; the next start removes it.
    (root / "snapshots" / "k" / ".building-rev3-abc").mkdir()
    assert sweep_unfinished(str(root)) == 1
    assert sorted(p.name for p in (root / "snapshots" / "k").iterdir()) == ["rev"]


class RecordingLocal(LocalOrigin):
    """A local origin that logs which (file, piece offset) starts when, and is a little slow."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        super().__init__(pool)
        self.starts: list[tuple[str, int]] = []

    async def read_range(self, entry, offset, length, sink: Sink) -> None:  # type: ignore[no-untyped-def]
        self.starts.append((entry.path, offset // MiB))
        await asyncio.sleep(0.01)
        await super().read_range(entry, offset, length, sink)


async def _prefetch_recording(tmp_path: Path, connections: int) -> RecordingLocal:
    """Prefetch the model in ``tmp_path/m`` into ``tmp_path/cache``; return what the origin was asked."""
    n = Node(tmp_path / "cache", 1 << 40, connections=connections)
    await n.start()
    try:
        ref, manifest = await n.service.resolve(str(tmp_path / "m"))
        recording = RecordingLocal(n.pool)
        n.origins._by_scheme["file"] = recording
        await n.service.ensure(ref, manifest)
    finally:
        await n.stop()
    return recording


async def test_pieces_are_fetched_front_of_the_model_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.fetch.origin_reader.ORIGIN_RANGE_MAX", MiB)  # one piece a request: the order shows
    for i in range(3):
        write_random(tmp_path / "m" / f"shard-{i}.bin", 4 * MiB, seed=10 + i)
    recording = await _prefetch_recording(tmp_path, connections=2)
    assert len(recording.starts) == 12
    # The first two connections go to whichever fills were ready first; from then on every
    # free connection takes the lowest (file, piece) still waiting.
    assert recording.starts[2:] == sorted(recording.starts[2:]), recording.starts
    assert recording.starts[-1] == ("shard-2.bin", 3)


async def test_consecutive_missing_pieces_go_in_one_origin_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without peers a fill asks the origin for up to ORIGIN_RANGE_MAX of consecutive missing pieces
    at once (a long range costs the origin less), and still hashes and records every piece on its own."""
    monkeypatch.setattr("agent.fetch.origin_reader.ORIGIN_RANGE_MAX", 2 * MiB)
    data = write_random(tmp_path / "m" / "w.bin", 7 * MiB + 5, seed=21)
    recording = await _prefetch_recording(tmp_path, connections=1)
    assert recording.starts == [("w.bin", 0), ("w.bin", 2), ("w.bin", 4), ("w.bin", 6)]  # 8 pieces, 4 requests
    digest = xxhash.xxh3_128_hexdigest(data)
    assert (tmp_path / "cache" / "blobs" / digest).read_bytes() == data
    meta = json.loads((tmp_path / "cache" / "meta" / f"{digest}.json").read_text())
    assert meta["pieces"] == [xxhash.xxh3_128_hexdigest(data[i : i + MiB]) for i in range(0, len(data), MiB)]


async def test_ordered_slots_admit_lowest_key_and_survive_cancellation() -> None:
    from agent.fetch.slots import OrderedSlots

    slots = OrderedSlots(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def use(name: str, key: int, wait: asyncio.Event | None = None) -> None:
        async with slots.hold(key):
            order.append(name)
            if wait is not None:
                await wait.wait()

    first = asyncio.create_task(use("first", 9, gate))
    await asyncio.sleep(0)
    late = asyncio.create_task(use("late", 5))
    early = asyncio.create_task(use("early", 1))
    gone = asyncio.create_task(use("gone", 0))
    await asyncio.sleep(0)
    gone.cancel()  # cancelled while waiting: never admitted, slot not lost
    gate.set()
    await asyncio.gather(first, late, early, return_exceptions=True)
    assert order == ["first", "early", "late"]
    assert slots.free == 1 and gone.cancelled()

    # promote: a waiter named when it began waiting moves up (a relay child asked for its piece).
    order.clear()
    gate = asyncio.Event()

    async def named(name: str, key: int) -> None:
        async with slots.hold(key, name=name):
            order.append(name)

    first = asyncio.create_task(use("first", 9, gate))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(named(n, k)) for n, k in (("a", 1), ("b", 2), ("c", 3))]
    await asyncio.sleep(0)
    assert slots.promote("c", 0) and not slots.promote("nobody", 0)
    assert slots.promote("a", 5)  # never moves a waiter down
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["first", "c", "a", "b"]
    assert not slots.promote("c", 0) and slots.free == 1


async def test_ordered_slots_keep_free_slots_for_an_expected_lower_request() -> None:
    """The second shard's span, opened first, must not take every free slot from the first shard still opening
    (it did in two of five runs of tests/test_streaming.py: first tensor after 2.1 s of 4.1 s)."""
    from agent.fetch.slots import OrderedSlots

    slots = OrderedSlots(2)
    order: list[str] = []
    release = asyncio.Event()

    admitted = asyncio.Event()

    async def take(name: str, key: tuple[int, ...], **kw: object) -> None:
        await slots.acquire(key, **kw)  # type: ignore[arg-type]
        order.append(name)
        admitted.set()
        await release.wait()
        slots.release()

    shard1 = slots.expect((1,), grace=30)
    later = [asyncio.create_task(take(f"shard2.{i}", (2, 0, i))) for i in range(2)]
    await asyncio.sleep(0.05)
    assert order == [] and slots.free == 2  # both free, held for shard 1
    first = asyncio.create_task(take("shard1", (1, 0, 0), fulfils=shard1))
    await asyncio.sleep(0.05)
    assert order == ["shard1", "shard2.0"]  # shard 1 first, then the next lowest takes what is left
    release.set()
    await asyncio.gather(first, *later)
    assert order[-1] == "shard2.1" and slots.free == 2

    # withdrawn (the file came from peers, or failed): higher keys go at once
    order.clear()
    release = asyncio.Event()
    gone = slots.expect((1,), grace=30)
    waiting = asyncio.create_task(take("other", (2, 0, 0)))
    await asyncio.sleep(0.05)
    assert order == []
    gone.withdraw()
    gone.withdraw()  # idempotent
    await asyncio.sleep(0)
    assert order == ["other"]
    release.set()
    await waiting

    # never arrives: the grace ends the wait
    order.clear()
    release = asyncio.Event()
    slots.expect((1,), grace=0.1)
    t0 = asyncio.get_running_loop().time()
    waiting = asyncio.create_task(take("other", (2, 0, 0)))
    admitted.clear()
    await asyncio.wait_for(admitted.wait(), 5)
    assert 0.08 <= asyncio.get_running_loop().time() - t0 < 1.0
    release.set()
    await waiting
    assert slots.free == 2


def test_recording_a_piece_leaves_the_whole_file_hash_to_a_follow_that_close_waits_for(tmp_path: Path) -> None:
    """A piece that completes a long prefix must not hash it on the caller's thread (its origin
    connection would wait): follow() does, in the pool. close() waits for a running follow, and a
    follow that comes after close() does nothing (it must not map a closed or reused descriptor)."""
    import threading

    from agent.store.fill import BlobFill

    entry = FileEntry(path="w.bin", size=3 * MIN_PIECE_SIZE + 5, source={}, piece_size=MIN_PIECE_SIZE)
    data = os.urandom(entry.size)
    fill = BlobFill(str(tmp_path), entry)
    fill.open()
    fill.write(0, [data])
    for i in reversed(range(entry.piece_count)):  # the last to complete is piece 0: the whole file is contiguous
        offset, length = entry.piece_range(i)
        fill.record_piece(i, xxhash.xxh3_128(data[offset : offset + length]).hexdigest())
    assert fill._whole.offset == 0
    fill.follow()
    assert fill._whole.offset == entry.size
    assert fill._whole.digests()["xxh128"] == xxhash.xxh3_128(data).hexdigest()

    with fill._whole_lock:  # a follow in the middle of hashing
        closer = threading.Thread(target=fill.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive() and fill.fd >= 0
    closer.join(5)
    assert fill.fd == -1
    fill.follow()  # late: nothing to do, no error


def test_fill_writes_in_bounded_calls_and_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pwritev of a fill is at most 32 KiB (the kernel sizes page-cache folios by the write,
    and larger fresh folios cost several times the copy on a VM whose free memory the host takes
    back), and a short write carries on where it stopped: the file holds exactly the chunks, in
    order."""
    import agent.store.fill as fill_mod

    chunks = [os.urandom(n) for n in (5, (3 << 20) + 17, 0, 256 << 10, 2 << 20)]
    data = b"".join(chunks)
    entry = FileEntry(path="w.bin", size=len(data) + 100, source={})
    real = os.pwritev
    sizes: list[int] = []

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        size = sum(len(b) for b in buffers)
        sizes.append(size)
        if size > 1000:  # write only part of every large call, as a signal may make the kernel do
            return real(fd, [bytes(b"".join(buffers)[: size - 999])], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(fill_mod.os, "pwritev", short_pwritev)
    sizer = fill_mod.WriteSizer(sizes=(32 << 10,))
    fill = fill_mod.BlobFill(str(tmp_path), entry, sizer=sizer)
    fill.open()
    try:
        fill.write(100, chunks)
    finally:
        fill.close()
    assert max(sizes) == 32 << 10
    assert Path(fill.path).read_bytes()[100:] == data
    assert sizer.cost[32 << 10] > 0  # the call's CPU time was measured


def test_the_write_size_follows_what_writes_cost() -> None:
    """The fills' write size is the largest one within LARGER_MARGIN of the cheapest measured cost;
    a size that was dearer is tried again after PROBE_EVERY bytes (more for a much dearer one),
    and when the machine changes so that it is cheap, the choice moves to it."""
    from agent.store.fill import LARGER_MARGIN, MIN_MEASURED, PROBE_EVERY, WriteSizer

    small, mid, large = 32 << 10, 128 << 10, 1 << 20
    cost = {small: 0.5, mid: 0.5 * (1 + LARGER_MARGIN / 2), large: 3.0}  # ns per byte on this "machine"
    sizer = WriteSizer(sizes=(small, mid, large))
    picks: list[int] = []

    def write(nbytes: int = MiB) -> None:
        size = sizer.pick()
        picks.append(size)
        sizer.record(size, nbytes, int(cost[size] * nbytes))

    for _ in range(3):
        write()
    assert sorted(picks) == [small, mid, large]  # each size measured once first
    assert sizer.best == mid  # a little dearer than 32 KiB, but within the margin: fewer calls
    sizer.record(large, MIN_MEASURED - 1, 10**12)  # too small a call to say anything
    assert sizer.cost[large] == 3.0
    picks.clear()
    for _ in range(int(6 * PROBE_EVERY / MiB) + 1):
        write()
    # 32 KiB about every 32 MiB, 1 MiB (5.3x dearer than the choice) once in 192 MiB; the rest 128 KiB
    assert picks.count(small) in (5, 6) and picks.count(large) == 1
    assert picks.count(mid) == len(picks) - picks.count(small) - 1
    cost[large] = 0.2  # the machine changed: large folios are cheap now (bare metal does this)
    for _ in range(int(6 * PROBE_EVERY / MiB) + 1):
        write()
    assert sizer.best == large


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache now: mincore(2) over a mapping of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw[:pages]) * mmap.PAGESIZE
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop-behind"])
@pytest.mark.serial  # page-cache residency, which other tests' files can evict
async def test_fill_keeps_its_pages_unless_told_to_drop_behind(
    tmp_path: Path, drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fill leaves the blob in the page cache; with ``--drop-behind`` what the whole-file hash
    passed is written back and dropped DROP_LAG behind it, so the fill's footprint stays near
    DROP_LAG plus what is in flight (here one piece a request). The bytes are the same either way."""
    from agent.store.fill import DROP_LAG

    monkeypatch.setattr("agent.fetch.origin_reader.ORIGIN_RANGE_MAX", MIN_PIECE_SIZE)

    stat = await asyncio.to_thread(
        subprocess.run, ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True
    )
    fs = stat.stdout.strip()
    if drop and fs == "tmpfs":
        pytest.skip("on tmpfs the page cache is the storage: nothing can be dropped (set --basetemp on a disk)")
    size = 3 * DROP_LAG
    data = write_random(tmp_path / "m" / "model.safetensors", size, seed=7)
    node = Node(tmp_path / "cache", 1 << 40, drop_behind=drop)
    await node.start()
    try:
        await node.prefetch(str(tmp_path / "m"))
    finally:
        await node.stop()
    blob = node.root / "blobs" / xxhash.xxh3_128_hexdigest(data)
    resident = resident_bytes(blob)
    print(f"drop={drop}: {resident / MiB:.0f} MiB of {size / MiB:.0f} MiB in the page cache after the fill")
    if drop:
        assert resident <= DROP_LAG + 32 * MiB  # the tail the hash passed last, and pages still being written
    else:
        assert resident >= size - 8 * MiB
    assert xxhash.xxh3_128_hexdigest(blob.read_bytes()) == blob.name
