"""Fleet simulator (issue 24 item 4): N nodes fill one model at once through peers, on paper.

A fluid, time-stepped simulation of a scale-up storm: every node's agent asks
for the same model at the same instant. It takes its decisions from the real
agent code, not a copy of it:

- who owns each piece and each piece's relay tree: ``compute_placement``
  (agent/peers/placement.py), the function ``Membership.prepare`` runs, over the
  pieces ``PeerContext.of`` lists for the model (file order, then piece index);
- whom a node asks: its relay parent (``RelayOrders``; checked on a sample
  against ``Membership.sources`` itself), else the owner; the owner fetches from
  the origin.

What it reproduces of the fetch path (agent/fetch/, numbers from there):
- a node asks for at most ``PEER_CONNECTIONS_MIN`` pieces from peers at once,
  in the order ``PeerReader._order`` admits them (``request_key``: level by level
  in the pieces' relay trees, then the model from k/N of the way in for node k of
  N; ``--no-levels``: the rotation alone, as before issue 24), and fetches the pieces it owns from the origin,
  ``--connections`` (8) at a time;
- a relay request to a parent that is not receiving the piece promotes it to
  the front of the parent's queue and waits up to ``RELAY_WAIT`` (1 s) for the
  parent's own fetch to start; then the child asks the owner, which fetches from
  the origin if it has not started (``PieceServer.serve``);
- cut-through: a node passes on what it has received so far, at least every
  0.1 s (``pump_body``): one time step of 0.1 s per hop;
- links: every node's upload and download capped at the link rate times
  ``--goodput`` (headers), the origin's upload at ``--origin-links`` node links; flows on a link share it max-min
  fairly (approximated by a few rounds of scaling).

What it leaves out: CPU (hashing, copies: on a 2-core machine the netns bench is
CPU-bound at N=8 with 1 GiB), TCP's slow start and unfairness, request latency,
failures. It predicts the origin's egress (x model) and when each node is ready
(p50, p99, max); the limit is model / link.

Usage::

    python bench/fleet_sim.py --nodes 100,1000,2600 --size 3GB --link 300MB
    python bench/fleet_sim.py --nodes 3,8 --size 256MiB --link 200Mbit --origin-links 1 --shards 4
    python bench/fleet_sim.py --table        # the issue's grid (bench/RESULTS.md "Fleet")
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import DEFAULT_PIECE_SIZE  # noqa: E402
from agent.fetch.peer_reader import PEER_CONNECTIONS_MIN  # noqa: E402
from agent.fetch.piece_server import RELAY_WAIT  # noqa: E402
from agent.peers.membership import Membership  # noqa: E402
from agent.peers.placement import RELAY_FANOUT, PieceSpec, compute_placement, place_level, request_key  # noqa: E402

DT = 0.1  # s: the step, and the cut-through delay per hop (pump_body passes bytes on at least this often)
ORIGIN_CONNECTIONS = 8  # --connections default: the owner's origin fetches at once
# Payload per byte of link: TCP/IP headers on 1500-byte frames leave 1448 of every 1514 bytes (0.956); the
# netns bench's shaping check moves 188-190 Mbit/s of payload through a 200 Mbit/s tbf (0.94-0.95).
GOODPUT = 0.95
SCALE_ROUNDS = 4  # rounds of scaling flows up into spare link capacity (max-min, approximately)

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``3GB``, ``256MiB``, ``140GB`` -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str) -> float:
    """``300MB`` (bytes/s), ``25Gbit``, ``200Mbit`` -> bytes/s."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)(bit|b|B)?(/s)?\s*", text)
    if not m:
        raise ValueError(f"not a rate: {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return float(m.group(1)) * scale / (8 if m.group(3) == "bit" else 1)


@dataclass
class Result:
    nodes: int
    size: int
    link: float  # bytes/s
    origin_links: float
    piece_size: int
    pieces: int
    limit_s: float
    origin_x: float  # origin egress / model
    p50_s: float
    p99_s: float
    max_s: float
    relay_share: float  # of bytes between peers, those that came from a relay parent (not the owner)
    owner_fallbacks: int  # relay requests that ended at the owner (parent not receiving within RELAY_WAIT)
    placement_s: float
    sim_s: float


def model_pieces(size: int, shards: int, piece_size: int) -> list[PieceSpec]:
    """The model's pieces as ``PeerContext.of`` lists them: file by file, piece by piece."""
    out: list[PieceSpec] = []
    per = -(-size // shards)
    for k in range(shards):
        n = min(per, size - k * per)
        out += [(f"sim-shard{k:05d}", i, min(piece_size, n - i * piece_size)) for i in range(-(-n // piece_size))]
    return out


def member_names(n: int) -> list[str]:
    """Node addresses as the netns bench names them (198.18.x.y:7070), sorted as the agent sorts them."""
    return sorted(f"198.18.{1 + i // 250}.{1 + i % 250}:7070" for i in range(n))


def check_against_membership(members: list[str], pieces: list[PieceSpec], owner: np.ndarray,
                             parent: np.ndarray, samples: int = 12) -> None:
    """The sim's owner and relay parent for a sample of (node, piece) are what Membership.sources answers."""

    async def check() -> None:
        rng = np.random.default_rng(1)
        model = ("sim-model@rev", tuple(pieces))
        for v in rng.choice(len(members), size=min(samples, len(members)), replace=False):
            m = Membership(members[v], advertise=members[v])
            await m.set_members(members)
            for a in members:
                if a != members[v]:
                    m.mark_up(a)
            await m.prepare(model)
            for p in rng.choice(len(pieces), size=min(samples, len(pieces)), replace=False):
                key, index, _ = pieces[p]
                sources = m.sources(key, index, 2, model)
                if owner[p] == v:
                    assert sources == [], (v, p, sources)
                    continue
                relays = [a for a, relay in sources if relay]
                owners = [a for a, relay in sources if not relay]
                assert owners[0] == members[owner[p]], (v, p, sources)
                par = parent[p, v]
                assert relays == ([] if par == owner[p] else [members[par]]), (v, p, sources, members[par])

    asyncio.run(check())


def simulate(n: int, size: int, link: float, origin_links: float, *, shards: int = 4, goodput: float = GOODPUT,
             piece_size: int = DEFAULT_PIECE_SIZE, peer_slots: int = PEER_CONNECTIONS_MIN,
             relay_wait: float = RELAY_WAIT, levels: bool = True, check: bool = True, max_s: float = 3600.0) -> Result:
    """One storm: ``n`` nodes, a model of ``size`` bytes in ``shards`` files, links of ``link`` bytes/s."""
    members = member_names(n)
    pieces = model_pieces(size, shards, piece_size)
    P = len(pieces)
    started = time.perf_counter()
    placement = compute_placement(members, pieces)
    placement_s = time.perf_counter() - started
    idx = {m: i for i, m in enumerate(members)}
    owner = np.array([idx[placement.owners[(k, i)]] for k, i, _ in pieces], dtype=np.int32)
    parent = np.empty((P, n), dtype=np.int32)  # parent[p, v]: whom v asks as a relay (itself: v owns p)
    place_of = np.empty((P, n), dtype=np.int32)
    places = np.arange(n)
    for p, (k, i, _) in enumerate(pieces):
        order = np.array([idx[m] for m in placement.orders[(k, i)]], dtype=np.int32)
        parent[p, order] = order[(np.maximum(places, 1) - 1) // RELAY_FANOUT]
        place_of[p, order] = places
    level_of_place = [place_level(k) if levels else 0 for k in range(n)]
    # Each node's requests to peers, in the order PeerReader._order admits them (request_key).
    queues: list[list[int]] = [sorted((p for p in range(P) if owner[p] != v),
                     key=lambda p: request_key(level_of_place[place_of[p, v]], p, v, n, P)) for v in range(n)]
    if check:
        check_against_membership(members, pieces, owner, parent)
    length = np.array([ln for *_, ln in pieces], dtype=np.float64)

    # Per (node, piece): 0 not asked, 1 asked (waiting on a relay parent), 2 receiving, 3 done.
    state = np.zeros((n, P), dtype=np.int8)
    have = np.zeros((n, P), dtype=np.float64)
    done_count = np.zeros(n, dtype=np.int64)
    ready_at = np.full(n, np.nan)
    owned_queue = [deque(int(p) for p in np.flatnonzero(owner == v)) for v in range(n)]
    ptr = np.zeros(n, dtype=np.int64)  # next place in the node's queue
    promoted: list[deque[int]] = [deque() for _ in range(n)]
    peer_busy = np.zeros(n, dtype=np.int64)  # peer slots held (receiving or waiting on a parent)
    origin_busy = np.zeros(n, dtype=np.int64)

    ORIGIN = n  # the origin's index as a source
    f_src: list[int] = []
    f_dst: list[int] = []
    f_p: list[int] = []
    f_slot: list[int] = []  # 0 peer slot, 1 origin slot, 2 none (an origin fetch for a peer)
    fs = np.empty(0, dtype=np.int64)
    fd = np.empty(0, dtype=np.int64)
    fp = np.empty(0, dtype=np.int64)
    fslot = np.empty(0, dtype=np.int8)
    fb = np.empty(0, dtype=np.float64)
    w_v: list[int] = []
    w_p: list[int] = []
    w_until: list[float] = []
    origin_bytes = 0.0
    relay_bytes = owner_bytes = 0.0
    fallbacks = 0
    up_cap = np.full(n + 1, link * goodput)
    up_cap[ORIGIN] = origin_links * link * goodput
    down_cap = np.full(n, link * goodput)

    def add_flow(src: int, dst: int, p: int, slot: int) -> None:
        f_src.append(src)
        f_dst.append(dst)
        f_p.append(p)
        f_slot.append(slot)
        state[dst, p] = 2

    def ask_owner(v: int, p: int) -> None:
        """A non-relay request: the owner serves it, fetching from the origin first if it has not started."""
        o = int(owner[p])
        if state[o, p] == 0:  # (an owner never asks peers for its own pieces: 0, 2 or 3)
            add_flow(ORIGIN, o, p, 2)
        add_flow(o, v, p, 0)

    def next_piece(v: int) -> int | None:
        while promoted[v]:
            p = promoted[v].popleft()
            if state[v, p] == 0:
                return p
        queue = queues[v]
        while ptr[v] < len(queue):
            p = queue[ptr[v]]
            ptr[v] += 1
            if state[v, p] == 0:
                return p
        return None

    t = 0.0
    while t < max_s:
        # Start what free slots allow: owned pieces from the origin, the others from peers.
        for node in np.flatnonzero(origin_busy < ORIGIN_CONNECTIONS).tolist():
            q = owned_queue[node]
            while q and origin_busy[node] < ORIGIN_CONNECTIONS:
                first = q.popleft()
                if state[node, first] == 0:
                    add_flow(ORIGIN, node, first, 1)
                    origin_busy[node] += 1
        for node in np.flatnonzero(peer_busy < peer_slots).tolist():
            while peer_busy[node] < peer_slots:
                got = next_piece(node)
                if got is None:
                    break
                v, p = node, got
                peer_busy[v] += 1
                par = int(parent[p, v])
                if par == owner[p]:
                    ask_owner(v, p)
                elif state[par, p] >= 2:
                    add_flow(par, v, p, 0)
                else:  # the parent is not receiving it yet: it moves it to the front and we wait
                    if state[par, p] == 0:
                        promoted[par].appendleft(p)
                    state[v, p] = 1
                    w_v.append(v)
                    w_p.append(p)
                    w_until.append(t + relay_wait)
        if f_src:
            fs = np.concatenate([fs, np.array(f_src, dtype=np.int64)])
            fd = np.concatenate([fd, np.array(f_dst, dtype=np.int64)])
            fp = np.concatenate([fp, np.array(f_p, dtype=np.int64)])
            fslot = np.concatenate([fslot, np.array(f_slot, dtype=np.int8)])
            fb = np.concatenate([fb, np.zeros(len(f_src))])
            for pending in (f_src, f_dst, f_p, f_slot):
                pending.clear()
        if not len(fs) and not w_v:
            break

        # Rates: each link shared by its flows, scaled up into what others leave; a node passes on
        # only what it had received by the previous step (cut-through).
        rem = (length[fp] - fb) / DT
        from_node = fs != ORIGIN
        cap = rem.copy()
        src_node = np.where(from_node, fs, 0)
        ahead = np.where(from_node & (state[src_node, fp] != 3), (have[src_node, fp] - fb) / DT, np.inf)
        cap = np.minimum(cap, np.maximum(ahead, 0.0))
        n_out = np.bincount(fs, minlength=n + 1)
        n_in = np.bincount(fd, minlength=n)
        r = np.minimum(np.minimum(up_cap[fs] / n_out[fs], down_cap[fd] / n_in[fd]), cap)
        for _ in range(SCALE_ROUNDS):
            use_out = np.bincount(fs, weights=r, minlength=n + 1)
            use_in = np.bincount(fd, weights=r, minlength=n)
            with np.errstate(divide="ignore", invalid="ignore"):
                g_out = np.where(use_out > 0, up_cap / use_out, 1e18)
                g_in = np.where(use_in > 0, down_cap / use_in, 1e18)
            r = np.minimum(r * np.minimum(g_out[fs], g_in[fd]), cap)
        moved = r * DT
        fb += moved
        origin_bytes += float(moved[~from_node].sum())
        relayed = from_node & (fs != owner[fp])
        relay_bytes += float(moved[relayed].sum())
        owner_bytes += float(moved[from_node & ~relayed].sum())
        have[fd, fp] = fb
        t += DT

        finished = fb >= length[fp] - 0.5
        if finished.any():
            dv, dp, ds = fd[finished], fp[finished], fslot[finished]
            state[dv, dp] = 3
            np.add.at(done_count, dv, 1)
            np.subtract.at(peer_busy, dv[ds == 0], 1)
            np.subtract.at(origin_busy, dv[ds == 1], 1)
            newly = (done_count == P) & np.isnan(ready_at)
            ready_at[newly] = t
            keep = ~finished
            fs, fd, fp, fslot, fb = fs[keep], fd[keep], fp[keep], fslot[keep], fb[keep]
        # Waiting relay requests: the parent's own fetch started (follow it), or RELAY_WAIT is up (the owner).
        if w_v:
            still_v: list[int] = []
            still_p: list[int] = []
            still_until: list[float] = []
            for child, piece, until in zip(w_v, w_p, w_until, strict=True):
                up = int(parent[piece, child])
                if state[up, piece] >= 2:
                    add_flow(up, child, piece, 0)
                elif t >= until - 1e-9:
                    fallbacks += 1
                    ask_owner(child, piece)
                else:
                    still_v.append(child)
                    still_p.append(piece)
                    still_until.append(until)
            w_v, w_p, w_until = still_v, still_p, still_until
        if done_count.min() == P:
            break
    if np.isnan(ready_at).any():
        raise RuntimeError(f"{int(np.isnan(ready_at).sum())} of {n} nodes not ready after {max_s} s")
    ready = sorted(ready_at.tolist())
    peer = relay_bytes + owner_bytes
    return Result(
        nodes=n, size=size, link=link, origin_links=origin_links, piece_size=piece_size, pieces=P,
        limit_s=size / link, origin_x=origin_bytes / size, p50_s=statistics.median(ready),
        p99_s=ready[min(n - 1, math.ceil(0.99 * n) - 1)], max_s=ready[-1],
        relay_share=relay_bytes / peer if peer else 0.0, owner_fallbacks=fallbacks,
        placement_s=placement_s, sim_s=time.perf_counter() - started,
    )  # fmt: skip


def show(r: Result) -> str:
    return (f"| {r.nodes} | {r.size / 1e9:.3g} GB | {r.link * 8 / 1e9:g} Gbit/s | {r.origin_links:g} | "
            f"{r.piece_size >> 20} MiB x {r.pieces} | {r.origin_x:.2f} | {r.p50_s:.1f} | {r.p99_s:.1f} | "
            f"{r.max_s:.1f} | {r.limit_s:.1f} | {r.p50_s / r.limit_s:.2f}x | {r.relay_share:.2f} | "
            f"{r.placement_s:.2f} |")


HEADER = ("| nodes | model | node link | origin (links) | pieces | origin egress (x model) | p50 s | p99 s | max s | "
          "limit s | p50 / limit | relay share | placement s |\n|" + "---:|" * 13)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="100,1000,2600")
    ap.add_argument("--size", default="3GB", help="model size (default 3GB: Kraken's figure)")
    ap.add_argument("--shards", type=int, default=4, help="files the model is split in")
    ap.add_argument("--link", default="300MB", help="every node's link, each way (300MB = 300 MB/s; 25Gbit)")
    ap.add_argument("--origin-links", type=float, default=3.0, help="the origin's upload, in node links")
    ap.add_argument("--piece-size", default=str(DEFAULT_PIECE_SIZE))
    ap.add_argument("--peer-slots", type=int, default=PEER_CONNECTIONS_MIN, help="pieces a node asks of peers at once")
    ap.add_argument("--goodput", type=float, default=GOODPUT, help="payload bytes per link byte (headers)")
    ap.add_argument("--relay-wait", type=float, default=RELAY_WAIT, help="s a relay child waits for its parent")
    ap.add_argument("--no-levels", action="store_true", help="ask in rotated model order only (before issue 24)")
    ap.add_argument("--table", action="store_true", help="the issue's grid: 100/1000/2600 x 3GB/140GB x 300MB/25Gbit")
    ap.add_argument("--no-check", action="store_true", help="skip the sample check against Membership.sources")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    runs: list[tuple[int, int, float, int]] = []
    if args.table:
        for size, piece in ((parse_bytes("3GB"), DEFAULT_PIECE_SIZE), (parse_bytes("140GB"), 256 << 20)):
            for link in (parse_rate("300MB"), parse_rate("25Gbit")):
                runs += [(n, size, link, piece) for n in (100, 1000, 2600)]
    else:
        piece = parse_bytes(args.piece_size)
        runs = [(int(n), parse_bytes(args.size), parse_rate(args.link), piece) for n in args.nodes.split(",")]
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    for n, size, link, piece in runs:
        r = simulate(n, size, link, args.origin_links, shards=args.shards, piece_size=piece, goodput=args.goodput,
                     peer_slots=args.peer_slots,
                     relay_wait=args.relay_wait, levels=not args.no_levels, check=not args.no_check)
        print(show(r), f"<!-- sim {r.sim_s:.0f} s -->", flush=True)
        results.append(asdict(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
