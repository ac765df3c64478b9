"""HTTP/1.1 + JSON to the node agent over its Unix socket, with the standard library only.

Inference images install the client beside torch and nothing else, so this
cannot use aiohttp or requests; ``http.client`` with a connection class that
dials an ``AF_UNIX`` socket is enough for a handful of small control calls.
The agent's `agent` CLI speaks through this module too.

Every call opens its own connection and closes it when done: the calls are
few and a Unix connect costs microseconds, while a kept-alive connection
would need liveness handling for nothing.

Nothing may hang forever. The socket timeout bounds the connect and every
read; long operations are NDJSON streams in which the agent sends a line at
least every second, so ``timeout`` seconds without a single byte means the
agent is gone, and that is reported as :class:`AgentUnavailableError`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

from client.errors import AgentUnavailableError, WarmstartError, error_from_wire

DEFAULT_SOCKET = "/run/warmstart/agent.sock"
SOCKET_ENV = "WARMSTART_SOCKET"
# Seconds without any byte from the agent before we call it dead. The agent
# sends a progress line at least every second while it works.
DEFAULT_TIMEOUT = 60.0
# One NDJSON line (the `complete` line of a large model lists every file) or error body.
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_ERROR_BODY = 1024 * 1024


def default_socket_path() -> str:
    """The socket to dial when none is given: ``$WARMSTART_SOCKET`` (read now, not at import) or the default."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is a Unix stream socket; the Host header says ``localhost``."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class NDJSONStream(Iterator[dict[str, Any]]):
    """The lines of one streamed answer, parsed; closes its connection when exhausted, on error or on ``close()``.

    Iterating raises the typed error of an ``{"event": "error"}`` line, and
    :class:`AgentUnavailableError` when the agent goes silent for longer than
    the timeout or the connection breaks. Use it as a context manager (or call
    ``close()``) when you stop reading before the end.
    """

    def __init__(self, conn: _UnixHTTPConnection, response: http.client.HTTPResponse, where: str) -> None:
        self._conn: _UnixHTTPConnection | None = conn
        self._response = response
        self._where = where

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._conn is None:
            raise StopIteration
        try:
            while True:
                raw = _guard(self._response.readline, MAX_LINE_BYTES + 1, where=self._where)
                if not raw:
                    self.close()
                    raise StopIteration
                if len(raw) > MAX_LINE_BYTES:
                    raise WarmstartError(f"{self._where}: a streamed line is longer than {MAX_LINE_BYTES} bytes")
                if raw.strip():
                    break
            line = _parse_object(raw, self._where)
            if line.get("event") == "error":
                raise error_from_wire(line)
            return line
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._response.close()
            conn.close()

    def abort(self) -> None:
        """Break the connection from another thread (wakes a reader blocked on it)."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AgentConnection:
    """Talks to the agent on ``socket_path`` (default ``$WARMSTART_SOCKET`` or ``/run/warmstart/agent.sock``).

    ``timeout`` is how many seconds of silence from the agent (connecting, or
    between any two bytes of an answer) make it count as unavailable.
    """

    def __init__(self, socket_path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.socket_path = socket_path or default_socket_path()
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"AgentConnection({self.socket_path!r}, timeout={self.timeout})"

    def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request, one JSON object back; a non-2xx answer raises its typed error."""
        conn, response, where = self._send(method, path, body)
        try:
            data = _guard(response.read, where=where)
        finally:
            response.close()
            conn.close()
        return _parse_object(data, where)

    def stream(self, method: str, path: str, body: dict[str, Any] | None = None) -> NDJSONStream:
        """Send a request whose answer is NDJSON; return an iterator over its parsed lines.

        The request is sent and the status checked before this returns, so an
        absent agent or a refused request raises here, not at the first line.
        """
        conn, response, where = self._send(method, path, body)
        return NDJSONStream(conn, response, where)

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[_UnixHTTPConnection, http.client.HTTPResponse, str]:
        where = f"agent at {self.socket_path} ({method} {path})"
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json, application/x-ndjson", "Connection": "close"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = self._connect()
        try:
            _guard(conn.request, method, path, body=payload, headers=headers, where=where)
            response = _check_status(conn, where)
        except BaseException:
            conn.close()
            raise
        return conn, response, where

    def send_file(
        self, method: str, path: str, f: BinaryIO, size: int, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Send ``size`` bytes of file ``f`` (from its current offset) as the body; one JSON object back.

        The body goes with ``socket.sendfile`` (the kernel copies file to
        socket, no Python buffers), so a bundle of GBs costs no client memory.
        """
        where = f"agent at {self.socket_path} ({method} {path})"
        conn = self._connect()
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in {"Accept": "application/json", "Connection": "close",
                                "Content-Type": "application/octet-stream", "Content-Length": str(size),
                                **(headers or {})}.items():
                conn.putheader(name, value)
            _guard(conn.endheaders, where=where)
            assert conn.sock is not None
            try:
                sent = _guard(conn.sock.sendfile, f, f.tell(), size, where=where)
            except AgentUnavailableError:
                _check_status(conn, where)  # the agent refused mid-body (capacity, ...): raise its own error
                raise
            if sent != size:
                raise WarmstartError(f"{where}: sent {sent} of {size} bytes (the file shrank?)")
            response = _check_status(conn, where)
            data = _guard(response.read, where=where)
            response.close()
        finally:
            conn.close()
        return _parse_object(data, where)

    def _connect(self) -> _UnixHTTPConnection:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise AgentUnavailableError(
                f"no warmstart agent is listening on {self.socket_path} ({exc.strerror or exc});"
                f" start one with `agent serve`, or set {SOCKET_ENV} to the agent's socket"
            ) from None
        except TimeoutError:
            raise AgentUnavailableError(
                f"connecting to the warmstart agent on {self.socket_path} timed out after {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise AgentUnavailableError(
                f"cannot connect to the warmstart agent on {self.socket_path}: {exc.strerror or exc};"
                f" check `agent serve` is running and {SOCKET_ENV}"
            ) from None
        return conn


def _check_status(conn: _UnixHTTPConnection, where: str) -> http.client.HTTPResponse:
    """The response's head; a non-2xx answer raises its typed error."""
    response = _guard(conn.getresponse, where=where)
    if not 200 <= response.status < 300:
        raw = _guard(response.read, MAX_ERROR_BODY, where=where)
        raise _error_from_response(response.status, response.reason, raw, where)
    return response


T = TypeVar("T")


# (a ParamSpec cannot type this: the keyword-only `where` sits between *args and **kwargs)
def _guard(fn: Callable[..., T], *args: Any, where: str, **kwargs: Any) -> T:
    """Call a socket/HTTP operation; silence past the timeout or a broken connection become AgentUnavailableError."""
    try:
        return fn(*args, **kwargs)
    except TimeoutError:
        raise AgentUnavailableError(
            f"{where}: no answer within the timeout; the agent is hung or gone"
        ) from None
    except (http.client.HTTPException, OSError) as exc:
        raise AgentUnavailableError(
            f"{where}: connection broke ({type(exc).__name__}: {exc}); is the agent still running?"
        ) from None


def _parse_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise WarmstartError(f"{where}: answer is not JSON: {raw[:200]!r}") from None
    if not isinstance(obj, dict):
        raise WarmstartError(f"{where}: answer is not a JSON object: {raw[:200]!r}")
    return obj


def _error_from_response(status: int, reason: str, raw: bytes, where: str) -> WarmstartError:
    """The typed error of a non-2xx answer; a body that is not the documented shape still names the status."""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return error_from_wire(payload)
    return WarmstartError(f"{where}: HTTP {status} {reason}: {raw[:200]!r}")
