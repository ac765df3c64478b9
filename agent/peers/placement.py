"""Placement: who owns each piece of a model, and each piece's relay tree, computed alike on every node.

Pieces are placed on a consistent-hash ring: every member puts ``RING_POINTS``
points on a 64-bit circle at ``xxh3_64(f"{member}#{j}")``; piece ``index`` of
the bytes named ``fill_key`` sits at ``xxh3_64(f"{fill_key}|{index}")``, and
walking the circle clockwise from there names the members in the piece's order,
owner first (:class:`Ring`). Every node computes the same order from the same
member list without talking to anyone; when a member leaves only its own pieces
move (each to the next member on its walk). A walk costs a few steps whatever
the member count, where rendezvous hashing (:func:`rendezvous`, kept for
artifacts, which are few) scores every member for every piece: 25,000 pieces over
2,600 members took about 81 s that way and well under a second on the ring
(bench/RESULTS.md "Fleet").

Over one model's pieces the owners are balanced (:func:`balanced_owners`) and
each piece's members form a relay tree (:func:`relay_orders`, a lazy
:class:`RelayOrders` mapping). Pure functions: no I/O, no clock, no event loop.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import xxhash

# Children per node in a piece's relay tree (see Membership.sources).
RELAY_FANOUT = 2
# Points per member on the ring: enough that plain ownership is within about a tenth of even
# over many pieces; the balanced owners bound each member's share anyway.
RING_POINTS = 64
# Relay trees are listed in full, each built least-loaded-first, while members x pieces stays
# under this (N=8 with 25,000 pieces, N=64 with 3,100); bigger ones are rotations (RelayOrders).
LISTED_ENTRIES = 200_000


def rendezvous(members: Iterable[str], fill_key: str, index: int) -> list[str]:
    """``members`` ordered by their score for ``(fill_key, index)``, top first (highest-random-weight).

    Scores every member: fine for a handful of lookups (artifacts), too slow for every piece of a
    big model over thousands of members (use :func:`ring`).
    """
    return sorted(
        members, key=lambda m: (xxhash.xxh3_64_intdigest(f"{m}|{fill_key}|{index}".encode()), m), reverse=True
    )


def _point(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())


class Ring:
    """The consistent-hash ring of one member list: ``RING_POINTS`` points per member, sorted."""

    def __init__(self, members: Iterable[str], points: int = RING_POINTS) -> None:
        self.members = tuple(sorted(set(members)))
        placed = sorted((_point(f"{m}#{j}"), m) for m in self.members for j in range(points))
        self._hashes = [h for h, _ in placed]
        self._owners = [m for _, m in placed]

    def walk(self, fill_key: str, index: int) -> Iterator[str]:
        """The members in the piece's order, owner first: clockwise from the piece's point, each once."""
        n = len(self._hashes)
        if not n:
            return
        start = bisect.bisect_left(self._hashes, _point(f"{fill_key}|{index}"))
        seen: set[str] = set()
        want = len(self.members)
        for k in range(n):
            m = self._owners[(start + k) % n]
            if m not in seen:
                seen.add(m)
                yield m
                if len(seen) == want:
                    return

    def ranked(self, fill_key: str, index: int) -> list[str]:
        """Every member in the piece's order, owner first (all of :meth:`walk`)."""
        return list(self.walk(fill_key, index))


@functools.lru_cache(maxsize=8)
def _ring(members: tuple[str, ...]) -> Ring:
    return Ring(members)


def ring(members: Iterable[str]) -> Ring:
    """The ring of ``members`` (any order; the last few member lists are remembered: building one
    for 2,600 members hashes 166,400 points)."""
    return _ring(tuple(sorted(set(members))))


# One piece of a model, for placement: (fill key, piece index, length in bytes).
PieceSpec = tuple[str, int, int]


