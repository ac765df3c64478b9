"""Issue 7, faults: kill -9 at seeded random moments of a fetch, an eviction and a publish;
an origin that fails in every way S3 does; a disk that fills up mid-fetch.

After every crash the cache directory is walked (tests/servers/cache_check.py):
every blob hashes to its name, what was complete before is still there, and a
restarted agent resumes with only the missing bytes. Counts of what was tried
are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import client
from client.artifacts import open_bundle, push_bundle
from tests.servers.cache_check import blob_digest, check_cache
from tests.servers.faulty_origin import FAULTS, FaultyOrigin
from tests.servers.seaweedfs import SeaweedS3
from tests.test_agent_e2e import assert_bit_exact, expected_tensors, one_line_error

MiB = 1024 * 1024
KILLS = 4  # seeded random moments per operation


def _upload(seaweed: SeaweedS3, tmp_path: Path, key: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"upload-{seed}.bin"
    path.write_bytes(data)
    seaweed.make_bucket("models")
    seaweed.upload_file(path, "models", key)
    path.unlink()
    return data


def _prefetch_proc(agent: Any, ref: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "prefetch", ref],
        env={**agent.env, "WARMSTART_SOCKET": str(agent.socket_path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _kept_bytes(agent: Any, size: int, piece: int) -> int:
    states = list((agent.cache_dir / "partial").glob("*.json"))
    if not states:
        return 0
    return min(size, len(json.loads(states[0].read_text())["done"]) * piece)


# ---------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill9_at_random_moments_of_a_fetch_loses_nothing_and_resumes(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, s3_model: Any, relay_factory: Any,
    tmp_path: Path,
) -> None:
    size = 24 * MiB
    data = _upload(seaweed, tmp_path, "kill-fetch/weights.bin", size, seed=7)
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    relay = relay_factory(host, int(port))
    env = {**agent_env, "AWS_ENDPOINT_URL": relay.url}
    agent = agent_factory(env=env, extra_args=("--piece-size", "1MiB", "--connections", "2"))
    assert agent.cli("prefetch", s3_model.ref, "--pin").returncode == 0
    complete_before = check_cache(agent.cache_dir)
    rng = random.Random(20261128)
    relay.set_rate(16 * MiB)  # ~1.5 s for the object: the kills land mid-transfer
    ref = "s3://models/kill-fetch"
    kept = 0
    for round_ in range(KILLS):
        proc = _prefetch_proc(agent, ref)
        time.sleep(rng.uniform(0.3, 1.4) if round_ == 0 else rng.uniform(0.1, 0.5))
        agent.kill9()
        proc.communicate(timeout=30)
        digests = check_cache(agent.cache_dir)
        assert complete_before <= digests  # the pinned model is intact
        if blob_digest(data) in digests:
            break  # the fetch completed before the kill; nothing left to resume
        now = _kept_bytes(agent, size, MiB)
        assert now >= kept  # verified pieces only accumulate across crashes
        kept = now
        agent.start()
    else:
        relay.set_rate(None)
    if not agent.alive():
        agent.start()
    relay.set_rate(None)
    kept = size if blob_digest(data) in check_cache(agent.cache_dir) else _kept_bytes(agent, size, MiB)
    relay.reset_counters()
    assert agent.cli("prefetch", ref).returncode == 0
    assert relay.bytes_down < size - kept + 2 * MiB, (relay.bytes_down, kept)
    assert blob_digest(data) in check_cache(agent.cache_dir)
    assert not list((agent.cache_dir / "partial").glob("*.part"))
    relay.reset_counters()
    assert_bit_exact(
        client.open_tensors(s3_model.ref, socket=str(agent.socket_path)), expected_tensors(s3_model.local_dir)
    )
    assert relay.bytes_down < MiB  # the pinned model came from the cache, not the origin


@pytest.mark.slow
def test_kill9_at_random_moments_of_evictions_keeps_the_cache_consistent(
    agent_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    datas = {i: _upload(seaweed, tmp_path, f"kill-evict/m{i}/w.bin", 3 * MiB, seed=100 + i) for i in range(8)}
    agent = agent_factory(capacity="14MiB", extra_args=("--piece-size", "1MiB"))
    for i in range(4):
        assert agent.cli("prefetch", f"s3://models/kill-evict/m{i}").returncode == 0
    rng = random.Random(7)
    tried = 0
    for round_ in range(KILLS):
        # A fetch that must evict, and an explicit evict, racing a kill at a random moment.
        new = 4 + round_
        proc = _prefetch_proc(agent, f"s3://models/kill-evict/m{new}")
        ev = agent.cli("evict", f"s3://models/kill-evict/m{round_}") if round_ % 2 else None
        time.sleep(rng.uniform(0.0, 0.4))
        agent.kill9()
        proc.communicate(timeout=30)
        tried += 1 + (ev is not None)
        check_cache(agent.cache_dir)
        agent.start()
    # After all of it: every model fetches again, bit-exact, and fits under capacity.
    for i, data in datas.items():
        assert agent.cli("prefetch", f"s3://models/kill-evict/m{i}").returncode == 0, i
        assert blob_digest(data) in check_cache(agent.cache_dir), i
    used = sum(p.stat().st_size for p in (agent.cache_dir / "blobs").iterdir())
    assert used <= 14 * MiB
    assert tried >= KILLS


@pytest.mark.slow
def test_kill9_at_random_moments_of_a_publish_leaves_whole_bundles_or_none(
    agent_factory: Any, tmp_path: Path
) -> None:
    agent = agent_factory()
    sock = str(agent.socket_path)
    fp = {"kind": "dir", "test": "kill-publish"}
    first = push_bundle("kept", fp, {}, {"a.bin": b"first bundle" * 1000}, socket=sock)
    rng = random.Random(11)
    payload = random.Random(3).randbytes(32 * MiB)
    landed = 0  # kills that interrupted the publish (the others came after it)
    for _ in range(KILLS):
        errors: list[BaseException] = []

        def publish(errors: list[BaseException]) -> None:
            try:
                push_bundle("big", fp, {}, {"w.bin": payload}, socket=sock)
            except BaseException as exc:  # noqa: BLE001 (the agent died under it: expected, counted below)
                errors.append(exc)

        t = threading.Thread(target=publish, args=(errors,))
        t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        agent.kill9()
        t.join(timeout=60)
        landed += bool(errors)
        digests = check_cache(agent.cache_dir)
        assert first["digest"] in digests  # the earlier bundle survives every crash
        agent.start()
        assert not [p for p in (agent.cache_dir / "partial").iterdir() if p.name.startswith("artifact-")]
    print(f"publish kills: {KILLS}, mid-publish: {landed}")
    entry = push_bundle("big", fp, {}, {"w.bin": payload}, socket=sock)
    with open_bundle("big", fp, socket=sock) as (answer, bundle):
        assert answer["entry"]["digest"] == entry["digest"]
        assert bundle.read("files/w.bin") == payload or bundle.read("w.bin") == payload
    check_cache(agent.cache_dir)


# ---------------------------------------------------------------------- origin faults


@pytest.fixture
def faulty(seaweed: SeaweedS3) -> Any:
    proxy = FaultyOrigin(seaweed.endpoint_url, stall_seconds=30)
    yield proxy
    proxy.close()


def test_origin_faults_are_retried_and_the_fetch_completes(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _upload(seaweed, tmp_path, "faults-ok/w.bin", 4 * MiB, seed=21)
    # Ten faults in a row on one piece: with the agent's own backoff (full jitter, doubling from 0.2 s up
    # to 8 s) the waits alone took about 20 s. What is tested is that each fault costs one more try.
    monkeypatch.setattr("agent.fetch.origin_reader.BACKOFF_BASE", 0.01)
    monkeypatch.setattr("agent.fetch.origin_reader.BACKOFF_CAP", 0.1)
    agent = inproc_factory(
        env={"AWS_ENDPOINT_URL": faulty.url},
        extra_args=("--piece-size", "1MiB", "--connections", "1", "--read-timeout", "1", "--retries", "12"),
    )
    # Two of every fault, interleaved, on the first ranged GETs.
    faulty.inject(*FAULTS, *FAULTS)
    done = agent.cli("prefetch", "s3://models/faults-ok")
    assert done.returncode == 0, done.stderr
    assert blob_digest(data) in check_cache(agent.cache_dir)
    gets = faulty.ranged_gets
    assert sum(g.fault is not None for g in gets) == 2 * len(FAULTS)
    # Each fault cost exactly one more try: the file's 4 pieces are one run of consecutive
    # pieces (agent/fetch/fetcher.py ORIGIN_RANGE_MAX), so after the faults one request gets the rest.
    assert len(gets) == 1 + 2 * len(FAULTS)
    # The range client sends a request once more by itself when a kept-alive connection is
    # reset before any answer (agent/origins/range_http.py), so a reset may not reach the
    # agent's own count; every other fault does.
    assert agent.log_text().count("failed (attempt") >= 2 * (len(FAULTS) - 1)


@pytest.mark.parametrize("fault", FAULTS)
def test_origin_that_keeps_failing_gives_up_bounded_with_a_clear_error(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path,
    s3_model: Any, fault: str,
) -> None:
    _upload(seaweed, tmp_path, "faults-bad/w.bin", 2 * MiB, seed=22)
    agent = inproc_factory(
        env={"AWS_ENDPOINT_URL": faulty.url},
        extra_args=("--piece-size", "1MiB", "--connections", "1", "--read-timeout", "1", "--retries", "4"),
    )
    faulty.always = fault
    start = time.monotonic()
    err = one_line_error(agent.cli("prefetch", "s3://models/faults-bad", timeout=120))
    took = time.monotonic() - start
    assert "w.bin" in err and "failed 4 times" in err, err  # names the file and the bound
    causes = {"500": "500", "503": "503 for 'w.bin' (<?xml", "reset": "", "stall": "Timeout", "short": "content length"}
    cause = causes[fault]
    assert cause in err and ("SlowDown" in err) == (fault == "503"), err
    gets = faulty.ranged_gets
    # Bounded: exactly --retries tries (the range client sends a request again once by itself
    # when a kept-alive connection is reset before any answer, so a reset may cost 2 each). The
    # file's 2 pieces go in one request, and a try that got a piece whole before failing makes
    # the next one ask for the rest only, so the tries are counted for the file, not per range.
    per_try = 2 if fault == "reset" else 1
    assert 4 <= len(gets) <= 4 * per_try
    times = [g.time for g in gets]
    # Full-jitter backoff between tries: uniform(0, 0.2 * 2**n) s, so > 0 and below the caps' sum.
    spent = times[-1] - times[0]
    assert 0.02 < spent < 0.4 + 0.8 + 1.6 + 4 * per_try * (1.5 if fault == "stall" else 0.5), spent
    assert took < 60
    faulty.always = None
    assert check_cache(agent.cache_dir) == set()
    assert agent.http_status("/livez") == 200
    ok = agent.cli("prefetch", "s3://models/faults-bad")
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------- disk full


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill_up(path: Path) -> None:
    """Write zeros to *path* until the filesystem is full.

    Unbuffered on purpose: a buffered file keeps the bytes of a short write and raises
    ENOSPC again when it is closed, which made this test fail at random depending on how
    the free space lined up with the write size.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    return
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    return
                raise
    finally:
        os.close(fd)


