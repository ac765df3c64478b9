"""What a new user runs into in the first hour, against real agent processes.

Separate processes are the point here: a second agent on the same cache, the
exit status and the one line it prints, what the agent's own log says when a
request fails or a client goes away, and the socket's mode as the process
creates it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.daemon import running
from tests.conftest import AgentFactory
from tests.servers.ports import free_port


def test_a_second_agent_on_the_same_cache_exits_at_once_naming_the_first(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    first = agent_factory("first")
    other_socket = tmp_path / "second.sock"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--cache-dir", str(first.cache_dir), "--socket", str(other_socket),
         "--listen", f"127.0.0.1:{free_port()}", "--capacity", "1GiB"],
        capture_output=True, text=True, timeout=60, env=first.env,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"pid {first.pid}" in lines[0] and str(first.socket_path) in lines[0], lines[0]
    assert not other_socket.exists()
    assert first.cli("ls", check=True).returncode == 0  # the first one still serves


def test_a_failed_request_is_logged_once_with_its_model_and_a_client_going_away_is_not_an_error(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    agent = agent_factory()
    missing = tmp_path / "no-such-model"
    assert agent.cli("prefetch", str(missing)).returncode == 1
    big = tmp_path / "big"
    big.mkdir()
    (big / "w.bin").write_bytes(os.urandom(256 * 1024 * 1024))
    # A client that asks for a prefetch and hangs up after the first line.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.socket_path))
        body = json.dumps({"ref": str(big)}).encode()
        s.sendall(b"POST /v1/prefetch HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        s.settimeout(30)
        got = b""
        while b"resolved" not in got and len(got) < 65536:  # the head, then the first line
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    deadline = time.monotonic() + 60  # the fetch goes on for whoever asks next: wait for it to finish
    while time.monotonic() < deadline and not _cached(agent.cli("ls", "--json", check=True).stdout, str(big)):
        time.sleep(0.2)
    assert _cached(agent.cli("ls", "--json", check=True).stdout, str(big))
    log = agent.log_text()
    failures = [line for line in log.splitlines() if str(missing) in line and "failed" in line]
    assert len(failures) == 1, log[-3000:]
    assert "not_found" in failures[0] and "INFO" in failures[0]
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def _cached(listing: str, ref: str) -> bool:
    return any(m["ref"] == ref and m["cached_bytes"] == m["total_size"] for m in json.loads(listing)["models"])


async def test_the_socket_never_has_a_wider_mode_than_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With umask 000 and no chmod after bind, the socket is already as narrow as --socket-mode."""
    import agent.daemon as daemon

    class NoChmod:
        @staticmethod
        def chmod(path: str, mode: int) -> None:  # the daemon's chmod after bind, made a no-op
            pass

        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

    monkeypatch.setattr(daemon, "os", NoChmod())
    old = os.umask(0)
    try:
        config = AgentConfig(cache_dir=str(tmp_path / "cache"), socket=str(tmp_path / "a.sock"),
                             listen=f"127.0.0.1:{free_port()}", capacity=1 << 30, socket_mode=0o600)
        async with running(config):
            mode = stat.S_IMODE(os.stat(config.socket).st_mode)
    finally:
        os.umask(old)
    assert mode == 0o600, oct(mode)
    await asyncio.sleep(0)
