"""A forward HTTP proxy for tests: CONNECT tunnels and absolute-form requests.

Why: clusters reach S3 and the Hugging Face hub through ``HTTPS_PROXY``; the
range client must go through one the way boto3 and huggingface_hub do. This
proxy runs in the test's event loop on loopback, records every tunnel and
forwarded request, and can require Basic credentials (407 otherwise). After the
first request of a connection it only pipes bytes, so a kept-alive connection's
later absolute-form requests go to the same target as they are (HTTP/1.1 servers
accept absolute form).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from urllib.parse import urlsplit


class HttpProxy:
    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.auth = None if user is None else "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.tunnels: list[str] = []  # CONNECT targets
        self.forwarded: list[str] = []  # absolute-form targets of first requests
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            given = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if self.auth is not None and given.get("proxy-authorization") != self.auth:
                self.refused += 1
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                self.tunnels.append(target)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
                self.forwarded.append(target)
                up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
