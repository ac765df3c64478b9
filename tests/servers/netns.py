"""A throwaway network namespace for tests that need addresses and names of their own.

Why: ``--peer-dns NAME`` resolves a name to several addresses, one per agent,
and every agent must bind its own address with the same port. Inside a network
namespace of its own a test can put any addresses on ``lo`` and give the name
its own ``/etc/hosts`` (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts``
over ``/etc/hosts``), without touching the machine's network: the root
namespace gets no link, address or route, and nothing is left behind (the
namespace and its ``/etc/netns`` directory are removed on close, whatever
happened).

Processes run inside with :meth:`Netns.exec_prefix`. A server in this process
can still be reached from inside: :meth:`Netns.listen_socket` makes a
listening socket in the namespace (from a short-lived thread that enters it
with ``setns``; the socket stays in the namespace it was made in, the process
does not move), and e.g. a :class:`tests.servers.relay.TcpRelay` serving on it
connects upstream from this process's own namespace.

Needs root and ``ip`` (iproute2); :func:`unavailable` says why not when it cannot
work. This module must not import pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")


def unavailable() -> str | None:
    """Why a namespace cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


class Netns:
    """``ip netns add wst<hex>``, ``lo`` up with ``addresses`` (/32), and ``hosts`` as its /etc/hosts.

    ``hosts`` maps a name to its addresses (several lines per name: getaddrinfo
    returns them all). Use as a context manager; :meth:`close` is idempotent.
    """

    def __init__(self, addresses: Iterable[str], hosts: dict[str, list[str]] | None = None) -> None:
        self.name = f"wst{secrets.token_hex(3)}"  # never the benchmark's wsb* namespaces
        self.addresses = list(addresses)
        self.hosts = hosts or {}
        self._made_etc_dir = False
        self._added = False

    def __enter__(self) -> Netns:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def etc_dir(self) -> Path:
        return NETNS_ETC_DIR / self.name

    def open(self) -> None:
        if self.hosts:
            self._made_etc_dir = not NETNS_ETC_DIR.exists()
            self.etc_dir.mkdir(parents=True)
            lines = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, addrs in self.hosts.items() for a in addrs]
            (self.etc_dir / "hosts").write_text("\n".join(lines) + "\n")
        _ip("netns", "add", self.name)
        self._added = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        for addr in self.addresses:
            _ip("-n", self.name, "addr", "add", f"{addr}/32", "dev", "lo")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=20)
        return [int(p) for p in done.stdout.split()]

    def listen_socket(self, host: str, port: int = 0, backlog: int = 256) -> socket.socket:
        """A TCP socket listening on ``host:port`` inside the namespace (usable from any thread here)."""
        result: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(NETNS_RUN_DIR / self.name, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:  # this thread only; it ends right after
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns: {os.strerror(err)}")
                finally:
                    os.close(fd)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
                result.append(sock)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread, which raises it)
                result.append(exc)

        t = threading.Thread(target=inside, name=f"setns-{self.name}")
        t.start()
        t.join(timeout=20)
        if not result:
            raise OSError(f"could not make a socket in {self.name} in time")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def close(self) -> None:
        """Kill what still runs inside, delete the namespace and its /etc/netns directory."""
        if self._added:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _ip("netns", "del", self.name)
            self._added = False
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        if self._made_etc_dir:
            with contextlib.suppress(OSError):
                NETNS_ETC_DIR.rmdir()  # only if empty: someone else may have made one since
            self._made_etc_dir = False
