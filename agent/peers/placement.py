"""Placement: who owns each piece of a model, and each piece's relay tree, computed alike on every node.

Rendezvous (highest-random-weight) hashing: for piece ``index`` of the bytes
named ``fill_key``, every member gets the score
``xxh3_64(f"{member}|{fill_key}|{index}")`` and the highest score owns the
piece. Every node computes the same owner from the same member list without
talking to anyone; when a member leaves only its own pieces move. Over one
model's pieces the owners are balanced (:func:`balanced_owners`) and each
piece's members form a relay tree (:func:`relay_orders`). Pure functions: no
I/O, no clock, no event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

# Children per node in a piece's relay tree (see Membership.sources).
RELAY_FANOUT = 2


def rendezvous(members: Iterable[str], fill_key: str, index: int) -> list[str]:
    """``members`` ordered by their score for piece ``index`` of ``fill_key``, owner first."""
    return sorted(
        members, key=lambda m: (xxhash.xxh3_64_intdigest(f"{m}|{fill_key}|{index}".encode()), m), reverse=True
    )


# One piece of a model, for placement: (fill key, piece index, length in bytes).
PieceSpec = tuple[str, int, int]


def balanced_owners(members: Sequence[str], pieces: Sequence[PieceSpec]) -> dict[tuple[str, int], str]:
    """The owner of every piece of a model: rendezvous order, with each member's share of the bytes bounded.

    Plain rendezvous gives each piece to its top-ranked member. Over the few dozen
    pieces of one model that is uneven (measured, bench/RESULTS.md "Peers": 16
    pieces over 8 nodes gave owners 0 to 3 pieces each), and the busiest owner's
    upload sets when the last node is ready. So pieces are taken in model order and
    each goes to its highest-ranked member that still has room under an even share
    of the bytes (total / members, at least the largest piece): consistent hashing
    with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018) over rendezvous
    ranks. Every node computes the same owners from the same manifest and member
    list; when a member leaves, its pieces move, and a few others may shift to keep
    the shares even.
    """
    if not members or not pieces:
        return {}
    share = max(-(-sum(n for _, _, n in pieces) // len(members)), max(n for _, _, n in pieces))
    load = dict.fromkeys(members, 0)
    owners: dict[tuple[str, int], str] = {}
    for key, index, n in pieces:
        ranked = rendezvous(members, key, index)
        owner = next((m for m in ranked if load[m] + n <= share), None)
        if owner is None:  # pieces of unequal sizes can leave no room anywhere: the least loaded takes it
            owner = min(ranked, key=lambda m: load[m])
        load[owner] += n
        owners[(key, index)] = owner
    return owners


def relay_orders(
    members: Sequence[str],
    pieces: Sequence[PieceSpec],
    owners: dict[tuple[str, int], str],
    fanout: int = RELAY_FANOUT,
) -> dict[tuple[str, int], list[str]]:
    """Every piece's relay tree, as the order of its members: the owner, then the rest.

    The member at place k gets the piece from the one at place (k - 1) // fanout
    (see :meth:`agent.peers.membership.Membership.sources`); the inner places upload, the last ones
    do not. Plain rendezvous order for the rest would give some members far more
    inner places than others over a model's few dozen pieces (measured at N=8:
    one node uploaded 2x the model, another 0.6x). So, as for the owners, pieces
    are taken in model order, and the inner places go to the members that so far
    upload the fewest bytes, rendezvous rank breaking ties. Deterministic: every
    node computes the same trees from the same manifest and member list.
    """
    n = len(members)
    sends = [max(0, min(n, fanout * k + fanout + 1) - (fanout * k + 1)) for k in range(n)]  # children of place k
    load = dict.fromkeys(members, 0)
    orders: dict[tuple[str, int], list[str]] = {}
    for key, index, length in pieces:
        owner = owners.get((key, index))
        ranked = rendezvous(members, key, index)
        if owner is None:
            owner = ranked[0]
        rest = sorted((m for m in ranked if m != owner), key=lambda m: load[m])  # stable: rank breaks ties
        order = [owner, *rest]
        for place, m in enumerate(order):
            load[m] += sends[place] * length
        orders[(key, index)] = order
    return orders


def tree_parent(order: Sequence[str], member: str, fanout: int = RELAY_FANOUT) -> str | None:
    """``member``'s parent in the relay tree ``order`` (the root, the owner, has none)."""
    place = order.index(member)
    return order[(place - 1) // fanout] if place else None


@dataclass(frozen=True)
class Placement:
    """Who owns each piece of one model, and each piece's relay tree, for one member list."""

    owners: dict[tuple[str, int], str]
    orders: dict[tuple[str, int], list[str]]


def compute_placement(members: Sequence[str], pieces: Sequence[PieceSpec]) -> Placement:
    owners = balanced_owners(members, pieces)
    return Placement(owners, relay_orders(members, pieces, owners))
