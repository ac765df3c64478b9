"""Child processes that do not outlive the test run.

Why: a test process that dies hard (``os._exit`` from a watchdog, SIGKILL,
an OOM kill) runs no teardown, and a leaked ``weed`` or agent keeps its ports,
its /tmp sockets and its CPU on a 2-core CI machine. ``setpriv --pdeathsig
KILL`` (util-linux) makes the kernel SIGKILL the child when its parent goes,
with no ``preexec_fn`` (unsafe in a process with threads, which ours has).

Linux delivers the signal when the *thread* that spawned the child exits, so
the guard is applied only to children spawned from the main thread (whose end
is the process's end); a child spawned from another thread is unguarded
rather than killed when, say, a thread pool shuts down.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path


@functools.cache
def _setpriv() -> str | None:
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out else None


def die_with_parent_prefix() -> list[str]:
    """``["setpriv", "--pdeathsig", "KILL", "--"]`` where available and called from the main thread, else ``[]``."""
    if threading.current_thread() is not threading.main_thread():
        return []
    path = _setpriv()
    return [path, "--pdeathsig", "KILL", "--"] if path else []


def spawn_logged(
    cmd: list[str],
    log_path: Path,
    *,
    banner: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (stop() signals its group; ^C to pytest does not reach it),
    stdout and stderr appended to ``log_path`` after a ``==== banner`` line naming the command."""
    if die_with_parent:
        cmd = die_with_parent_prefix() + cmd  # setpriv execs the command: same pid, same process group
    with open(log_path, "ab") as log:
        log.write(f"\n==== {banner}: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` (spawned with its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # No signal after the wait: the group id may belong to someone else once reaped.


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """SIGTERM the process group, wait ``grace`` s, then SIGKILL it; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            kill_group(proc)
    return proc.returncode


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a server's log, headed by its path, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)
