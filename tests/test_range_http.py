"""The range client (agent/origins/range_http.py) against a real HTTP server on loopback.

The agent's end-to-end tests fetch through it from SeaweedFS and the Hugging Face
endpoint (tests/test_agent_e2e.py, tests/test_reliability_faults.py); these cover
what those servers never do: redirects (the hub's CDN), TLS, an idle connection
closed by the server, bodies that are not a plain Content-Length range, a sink
slower than the network, header injection, and proxies (HTTPS_PROXY's CONNECT
tunnel, HTTP_PROXY's absolute form, credentials, NO_PROXY).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from agent.errors import TransientOriginError
from agent.origins.policy import AddressPolicy
from agent.origins.range_http import BUFFERS_PER_CONNECTION, MAX_REDIRECTS, SPARE_BUFFERS, RangeClient
from client.errors import FetchFailedError
from tests.servers.http_proxy import HttpProxy

DATA = os.urandom(5 * 1024 * 1024 + 123)


@dataclass
class Server:
    url: str
    other_url: str  # the same server under another host name: another origin
    auth_seen: list[str | None] = field(default_factory=list)
    peers: set[int] = field(default_factory=set)  # client ports that sent requests


SERVER: web.AppKey[Server] = web.AppKey("server", Server)


def _range(request: web.Request) -> tuple[int, int]:
    spec = request.headers["Range"].removeprefix("bytes=")
    start, end = (int(x) for x in spec.split("-"))
    return start, end


async def _blob(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    server.auth_seen.append(request.headers.get("Authorization"))
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer:
        server.peers.add(peer[1])
    start, end = _range(request)
    return web.Response(
        status=206,
        body=DATA[start : end + 1],
        headers={"Content-Range": f"bytes {start}-{end}/{len(DATA)}"},
    )


async def _chunked(request: web.Request) -> web.StreamResponse:
    start, end = _range(request)
    resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {start}-{end}/{len(DATA)}"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(DATA[start : end + 1])
    await resp.write_eof()
    return resp


async def _wrong_range(request: web.Request) -> web.StreamResponse:
    start, end = _range(request)
    return web.Response(
        status=206, body=DATA[: end - start + 1], headers={"Content-Range": f"bytes 0-{end - start}/{len(DATA)}"}
    )


def _app(server: Server) -> web.Application:
    app = web.Application()
    app[SERVER] = server
    app.router.add_get("/blob", _blob)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/wrong-range", _wrong_range)
    app.router.add_get("/same", lambda r: web.HTTPFound("/blob"))  # type: ignore[arg-type,return-value]
    app.router.add_get("/other", lambda r: web.HTTPFound(f"{server.other_url}/blob"))  # type: ignore[arg-type,return-value]
    app.router.add_get("/loop", lambda r: web.HTTPFound("/loop"))  # type: ignore[arg-type,return-value]
    app.router.add_get("/gone", lambda r: web.HTTPNotFound(text="<Error>NoSuchKey</Error>"))  # type: ignore[arg-type,return-value]
    return app


async def _serve(tls: ssl.SSLContext | None = None, keepalive: float = 75.0) -> tuple[web.AppRunner, Server]:
    server = Server(url="", other_url="")
    runner = web.AppRunner(_app(server), keepalive_timeout=keepalive)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if tls else "http"
    server.url, server.other_url = f"{scheme}://127.0.0.1:{port}", f"{scheme}://localhost:{port}"
    return runner, server


@pytest.fixture
async def http() -> AsyncIterator[Server]:
    runner, server = await _serve()
    yield server
    await runner.cleanup()


class Collect:
    """A sink that copies what it is given (the buffers are reused after it returns)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.data = bytearray()
        self.calls = 0
        self.delay = delay

    async def __call__(self, chunks: Sequence[bytes | memoryview]) -> None:
        self.calls += 1
        for c in chunks:
            self.data += c
        if self.delay:
            await asyncio.sleep(self.delay)


async def _get(
    client: RangeClient, url: str, offset: int, length: int, headers: dict[str, str] | None = None
) -> Collect:
    sink = Collect()
    head = await client.get_range(url, headers or {}, offset, length, sink, what="w.bin")
    assert head.status == 206
    return sink


