"""The machinery that lets the suite run on several xdist workers (tests/parallel.py, tests/servers/ports.py).

Port shares: two workers never hand out the same port, and SeaweedFS's P and
P+10000 stay in one share. The serial marker: under a real ``pytest -n 2`` run,
a serial test's run overlaps no other test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ports

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_port_shares_split_the_range_and_keep_the_grpc_twin(count: int) -> None:
    owners = {p: [i for i in range(count) if ports.in_share(p, (i, count))] for p in range(ports.LOW, ports.HIGH)}
    assert all(len(o) == 1 for o in owners.values())  # every port has exactly one owner
    sizes = [sum(o == [i] for o in owners.values()) for i in range(count)]
    assert min(sizes) >= (ports.HIGH - ports.LOW) // count - ports.SHARE_PERIOD // count - 1, sizes
    assert all(owners[p] == owners[p + ports.SHARE_PERIOD] for p in range(ports.LOW, ports.HIGH - ports.SHARE_PERIOD))


def test_free_port_draws_from_this_workers_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    assert ports.worker_share() == (2, 3)
    got = [ports.free_port(also_free_at=(10_000,), high=22_000) for _ in range(10)]
    assert all(ports.in_share(p, (2, 3)) and ports.in_share(p + 10_000, (2, 3)) for p in got), got
    assert not any(ports.in_share(p, (0, 3)) or ports.in_share(p, (1, 3)) for p in got)
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert ports.worker_share() == (0, 1)  # not under xdist: every port


INNER_CONFTEST = """
from tests.parallel import pytest_collection_modifyitems, pytest_runtest_protocol  # noqa: F401
"""

INNER_TESTS = """
import json, os, time
from pathlib import Path

import pytest

LOG = Path(os.environ["INNER_LOG"])


def _record(name, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    with LOG.open("a") as f:
        f.write(json.dumps({"name": name, "start": start, "end": time.monotonic()}) + "\\n")


@pytest.mark.parametrize("i", range(8))
def test_normal(i):
    _record(f"normal{i}", 0.3)


@pytest.mark.serial
def test_alone():
    _record("alone", 1.2)


def test_normal_late():
    _record("normal_late", 0.4)
"""


def _inner_run(tmp_path: Path, workers: int) -> list[dict[str, Any]]:
    """The inner tests under ``pytest -n WORKERS`` with this suite's hooks; each test's run (monotonic start/end)."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(INNER_TESTS)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "INNER_LOG": str(log), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), "--maxschedchunk", "1",
         "--rootdir", str(inner), "-c", str(REPO / "pyproject.toml"), "--basetemp", str(tmp_path / "bt"),
         str(inner)],
        cwd=inner, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs) == 10, runs
    return runs


def _beside_alone(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (alone,) = [r for r in runs if r["name"] == "alone"]
    return [r for r in runs if r["name"] != "alone" and r["start"] < alone["end"] and alone["start"] < r["end"]]


def test_a_serial_test_runs_beside_no_other_under_xdist(tmp_path: Path) -> None:
    """Fails without the lock: on 2 workers, the serial test would overlap a normal one."""
    runs = _inner_run(tmp_path, 2)
    assert not _beside_alone(runs), runs
