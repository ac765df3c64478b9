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

import functools
import shutil
import subprocess
import threading


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