async def test_ranges_arrive_exactly_over_kept_alive_connections(http: Server) -> None:
    client = RangeClient(read_timeout=5)
    try:
        pieces = [(o, min(1 << 20, len(DATA) - o)) for o in range(0, len(DATA), 1 << 20)]
        for offset, length in pieces:  # one after another: every request reuses the one connection
            assert (await _get(client, f"{http.url}/blob", offset, length)).data == DATA[offset : offset + length]
        assert len(http.peers) == 1
        got = await asyncio.gather(*(_get(client, f"{http.url}/blob", o, n) for o, n in pieces))
        assert b"".join(bytes(s.data) for s in got) == DATA
        assert len(http.peers) <= 1 + len(pieces)
    finally:
        await client.close()


async def test_redirects_are_followed_and_authorization_stays_with_its_origin(http: Server) -> None:
    # The "CDN" here is localhost: allowed explicitly (the address policy itself: tests/test_redirects.py).
    client = RangeClient(read_timeout=5, policy=AddressPolicy(allow_private=True))
    try:
        auth = {"Authorization": "Bearer hf_secret"}
        assert (await _get(client, f"{http.url}/same", 10, 100, auth)).data == DATA[10:110]
        assert (await _get(client, f"{http.url}/other", 10, 100, auth)).data == DATA[10:110]
        assert http.auth_seen == ["Bearer hf_secret", None]  # the CDN never sees the hub token
        with pytest.raises(FetchFailedError, match=f"more than {MAX_REDIRECTS} redirects"):
            await _get(client, f"{http.url}/loop", 0, 10)
    finally:
        await client.close()


async def test_error_status_comes_back_with_its_reason_and_the_client_carries_on(http: Server) -> None:
    client = RangeClient(read_timeout=5)
    try:
        head = await client.get_range(f"{http.url}/gone", {}, 0, 10, Collect(), what="w.bin")
        assert head.status == 404 and "NoSuchKey" in head.reason
        assert (await _get(client, f"{http.url}/blob", 0, 10)).data == DATA[:10]
    finally:
        await client.close()


async def test_bodies_that_are_not_the_range_are_refused(http: Server) -> None:
    client = RangeClient(read_timeout=5)
    try:
        with pytest.raises(FetchFailedError, match="without a Content-Length"):
            await _get(client, f"{http.url}/chunked", 0, 1000)
        with pytest.raises(TransientOriginError, match="unexpected Content-Range"):
            await _get(client, f"{http.url}/wrong-range", 1000, 1000)
        with pytest.raises(FetchFailedError, match="refusing to send header"):
            await _get(client, f"{http.url}/blob", 0, 10, {"X-Evil": "a\r\nHost: elsewhere"})
        assert (await _get(client, f"{http.url}/blob", 0, 10)).data == DATA[:10]
    finally:
        await client.close()


async def test_a_slow_sink_holds_the_connection_to_a_few_buffers(http: Server) -> None:
    """The socket is read only as fast as the sink takes buffers: memory stays bounded, and the
    buffers are reused by the next answer (new ones would be fresh memory, page-faulting)."""
    client = RangeClient(read_timeout=5)
    try:
        sink = Collect(delay=0.02)
        head = await client.get_range(f"{http.url}/blob", {}, 0, len(DATA), sink, what="w.bin")
        assert head.status == 206 and sink.data == DATA
        (conn,) = [c for idle in client._idle.values() for c in idle]
        assert conn.held == 0  # an idle connection holds no buffers: they went back to the pool
        assert 1 < len(client.buffers._spare) <= BUFFERS_PER_CONNECTION  # read ahead, but only so far
        spare = list(client.buffers._spare)
        await client.get_range(f"{http.url}/blob", {}, 0, len(DATA), Collect(), what="w.bin")
        assert {id(b) for b in client.buffers._spare} <= {id(b) for b in spare}  # reused, none new
    finally:
        await client.close()


