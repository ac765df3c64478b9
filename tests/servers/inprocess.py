"""The real agent in this test process: ``agent.daemon.running(config)`` on its own event loop in a thread.

Why: an ``agent serve`` child imports aiohttp, botocore, huggingface_hub and
prometheus before it serves, seconds each on a 2-core CI machine, and the suite
started ~80 of them. Most tests only need *an agent* to talk to over its Unix
socket, its TCP port or the ``agent`` CLI; the daemon's parts (store, origins,
fetcher, peers, both sites) are the same code either way. Tests whose point is
the process itself (kill -9, signals, RSS, ``serve``'s exit codes and flag
checks, the environment a process reads at start, agents with different
environments side by side) keep :class:`tests.servers.agent_proc.AgentProcess`.

The surface follows ``AgentProcess`` where it means the same thing: ``socket_path``,
``port``, ``url``, ``cache_dir``, ``extra_args`` (the ``serve`` flags, parsed by
the real CLI parser into an :class:`agent.config.AgentConfig`), ``cli(...)``
(the verbs still run as ``python -m agent`` children: cheap, and real),
``http_get``/``http_status``, ``stop()``/``restart()`` (graceful only: a thread
cannot be SIGKILLed) and ``log_text()``/``log_tail()``.

The environment: the agent reads ``AWS_*``, ``HF_ENDPOINT`` and ``HF_TOKEN``
from ``os.environ`` when its origins are built and used, so the caller sets them
first (the ``s3_env`` / ``hf_endpoint`` fixtures monkeypatch them) and keeps
them while the agent runs. ``WARMSTART_*`` variables are not read: settings
come only from ``extra_args``.

The log: records are routed to ``<workdir>/<name>.log`` by a context variable
set in the agent's thread before its loop starts. asyncio copies the context
into every task and callback of that loop, so records logged on the loop (or in
``asyncio.to_thread``, which copies it too) name their agent even with several
agents in one process. Records from plain pool threads carry no agent; they are
written to the log of every in-process agent running at the time, so a test
that looks for a line still finds it, and one that asserts a line is absent
(a secret) sees more, never less.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from tests.servers.agent_proc import MAX_SOCKET_PATH, AgentCliError, AgentStartError
from tests.servers.ports import free_port
from tests.servers.proc import log_tail

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.daemon import Agent

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `agent serve` writes it
_current: contextvars.ContextVar[InProcessAgent | None] = contextvars.ContextVar("warmstart_test_agent", default=None)
_running: set[InProcessAgent] = set()
_running_lock = threading.Lock()
_saved_levels: dict[str, int] = {}  # the "agent"/"client" logger levels before the first in-process agent


class _AgentLogHandler(logging.Handler):
    """Appends the records of one agent (see the module docstring) to its log file."""

    def __init__(self, owner: InProcessAgent, level: int) -> None:
        super().__init__(level)
        self.owner = owner
        self.setFormatter(logging.Formatter(_FORMAT))
        self._file = open(owner.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def filter(self, record: logging.LogRecord) -> bool:
        who = _current.get()
        if who is None:
            with _running_lock:
                return self.owner in _running
        return who is self.owner and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:  # noqa: BLE001 - a log line must never break the agent under test
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        super().close()


def build_config(
    cache_dir: Path, socket_path: Path, listen: str, capacity: str, extra_args: Sequence[str]
) -> AgentConfig:
    """The ``AgentConfig`` that ``agent serve --cache-dir ... EXTRA`` would run with (no ``WARMSTART_*``)."""
    from agent.cli.main import build_parser
    from agent.config import AgentConfig, settings

    argv = ["serve", "--cache-dir", str(cache_dir), "--socket", str(socket_path), "--listen", listen,
            "--capacity", str(capacity), *extra_args]  # fmt: skip
    args = build_parser(serve_flags=True).parse_args(argv)
    return AgentConfig.from_texts({name: getattr(args, name) for name, _, _ in settings()}, {})


class InProcessAgent:
    """One agent on its own event loop in a daemon thread of this process, with its own cache dir, socket and port.

    ``start()`` returns once ``running()`` has yielded (the TCP port answers,
    ``/readyz`` is 200 and the socket serves). The port is kept across
    :meth:`restart` so peers and URLs stay valid. ``stop_grace`` is above
    aiohttp's own 60 s wait for requests still open at shutdown: a thread cannot
    be killed, so a stop that outlasts it raises instead of leaving the agent behind.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        capacity: str = "2GiB",
        extra_args: Sequence[str] = (),
        name: str = "agent",
        cache_dir: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        start_timeout: float = 30.0,
        stop_grace: float = 90.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
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
        self.starts = 0
        self.agent: Agent | None = None  # the running agent's parts (store, service, metrics, membership)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._handler: _AgentLogHandler | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the agent's TCP port (health, metrics, peer API)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment the agent runs with (this process's, less ``WARMSTART_*``): for CLI children."""
        return {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_")}

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set() and self._error is None

    def config(self) -> AgentConfig:
        return build_config(self.cache_dir, self.socket_path, self.listen, self.capacity, self.extra_args)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> InProcessAgent:
        """Start the agent; block (bounded) until it serves. A lost port (not given) is retried up to 3 times."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running")
        for attempt in range(3):
            try:
                self._start_once()
                return self
            except AgentStartError as exc:
                lost_port = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EADDRINUSE
                if not lost_port or self._port_given or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        try:
            config = self.config()
        except ValueError as exc:
            raise AgentStartError(f"{self.name}: bad settings {self.extra_args}: {exc}") from exc
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n==== start {self.starts} at {time.strftime('%H:%M:%S')}: in-process {self.extra_args}\n")
        self._attach_log(config.log_level)
        self._ready.clear()
        self._error = None
        self.agent = None
        with _running_lock:
            _running.add(self)
        self._thread = threading.Thread(target=self._thread_main, args=(config,), name=f"agent-{self.name}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self._request_stop()
            self._finish(self.stop_grace)
            raise AgentStartError(f"{self.name} not ready after {self.start_timeout:.0f}s\n{self.log_tail()}")
        if self._error is not None:
            error = self._error
            self._finish(self.stop_grace)
            raise AgentStartError(f"{self.name} failed to start: {error!r}\n{self.log_tail()}") from error

    def _thread_main(self, config: AgentConfig) -> None:
        _current.set(self)  # asyncio.run copies this thread's context into the loop's tasks
        try:
            asyncio.run(self._main(config))
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread, or at stop()
            if self._error is None:
                self._error = exc
        finally:
            self._ready.set()

    async def _main(self, config: AgentConfig) -> None:
        from agent.daemon import running

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running(config) as agent:
            self.agent = agent
            self._ready.set()
            await self._stop.wait()

    def _request_stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)

    def _finish(self, grace: float) -> None:
        """Wait for the thread (the agent's shutdown), then detach its log."""
        thread = self._thread
        if thread is not None:
            thread.join(grace)
            if thread.is_alive():
                raise RuntimeError(f"{self.name} did not shut down within {grace:.0f}s\n{self.log_tail()}")
        self._thread = None
        self._loop = self._stop = None
        self.agent = None
        with _running_lock:
            _running.discard(self)
            last = not _running
        self._detach_log()
        if last:  # the levels this process had, so the rest of the test run logs as before
            for name, level in _saved_levels.items():
                logging.getLogger(name).setLevel(level)
            _saved_levels.clear()
        gc.unfreeze()  # the agent's warm-up froze what existed then; let this process collect it again

    def stop(self, grace: float | None = None) -> None:
        """Leave ``running()`` (the agent's own orderly shutdown) and wait for it; raises if it does not end."""
        if self._thread is None:
            return
        self._request_stop()
        self._finish(self.stop_grace if grace is None else grace)

    def restart(self) -> InProcessAgent:
        """Stop gracefully and start again on the same dirs, socket and port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the agent and remove the short socket dir this object made (if any); idempotent."""
        self.stop()
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _attach_log(self, level_name: str) -> None:
        self._detach_log()
        level = logging.getLevelName(level_name)
        self._handler = _AgentLogHandler(self, level)
        logging.getLogger().addHandler(self._handler)
        for name in ("agent", "client"):  # as basicConfig(level=...) in `agent serve` lets them through
            logger = logging.getLogger(name)
            _saved_levels.setdefault(name, logger.level)
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)

    def _detach_log(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None

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

        ``env`` adds to / overrides this process's environment for this one command.
        With ``check`` a non-zero exit raises :class:`AgentCliError`.
        """
        run_env = {**self.env, **(env or {}), "WARMSTART_SOCKET": str(self.socket_path)}
        cmd = [sys.executable, "-m", "agent", *args]
        done = subprocess.run(
            cmd, env=run_env, check=False, capture_output=True, text=True, timeout=timeout, input=input,
            cwd=self.workdir, stdin=None if input is not None else subprocess.DEVNULL,
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
