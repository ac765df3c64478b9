"""Peers: real agents on loopback ports fill each other's caches from one origin.

Tests of one agent run it in this process (``inproc_factory``). Tests of several agents
run them as processes (``agent_factory``): in one process the agents share one
interpreter lock, and one agent's work delayed another's answers past the 2 s hedge
timeout (CI saw the origin send 1.7x and 1.9x the model), so origin-egress bounds
were flaky there.

The origin is SeaweedFS behind a byte-counting TCP relay, so "the origin sent the
model about once" is measured on the wire. Every agent gets the same static
``--peers`` list (itself included: it must ignore its own address) and a shared
token file. Models are random bytes in several files (multipart uploads above
8 MiB, so the whole-file check is the S3 multipart ETag) with 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import crc32c as crc32c_lib
import pytest
import xxhash

import agent.peers.membership as peers_module
import agent.peers.placement as placement
from agent.fetch.flight import PeerContext
from agent.manifest import Manifest
from agent.peers.membership import Membership
from agent.peers.placement import RELAY_FANOUT, balanced_owners, relay_orders, rendezvous, ring, tree_parent
from client.errors import WarmstartError
from client.transport import AgentConnection
from tests.servers.agent_proc import AgentProcess, AgentStartError
from tests.servers.netns import Netns
from tests.servers.netns import unavailable as netns_unavailable
from tests.servers.ports import free_port, free_ports
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3

MiB = 1024 * 1024
TOKEN = "peer-token-for-tests-0123456789abcdef"


# ---------------------------------------------------------------------- placement (pure)


def test_rendezvous_is_stable_even_and_minimal_on_leave() -> None:
    members = [f"10.0.0.{i}:7070" for i in range(1, 6)]
    pieces = [(f"sha256-{k:04d}", i) for k in range(40) for i in range(50)]
    owners = {p: rendezvous(members, *p)[0] for p in pieces}
    # Stable: the same answer again, and whatever order the members are listed in.
    assert owners == {p: rendezvous(list(reversed(members)), *p)[0] for p in pieces}
    # Even: each of 5 members owns about a fifth of 2000 pieces.
    counts = Counter(owners.values())
    assert set(counts) == set(members)
    assert all(0.8 * 400 < c < 1.2 * 400 for c in counts.values()), counts
    # Removing a member moves only that member's pieces (each to its next-ranked member).
    gone = members[2]
    rest = [m for m in members if m != gone]
    for p in pieces:
        new_owner = rendezvous(rest, *p)[0]
        if owners[p] != gone:
            assert new_owner == owners[p]
        else:
            assert new_owner == rendezvous(members, *p)[1]


def test_balanced_owners_share_a_model_evenly_in_ring_order() -> None:
    """16 equal pieces over 8 members: plain ring ownership gives some members 3 and some 0; balanced, 2 each."""
    members = [f"198.18.1.{i}:7070" for i in range(1, 9)]
    pieces = [(f"src-shard{k}", i, 16 * MiB) for k in range(4) for i in range(4)]
    owners = balanced_owners(members, pieces)
    assert owners == balanced_owners(list(reversed(members)), pieces)  # every node computes the same
    assert Counter(owners.values()) == dict.fromkeys(members, 2)
    r = ring(members)
    plain = Counter(r.ranked(k, i)[0] for k, i, _ in pieces)
    assert max(plain.values()) > 2  # what it fixes (for these names)
    # Each piece goes to the first member on its ring walk that still had room.
    held: Counter[str] = Counter()
    for k, i, n in pieces:
        walk = r.ranked(k, i)
        assert sorted(walk) == sorted(members)
        assert owners[(k, i)] == next(m for m in walk if held[m] < 2 * 16 * MiB)
        held[owners[(k, i)]] += n
    # Unequal sizes (a short last piece, small files): bytes stay within one piece of an even share.
    mixed = [(f"f{k}", i, 16 * MiB if i < 5 else 3 * MiB) for k in range(3) for i in range(6)] + [("cfg", 0, 700)]
    load: Counter[str] = Counter()
    for (k, i), owner in balanced_owners(members, mixed).items():
        load[owner] += next(n for kk, ii, n in mixed if (kk, ii) == (k, i))
    share = sum(n for *_, n in mixed) / len(members)
    assert max(load.values()) <= share + 16 * MiB, (load, share)


def test_relay_trees_are_rooted_at_the_owner_and_share_the_upload_evenly() -> None:
    members = [f"198.18.1.{i}:7070" for i in range(1, 9)]
    pieces = [(f"shard{k}", i, 16 * MiB) for k in range(4) for i in range(4)] + [("cfg", 0, 62)]
    owners = balanced_owners(members, pieces)
    orders = relay_orders(members, pieces, owners)
    children: Counter[tuple[str, int, str]] = Counter()
    upload: Counter[str] = Counter()
    for key, index, length in pieces:
        order = orders[(key, index)]
        assert order[0] == owners[(key, index)] and sorted(order) == sorted(members)
        assert tree_parent(order, order[0]) is None
        for m in order[1:]:
            parent = tree_parent(order, m)
            assert parent is not None and order.index(parent) < order.index(m)  # toward the root: no loops
            children[(key, index, parent)] += 1
            upload[parent] += length
    assert max(children.values()) <= RELAY_FANOUT  # no node uploads a piece more than twice
    # Every node uploads within two pieces of an even share (7/8 of the model each); with the
    # rest of each tree in plain rendezvous order this 16-piece model gave 0.6x to 2x.
    even = sum(upload.values()) / len(members)
    assert set(upload) == set(members)
    assert max(upload.values()) <= even + 2 * 16 * MiB and min(upload.values()) >= even - 2 * 16 * MiB, upload
    # The same trees whatever order the members are listed in (every node computes them alone).
    assert relay_orders(list(reversed(members)), pieces, owners) == orders


def _uploads(orders: Any, pieces: list[tuple[str, int, int]], members: list[str]) -> Counter[str]:
    """Bytes each member sends over the relay trees, checking every tree: the owner at the root,
    parents before their children, at most RELAY_FANOUT children, and ``parent`` agreeing with the order."""
    upload: Counter[str] = Counter(dict.fromkeys(members, 0))
    for key, index, length in pieces:
        order = orders[(key, index)]
        assert sorted(order) == sorted(members)
        kids: Counter[str] = Counter()
        for place, m in enumerate(order[1:], 1):
            parent = order[(place - 1) // RELAY_FANOUT]
            assert orders.parent((key, index), m) == parent and orders.place((key, index), m) == place
            kids[parent] += 1
            upload[parent] += length
        assert orders.parent((key, index), order[0]) is None and max(kids.values()) <= RELAY_FANOUT
    return upload


def test_relay_trees_stay_even_when_they_are_rotations() -> None:
    """Past LISTED_ENTRIES the trees are rotations of one member order (no per-piece sort): still
    valid trees, each member's upload within a tenth of even over a long model."""
    members = [f"198.18.{i // 200}.{i % 200 + 1}:7070" for i in range(257)]
    pieces = [(f"shard{k}", i, 16 * MiB) for k in range(40) for i in range(50)]
    owners = balanced_owners(members, pieces)
    orders = relay_orders(members, pieces, owners)
    assert orders._lists is None  # the rotations, not the listed trees
    upload = _uploads(orders, pieces, members)
    even = sum(upload.values()) / len(members)
    assert 0.9 * even <= min(upload.values()) and max(upload.values()) <= 1.1 * even, (min(upload.values()), even)
    assert relay_orders(list(reversed(members)), pieces, owners) == orders  # the same on every node


