"""Peers: who else caches for this cluster, which of them answer, and who owns a piece.

Placement is a consistent-hash ring (agent/peers/placement.py): each member
(peers and this node) has points on a circle, piece ``index`` of the bytes named
``fill_key`` has one, and the walk clockwise from the piece names its members in
order, owner first. Every node computes the same owner from the same member
list without talking to anyone; when a member leaves only its own pieces move
(each to the next member on the walk), and the pieces spread evenly over the
members.

Members are named ``HOST:PORT`` exactly as they appear in ``--peers`` or as
``--peer-dns`` resolves them (``IP:PORT``), so all nodes name each other the
same way. This node's own name is ``--advertise``, or ``--listen`` when that
is not a wildcard address, or the list entry that is an address of one of this
host's interfaces with the listen port.

Liveness: a background task pings every peer (short timeout) and re-resolves
the DNS name now and then. A peer that fails a ping, or a request, drops out of
placement until a ping succeeds again. A request or ping *from* a member
(``from=`` names the sender) counts as liveness too (:meth:`Membership.heard_from`).

Start-up: nodes that scale up together each start every fill at once, and a
piece this node thinks it owns because it has not yet heard from the others
goes to the origin (measured: three agents prefetching at readiness took 1.83x
the model from the origin, issue 24). So until every member has answered once
(:attr:`Membership.settled`, at most START_PHASE seconds) the probes run every
START_PROBE_INTERVAL, and readiness and fills wait for it, bounded by
``--peer-start-wait``. A peer that sent bytes that did not
match what it promised is *penalised*: left out for a while, longer each time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.peers.placement import PieceSpec, Placement, compute_placement, ring
from agent.singleflight import SingleFlight

log = logging.getLogger(__name__)

PROBE_INTERVAL = 2.0
START_PROBE_INTERVAL = 0.2  # probes while some member has not answered yet (the start phase)
START_PHASE = 30.0  # the start phase ends after this many seconds even if some member never answered
START_DNS_INTERVAL = 1.0  # DNS lookups in the start phase: pods of a scale-up appear in it over seconds
PENALTY_BASE = 30.0
PENALTY_CAP = 600.0
SUSPECT_LIMIT = 2  # consecutive slow answers before a peer is taken out of placement
# The most members this node tracks: a bound on what a DNS answer or a list can make it hold, well above
# the fleets it is built for. Every node must see the same members, or their placements disagree (owners
# fetch the same piece from the origin twice, relay trees break): at 1,024 a fleet of 2,600 saw 1,024 of
# its members (bench/fleet_sim.py's check against this class failed).
MAX_PEERS = 10_000
# Pings this node sends per second at most: a round pings every peer, so past PINGS_PER_SECOND x the
# interval members the rounds are spaced out (2,600 members: a round every 5.2 s, not every 2 s).
PINGS_PER_SECOND = 500
PLACEMENTS_KEPT = 16  # balanced placements remembered (model revision x member list)


def split_hostport(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError when it is neither."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ValueError(f"peer address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


@dataclass
class Peer:
    """What this node knows about one other member."""

    addr: str
    alive: bool = False
    penalised_until: float = 0.0
    strikes: int = 0
    slow: int = 0
    last_error: str = ""

    def usable(self, now: float) -> bool:
        return self.alive and now >= self.penalised_until

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "addr": self.addr,
            "alive": self.alive,
            "penalised_for_s": round(max(0.0, self.penalised_until - now), 1),
            "strikes": self.strikes,
            "last_error": self.last_error,
        }


def _local_address(ip: str) -> bool:
    """Whether ``ip`` belongs to one of this host's interfaces (a socket can bind it)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


