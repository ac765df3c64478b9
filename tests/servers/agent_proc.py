"""The real agent daemon as a child process, for end-to-end tests.

Why a process and not the daemon in-process: crash/restart behaviour (SIGKILL
in the middle of a fill, resume after restart), signal handling, the CLI's
exit codes and the environment the agent reads at start (``AWS_ENDPOINT_URL``,
``HF_ENDPOINT``, ``HF_TOKEN``, ``WARMSTART_*``) are only real in a real process.

The command line is the documented contract (docs/API.md)::

    python -m agent serve --cache-dir D --socket S --listen 127.0.0.1:PORT --capacity C [extra...]

Ready means ``GET http://127.0.0.1:PORT/readyz`` answers 200 and the socket file
exists. Output goes to ``<workdir>/<name>.log`` (appended across restarts, with
a header line per start); a failed start raises :class:`AgentStartError`
carrying the log's tail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.servers.ports import free_port
from tests.servers.proc import kill_group, log_tail, spawn_logged, stop_group

# sockaddr_un.sun_path is 108 bytes with the NUL; pytest's tmp paths can be longer.
MAX_SOCKET_PATH = 100


class AgentStartError(RuntimeError):
    """The agent exited or did not become ready in time; the message has the log tail."""


class AgentCliError(subprocess.CalledProcessError):
    """``AgentProcess.cli(..., check=True)`` failed; unlike its base, str() shows the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


class AgentProcess:
    """One ``agent serve`` child process with its own cache dir, socket and TCP port.

    ``env`` is the complete environment of the child (default: this process's);
    ``PYTHONUNBUFFERED=1`` is added so the log is current. The TCP port is kept
    across :meth:`restart` so peers and URLs stay valid.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        capacity: str = "2GiB",
        extra_args: Sequence[str] = (),
        name: str = "agent",
        cache_dir: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        start_timeout: float = 30.0,
        stop_grace: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self.die_with_parent = die_with_parent
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.capacity = capacity
        self.extra_args = list(extra_args)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.workdir / f"{name}-cache"
        self._socket_tmp: Path | None = None
        if socket_path is None:
            socket_path = self.workdir / f"{name}.sock"
            if len(str(socket_path)) > MAX_SOCKET_PATH:
                self._socket_tmp = Path(tempfile.mkdtemp(prefix="ws-"))
                socket_path = self._socket_tmp / f"{name}.sock"
        self.socket_path = Path(socket_path)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")
        self._port_given = port is not None
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ------------------------------------------------------------------ addresses

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the agent's TCP port (health, metrics, peer API)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "agent", "serve",
            "--cache-dir", str(self.cache_dir),
            "--socket", str(self.socket_path),
            "--listen", self.listen,
            "--capacity", str(self.capacity),
            *self.extra_args,
        ]  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True) -> AgentProcess:
        """Spawn the daemon; with ``wait`` block (bounded) until it is ready.

        If the port was picked here (not given) and the agent lost it to
        another process, a new port is tried (up to 3 times).
        """
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        for attempt in range(3):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except AgentStartError as exc:
                lost_port = "address already in use" in str(exc).lower()
                self._kill_and_reap()
                if not lost_port or self._port_given or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.proc = spawn_logged(
            self.command(), self.log_path, banner=f"start {self.starts} at {time.strftime('%H:%M:%S')}",
            cwd=self.workdir, env=self.env, die_with_parent=self.die_with_parent,
        )  # fmt: skip

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll /readyz and the socket file (bounded in time and count); raise with the log tail."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        for _ in range(int(timeout / 0.05) + 1):
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise AgentStartError(f"{self.name} exited with {code} before it was ready\n{self.log_tail()}")
            status = self.http_status("/readyz", timeout=1.0)
            if status == 200 and self.socket_path.exists():
                return
            last = f"/readyz -> {status}, socket {'exists' if self.socket_path.exists() else 'missing'}"
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AgentStartError(f"{self.name} not ready after {timeout:.0f}s ({last})\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the daemon (a crash: no shutdown code runs) and reap it."""
        self._kill_and_reap()

    def _kill_and_reap(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait ``grace`` s, then SIGKILL the process group; returns the exit code."""
        if self.proc is None:
            return None
        return stop_group(self.proc, self.stop_grace if grace is None else grace)

    def restart(self, *, kill: bool = False, wait: bool = True) -> AgentProcess:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``) and start again on the same dirs, socket and port."""
        if kill:
            self.kill9()
        else:
            self.stop()
        return self.start(wait=wait)

    def close(self) -> None:
        """Stop the daemon and remove the short socket dir this object made (if any); idempotent."""
        self.stop()
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ talking to it

    def cli(
        self,
        *args: str,
        check: bool = False,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m agent ARGS`` against this agent (``WARMSTART_SOCKET`` set); output captured.

        ``env`` adds to / overrides the agent's environment for this one command.
        With ``check`` a non-zero exit raises :class:`AgentCliError` (a
        ``CalledProcessError`` whose message includes stdout and stderr).
        """
        run_env = {**self.env, **(env or {}), "WARMSTART_SOCKET": str(self.socket_path)}
        cmd = [sys.executable, "-m", "agent", *args]
        done = subprocess.run(
            cmd, env=run_env, capture_output=True, text=True, timeout=timeout, input=input, cwd=self.workdir,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AgentCliError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def http_status(self, path: str, timeout: float = 5.0) -> int | None:
        """Status of GET ``path`` on the TCP port, or None if nothing answered."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError):
            return None

    def http_get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """(status, body) of GET ``path`` on the TCP port, e.g. ``/metrics``; raises if nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)