@pytest.mark.serial
def test_placement_of_25000_pieces_over_2600_members_takes_under_a_second() -> None:
    """Issue 24: rendezvous took about 81 s here (every member scored for every piece); the ring
    walks a few points per piece. Target 1 s (0.42 s measured on an idle core). Asserted on the
    thread's CPU time, at 3 s: wall time on this shared 2-core machine was 6.7 s at load 18,
    which measures the neighbours, not the placement."""
    members = [f"198.18.{i // 250}.{i % 250 + 1}:7070" for i in range(2600)]
    pieces = [(f"shard{k:03d}", i, 16 * MiB) for k in range(500) for i in range(50)]
    placement._ring.cache_clear()  # the ring is remembered per member list: time a fresh one
    started, wall = time.thread_time(), time.perf_counter()
    p = placement.compute_placement(members, pieces)
    took, took_wall = time.thread_time() - started, time.perf_counter() - wall
    assert took < 3.0, f"placement took {took:.2f} CPU s ({took_wall:.2f} s wall)"
    load = Counter(p.owners.values())
    share = len(pieces) / len(members)
    assert max(load.values()) <= share + 1, max(load.values())  # bounded loads: at most one piece over even
    assert len(p.orders) == len(pieces)
    sample = pieces[::500]  # 50 whole trees of 2,600 members each
    upload = _uploads(p.orders, sample, members)
    assert sum(upload.values()) == len(sample) * (len(members) - 1) * 16 * MiB


