"""A model of thousands of files: descriptors stay bounded by --open-files, and other requests are served.

Before the bound, every file of a model opened its partial file at once (a model
of 50,000 files held 19,932 descriptors and 867 MB, then every request failed with
"Too many open files"). Here the agent runs with a descriptor limit far below the
model's file count (``prlimit`` on the real process: the limit of a process is the
point, so this test keeps a separate agent process).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import AgentFactory

FILES = 3000
NOFILE = 512  # the agent process's descriptor limit: far below FILES
OPEN_FILES = 64


def _many_files(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"d{i // 300}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * 3)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_model_of_thousands_of_files_prefetches_with_bounded_descriptors(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    model, tiny = tmp_path / "many", tmp_path / "tiny"
    _many_files(model, FILES)
    tiny.mkdir()
    (tiny / "t.bin").write_bytes(b"abcd")
    agent = agent_factory(extra_args=["--open-files", str(OPEN_FILES)])
    assert agent.pid is not None
    subprocess.run(["prlimit", f"--pid={agent.pid}", f"--nofile={NOFILE}:{NOFILE}"], check=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _fds(agent.pid))  # type: ignore[arg-type]
            except FileNotFoundError:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    big = threading.Thread(target=lambda: results.update(big=agent.cli("prefetch", str(model), timeout=300)))
    big.start()
    try:
        time.sleep(1.0)  # the big prefetch is under way
        started = time.monotonic()
        small = agent.cli("prefetch", str(tiny), timeout=60)
        small_seconds = time.monotonic() - started
        big.join(timeout=300)
    finally:
        done.set()
    assert results["big"].returncode == 0, results["big"].stderr
    assert small.returncode == 0, small.stderr
    assert small_seconds < 15, f"a 4-byte model took {small_seconds:.1f}s while {FILES} files filled"
    assert peak[0] <= OPEN_FILES + 100, f"peak {peak[0]} descriptors for --open-files {OPEN_FILES}"
    models = json.loads(agent.cli("ls", "--json", check=True).stdout)["models"]
    assert {m["ref"]: (m["files"], m["cached_bytes"] == m["total_size"]) for m in models} == {
        str(model): (FILES, True), str(tiny): (1, True),
    }