def test_disk_full_mid_fetch_is_a_clear_error_and_the_agent_serves_on(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, small_tmpfs: Path,
    tmp_path: Path,
) -> None:
    big = _upload(seaweed, tmp_path, "diskfull/big/w.bin", 16 * MiB, seed=31)
    small = _upload(seaweed, tmp_path, "diskfull/small/w.bin", 2 * MiB, seed=32)
    del big
    # The capacity says 1 GiB; the filesystem has 12 MiB: the disk, not the limit, runs out.
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    relay = relay_factory(host, int(port))
    agent = inproc_factory(
        env={"AWS_ENDPOINT_URL": relay.url}, capacity="1GiB", cache_dir=small_tmpfs / "cache",
        extra_args=("--piece-size", "1MiB"),
    )
    err = one_line_error(agent.cli("prefetch", "s3://models/diskfull/big"))
    assert "disk full" in err or "No space left" in err, err
    assert agent.alive() and agent.http_status("/livez") == 200
    check_cache(agent.cache_dir)
    assert agent.cli("prefetch", "s3://models/diskfull/small").returncode == 0
    assert blob_digest(small) in check_cache(agent.cache_dir)
    out = agent.cli("verify", "s3://models/diskfull/small", check=True).stdout
    assert "0 corrupt" in out
    # The disk fills up behind the agent's back while a fetch runs (the data file is
    # preallocated; the piece records and the publish still need space).
    relay.set_rate(4 * MiB)
    mid = _upload(seaweed, tmp_path, "diskfull/mid/w.bin", 6 * MiB, seed=33)
    proc = _prefetch_proc(agent, "s3://models/diskfull/mid")
    deadline = time.monotonic() + 20
    while not list((agent.cache_dir / "partial").glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.02)
    filler = small_tmpfs / "filler"
    _fill_up(filler)
    out, errs = proc.communicate(timeout=120)
    print(f"disk filled mid-fetch: exit {proc.returncode}: {errs.strip().splitlines()[-1:]}")
    if proc.returncode != 0:
        # "no space left" when the disk fills while pieces land; "cannot preallocate" when it fills
        # between the partial file's creation and its preallocation (the glob above sees the file first)
        assert "error: disk full: " in errs and "internal error" not in errs, errs
    assert agent.alive() and agent.http_status("/livez") == 200
    check_cache(agent.cache_dir)
    filler.unlink()
    relay.set_rate(None)
    assert agent.cli("prefetch", "s3://models/diskfull/mid").returncode == 0
    assert blob_digest(mid) in check_cache(agent.cache_dir)
    assert agent.cli("prefetch", "s3://models/diskfull/small").returncode == 0