class Membership:
    """The member list, its liveness, and placement over it.

    Touched only from the event loop. ``ping`` is the peer client's probe
    (injected so this module stays free of HTTP).
    """

    def __init__(
        self,
        listen: str,
        *,
        static: Iterable[str] = (),
        dns_name: str | None = None,
        dns_interval: float = 10.0,
        advertise: str | None = None,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        host, self.port = split_hostport(listen)
        self.listen = join_hostport(host, self.port)
        self.self_addr: str | None = advertise.strip() if advertise else None
        if self.self_addr is None and not is_wildcard(host):
            self.self_addr = self.listen
        if self.self_addr is not None:
            split_hostport(self.self_addr)  # checked
        self.static = [a.strip() for a in static if a.strip()]
        for a in self.static:
            split_hostport(a)
        self.dns_name = dns_name
        self.dns_interval = dns_interval
        self.probe_interval = probe_interval
        self._placements: dict[tuple[str, tuple[str, ...]], Placement] = {}
        self._computing: SingleFlight[tuple[str, tuple[str, ...]], Placement] = SingleFlight()
        self.peers: dict[str, Peer] = {}
        self._dns_at = 0.0
        self._listed = False  # the member list was looked up at least once
        self._answered: set[str] = set()  # members that answered (or spoke) at least once
        self._started = time.monotonic()
        self._settled = asyncio.Event()  # every member answered once, or the start phase is over

    @property
    def me(self) -> str:
        """This node's name in placement (a stand-in until it is known: others then never pick it)."""
        return self.self_addr or join_hostport(socket.gethostname(), self.port)

    # -- membership ----------------------------------------------------------
    async def _is_self(self, addr: str) -> bool:
        if addr in (self.self_addr, self.listen):
            return True
        if self.self_addr is not None:
            return False  # known exactly: nothing else is this node
        host, port = split_hostport(addr)
        if port != self.port:
            return False
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 5)
        except (OSError, TimeoutError):
            return False
        ips = {str(info[4][0]) for info in infos}  # an address string for AF_INET/AF_INET6
        for ip in ips:
            if await loop.run_in_executor(None, _local_address, ip):
                return True
        return False

    async def set_members(self, addrs: Iterable[str]) -> None:
        """Replace the member list (keeping what is known about those that stay); drop this node."""
        wanted: list[str] = []
        seen: set[str] = set()
        dropped = 0
        for addr in addrs:
            if addr in seen:
                continue
            seen.add(addr)
            if len(wanted) >= MAX_PEERS:
                dropped += 1
                continue
            if await self._is_self(addr):
                if self.self_addr is None:
                    self.self_addr = addr
                    log.info("this node is %s in the peer list", addr)
                continue
            wanted.append(addr)
        if dropped:
            log.error("peers: %d members listed, %d left out (at most %d are tracked)", len(seen), dropped, MAX_PEERS)
        added = [a for a in wanted if a not in self.peers]
        kept = set(wanted)
        gone = [a for a in self.peers if a not in kept]
        self.peers = {a: self.peers.get(a) or Peer(a) for a in wanted}
        if added or gone:
            log.info("peers: %d (+%s -%s)", len(self.peers), ",".join(added) or "0", ",".join(gone) or "0")

    async def _resolve_dns(self) -> list[str]:
        assert self.dns_name
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(loop.getaddrinfo(self.dns_name, self.port, type=socket.SOCK_STREAM), 10)
        return sorted({join_hostport(str(info[4][0]), self.port) for info in infos})

    async def refresh(self) -> None:
        """Static list plus the DNS name's current addresses (when due)."""
        found = list(self.static)
        if self.dns_name:
            try:
                found += await self._resolve_dns()
            except (OSError, TimeoutError) as exc:
                log.warning("cannot resolve --peer-dns %s: %s (keeping the last answer)", self.dns_name, exc)
                found += [a for a in self.peers if a not in found]
            self._dns_at = time.monotonic()
        await self.set_members(found)
        self._listed = True
        self._check_settled()

    # -- liveness ------------------------------------------------------------
    def mark_up(self, addr: str) -> None:
        peer = self.peers.get(addr)
        if peer is not None:
            if not peer.alive:
                log.info("peer %s is up", addr)
            peer.alive = True
            peer.slow = 0
            if addr not in self._answered:
                self._answered.add(addr)
                self._check_settled()

    def heard_from(self, addr: str) -> None:
        """A ping or piece request came from member ``addr`` (its ``from=``): it is alive now.

        Without this a node that has just started would leave a member that is
        already asking it for pieces out of placement until its next probe. A
        name not in the list (a pod DNS does not list yet) makes the next probe
        round look the name up again; the name itself is never added unchecked.
        """
        if addr in self.peers:
            self.mark_up(addr)
        elif self.dns_name and addr and addr not in (self.self_addr, self.listen):
            self._dns_at = 0.0

    @property
    def settled(self) -> bool:
        """Whether the start phase is over: every member answered once, or START_PHASE passed."""
        return self._settled.is_set()

    async def wait_settled(self, timeout: float) -> bool:
        """Wait until every member answered once (the start phase), at most ``timeout`` seconds; True if so."""
        if self._settled.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def not_answered(self) -> list[str]:
        """Members that have not answered once yet (for the start-up log line)."""
        return [a for a in self.peers if a not in self._answered]

    def _check_settled(self) -> None:
        if self._settled.is_set():
            return
        # A DNS name that lists no peer yet is not a cluster of one: pods that start together
        # appear in it over seconds (the start wait bounds how long a real cluster of one waits).
        if self._listed and (self.peers or not self.dns_name) and all(a in self._answered for a in self.peers):
            log.info("peers: every member answered (%d) after %.2fs", len(self.peers), time.monotonic() - self._started)
            self._settled.set()
        elif time.monotonic() - self._started >= START_PHASE:
            missing = self.not_answered()
            shown = ",".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            log.warning("peers: start phase over; not answered yet: %s", shown or "-")
            self._settled.set()

    def mark_down(self, addr: str, why: str) -> None:
        peer = self.peers.get(addr)
        if peer is not None:
            if peer.alive:
                log.warning("peer %s is down: %s", addr, why)
            peer.alive = False
            peer.last_error = why

    def mark_slow(self, addr: str, why: str) -> None:
        """A hedged request gave up on it; a few in a row take it out of placement."""
        peer = self.peers.get(addr)
        if peer is not None:
            peer.slow += 1
            if peer.slow >= SUSPECT_LIMIT:
                self.mark_down(addr, why)

    def penalise(self, addr: str, why: str) -> None:
        """It sent bytes that did not match what it promised: leave it out, longer each time."""
        peer = self.peers.get(addr)
        if peer is None:
            return
        peer.strikes += 1
        span = min(PENALTY_CAP, PENALTY_BASE * 2 ** (peer.strikes - 1))
        peer.penalised_until = time.monotonic() + span
        peer.last_error = why
        log.error("peer %s penalised for %.0fs (strike %d): %s", addr, span, peer.strikes, why)

    async def run(self, ping: Callable[[str], Awaitable[None]]) -> None:
        """Background task: refresh the list, ping every peer, forever (fast until every member answered once)."""
        self._started = time.monotonic()
        while True:
            starting = not self._settled.is_set()
            try:
                dns_every = min(self.dns_interval, START_DNS_INTERVAL) if starting else self.dns_interval
                due = self.dns_name and time.monotonic() - self._dns_at >= dns_every
                if not self._listed or not self.peers or due:
                    await self.refresh()
                await asyncio.gather(*(self._probe(a, ping) for a in list(self.peers)))
            except Exception:  # the loop must outlive any one bad round
                log.exception("peer probe round failed")
            self._check_settled()
            await asyncio.sleep(self.round_interval())

    def round_interval(self) -> float:
        """Seconds until the next probe round: fast in the start phase, and never over PINGS_PER_SECOND."""
        base = START_PROBE_INTERVAL if not self._settled.is_set() else self.probe_interval
        return max(base, len(self.peers) / PINGS_PER_SECOND)

    async def _probe(self, addr: str, ping: Callable[[str], Awaitable[None]]) -> None:
        try:
            await ping(addr)
        except Exception as exc:  # noqa: BLE001 - any failure to answer a ping means down, with its reason
            self.mark_down(addr, f"ping: {type(exc).__name__}: {exc}")
        else:
            self.mark_up(addr)

    # -- placement -----------------------------------------------------------
    def live(self) -> list[str]:
        now = time.monotonic()
        return [a for a, p in self.peers.items() if p.usable(now)]

    def owners(self, fill_key: str, index: int) -> list[str]:
        """Live members (this node included) ranked for the piece, owner first."""
        return ring([self.me, *self.live()]).ranked(fill_key, index)

    def sources(
        self, fill_key: str, index: int, limit: int, model: tuple[str, Sequence[PieceSpec]] | None = None
    ) -> list[tuple[str, bool]]:
        """Whom to ask for a piece, in order, as (peer, ask it as a relay parent). Empty when this node owns it.

        First the piece's relay parent (unless that is the owner). If every node
        asked the owner, the owner would upload each of its pieces N-1 times, as
        fast as the origin sends it; the origin's link is not shared evenly among
        the owners' flows, so the owners it favours upload at their link's rate
        while the others idle, and then those are the tail (measured:
        bench/RESULTS.md "Peers"). Instead the members form a tree per piece: the
        owner first, then the rest (:func:`~agent.peers.placement.relay_orders`);
        the member at place k asks the one at place (k - 1) // RELAY_FANOUT,
        which passes the piece on as it lands. A parent that neither holds nor is
        receiving the piece says so at once (it never goes to the origin for a
        relay request); then the owners are asked: the piece's owner (the
        balanced one with ``model``, else the first on the piece's ring walk),
        then those ahead of this node on the walk, at most ``limit``.
        """
        members = tuple(sorted([self.me, *self.live()]))
        on_ring = ring(members)
        owner, parent = next(on_ring.walk(fill_key, index)), None
        if model is not None:
            placement = self._balanced(model, members)
            piece = (fill_key, index)
            if piece in placement.orders:
                owner, parent = placement.owners.get(piece, owner), placement.orders.parent(piece, self.me)
        if owner == self.me:
            return []
        owners = [owner]
        for addr in on_ring.walk(fill_key, index):  # then those ahead of this node on the piece's walk
            if addr == self.me or len(owners) >= limit:
                break
            if addr != owner:
                owners.append(addr)
        relay = [(parent, True)] if parent is not None and parent != owner else []
        return relay + [(a, False) for a in owners[:limit]]

    def tree_level(self, fill_key: str, index: int, model: tuple[str, Sequence[PieceSpec]]) -> int:
        """This node's level in the piece's relay tree (0: it owns the piece), for the order it asks in."""
        members = tuple(sorted([self.me, *self.live()]))
        orders = self._balanced(model, members).orders
        piece = (fill_key, index)
        return orders.level(piece, self.me) if piece in orders else 0

    async def prepare(self, model: tuple[str, Sequence[PieceSpec]]) -> None:
        """Compute the model's placement for the current members off the event loop, once.

        It takes a while for big models and clusters (measured: 25,000 pieces over 64
        members, 1.9 s), and :meth:`sources` would otherwise compute it on the loop.
        Concurrent callers share one computation.
        """
        members = tuple(sorted([self.me, *self.live()]))
        key = (model[0], members)
        if key in self._placements:
            return
        placement = await self._computing.run(key, lambda: asyncio.to_thread(compute_placement, members, model[1]))
        self._remember(key, placement)

    def _balanced(self, model: tuple[str, Sequence[PieceSpec]], members: tuple[str, ...]) -> Placement:
        """The placement of ``model`` for ``members``: remembered (see :meth:`prepare`), else computed here."""
        key = (model[0], members)
        placement = self._placements.get(key)
        if placement is None:
            placement = compute_placement(members, model[1])
            self._remember(key, placement)
        return placement

    def _remember(self, key: tuple[str, tuple[str, ...]], placement: Placement) -> None:
        if key not in self._placements and len(self._placements) >= PLACEMENTS_KEPT:
            self._placements.pop(next(iter(self._placements)))
        self._placements[key] = placement

    def state_counts(self) -> dict[str, int]:
        """How many peers are live (used for pieces), penalised (answering, sent bad bytes) or down."""
        now = time.monotonic()
        counts = {"live": 0, "penalised": 0, "down": 0}
        for peer in self.peers.values():
            counts["live" if peer.usable(now) else "penalised" if peer.alive else "down"] += 1
        return counts

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        return {"self": self.me, "peers": [p.to_json(now) for p in self.peers.values()]}


def read_token(path: str) -> str:
    """The shared peer token (a mounted Kubernetes Secret), stripped; ValueError if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read --peer-token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"--peer-token-file {path} holds {len(token)} characters; use a random token of 16 or more")
    return token