def balanced_owners(members: Sequence[str], pieces: Sequence[PieceSpec]) -> dict[tuple[str, int], str]:
    """The owner of every piece of a model: ring order, with each member's share of the bytes bounded.

    Plain ring (or rendezvous) ownership over the few dozen pieces of one model is
    uneven (measured, bench/RESULTS.md "Peers": 16 pieces over 8 nodes gave owners
    0 to 3 pieces each), and the busiest owner's upload sets when the last node is
    ready. So pieces are taken in model order and each goes to the first member on
    its ring walk still under an even share of the bytes (total / members, at least
    the largest piece): consistent hashing with bounded loads (Mirrokni, Thorup and
    Zadimoghaddam, 2018). A member under its share may take one more piece, so none
    ends more than one piece over the share and a member with room is always found.
    Every node computes the same owners from the same manifest and member list;
    when a member leaves, its pieces move, and a few others may shift to keep the
    shares even.
    """
    if not members or not pieces:
        return {}
    r = ring(members)
    share = max(-(-sum(n for _, _, n in pieces) // len(r.members)), max(n for _, _, n in pieces))
    load = dict.fromkeys(r.members, 0)
    owners: dict[tuple[str, int], str] = {}
    for key, index, n in pieces:
        owner = next(m for m in r.walk(key, index) if load[m] < share)
        load[owner] += n
        owners[(key, index)] = owner
    return owners


class RelayOrders(Mapping[tuple[str, int], list[str]]):
    """Every piece's relay tree, as the order of its members, computed on demand.

    A tree holds every member, so listing them all for 25,000 pieces over 2,600
    members is 65 million entries; instead each order is a rotation of one fixed
    member order (the members sorted by their hash), with the owner moved to the
    front. The member at place k gets the piece from the one at place
    (k - 1) // fanout (see :meth:`agent.peers.membership.Membership.sources`); the
    inner places upload, the last ones do not. Pieces are taken in model order and
    each rotation starts where the previous tree's inner places ended, shifted by
    one more member each time round the circle: the inner places are dealt around
    the members like cards, so over a model each member uploads about the same
    bytes (within about a tenth over long models; plain rendezvous order for the
    rest gave one node 2x the model and another 0.6x at N=8). Small placements
    (``LISTED_ENTRIES``) list every order instead, built least-loaded-first, which
    is even to within two pieces however few the pieces. :meth:`place` and
    :meth:`parent` answer for one member without building the order.
    """

    def __init__(
        self,
        members: Sequence[str],
        pieces: Sequence[PieceSpec],
        owners: Mapping[tuple[str, int], str],
        fanout: int = RELAY_FANOUT,
    ) -> None:
        self.fanout = fanout
        self._base = sorted(set(members), key=lambda m: (_point(m), m))
        self._pos = {m: i for i, m in enumerate(self._base)}
        n = len(self._base)
        # Places 1.. that have children, counting the owner out of the rotation.
        inner = max(1, min(n - 1, -(-(n - 1 - fanout) // fanout))) if n > 1 else 1
        self._trees: dict[tuple[str, int], tuple[str, int]] = {}  # piece -> (owner, rotation)
        self._lists: dict[tuple[str, int], list[str]] | None = None  # small placements: every order listed
        owner_of = {(key, index): owners.get((key, index)) or next(ring(self._base).walk(key, index))
                    for key, index, _ in pieces}  # fmt: skip
        if n * len(pieces) <= LISTED_ENTRIES:
            self._lists = self._least_loaded_first(pieces, owner_of)
            return
        ptr = 0
        for key, index, _ in pieces:
            owner = owner_of[(key, index)]
            self._trees[(key, index)] = (owner, ptr)
            # The next tree's inner places start right after this one's (the owner is not dealt).
            ptr = (ptr + inner + ((self._pos[owner] - ptr) % n < inner)) % n

    def _least_loaded_first(
        self, pieces: Sequence[PieceSpec], owner_of: dict[tuple[str, int], str]
    ) -> dict[tuple[str, int], list[str]]:
        """Small placements: each tree's inner places go to the members that so far upload the fewest bytes.

        Exact to within two pieces of an even upload (the rotations are within about a tenth over
        long models, but lumpier over a few dozen pieces: 1.3x at N=7 with 16), at the cost of a
        sort of the members per piece.
        """
        n, fanout = len(self._base), self.fanout
        sends = [max(0, min(n, fanout * k + fanout + 1) - (fanout * k + 1)) for k in range(n)]  # children of place k
        load = dict.fromkeys(self._base, 0)
        for key, index, length in pieces:  # the owners' uploads are known up front: count them from the start
            load[owner_of[(key, index)]] += sends[0] * length
        lists: dict[tuple[str, int], list[str]] = {}
        for key, index, length in pieces:
            owner, h = owner_of[(key, index)], _point(f"{key}|{index}") % n
            rest = sorted((m for m in self._base if m != owner), key=lambda m: (load[m], (self._pos[m] - h) % n))
            order = [owner, *rest]
            for place, m in enumerate(order[1:], 1):
                load[m] += sends[place] * length
            lists[(key, index)] = order
        return lists

    def _tree(self, piece: tuple[str, int]) -> tuple[str, int, int]:
        owner, rot = self._trees[piece]
        return owner, rot, (self._pos[owner] - rot) % len(self._base)

    def place(self, piece: tuple[str, int], member: str) -> int:
        """``member``'s place in the piece's order (0: the owner)."""
        if self._lists is not None:
            return self._lists[piece].index(member)
        owner, rot, q_owner = self._tree(piece)
        if member == owner:
            return 0
        q = (self._pos[member] - rot) % len(self._base)
        return q + 1 if q < q_owner else q

    def at(self, piece: tuple[str, int], place: int) -> str:
        """The member at ``place`` in the piece's order."""
        if self._lists is not None:
            return self._lists[piece][place]
        owner, rot, q_owner = self._tree(piece)
        if place == 0:
            return owner
        q = place - 1 if place - 1 < q_owner else place
        return self._base[(q + rot) % len(self._base)]

    def level(self, piece: tuple[str, int], member: str) -> int:
        """How many hops ``member`` is below the owner in the piece's tree (0: the owner).

        A node asks for its pieces level by level (agent/fetch/peer_reader.py ``_order``): then by
        the time it asks a parent for a piece, the parent, one level up, has asked for it too.
        """
        return place_level(self.place(piece, member), self.fanout)

    def parent(self, piece: tuple[str, int], member: str) -> str | None:
        """``member``'s parent in the piece's relay tree (the root, the owner, has none)."""
        place = self.place(piece, member)
        return self.at(piece, (place - 1) // self.fanout) if place else None

    def __getitem__(self, piece: tuple[str, int]) -> list[str]:
        if self._lists is not None:
            return list(self._lists[piece])
        owner, rot, _ = self._tree(piece)
        n = len(self._base)
        return [owner, *(m for k in range(n) if (m := self._base[(rot + k) % n]) != owner)]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._lists if self._lists is not None else self._trees)

    def __len__(self) -> int:
        return len(self._lists if self._lists is not None else self._trees)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RelayOrders):
            return (self._base, self._trees, self._lists, self.fanout) == (
                other._base, other._trees, other._lists, other.fanout
            )
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


def place_level(place: int, fanout: int = RELAY_FANOUT) -> int:
    """The level of ``place`` in a relay tree: 0 the owner, 1 its children, and so on."""
    level, width, first = 0, 1, 0
    while place >= first + width:
        first, width, level = first + width, width * fanout, level + 1
    return level


def request_key(level: int, position: int, rank: int, members: int, pieces: int) -> tuple[int, int]:
    """Where a node's request for a piece waits among its others (lowest first): by the node's
    level in the piece's relay tree, then through the model from k/N of the way in for node k of N.

    Level first: a node asks its parent for a piece about when the parent, one level up, has asked
    its own parent, so the parent is receiving it and the child follows, instead of waiting out
    RELAY_WAIT and going to the owner (bench/fleet_sim.py showed the owners swamped so at 100 nodes
    and more). The rotation spreads the asking over all owners (bench/RESULTS.md "Peers").
    """
    return (level, (position - rank * pieces // max(1, members)) % max(1, pieces))


def relay_orders(
    members: Sequence[str],
    pieces: Sequence[PieceSpec],
    owners: Mapping[tuple[str, int], str],
    fanout: int = RELAY_FANOUT,
) -> RelayOrders:
    """Every piece's relay tree, as the order of its members: the owner, then the rest (see :class:`RelayOrders`)."""
    return RelayOrders(members, pieces, owners, fanout)


def tree_parent(order: Sequence[str], member: str, fanout: int = RELAY_FANOUT) -> str | None:
    """``member``'s parent in the relay tree ``order`` (the root, the owner, has none)."""
    place = order.index(member)
    return order[(place - 1) // fanout] if place else None


@dataclass(frozen=True)
class Placement:
    """Who owns each piece of one model, and each piece's relay tree, for one member list."""

    owners: dict[tuple[str, int], str]
    orders: RelayOrders


def compute_placement(members: Sequence[str], pieces: Sequence[PieceSpec]) -> Placement:
    owners = balanced_owners(members, pieces)
    return Placement(owners, relay_orders(members, pieces, owners))