async def test_buffers_reserved_at_start_serve_the_first_answers(http: Server) -> None:
    """The agent reserves body buffers while it starts: the first cold miss allocates none."""
    client = RangeClient(read_timeout=5)
    try:
        client.buffers.reserve(2 * BUFFERS_PER_CONNECTION)
        reserved = {id(b) for b in client.buffers._spare}
        assert len(reserved) == 2 * BUFFERS_PER_CONNECTION
        client.buffers.reserve(SPARE_BUFFERS + 10)
        assert len(client.buffers._spare) == SPARE_BUFFERS  # never more than the pool keeps
        reserved = {id(b) for b in client.buffers._spare}
        sinks = [Collect(delay=0.01), Collect(delay=0.01)]
        await asyncio.gather(
            *(client.get_range(f"{http.url}/blob", {}, 0, len(DATA), s, what="w.bin") for s in sinks)
        )
        assert all(s.data == DATA for s in sinks)
        assert {id(b) for b in client.buffers._spare} == reserved  # the same buffers, back in the pool
    finally:
        await client.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    runner, server = await _serve(keepalive=0.2)
    client = RangeClient(read_timeout=5)
    try:
        assert (await _get(client, f"{server.url}/blob", 0, 100)).data == DATA[:100]
        await asyncio.sleep(0.6)  # the server drops the kept-alive connection meanwhile
        assert (await _get(client, f"{server.url}/blob", 100, 100)).data == DATA[100:200]
        assert len(server.peers) == 2
    finally:
        await client.close()
        await runner.cleanup()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return cert, key


async def test_tls_uses_the_trust_store_and_refuses_an_unknown_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner, server = await _serve(tls)
    try:
        untrusting = RangeClient(read_timeout=5)
        with pytest.raises(FetchFailedError, match=r"TLS certificate of 127.0.0.1 is not trusted"):
            await _get(untrusting, f"{server.url}/blob", 0, 10)
        await untrusting.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how a cluster adds its own CA
        client = RangeClient(read_timeout=5)
        try:
            assert (await _get(client, f"{server.url}/blob", 0, len(DATA))).data == DATA
        finally:
            await client.close()
    finally:
        await runner.cleanup()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[HttpProxy, str]]:
    p = HttpProxy(user="ws", password="s3cret:/")
    url = await p.start()
    yield p, url
    await p.close()


def _with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{quote(user, safe='')}:{quote(password, safe='')}@")


async def test_https_goes_through_a_connect_tunnel_of_https_proxy(
    certificate: tuple[Path, Path], proxy: tuple[HttpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner, server = await _serve(tls)
    p, url = proxy
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        monkeypatch.setenv("HTTPS_PROXY", _with_credentials(url, "ws", "wrong"))
        client = RangeClient(read_timeout=5)
        with pytest.raises(FetchFailedError, match=r"refused a tunnel .* check the proxy's credentials"):
            await _get(client, f"{server.url}/blob", 0, 10)
        await client.close()
        assert p.refused == 1 and not p.tunnels

        monkeypatch.setenv("HTTPS_PROXY", _with_credentials(url, "ws", "s3cret:/"))
        client = RangeClient(read_timeout=5)
        try:
            for offset in (0, 1 << 20, 2 << 20):  # one tunnel, kept alive
                got = await _get(client, f"{server.url}/blob", offset, 1 << 20)
                assert got.data == DATA[offset : offset + (1 << 20)]
        finally:
            await client.close()
        assert p.tunnels == [server.url.removeprefix("https://")]
    finally:
        await runner.cleanup()


async def test_http_goes_through_http_proxy_unless_no_proxy_names_the_host(
    http: Server, proxy: tuple[HttpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, url = proxy
    monkeypatch.setenv("HTTP_PROXY", _with_credentials(url, "ws", "s3cret:/"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = RangeClient(read_timeout=5)
    try:
        assert (await _get(client, f"{http.url}/blob", 5, 100)).data == DATA[5:105]
        assert p.forwarded == [f"{http.url}/blob"]
    finally:
        await client.close()
    monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
    client = RangeClient(read_timeout=5)
    try:
        assert (await _get(client, f"{http.url}/blob", 5, 100)).data == DATA[5:105]
        assert len(p.forwarded) == 1  # straight to the server
    finally:
        await client.close()
