"""The fleet simulator (bench/fleet_sim.py) run small: it drives the real placement and asking order,
and what it predicts obeys the limits any storm must (issue 24 item 4)."""

from __future__ import annotations

import pytest

from bench.fleet_sim import model_pieces, parse_rate, simulate

MiB = 1024 * 1024


def test_twenty_nodes_take_the_model_once_from_the_origin_and_no_faster_than_their_links() -> None:
    size, link = 256 * MiB, parse_rate("200Mbit")
    # check=True: a sample of (node, piece) gets the same owner and relay parent from Membership.sources.
    r = simulate(20, size, link, 1.0, shards=4, check=True)
    assert r.pieces == len(model_pieces(size, 4, 16 * MiB)) == 16
    assert 0.99 <= r.origin_x <= 1.01, r  # relay trees: every piece leaves the origin once
    assert r.owner_fallbacks == 0  # asked level by level, no child waits out its parent
    assert r.limit_s / 0.95 <= r.p50_s <= r.p99_s <= r.max_s  # no node beats its link (less headers)
    assert r.max_s < 1.5 * r.limit_s, r  # and the peers keep them near it
    assert r.relay_share > 0.5  # most peer bytes come down the trees, not from the owners


def test_more_nodes_behind_the_same_links_are_not_faster_and_a_faster_origin_is_not_slower() -> None:
    size, link = 128 * MiB, parse_rate("200Mbit")
    few, many = simulate(4, size, link, 1.0, check=False), simulate(24, size, link, 1.0, check=False)
    assert few.max_s <= many.max_s + 0.2  # one step of slack
    slow_origin = simulate(12, size, link, 0.25, check=False)
    fast_origin = simulate(12, size, link, 2.0, check=False)
    assert fast_origin.max_s <= slow_origin.max_s
    assert slow_origin.max_s >= size / (0.25 * link)  # the origin's link bounds every node's first copy
    for r in (few, many, slow_origin, fast_origin):
        assert 0.99 <= r.origin_x <= 1.01, r


def test_relay_children_that_ask_in_rotated_model_order_wait_out_their_parents() -> None:
    """The order of asking matters at scale: in plain rotated model order many relay requests find a
    parent not yet receiving the piece and end at the owner; level by level (request_key) none do."""
    # 180 pieces, many more than 32 peer slots (the agent now asks for 256 at once, the whole of this
    # model, where order no longer matters; it still does for models of more pieces than that)
    size, link = 3_000_000_000, parse_rate("300MB")
    rotated = simulate(100, size, link, 3.0, levels=False, check=False, peer_slots=32)
    levelled = simulate(100, size, link, 3.0, levels=True, check=False, peer_slots=32)
    assert rotated.owner_fallbacks > 0 and levelled.owner_fallbacks == 0
    assert levelled.relay_share > rotated.relay_share


@pytest.mark.parametrize("text,want", [("300MB", 300e6), ("25Gbit", 25e9 / 8), ("200Mbit", 25e6)])
def test_rates_parse_in_bytes_per_second(text: str, want: float) -> None:
    assert parse_rate(text) == pytest.approx(want)
