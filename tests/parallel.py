"""pytest hooks for runs on several xdist workers: the ``serial`` marker's lock, and the order tests run in.

tests/conftest.py imports them (its docstring says what a test must do to run
beside others); they live here, apart from the fixtures, so that
tests/test_parallel_runs.py can load them into an inner pytest run without
the fixtures' imports. This module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Serial tests first, then slow ones, then the rest in file order (a stable sort).

    Serial tests first: they run one at a time however many workers wait, so
    at the start they cost only their own time; at the end they would stretch
    the run's tail. Slow tests next, so that no worker picks one up last.
    Every worker collects the same items and sorts them the same way, as
    xdist requires.
    """

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("serial") is not None:
            return 0
        if item.get_closest_marker("slow") is not None:
            return 1
        return 2

    items.sort(key=rank)


def _run_lock_dir(config: pytest.Config) -> Path | None:
    """The folder all xdist workers of this run share (their basetemps' parent), or None without xdist."""
    if not hasattr(config, "workerinput"):  # the controller, or a run without -n
        return None
    basetemp = config.getoption("basetemp")
    return Path(basetemp).parent if basetemp else None


@contextlib.contextmanager
def _serial_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``folder/serial.lock`` exclusively (a serial test) or shared (any other test).

    flock alone would let a stream of shared holders starve a waiting exclusive
    one, so each taker first passes a gate (``serial-gate.lock``, exclusive,
    held only while taking the main lock): once a serial test waits at the
    main lock, the tests behind it wait at the gate. The descriptors are not
    inherited by the agents a test starts (Python opens files close-on-exec),
    so a leftover child can never hold the lock.
    """
    with open(folder / "serial-gate.lock", "a") as gate, open(folder / "serial.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Run a ``serial`` test alone across all xdist workers (setup, call and teardown); see the module docstring.

    Outermost (tryfirst), so the wait for the lock is not counted by pytest-timeout
    nor in the test's durations.
    """
    folder = _run_lock_dir(item.config)
    if folder is None:
        return (yield)
    serial = item.get_closest_marker("serial") is not None
    if serial:
        try:
            with _serial_lock(folder, exclusive=True):
                return (yield)
        finally:
            with open(folder / "serial-done.txt", "a") as done:
                done.write(item.nodeid + "\n")
    _wait_for_serial_tests(folder, item.session)
    with _serial_lock(folder, exclusive=False):
        return (yield)


SERIAL_PHASE_CAP = 900.0  # seconds a test waits for the serial tests to end (a crashed worker never reports its own)


def _wait_for_serial_tests(folder: Path, session: pytest.Session) -> None:
    """Wait until every serial test of the run has ended (they run first; serial-done.txt lists those ended).

    Without this, a worker whose turn came between two serial tests took the shared lock for a
    long test (a cold torch.compile, 25 s) and the next serial test waited for it with every
    other worker idle at the gate.
    """
    serial = {i.nodeid for i in session.items if i.get_closest_marker("serial") is not None}
    if not serial:
        return
    deadline = time.monotonic() + SERIAL_PHASE_CAP
    path = folder / "serial-done.txt"
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if serial <= set(path.read_text().splitlines()):
                return
        time.sleep(0.2)
