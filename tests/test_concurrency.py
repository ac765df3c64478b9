"""The origin request window (agent/fetch/concurrency.py): grows while throughput grows, backs off on throttling.

The first tests drive :class:`HostWindow` with a clock the test moves (real
asyncio, real slots): the rules themselves. The others run an agent against
real SeaweedFS behind the test servers: a relay that caps each connection's
rate as object stores do (tests/servers/relay.py ``per_connection_rate``), and
the faulty origin that answers 503 SlowDown / 429 and counts the ranged GETs
it answers at once (tests/servers/faulty_origin.py). Every fetched file must
be bit-exact.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from agent.fetch.concurrency import MAX_RANGE, MIN_RANGE, HostWindow
from tests.servers.cache_check import blob_digest, check_cache
from tests.servers.faulty_origin import FaultyOrigin
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _crowd(window: HostWindow, extra: int, want: int = MAX_RANGE) -> list[asyncio.Task[Any]]:
    """Hold every slot and leave ``extra`` waiters: the window is what limits requests."""
    tasks = [asyncio.create_task(window.lease((0, i), want)) for i in range(window.size + extra)]
    await asyncio.sleep(0)
    return tasks


def _step(window: HostWindow, clock: Clock, rate: float) -> None:
    """One measuring step at ``rate`` bytes/s."""
    clock.now += window.step_seconds
    window.landed(int(rate * window.step_seconds))


def test_window_doubles_while_throughput_grows_then_holds() -> None:
    async def run() -> None:
        clock = Clock()
        window = HostWindow("s3://b", 2, 64, 1024 * MiB, clock=clock)
        tasks = await _crowd(window, 100)
        _step(window, clock, 100e6)  # first measurement: probe upward
        assert window.size == 4
        _step(window, clock, 180e6)  # +80%: on
        assert window.size == 8
        _step(window, clock, 190e6)  # +5.5%: the link is full, hold
        assert window.size == 8 and window.state == "holding"
        for rate in (300e6, 400e6):  # holding means holding (until the origin throttles)
            _step(window, clock, rate)
        assert window.size == 8 and window.peak_size == 8
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def test_window_does_not_grow_when_requests_do_not_wait_for_it() -> None:
    """A slow consumer, not the window, limits throughput: growing would only spend memory."""
    async def run() -> None:
        clock = Clock()
        window = HostWindow("s3://b", 4, 64, 1024 * MiB, clock=clock)
        for rate in (50e6, 100e6, 200e6):
            _step(window, clock, rate)
        assert window.size == 4

    asyncio.run(run())


def test_window_halves_on_throttle_once_a_step_and_never_below_one() -> None:
    async def run() -> None:
        clock = Clock()
        window = HostWindow("s3://b", 16, 64, 1024 * MiB, clock=clock)
        window.throttled()
        window.throttled()  # the same burst of 503s: one halving
        assert window.size == 8 and window.throttles == 2 and window.state == "backed off"
        for _ in range(6):
            clock.now += window.step_seconds
            window.throttled()
        assert window.size == 1 and window.lowest_size == 1
        tasks = await _crowd(window, 100)
        _step(window, clock, 10e6)  # once the throttling stops it probes upward again
        assert window.size == 2
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def test_window_never_exceeds_its_ceiling_nor_its_byte_budget() -> None:
    async def run() -> None:
        clock = Clock()
        budget = 24 * MiB
        window = HostWindow("s3://b", 2, 5, budget, clock=clock)
        assert window.range_size() == 8 * MiB  # 24 MiB / 2, as a power of two
        tasks = await _crowd(window, 20)
        rate = 10e6
        for _ in range(8):
            rate *= 2
            _step(window, clock, rate)
        assert window.size == 5 and window.peak_size == 5 and window.state == "at ceiling"
        # Two 8 MiB leases were granted at 2 slots; at 5 slots a range is 4 MiB (24 MiB / 5, as a
        # power of two): two more fit the budget, the fifth holds its slot and waits for room.
        await asyncio.sleep(0)
        leases = [t.result() for t in tasks if t.done()]
        assert sum(lease.nbytes for lease in leases) <= budget == window.budget
        assert window.inflight <= budget and window.peak_inflight <= budget
        assert window.slots.held <= 5
        for lease in leases:
            lease.release()
        await asyncio.sleep(0)
        assert window.peak_inflight <= budget
        for t in tasks:
            if t.done():
                t.result().release()
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert MIN_RANGE <= window.range_size() <= MAX_RANGE

    asyncio.run(run())


# ---------------------------------------------------------------------- real agent, real S3


def _upload(seaweed: SeaweedS3, tmp_path: Path, key: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"upload-{seed}.bin"
    path.write_bytes(data)
    seaweed.make_bucket("models")
    seaweed.upload_file(path, "models", key)
    path.unlink()
    return data


@pytest.fixture
def faulty(seaweed: SeaweedS3) -> Any:
    proxy = FaultyOrigin(seaweed.endpoint_url, stall_seconds=30)
    yield proxy
    proxy.close()


def _host(agent: Any) -> dict[str, Any]:
    done = agent.cli("stats", "--json", check=True)
    hosts = json.loads(done.stdout)["origin_hosts"]
    assert [h["host"] for h in hosts] == ["s3://models"], hosts
    return dict(hosts[0])


@pytest.mark.serial
def test_window_grows_on_a_store_that_caps_each_connection_and_pieces_come_in_parts(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path
) -> None:
    """Each connection gets 4 MB/s, as a store's per-connection cap: 2 requests give 8 MB/s, more give more.

    The window must grow past 2 toward its ceiling (16), the requests it sends must
    get shorter than a piece (16 MiB budget / 8 or more requests: 2 MiB or less,
    pieces of 4 MiB), and the origin must never see more than 16 at once. The file
    is bit-exact.
    """
    data = _upload(seaweed, tmp_path, "window-grows/w.bin", 48 * MiB, seed=31)
    host, port = faulty.host, faulty.port
    relay = TcpRelay(host, port, per_connection_rate=4e6)
    try:
        agent = inproc_factory(
            env={"AWS_ENDPOINT_URL": relay.url},
            extra_args=("--piece-size", "4MiB", "--connections", "2", "--origin-connections", "16",
                        "--origin-inflight", "16MiB"),
        )
        done = agent.cli("prefetch", "s3://models/window-grows", timeout=120)
        assert done.returncode == 0, done.stderr
        assert blob_digest(data) in check_cache(agent.cache_dir)
        seen = _host(agent)
    finally:
        relay.close()
    assert seen["peak_window"] >= 8, seen  # 2 -> 4 -> 8 at least: each doubling paid
    assert seen["peak_window"] <= seen["ceiling"] == 16, seen
    assert faulty.max_in_flight <= 16, faulty.max_in_flight
    assert seen["peak_inflight_bytes"] <= 16 * MiB, seen
    lengths = [int(b) - int(a) + 1 for a, b in
               (g.range.removeprefix("bytes=").split("-") for g in faulty.ranged_gets)]
    assert min(lengths) < 4 * MiB, sorted(set(lengths))  # parts of a piece, several in flight at once


def test_window_halves_on_slowdown_and_429_and_the_file_is_exact(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _upload(seaweed, tmp_path, "window-throttled/w.bin", 24 * MiB, seed=32)
    monkeypatch.setattr("agent.fetch.origin_reader.BACKOFF_BASE", 0.01)
    monkeypatch.setattr("agent.fetch.origin_reader.BACKOFF_CAP", 0.1)
    agent = inproc_factory(
        env={"AWS_ENDPOINT_URL": faulty.url},
        extra_args=("--piece-size", "1MiB", "--connections", "8", "--origin-inflight", "8MiB", "--retries", "6"),
    )
    faulty.inject("503", "429", "503", "429")
    done = agent.cli("prefetch", "s3://models/window-throttled", timeout=120)
    assert done.returncode == 0, done.stderr
    assert blob_digest(data) in check_cache(agent.cache_dir)
    seen = _host(agent)
    assert seen["throttles"] == 4, seen
    assert seen["lowest_window"] <= 4, seen  # 8 halved at least once
    assert sum(g.fault is not None for g in faulty.ranged_gets) == 4
    assert faulty.max_in_flight <= 8
    assert "requests in flight -> 4" in agent.log_text()