async def test_every_node_of_a_2600_node_fleet_sees_all_its_members_and_the_same_owners(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Membership kept the first 1,024 members of a list: in a fleet of 2,600 each node saw a different
    part of it, so nodes disagreed on owners (bench/fleet_sim.py's check against Membership failed).
    Probes then space their rounds out: at most PINGS_PER_SECOND pings a second."""
    members = sorted(f"198.18.{1 + i // 250}.{1 + i % 250}:7070" for i in range(2600))
    pieces = tuple((f"shard{k}", i, 16 * MiB) for k in range(4) for i in range(12))
    model = ("s3://b/m@rev", pieces)
    placed = placement.compute_placement(members, pieces)
    for me in (members[0], members[1500], members[-1]):
        m = Membership(me, advertise=me, static=[*members, *members[:10]])  # repeats are one member
        await m.refresh()
        assert len(m.peers) == 2599 and me not in m.peers
        for a in members:
            if a != me:
                m.mark_up(a)
        await m.prepare(model)
        for key, index, _ in pieces:
            owner = placed.owners[(key, index)]
            sources = m.sources(key, index, 2, model)
            assert sources == [] if owner == me else next(a for a, relay in sources if not relay) == owner
        assert m.settled  # every member answered: past the start phase
        assert m.round_interval() == pytest.approx(2599 / peers_module.PINGS_PER_SECOND)
    few = Membership(members[0], advertise=members[0], static=members[:9])
    await few.refresh()
    for a in members[1:9]:
        few.mark_up(a)
    assert few.round_interval() == peers_module.PROBE_INTERVAL
    # a list longer than any fleet (a bad DNS answer): bounded, and said
    over = [f"198.19.{i // 250}.{i % 250 + 1}:7070" for i in range(peers_module.MAX_PEERS + 5)]
    with caplog.at_level("ERROR"):
        await few.set_members(over)
    assert len(few.peers) == peers_module.MAX_PEERS
    assert "5 left out" in caplog.text


def test_a_node_asks_level_by_level_so_its_relay_parents_ask_before_it() -> None:
    """request_key puts a node's pieces in order of its level in their trees: each parent sits one
    level up, so (every node asking alike) it asks for a piece before its children do."""
    assert [placement.place_level(k) for k in range(8)] == [0, 1, 1, 2, 2, 2, 2, 3]
    members = sorted(f"198.18.{i // 200}.{i % 200 + 1}:7070" for i in range(300))
    pieces = [(f"shard{k}", i, 16 * MiB) for k in range(20) for i in range(50)]
    orders = placement.compute_placement(members, pieces).orders
    for key, index, _ in pieces[::37]:
        for m in members[::23]:
            parent = orders.parent((key, index), m)
            level = orders.level((key, index), m)
            assert (level == 0) if parent is None else (orders.level((key, index), parent) == level - 1)
    rank = 7
    keys = sorted(
        (placement.request_key(orders.level(p[:2], members[rank]), n, rank, len(members), len(pieces)), n)
        for n, p in enumerate(pieces)
    )
    levels = [orders.level(pieces[n][:2], members[rank]) for _, n in keys]
    assert levels == sorted(levels) and levels[0] < levels[-1]
    # Within a level, node k of N starts k/N of the way into the model (the rotation kept from before).
    same = [n for (lvl, _), n in keys if lvl == levels[-1]]
    assert same[0] >= rank * len(pieces) // len(members)


async def test_placement_is_computed_off_the_event_loop_once_per_member_list() -> None:
    """A big model's placement (owners and relay trees) takes seconds for big clusters; the fetcher
    asks for it with ``prepare`` (a thread, one computation for all callers), never on the loop."""
    members = [f"10.0.0.{i}:7070" for i in range(1, 9)]
    m = Membership(members[0], advertise=members[0])
    await m.set_members(members)
    for a in members[1:]:
        m.mark_up(a)
    pieces = tuple((f"f{k}", i, 16 * MiB) for k in range(20) for i in range(50))
    model = ("s3://b/m@rev", pieces)
    loop_thread = threading.get_ident()
    computed_in: list[int] = []
    real = peers_module.compute_placement

    def spy(*args: Any) -> Any:
        computed_in.append(threading.get_ident())
        return real(*args)

    peers_module.compute_placement = spy  # type: ignore[assignment]
    try:
        await asyncio.gather(*(m.prepare(model) for _ in range(5)))
        assert len(computed_in) == 1 and computed_in[0] != loop_thread
        owners = balanced_owners(sorted(members), pieces)
        orders = relay_orders(sorted(members), pieces, owners)
        for key, index, _ in pieces[:40]:
            want_owner = owners[(key, index)]
            sources = m.sources(key, index, 2, model)
            owners_asked = [a for a, relay in sources if not relay]
            relay_parents = [a for a, relay in sources if relay]
            assert owners_asked[:1] == ([] if want_owner == members[0] else [want_owner])
            parent = tree_parent(orders[(key, index)], members[0])
            assert relay_parents[:1] == ([] if parent in (None, want_owner) else [parent])
        assert len(computed_in) == 1  # the accessors used what prepare computed
        m.mark_down(members[-1], "test")  # another member list: another placement
        await m.prepare(model)
        assert len(computed_in) == 2
    finally:
        peers_module.compute_placement = real  # type: ignore[assignment]


# ---------------------------------------------------------------------- helpers


def _upload(
    seaweed: SeaweedS3, tmp_path: Path, prefix: str, sizes: dict[str, int], *, crc32c: bool = False
) -> dict[str, bytes]:
    """Random files under s3://models/PREFIX; ``crc32c``: each put with its whole-object CRC32C, which
    S3 (and SeaweedFS) keeps and returns to HeadObject with ChecksumMode=ENABLED."""
    src = tmp_path / f"src-{prefix.replace('/', '-')}"
    src.mkdir()
    seaweed.make_bucket("models")
    files = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (src / name).write_bytes(data)
        if crc32c:
            value = base64.b64encode(crc32c_lib.crc32c(data).to_bytes(4, "big")).decode()
            seaweed.client().put_object(Bucket="models", Key=f"{prefix}/{name}", Body=data, ChecksumCRC32C=value)
        else:
            seaweed.upload_file(src / name, "models", f"{prefix}/{name}")
        files[name] = data
    return files


MODEL = {
    "config.json": 3000,
    "model-00001-of-00003.safetensors": 12 * MiB + 4321,
    "model-00002-of-00003.safetensors": 12 * MiB,
    "model-00003-of-00003.safetensors": 9 * MiB + 77,
}


def _relay(seaweed: SeaweedS3, relay_factory: Any, rate: float | None = None) -> Any:
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    return relay_factory(host, int(port), rate=rate)


def _cluster(
    agent_factory: Any, agent_env: dict[str, str] | None, tmp_path: Path, n: int, relay: Any, *,
    start: int | None = None, extra: tuple[str, ...] = (), first_extra: tuple[str, ...] = (),
) -> list[Any]:
    """``n`` agents with the same static peer list (themselves included); the first ``start`` started.

    ``agent_factory`` is ``inproc_factory`` (``agent_env`` None: the agents share this process's
    environment, with ``AWS_ENDPOINT_URL`` at the relay) or ``agent_factory`` with its ``agent_env``.

    ``extra`` goes to every agent's command line, ``first_extra`` after it to the first agent's only.
    """
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKEN + "\n")
    ports = free_ports(n)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    env = {"AWS_ENDPOINT_URL": relay.url} if agent_env is None else {**agent_env, "AWS_ENDPOINT_URL": relay.url}
    start_wait = () if "--peer-start-wait" in extra else ("--peer-start-wait", "0")
    agents = []
    for i, port in enumerate(ports):
        # Started one by one (each ready before the next starts): the start-up wait for peers is not the point.
        args = ("--peers", peers, "--peer-token-file", str(token_file), "--piece-size", "1MiB", *start_wait, *extra)
        args += first_extra if i == 0 else ()
        agents.append(agent_factory(f"node{i}", env=env, port=port, extra_args=args, start=False))
    for a in agents[: n if start is None else start]:
        a.start()
    return agents


def _stats(agent: Any) -> dict[str, Any]:
    return AgentConnection(str(agent.socket_path), timeout=10).request_json("GET", "/v1/stats")


_PEER_STORY = re.compile(
    r"from peer|for a peer|from the origin for|no answer within|origin range|answered \d{3}|filled "
)


def _peer_story(agents: list[Any], lines: int = 40) -> str:
    """What each agent logged about where its pieces came from: printed when an origin-once check fails.

    A piece fetched twice from the origin shows up as a peer request that failed (and why) on
    the node that then went to the origin itself.
    """
    out = []
    for a in agents:
        hits = [ln for ln in a.log_text().splitlines() if _PEER_STORY.search(ln)]
        out.append(f"  {a.name}: {len(hits)} lines" + "".join(f"\n    {ln}" for ln in hits[-lines:]))
    return "\n".join(out)


def _assert_origin_once(relay: Any, agents: list[Any], model_bytes: int, context: Any = "") -> None:
    """The cluster took the model from the origin about once (at most 10% over its size).

    On failure: the relay's requests per connection and what each agent logged about its pieces.
    """
    assert relay.bytes_down <= 1.1 * model_bytes, (
        f"{relay.bytes_down} bytes from the origin for a {model_bytes}-byte model; "
        f"{context}\n{relay.traffic()}\n{_peer_story(agents)}"
    )


def _wait_peers_up(agents: list[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        views = [_stats(a) for a in agents]
        if all(sum(p["alive"] for p in v["peers"]) == len(agents) - 1 for v in views):
            return
        assert time.monotonic() < deadline, views
        time.sleep(0.2)


def _start_prefetches(agents: list[Any], ref: str) -> list[subprocess.Popen[str]]:
    """``agent prefetch ref`` against every agent, all started at once (output captured)."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "agent", "prefetch", ref],
            env={**a.env, "WARMSTART_SOCKET": str(a.socket_path)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for a in agents
    ]  # fmt: skip


def _prefetch_all_at_once(agents: list[Any], ref: str, timeout: float = 90.0) -> list[subprocess.CompletedProcess[str]]:
    procs = _start_prefetches(agents, ref)
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _assert_bit_exact(agent: Any, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        blob = agent.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(data)
        assert blob.is_file(), f"{agent.name} lacks {name}"
        assert blob.read_bytes() == data, f"{agent.name}: {name} differs"


def _peer_get(agent: Any, path: str, params: dict[str, str] | None = None, token: str | None = TOKEN) -> int:
    url = agent.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# ---------------------------------------------------------------------- end to end


ODD_PIECE = MiB + 7  # pieces start off page boundaries: sendfile's offsets are not aligned


def _piece_query(node: Any, ref: str, path: str) -> tuple[dict[str, str], Any]:
    """The query a requester sends for pieces of ``path`` (index left out), and the node's manifest entry."""
    conn = AgentConnection(str(node.socket_path), timeout=10)
    rev = conn.request_json("POST", "/v1/resolve", {"ref": ref})["revision"]
    (manifest,) = (node.cache_dir / "manifests").rglob(f"{rev}.json")
    entry = next(f for f in Manifest.from_json(json.loads(manifest.read_text())).files if f.path == path)
    return {"ref": ref, "rev": rev, "path": path, "key": entry.fill_key, "piece_size": str(entry.piece_size)}, entry


def _get_piece(node: Any, params: dict[str, str]) -> tuple[bytes, bytes]:
    """(the piece's bytes, the 32-character digest after them) as a requester reads them."""
    url = node.url + "/peer/v1/piece?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        assert int(r.headers["Content-Length"]) == len(body)
        assert int(r.headers["X-Warmstart-Piece-Length"]) == len(body) - 32
    return body[:-32], body[-32:]


def test_held_pieces_are_sent_bit_exact_at_odd_offsets_and_counted(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """Pieces of a complete blob go out with sendfile (plain HTTP): every byte at its offset, the digest after
    them, Content-Length exact, whatever the offset's alignment; the served/relayed counters move by the bytes
    sent; and a requester that resets mid-piece leaves the node serving the next one."""
    ref = "s3://models/peers/sendfile"
    files = _upload(seaweed, tmp_path, "peers/sendfile", {"w.bin": 4 * ODD_PIECE + 12345})
    data = files["w.bin"]
    relay = _relay(seaweed, relay_factory)
    (node,) = _cluster(inproc_factory, None, tmp_path, 1, relay, extra=("--piece-size", str(ODD_PIECE)))
    node.cli("prefetch", ref, check=True)
    q, entry = _piece_query(node, ref, "w.bin")
    assert entry.piece_size == ODD_PIECE and entry.piece_count == 5
    before = _stats(node)
    relay.reset_counters()
    for index in reversed(range(entry.piece_count)):  # the short last piece first
        start, length = entry.piece_range(index)
        got, digest = _get_piece(node, {**q, "index": str(index)})
        assert len(got) == length and got == data[start:start + length], index
        assert digest.decode() == xxhash.xxh3_128_hexdigest(got), index
    _, _ = _get_piece(node, {**q, "index": "2", "relay": "1", "from": "127.0.0.1:1"})
    after = _stats(node)
    assert relay.bytes_down == 0  # all of it from the cache
    assert after["peer_bytes_served"] - before["peer_bytes_served"] == len(data) + ODD_PIECE
    assert after["peer_bytes_relayed"] - before["peer_bytes_relayed"] == ODD_PIECE
    status, metrics = node.http_get("/metrics")
    assert status == 200
    exported = re.search(rb'^warmstart_served_bytes_total\{to="peer"\} (\S+)$', metrics, re.M)
    assert exported is not None and float(exported[1]) == after["peer_bytes_served"]

    # A requester that goes away mid-piece (connection reset): nothing breaks, the next piece is whole.
    import socket
    import struct

    path = "/peer/v1/piece?" + urllib.parse.urlencode({**q, "index": "1"})
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", int(node.listen.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    got, digest = _get_piece(node, {**q, "index": "1"})
    assert got == data[ODD_PIECE:2 * ODD_PIECE] and digest.decode() == xxhash.xxh3_128_hexdigest(got)
    assert "Traceback" not in node.log_text()


@pytest.mark.slow
@pytest.mark.serial  # relaying needs the tree's parent to be mid-piece: beside other tests holders finish first
def test_concurrent_prefetch_sends_the_model_once_from_the_origin(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "peers/once", MODEL)
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 4, relay)
    _wait_peers_up(agents)
    relay.reset_counters()
    started = time.monotonic()
    for done in _prefetch_all_at_once(agents, "s3://models/peers/once"):
        assert done.returncode == 0, done.stderr
    elapsed = time.monotonic() - started
    model_bytes = sum(len(d) for d in files.values())
    for a in agents:
        _assert_bit_exact(a, files)
    stats = [_stats(a) for a in agents]
    received = sum(s["peer_bytes_received"] for s in stats)
    served = sum(s["peer_bytes_served"] for s in stats)
    print(f"origin {relay.bytes_down / model_bytes:.2f}x the model, peers moved {received / model_bytes:.2f}x, "
          f"{elapsed:.1f}s for 4 nodes")
    _assert_origin_once(relay, agents, model_bytes, stats)
    assert all(s["peer_bytes_received"] > 0 for s in stats), stats
    assert received > 2 * model_bytes and served > 2 * model_bytes, stats
    assert sum(s["origin_bytes"] for s in stats) <= 1.1 * model_bytes, stats
    assert all(s["peer_pieces_rejected"] == 0 for s in stats), stats
    # With 4 nodes the last place of every piece's tree asks the node at place 1, not the owner.
    assert sum(s["peer_bytes_relayed"] for s in stats) > 0, stats


@pytest.mark.slow
def test_kill9_one_agent_mid_transfer_the_others_finish(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(
        seaweed, tmp_path, "peers/kill", {k: v for k, v in MODEL.items() if not k.startswith("model-00003")}
    )
    relay = _relay(seaweed, relay_factory, rate=6 * MiB)  # ~24 MiB: about 4 s from the origin
    agents = _cluster(agent_factory, agent_env, tmp_path, 3, relay)
    _wait_peers_up(agents)
    victim, *rest = agents
    procs = _start_prefetches(agents, "s3://models/peers/kill")
    deadline = time.monotonic() + 30
    while _stats(victim)["peer_bytes_served"] < 2 * MiB:
        assert time.monotonic() < deadline, "the victim never served a piece"
        time.sleep(0.05)
    victim.kill9()
    started = time.monotonic()
    for a, p in zip(agents, procs, strict=True):
        _, stderr = p.communicate(timeout=90)
        if a is not victim:
            assert p.returncode == 0, stderr
    print(f"survivors finished {time.monotonic() - started:.1f}s after the kill")
    for a in rest:
        _assert_bit_exact(a, files)
    # Pings take the dead node out of placement within a few seconds.
    deadline = time.monotonic() + 10
    while any(p["alive"] for a in rest for p in _stats(a)["peers"] if p["addr"] == victim.listen):
        assert time.monotonic() < deadline, [_stats(a)["peers"] for a in rest]
        time.sleep(0.2)


@pytest.mark.slow
def test_lying_peer_is_detected_penalised_and_worked_around(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(
        seaweed, tmp_path, "peers/liar", {k: v for k, v in MODEL.items() if not k.startswith("model-00003")}
    )
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 3, relay, start=1)
    liar, *honest = agents
    assert liar.cli("prefetch", "s3://models/peers/liar").returncode == 0  # alone: all from the origin
    # Its disk goes bad under it: every piece of the big files has a flipped byte.
    for data in files.values():
        if len(data) > MiB:
            blob = liar.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(data)
            blob.chmod(0o644)
            with open(blob, "r+b") as f:
                for off in range(100, len(data), MiB):
                    f.seek(off)
                    f.write(bytes([data[off] ^ 0xFF]))
    for a in honest:
        a.start()
    _wait_peers_up(agents)
    for done in _prefetch_all_at_once(honest, "s3://models/peers/liar"):
        assert done.returncode == 0, done.stderr
    for a in honest:
        _assert_bit_exact(a, files)
    views = [_stats(a) for a in honest]
    assert sum(v["peer_pieces_rejected"] for v in views) > 0, views
    for v in views:
        if v["peer_pieces_rejected"]:
            (peer,) = [p for p in v["peers"] if p["addr"] == liar.listen]
            assert peer["strikes"] >= 1 and peer["penalised_for_s"] > 0, peer


def test_peer_routes_need_the_token_and_refuse_what_is_not_a_model_piece(
    inproc_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    _upload(seaweed, tmp_path, "peers/auth", {"config.json": 1000})
    relay = _relay(seaweed, relay_factory)
    (node,) = _cluster(inproc_factory, None, tmp_path, 1, relay)
    assert _peer_get(node, "/peer/v1/ping") == 200
    assert _peer_get(node, "/peer/v1/ping", token=None) == 401
    assert _peer_get(node, "/peer/v1/ping", token="wrong-token-wrong-token-wrong") == 401
    good = {"ref": "s3://models/peers/auth", "rev": "x", "path": "config.json", "key": "k", "index": "0",
            "piece_size": str(MiB)}
    assert _peer_get(node, "/peer/v1/piece", good, token=None) == 401
    for bad in (
        {"path": "../../etc/passwd"},
        {"path": "/etc/passwd"},
        {"ref": "file:///etc"},
        {"ref": "/etc"},
        {"ref": "s3://models/peers/auth@abc"},
        {"index": "nope"},
    ):
        assert _peer_get(node, "/peer/v1/piece", {**good, **bad}) == 400, bad
    assert _peer_get(node, "/peer/v1/piece", {**good, "rev": "not-the-revision"}) in (404, 409)
    assert node.http_status("/readyz") == 200

    # Without a token file the peer routes do not exist, and --peers without one is refused.
    plain = inproc_factory("plain", env={"AWS_ENDPOINT_URL": relay.url})
    assert _peer_get(plain, "/peer/v1/ping") == 404
    refused = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--cache-dir", str(tmp_path / "x"), "--socket",
         str(tmp_path / "x.sock"), "--peers", "127.0.0.1:1"],
        env=agent_env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 2 and "--peer-token-file" in refused.stderr


@pytest.mark.serial  # answered within 1 s
def test_a_relay_request_never_costs_an_origin_fetch(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """A node asked as a relay parent for a piece it is not getting says so at once (503): no origin
    fetch, no partial file. Asked as the owner (no relay=1), it fetches the piece and serves it."""
    files = _upload(seaweed, tmp_path, "peers/relay", {"w.bin": 3 * MiB})
    relay = _relay(seaweed, relay_factory)
    (node,) = _cluster(inproc_factory, None, tmp_path, 1, relay)
    conn = AgentConnection(str(node.socket_path), timeout=10)
    rev = conn.request_json("POST", "/v1/resolve", {"ref": "s3://models/peers/relay"})["revision"]
    (manifest,) = (node.cache_dir / "manifests").rglob(f"{rev}.json")
    (entry,) = Manifest.from_json(json.loads(manifest.read_text())).files
    q = {"ref": "s3://models/peers/relay", "rev": rev, "path": "w.bin", "key": entry.fill_key, "index": "1",
         "piece_size": str(MiB)}
    relay.reset_counters()
    started = time.monotonic()
    assert _peer_get(node, "/peer/v1/piece", {**q, "relay": "1", "from": "127.0.0.1:1"}) == 503
    assert time.monotonic() - started < 1.0
    assert relay.bytes_down == 0
    assert not list((node.cache_dir / "partial").glob("*")), "a relay request made a partial file"
    assert _peer_get(node, "/peer/v1/piece", q) == 200
    assert MiB <= relay.bytes_down < 2 * MiB
    assert len(files["w.bin"]) == 3 * MiB


def test_prefetch_all_nodes_fills_every_node(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "peers/all", {"config.json": 2000, "w.bin": 10 * MiB + 5})
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 3, relay)
    _wait_peers_up(agents)
    relay.reset_counters()
    done = agents[0].cli("prefetch", "s3://models/peers/all", "--all-nodes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": complete") == 3, done.stdout
    for a in agents:
        _assert_bit_exact(a, files)
    _assert_origin_once(relay, agents, sum(len(d) for d in files.values()), [_stats(a) for a in agents])


def _fill_key_of(agent: Any, data: bytes) -> str:
    """The fill key under which ``agent`` stored a blob with these bytes (its sources/ index)."""
    digest = xxhash.xxh3_128_hexdigest(data)
    keys = [p.name for p in (agent.cache_dir / "sources").iterdir() if json.loads(p.read_text()) == digest]
    assert len(keys) == 1, keys
    return keys[0]


def _liar_first(members: list[str], liar: Any, fill_key: str) -> list[int]:
    """Pieces of ``fill_key`` whose owner is ``liar`` (balanced over the model): every other member asks it first."""
    (path,) = (liar.cache_dir / "manifests").glob("*/*.json")  # the one model the liar resolved
    ctx = PeerContext.of("s3://unused", "s3", Manifest.from_json(json.loads(path.read_text())))
    owners = balanced_owners(sorted(members), ctx.pieces)
    return [i for (key, i), owner in owners.items() if key == fill_key and owner == liar.listen]


@pytest.mark.slow
@pytest.mark.parametrize("check", ["etag", "crc32c"])
def test_consistent_liar_is_caught_by_the_whole_file_check_and_repaired_from_the_origin(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path,
    check: str,
) -> None:
    """A peer whose bytes match the piece hashes it states: only the origin's ETag can catch it.

    ``crc32c``: the objects were put with their CRC32C, which the store keeps; the requesters check
    peers' bytes against it (0.10 CPU s/GiB) instead of recomputing the ETag (MD5, 1.76), and it
    must catch the liar as well (its own error line names the object store's CRC32C).

    The liar is a real agent serving from its own cache, where one file's bytes
    AND the piece hashes it recorded for them (meta/<digest>.json) were
    rewritten: every piece it sends of that file passes the per-piece check.
    The requesters must find out at the whole-file S3 ETag (multipart MD5 of
    MD5s), fetch their peer pieces of that file again from the origin (only
    that file), penalise the liar and no one else, and end bit-exact.
    """
    sizes = {k: v for k, v in MODEL.items() if not k.startswith("model-00003")}
    prefix = f"peers/consistent-{check}"
    files = _upload(seaweed, tmp_path, prefix, sizes, crc32c=check == "crc32c")
    bad_name = "model-00001-of-00003.safetensors"
    bad = files[bad_name]
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 3, relay, start=1)
    liar, *honest = agents
    assert liar.cli("prefetch", f"s3://models/{prefix}").returncode == 0  # alone: all from the origin
    # It has served nothing yet, so it reads the piece hashes from disk on the first request.
    digest = xxhash.xxh3_128_hexdigest(bad)
    blob, meta_path = liar.cache_dir / "blobs" / digest, liar.cache_dir / "meta" / f"{digest}.json"
    lie = bytearray(bad)
    for off in range(100, len(lie), MiB):
        lie[off] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(lie))
    blob.chmod(0o444)
    meta = json.loads(meta_path.read_text())
    meta["pieces"] = [xxhash.xxh3_128_hexdigest(bytes(lie[i : i + MiB])) for i in range(0, len(lie), MiB)]
    meta_path.write_text(json.dumps(meta))
    members = [a.listen for a in agents]
    lying = _liar_first(members, liar, _fill_key_of(liar, bad))
    assert lying, "the liar owns no piece of the file"  # balanced: about a third of its 13
    for a in honest:
        a.start()
    _wait_peers_up(agents)
    relay.reset_counters()
    for done in _prefetch_all_at_once(honest, f"s3://models/{prefix}"):
        assert done.returncode == 0, done.stderr
    for a in honest:
        _assert_bit_exact(a, files)
    views = [_stats(a) for a in honest]
    model_bytes = sum(len(d) for d in files.values())
    repaired = sum(v["peer_bytes_repaired"] for v in views)
    print(f"origin {relay.bytes_down / model_bytes:.2f}x the model, {repaired / model_bytes:.2f}x repaired; "
          f"liar owned pieces {lying} of {bad_name}")
    for a, v in zip(honest, views, strict=True):
        # Each requester took the liar's pieces of the bad file, none was refused piece by piece,
        # the whole file did not match, and only that file was fetched again. The liar holds the
        # whole model, so holders-first asks it for any piece (not only those it owns).
        assert v["peer_files_repaired"] == 1, v
        assert 0 < v["peer_pieces_rejected"] <= -(-len(bad) // MiB), v
        assert (v["peer_pieces_rejected"] - 1) * MiB < v["peer_bytes_repaired"] <= len(bad), v
        assert "does not match the origin's digest" in a.log_text()
        # which digest caught it: the store's CRC32C, or the ETag recomputed
        assert ("the object store says" in a.log_text()) == (check == "crc32c")
        (liar_view,) = [p for p in v["peers"] if p["addr"] == liar.listen]
        assert liar_view["strikes"] == 1 and liar_view["penalised_for_s"] > 0, liar_view
        assert all(p["strikes"] == 0 for p in v["peers"] if p["addr"] != liar.listen), v["peers"]
    # The origin sent the model about once plus the repaired pieces, and nothing more.
    assert repaired <= 2 * len(bad)
    assert relay.bytes_down >= repaired
    assert relay.bytes_down <= 1.1 * (model_bytes + repaired), (
        f"{(relay.bytes_down, model_bytes, repaired, views)}\n{relay.traffic()}\n{_peer_story(agents)}"
    )
    assert sum(v["origin_bytes"] for v in views) - repaired <= 1.05 * model_bytes, views


def test_owner_with_another_piece_size_answers_409_and_requesters_go_elsewhere(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """An owner that resolved the file differently (here: another --piece-size, as in a rolling
    change of the flag) refuses with 409; requesters go to the next owner or the origin."""
    files = _upload(seaweed, tmp_path, "peers/conflict", {"config.json": 2000, "w.bin": 12 * MiB + 5})
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 3, relay, first_extra=("--piece-size", "2MiB"))
    odd, *rest = agents
    _wait_peers_up(agents)
    assert odd.cli("prefetch", "s3://models/peers/conflict").returncode == 0  # it has every piece, in 2 MiB pieces
    relay.reset_counters()
    for done in _prefetch_all_at_once(rest, "s3://models/peers/conflict"):
        assert done.returncode == 0, done.stderr
    for a in rest:
        _assert_bit_exact(a, files)
    model_bytes = sum(len(d) for d in files.values())
    views = [_stats(a) for a in rest]
    assert _stats(odd)["peer_bytes_served"] == 0
    assert any("answered 409" in a.log_text() for a in rest), "nobody asked the odd node"
    for v in views:
        assert v["peer_pieces_rejected"] == 0 and v["peer_files_repaired"] == 0, v
        (o,) = [p for p in v["peers"] if p["addr"] == odd.listen]
        assert o["alive"] and o["strikes"] == 0, o  # a refusal is no lie, and no sign of a dead node
    assert all(v["peer_bytes_received"] > 0 for v in views), views  # the two 1 MiB nodes still shared
    # The odd node's third of the pieces may come from the origin twice (both asked it, then went there).
    assert relay.bytes_down <= 1.45 * model_bytes, (
        f"{(relay.bytes_down, model_bytes, views)}\n{relay.traffic()}\n{_peer_story(agents)}"
    )


@pytest.mark.serial  # no requester may hit the 2 s hedge timeout
def test_an_owner_with_busy_origin_connections_answers_at_once_and_nobody_hedges_to_the_origin(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """``--connections 1`` on one owner behind a slow origin: its pieces wait for its one origin
    connection for seconds. The owner answers a peer's request (headers) as soon as it checked it,
    and the bytes follow when they come; had it answered only once the piece got a connection,
    every requester would hedge away after --peer-hedge-timeout (2 s) and fetch the piece from the
    origin itself."""
    files = _upload(seaweed, tmp_path, "peers/busy", {"config.json": 2000, "a.bin": 8 * MiB, "b.bin": 8 * MiB + 9})
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 4, relay, first_extra=("--connections", "1"))
    owner, *rest = agents
    _wait_peers_up(agents)
    relay.reset_counters()
    relay.set_rate(4 * MiB)  # shared by 25 origin connections: ~0.16 MiB/s, 6 s a piece, for the owner's one
    started = time.monotonic()
    for done in _prefetch_all_at_once(agents, "s3://models/peers/busy"):
        assert done.returncode == 0, done.stderr
    elapsed = time.monotonic() - started
    for a in agents:
        _assert_bit_exact(a, files)
    model_bytes = sum(len(d) for d in files.values())
    views = [_stats(a) for a in rest]
    hedged = sum(a.log_text().count("no answer within") for a in agents)
    print(f"origin {relay.bytes_down / model_bytes:.2f}x the model in {elapsed:.1f}s, {hedged} hedged requests, "
          f"owner served {_stats(owner)['peer_bytes_served'] / MiB:.0f} MiB")
    assert hedged == 0
    assert _stats(owner)["peer_bytes_served"] > 0
    for v in views:
        (o,) = [p for p in v["peers"] if p["addr"] == owner.listen]
        assert o["alive"], o
    assert relay.bytes_down <= 1.1 * model_bytes, (
        f"{(relay.bytes_down, model_bytes, views)}\n{relay.traffic()}\n{_peer_story(agents)}"
    )


def test_a_piece_still_arriving_from_a_slow_origin_is_passed_on_as_it_lands(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """Cut-through: a one-piece model behind a 2 MiB/s origin. The owner gets it from the origin in
    about 4 s; the other node must be receiving it from the owner while it lands, not after a whole
    4 MiB read block (at 1.5 MB/s, one of 16 flows on a 200 Mbit/s link, that held a piece's first
    bytes back for 2.7 s: bench/RESULTS.md "Peers")."""
    files = _upload(seaweed, tmp_path, "peers/cut", {"a.bin": 8 * MiB})
    relay = _relay(seaweed, relay_factory)
    agents = _cluster(agent_factory, agent_env, tmp_path, 2, relay, extra=("--piece-size", "8MiB"))
    _wait_peers_up(agents)
    relay.reset_counters()
    relay.set_rate(2 * MiB)
    procs = _start_prefetches(agents, "s3://models/peers/cut")
    try:
        # Sample until the origin has sent 3 MiB (under one read block): what has the follower got?
        deadline = time.monotonic() + 10
        while relay.bytes_down < 3 * MiB:
            assert time.monotonic() < deadline, relay.bytes_down
            time.sleep(0.05)
        followed = max(_stats(a)["peer_bytes_received"] for a in agents)
    finally:
        for p in procs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
    for a in agents:
        _assert_bit_exact(a, files)
    assert sum(_stats(a)["peer_bytes_received"] for a in agents) == 8 * MiB  # one node owns the one piece
    print(f"follower had {followed / MiB:.2f} MiB when the origin had sent {3 * MiB / MiB:.0f} MiB")
    assert followed >= 1 * MiB, followed


# ---------------------------------------------------------------------- --peer-dns in a network namespace


class _NetnsAgent(AgentProcess):
    """An agent inside ``netns`` listening on ``ip:port``; ready when its Unix socket answers.

    (Unix sockets are files: reachable from outside the namespace; its TCP port is not.)
    """

    def __init__(self, workdir: Path, netns: Netns, ip: str, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.netns, self.ip = netns, ip

    @property
    def listen(self) -> str:
        return f"{self.ip}:{self.port}"

    def command(self) -> list[str]:
        return [*self.netns.exec_prefix(), *super().command()]

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise AgentStartError(f"{self.name} exited before it was ready\n{self.log_tail()}")
            try:
                _stats(self)
                return
            except (OSError, WarmstartError):
                pass
            if time.monotonic() > deadline:
                raise AgentStartError(f"{self.name} not ready in time\n{self.log_tail()}")
            time.sleep(0.1)


@pytest.mark.skipif(netns_unavailable() is not None, reason=netns_unavailable() or "")
@pytest.mark.slow
def test_peer_dns_in_a_network_namespace(
    agent_env: dict[str, str], seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """``--peer-dns NAME``: three agents on three addresses of one name, same port, inside a
    namespace of the test's own (its /etc/hosts gives the name); S3 through a relay listening in
    the namespace. They find each other, leave themselves out, drop a stopped agent and take it
    back when it answers again, and a concurrent prefetch takes the model once from the origin."""
    ips = ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
    name = "warmstart-agents.test"
    files = _upload(seaweed, tmp_path, "peers/dns", {"config.json": 2000, "w.bin": 9 * MiB + 7})
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKEN + "\n")
    agents: list[_NetnsAgent] = []
    relay = None
    try:
        with Netns(["198.18.0.1", *ips], hosts={name: ips}) as ns:
            host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
            relay = TcpRelay(host, int(port), sock=ns.listen_socket("198.18.0.1"))
            env = {**agent_env, "AWS_ENDPOINT_URL": f"http://198.18.0.1:{relay.port}"}
            agent_port = free_port()  # the same on every address (the port of --peer-dns is --listen's)
            for i, ip in enumerate(ips):
                args = ("--peer-dns", name, "--peer-dns-interval", "1", "--peer-token-file", str(token_file),
                        "--piece-size", "1MiB", "--peer-start-wait", "0")  # started one by one
                agents.append(_NetnsAgent(tmp_path / f"dns{i}", ns, ip, name=f"dns{i}", env=env, port=agent_port,
                                          extra_args=args, stop_grace=5))
            for a in agents:
                a.start()

            def views_until(ok: Any, what: str, timeout: float = 20.0) -> list[dict[str, Any]]:
                deadline = time.monotonic() + timeout
                while True:
                    views = [_stats(a) for a in agents if a.alive()]
                    if ok(views):
                        return views
                    assert time.monotonic() < deadline, f"{what}: {views}"
                    time.sleep(0.2)

            addrs = {a.listen for a in agents}
            views = views_until(lambda vs: all(sum(p["alive"] for p in v["peers"]) == 2 for v in vs), "peers up")
            for a, v in zip(agents, views, strict=True):
                assert v["self"] == a.listen  # itself, as the name resolves to it...
                assert {p["addr"] for p in v["peers"]} == addrs - {a.listen}  # ... and left out

            relay.reset_counters()
            for done in _prefetch_all_at_once(agents, "s3://models/peers/dns"):
                assert done.returncode == 0, done.stderr
            model_bytes = sum(len(d) for d in files.values())
            for a in agents:
                _assert_bit_exact(a, files)
            stats = [_stats(a) for a in agents]
            print(f"origin {relay.bytes_down / model_bytes:.2f}x the model over --peer-dns")
            _assert_origin_once(relay, agents, model_bytes, stats)
            assert all(s["peer_bytes_received"] > 0 for s in stats), stats

            gone = agents[2]
            gone.stop()
            views_until(lambda vs: all(not p["alive"] for v in vs for p in v["peers"] if p["addr"] == gone.listen),
                        "stopped agent dropped")
            gone.start()
            views_until(lambda vs: len(vs) == 3 and all(sum(p["alive"] for p in v["peers"]) == 2 for v in vs),
                        "restarted agent back")
    finally:
        for a in agents:
            a.close()
        if relay is not None:
            relay.close()
