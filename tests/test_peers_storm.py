"""Peers in a storm's first seconds, holders before the origin, and churn (issue 24 items 1, 2, 5).

Real agents as processes on loopback ports, SeaweedFS behind a byte-counting relay
(origin egress measured on the wire), a shared token. "Started together" means every
agent is spawned before any is ready, and each one's prefetch starts the moment its
own ``/readyz`` answers (or a warm set is in place at start-up): nobody waits for the
others to have seen each other first, which is what a DaemonSet's scale-up does.

Tests whose point is not the start-up wait pass ``--peer-start-wait 0``. Run against
the code before these changes (dba9921), the fast-origin storm took 1.82x the model from
the origin, the warm-set storm and both busy-holder tests went over their bounds, and
the restart test's prefetch failed (the resumed file's peer pieces were not repaired).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import xxhash

from agent.peers.membership import Membership
from tests.servers.flaky_peer import FlakyPeer
from tests.servers.ports import free_port, free_ports
from tests.servers.seaweedfs import SeaweedS3
from tests.test_peers import (
    MODEL,
    TOKEN,
    _assert_bit_exact,
    _peer_story,
    _relay,
    _stats,
    _upload,
)

MiB = 1024 * 1024
STORM_LIMIT = 1.05  # origin egress over the model's size when agents start together (issue 24 item 1)
CHURN_LIMIT = 1.1  # ... when a node dies or joins mid-storm (item 5)
JOIN_LIMIT = 0.05  # ... for a node joining where another holds the model (item 2)


def _token(tmp_path: Path) -> Path:
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKEN + "\n")
    return token_file


def _agents(
    agent_factory: Any, agent_env: dict[str, str], tmp_path: Path, relay: Any, n: int, *,
    extra: tuple[str, ...] = (), names: str = "node", ports: list[int] | None = None,
) -> list[Any]:
    """``n`` agents (not started) with one static peer list of all of them; ``ports`` may list more peers."""
    token_file = _token(tmp_path)
    ports = ports or free_ports(n)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    env = {**agent_env, "AWS_ENDPOINT_URL": relay.url}
    args = ("--peers", peers, "--peer-token-file", str(token_file), "--piece-size", "1MiB", *extra)
    return [agent_factory(f"{names}{i}", env=env, port=p, extra_args=args, start=False)
            for i, p in enumerate(ports[:n])]  # fmt: skip


def _prefetch(agent: Any, ref: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "prefetch", ref],
        env={**agent.env, "WARMSTART_SOCKET": str(agent.socket_path)},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _start_together_and_prefetch(agents: list[Any], ref: str) -> list[subprocess.CompletedProcess[str]]:
    """Spawn every agent, then in one thread per agent: wait for its /readyz, prefetch at once."""
    for a in agents:
        a.start(wait=False)
    done: dict[int, subprocess.CompletedProcess[str] | BaseException] = {}

    def one(i: int, a: Any) -> None:
        try:
            a.wait_ready(60)
            done[i] = _prefetch(a, ref)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            done[i] = exc

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    out = []
    for i in range(len(agents)):
        result = done.get(i)
        assert isinstance(result, subprocess.CompletedProcess), f"{agents[i].name}: {result!r}"
        out.append(result)
    return out


def _origin_ratio(relay: Any, model_bytes: int) -> float:
    return relay.bytes_down / model_bytes


def _assert_origin(relay: Any, agents: list[Any], model_bytes: int, limit: float, what: str) -> None:
    ratio = _origin_ratio(relay, model_bytes)
    print(f"{what}: origin sent {ratio:.3f}x the model")
    assert ratio <= limit, (
        f"{what}: origin sent {relay.bytes_down} bytes, {ratio:.3f}x the {model_bytes}-byte model (limit {limit}x)\n"
        f"{relay.traffic()}\n{_peer_story(agents)}"
    )


# ---------------------------------------------------------------------- item 1: the storm's first seconds


async def test_membership_settles_when_every_member_spoke_and_probes_fast_until_then() -> None:
    """Unit: the start phase ends when every member answered a probe or spoke to this node (from=)."""
    members = ["198.18.1.1:7070", "198.18.1.2:7070", "198.18.1.3:7070"]
    m = Membership(members[0], static=members, advertise=members[0])
    await m.refresh()
    assert not m.settled and not await m.wait_settled(0.05)
    answered: list[str] = []

    async def ping(addr: str) -> None:  # only 198.18.1.2 answers probes
        answered.append(addr)
        if addr != members[1]:
            raise ConnectionRefusedError("nothing listens")

    runner = asyncio.create_task(m.run(ping))
    try:
        await asyncio.sleep(0.5)
        assert answered.count(members[2]) >= 2  # probed every START_PROBE_INTERVAL, not every 2 s
        assert m.live() == [members[1]] and not m.settled
        m.heard_from("198.18.9.9:7070")  # not a member: ignored
        assert not m.settled
        m.heard_from(members[2])  # its piece request or ping named it
        assert m.settled and await m.wait_settled(0)
        assert sorted(m.live()) == members[1:]
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


@pytest.mark.parametrize("rate", [None, 16 * MiB], ids=["fast-origin", "shaped-origin"])
def test_agents_started_together_prefetching_at_readiness_take_the_model_once(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path,
    rate: float | None,
) -> None:
    """Before: peers were marked alive only after a probe round (2 s), so each node's first seconds
    went to the origin (issue 24: 1.83x the model with three nodes and a fast origin)."""
    files = _upload(seaweed, tmp_path, f"storm/cli-{rate}", MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory, rate=rate)
    agents = _agents(agent_factory, agent_env, tmp_path, relay, 3)
    for result in _start_together_and_prefetch(agents, f"s3://models/storm/cli-{rate}"):
        assert result.returncode == 0, result.stderr
    for a in agents:
        _assert_bit_exact(a, files)
    _assert_origin(relay, agents, model_bytes, STORM_LIMIT, f"3 agents started together, origin {rate or 'fast'}")


def test_agents_started_together_with_a_warm_set_take_the_model_once(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """A warm set present at start-up begins filling before readiness: fills wait for the first round too."""
    files = _upload(seaweed, tmp_path, "storm/warmset", MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory)
    warm = tmp_path / "warm-set.yaml"
    warm.write_text("models:\n  - ref: s3://models/storm/warmset\n    pin: true\n")
    agents = _agents(agent_factory, agent_env, tmp_path, relay, 3, extra=("--warm-set", str(warm)))
    for a in agents:
        a.start(wait=False)
    for a in agents:
        a.wait_ready(60)
    deadline = time.monotonic() + 90
    for a in agents:
        while not all((a.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(d)).is_file() for d in files.values()):
            assert time.monotonic() < deadline, f"{a.name} did not fill the warm set\n{a.log_tail()}"
            time.sleep(0.1)
    for a in agents:
        _assert_bit_exact(a, files)
    _assert_origin(relay, agents, model_bytes, STORM_LIMIT, "3 agents started together with a warm set")


@pytest.mark.serial  # measures how long readiness took
def test_readiness_waits_for_the_first_round_but_no_longer_than_peer_start_wait(
    agent_factory: Any, agent_env: dict[str, str], relay_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """A peer that never answers holds readiness back by --peer-start-wait at most, and only that."""
    relay = _relay(seaweed, relay_factory)
    silent = free_port()  # nothing listens there
    ports = [free_port(), silent]
    (agent,) = _agents(agent_factory, agent_env, tmp_path, relay, 1, extra=("--peer-start-wait", "1.5"), ports=ports)
    started = time.monotonic()
    agent.start()
    waited = time.monotonic() - started
    assert 1.4 <= waited < 30, waited
    assert "not heard from within --peer-start-wait" in agent.log_text()


# ---------------------------------------------------------------------- item 2: holders before the origin


def test_a_node_joining_where_another_holds_the_model_takes_it_from_the_holder(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """Before: the pieces the newcomer owned by placement (about half) went to the origin."""
    files = _upload(seaweed, tmp_path, "storm/join", MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory)
    holder, newcomer = _agents(agent_factory, agent_env, tmp_path, relay, 2)
    holder.extra_args = (*holder.extra_args, "--peer-start-wait", "0")  # alone at first: nobody to wait for
    holder.start()
    assert _prefetch(holder, "s3://models/storm/join").returncode == 0
    relay.reset_counters()
    newcomer.start()
    done = _prefetch(newcomer, "s3://models/storm/join")
    assert done.returncode == 0, done.stderr
    _assert_bit_exact(newcomer, files)
    _assert_origin(relay, [holder, newcomer], model_bytes, JOIN_LIMIT, "a node joining where one holds the model")
    assert _stats(newcomer)["peer_bytes_received"] >= 0.95 * model_bytes


def test_have_answers_only_what_is_held_and_refuses_bad_bodies(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """``/peer/v1/have``: the token is needed; junk bodies get 400 in one line; a held file is listed
    complete for its own piece size only; an unknown key is not listed; nothing is fetched to answer."""
    files = _upload(seaweed, tmp_path, "storm/have", {"w.bin": 3 * MiB + 5})
    relay = _relay(seaweed, relay_factory)
    agent = inproc_factory("h", env={"AWS_ENDPOINT_URL": relay.url},
                           extra_args=("--peer-token-file", str(_token(tmp_path)), "--piece-size", "1MiB"))
    assert agent.cli("prefetch", "s3://models/storm/have").returncode == 0
    key = next(p.name for p in (agent.cache_dir / "sources").iterdir())
    relay.reset_counters()

    def post(body: object, token: str | None = TOKEN) -> tuple[int, Any]:
        req = urllib.request.Request(agent.url + "/peer/v1/have", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    assert post({"keys": [key], "piece_size": MiB}, token=None)[0] == 401
    for bad in ({"keys": key, "piece_size": MiB}, {"keys": [key], "piece_size": 0}, {"keys": [1], "piece_size": MiB},
                {"keys": ["k"] * 10001, "piece_size": MiB}, {"keys": [key], "piece_size": True}, [key]):
        status, text = post(bad)
        assert status == 400 and "\n" not in str(text).strip(), (bad, status, text)
    assert post({"keys": [key, "nope"], "piece_size": MiB}) == (200, {"complete": [key], "pieces": {}})
    assert post({"keys": [key], "piece_size": 2 * MiB}) == (200, {"complete": [], "pieces": {}})
    assert relay.bytes_down == 0
    assert len(files) == 1


def test_have_lists_pieces_whose_origin_fetch_is_running(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """A node joining mid-storm asks ``/peer/v1/have`` while the others' pieces are still on their way from
    the origin: those pieces are listed (a request for one follows that fetch), or the joining node would
    take its share of them from the origin a second time."""
    _upload(seaweed, tmp_path, "storm/havefly", {"w.bin": 6 * MiB})
    relay = _relay(seaweed, relay_factory, rate=1 * MiB)  # ~6 s for the file: the fill is caught mid-way
    agent = inproc_factory("h", env={"AWS_ENDPOINT_URL": relay.url},
                           extra_args=("--peer-token-file", str(_token(tmp_path)), "--piece-size", "1MiB"))
    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(agent.cli("prefetch", "s3://models/storm/havefly")))
    runner.start()
    seen: list[int] = []
    landed = 0
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline and runner.is_alive():
        keys = [p.name.removesuffix(".part") for p in (agent.cache_dir / "partial").glob("*.part")]
        if keys:
            req = urllib.request.Request(
                agent.url + "/peer/v1/have", data=json.dumps({"keys": keys, "piece_size": MiB}).encode(),
                method="POST", headers={"Authorization": f"Bearer {TOKEN}"},
            )  # fmt: skip
            with urllib.request.urlopen(req, timeout=10) as r:
                answer = json.loads(r.read())
            landed = relay.bytes_down
            seen = sorted(i for indexes in answer["pieces"].values() for i in indexes)
        time.sleep(0.1)
    runner.join(timeout=60)
    assert done and done[0].returncode == 0, done
    # More pieces listed than had landed whole when the answer came: the running fetches are in it.
    assert seen and len(seen) * MiB > landed, (seen, landed)


@pytest.mark.parametrize("refusals", [2, None], ids=["busy-twice", "always-busy-beside-a-good-one"])
def test_a_busy_holder_does_not_send_the_file_to_the_origin(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path,
    refusals: int | None,
) -> None:
    """A holder that answers 503 (busy, finishing the file) is asked again or another holder is; never the origin."""
    files = _upload(seaweed, tmp_path, f"storm/busy-{refusals}", MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory)
    port, p1, p2 = free_ports(3)
    busy = FlakyPeer(files, TOKEN, p1, refusals=refusals)
    good = FlakyPeer(files, TOKEN, p2, refusals=0) if refusals is None else None
    try:
        ports = [port, p1] + ([p2] if good is not None else [])
        (agent,) = _agents(agent_factory, agent_env, tmp_path, relay, 1, ports=ports)
        agent.start()
        relay.reset_counters()
        done = _prefetch(agent, f"s3://models/storm/busy-{refusals}")
        assert done.returncode == 0, done.stderr
        _assert_bit_exact(agent, files)
        assert busy.refused > 0 and busy.have_asked > 0
        if good is not None:
            assert good.served_bytes >= 0.95 * model_bytes
        else:
            assert busy.served_bytes >= 0.95 * model_bytes
        _assert_origin(relay, [agent], model_bytes, JOIN_LIMIT, f"a holder refusing {refusals or 'always'}")
    finally:
        busy.close()
        if good is not None:
            good.close()


# ---------------------------------------------------------------------- item 5: churn


CHURN_MODEL = {"config.json": 3000, "a.safetensors": 24 * MiB + 11, "b.safetensors": 24 * MiB}


@pytest.mark.serial  # the origin bound (1.1x) beside 3 other workers: 1.136x once in CI (1.02-1.09x alone)
def test_a_node_killed_mid_storm_the_others_finish_bit_exact(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "storm/kill", CHURN_MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory, rate=12 * MiB)  # ~4 s for the model: the kill lands mid-storm
    agents = _agents(agent_factory, agent_env, tmp_path, relay, 3, extra=("--connections", "2"))
    victim, *rest = agents
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.extend(_try_storm(agents, "s3://models/storm/kill")))
    runner.start()
    deadline = time.monotonic() + 60
    while not _served(victim, 2 * MiB):
        assert time.monotonic() < deadline, f"the victim never served a piece\n{victim.log_tail()}"
        time.sleep(0.05)
    victim.kill9()
    runner.join(timeout=180)
    assert not runner.is_alive()
    for a, result in zip(agents, results, strict=True):
        if a is not victim:
            assert isinstance(result, subprocess.CompletedProcess) and result.returncode == 0, result
    for a in rest:
        _assert_bit_exact(a, files)
    _assert_origin(relay, agents, model_bytes, CHURN_LIMIT, "a node killed mid-storm")


@pytest.mark.serial  # the origin bound (1.1x) holds only if no answer passes a hedge; beside others: 1.105x
def test_a_node_joining_mid_storm_gets_it_bit_exact_and_the_origin_sends_it_about_once(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "storm/joinmid", CHURN_MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory, rate=12 * MiB)
    *first, late = _agents(agent_factory, agent_env, tmp_path, relay, 3, extra=("--peer-start-wait", "2"))
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.extend(_try_storm(first, "s3://models/storm/joinmid")))
    runner.start()
    deadline = time.monotonic() + 60
    while relay.bytes_down < model_bytes // 4:
        assert time.monotonic() < deadline, "the storm never started"
        time.sleep(0.05)
    late.start()
    joined = _prefetch(late, "s3://models/storm/joinmid")
    runner.join(timeout=180)
    assert joined.returncode == 0, joined.stderr
    assert all(isinstance(r, subprocess.CompletedProcess) and r.returncode == 0 for r in results), results
    for a in [*first, late]:
        _assert_bit_exact(a, files)
    _assert_origin(relay, [*first, late], model_bytes, CHURN_LIMIT, "a node joining mid-storm")


@pytest.mark.serial  # the origin bound (1.1x) beside 3 other workers: 1.109x once in CI (1.01-1.08x alone)
def test_a_relay_parent_killed_mid_piece_its_children_finish_bit_exact(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """Four nodes: every piece's tree has a relay parent between the owner and the last place.
    A node killed while it passes pieces on (relayed bytes counted, not yet done) leaves children
    mid-piece; they go to the owner, and everyone finishes bit-exact."""
    files = _upload(seaweed, tmp_path, "storm/relay", CHURN_MODEL)
    model_bytes = sum(len(d) for d in files.values())
    relay = _relay(seaweed, relay_factory, rate=8 * MiB)
    agents = _agents(agent_factory, agent_env, tmp_path, relay, 4, extra=("--connections", "2"))
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.extend(_try_storm(agents, "s3://models/storm/relay")))
    runner.start()
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no node relayed a piece"
        for a in agents:
            with_stats = _safe_stats(a)
            if with_stats and with_stats["peer_bytes_relayed"] > 0:
                victim = a
                break
        time.sleep(0.02)
    victim.kill9()
    runner.join(timeout=180)
    assert not runner.is_alive()
    rest = [a for a in agents if a is not victim]
    for a, result in zip(agents, results, strict=True):
        if a is not victim:
            assert isinstance(result, subprocess.CompletedProcess) and result.returncode == 0, result
    for a in rest:
        _assert_bit_exact(a, files)
    print(f"relay parent {victim.name} killed; origin {_origin_ratio(relay, model_bytes):.3f}x")
    _assert_origin(relay, agents, model_bytes, CHURN_LIMIT, "a relay parent killed mid-piece")


def test_a_restart_mid_fill_keeps_which_pieces_came_from_peers(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    """Pieces from a consistent liar are recorded with their peer; after a kill -9 and a restart the fill
    still knows them, so the failed whole-file check repairs them from the origin (before: the record
    lost them, and the file was discarded: the prefetch failed)."""
    files = _upload(seaweed, tmp_path, "storm/restart", {"w.safetensors": 12 * MiB})
    ref = "s3://models/storm/restart"
    relay = _relay(seaweed, relay_factory, rate=256 * 1024)  # the origin's pieces take long: kill lands mid-fill
    port, liar_port = free_ports(2)
    liar = FlakyPeer(files, TOKEN, liar_port, refusals=0, serve_limit=4, lie=True)
    try:
        (agent,) = _agents(agent_factory, agent_env, tmp_path, relay, 1, ports=[port, liar_port])
        agent.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "prefetch", ref],
            env={**agent.env, "WARMSTART_SOCKET": str(agent.socket_path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(_recorded_peers(agent)) < 4:
                assert time.monotonic() < deadline, f"no peer pieces recorded\n{agent.log_tail()}"
                time.sleep(0.05)
            agent.kill9()
        finally:
            proc.kill()
            proc.wait(timeout=10)
        before = _recorded_peers(agent)
        assert set(before.values()) == {liar.addr}, before
        liar.refusals = None  # it serves nothing more
        relay.set_rate(None)
        agent.start()
        done = _prefetch(agent, ref)
        assert done.returncode == 0, f"{done.stderr}\n{agent.log_tail()}"
        _assert_bit_exact(agent, files)
        assert _stats(agent)["peer_files_repaired"] == 1, _stats(agent)
        assert f"with {len(before)} pieces from peers" in agent.log_text()
    finally:
        liar.close()


# ---------------------------------------------------------------------- helpers


def _try_storm(agents: list[Any], ref: str) -> list[Any]:
    """Like :func:`_start_together_and_prefetch`, but a killed agent's failure is a result, not an error."""
    for a in agents:
        a.start(wait=False)
    done: dict[int, Any] = {}

    def one(i: int, a: Any) -> None:
        try:
            a.wait_ready(60)
            done[i] = _prefetch(a, ref)
        except BaseException as exc:  # noqa: BLE001 - a killed agent's start or prefetch fails
            done[i] = exc

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return [done.get(i) for i in range(len(agents))]


def _safe_stats(agent: Any) -> dict[str, Any] | None:
    try:
        return _stats(agent)
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _served(agent: Any, least: int) -> bool:
    stats = _safe_stats(agent)
    return stats is not None and stats["peer_bytes_served"] >= least


def _recorded_peers(agent: Any) -> dict[str, str]:
    """The ``peers`` of every partial file's record (index -> peer), merged."""
    out: dict[str, str] = {}
    for record in (agent.cache_dir / "partial").glob("*.json"):
        try:
            out.update(json.loads(record.read_text()).get("peers", {}))
        except (OSError, ValueError):
            continue
    return out
