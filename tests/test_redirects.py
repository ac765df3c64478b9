"""Requests go only where they should (agent/origins/policy.py), against real servers on loopback.

The trusted origin listens on 127.0.0.1; the "internal" targets on 127.0.0.2 and
127.0.0.3, which the tests' policy counts as non-public (``refused``), so a
trusted first hop and a refused redirect target both live on 127.0.0.0/8. The
default policy (every loopback address refused) is used where a host *name*
must be judged on what it resolves to (``localhost``).

Covered: redirects of the range client and of the https origin's HEAD never
go from https to http nor to a refused address (and do with ``allow_private``);
a peer's prefetch and piece requests naming a non-public https host are
refused; failures that go back to a peer name no port and read the same for
an open and a closed port; pieces of files without a whole-file digest are
not served to peers.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.api.node import Readiness, node_app
from agent.api.peer import PeerState
from agent.artifacts.index import ArtifactIndex
from agent.artifacts.lookup import Artifacts
from agent.config import MIN_PIECE_SIZE
from agent.fetch.fetcher import Fetcher
from agent.manifest import FileEntry
from agent.metrics import Metrics
from agent.origins import AddressPolicy, AddressRefusedError, Origins
from agent.origins.http import PlainHttpOrigin
from agent.origins.range_http import RangeClient
from agent.refs import parse_ref
from agent.service import ModelService
from agent.store.store import Store
from tests.servers.ports import free_port

DATA = bytes(range(256)) * 4096  # 1 MiB
TOKEN = "peer-token-for-redirect-tests-0123"
# 127.0.0.1 is the trusted origin; 127.0.0.2 and 127.0.0.3 stand for internal services.
INTERNAL = (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("127.0.0.3/32"))
TESTS = AddressPolicy(refused=INTERNAL)


@dataclass
class Server:
    url: str = ""
    seen: list[str] = field(default_factory=list)  # "METHOD path Host" of every request that arrived


SERVER: web.AppKey[Server] = web.AppKey("server", Server)


async def _file(request: web.Request) -> web.StreamResponse:
    request.app[SERVER].seen.append(f"{request.method} {request.path} {request.host}")
    headers = {"ETag": '"v1"', "Accept-Ranges": "bytes"}
    if "Range" not in request.headers:
        return web.Response(body=DATA, headers=headers)
    start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
    headers["Content-Range"] = f"bytes {start}-{end}/{len(DATA)}"
    return web.Response(status=206, body=DATA[start : end + 1], headers=headers)


async def _redirect(request: web.Request) -> web.StreamResponse:
    request.app[SERVER].seen.append(f"{request.method} {request.path} {request.host}")
    m = request.match_info
    raise web.HTTPFound(f"{m['scheme']}://{m['where']}/{m['rest']}")


async def _serve(host: str, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, Server]:
    server = Server()
    app = web.Application()
    app[SERVER] = server
    app.router.add_route("*", "/file/{name}", _file)
    app.router.add_route("*", "/redirect/{scheme}/{where}/{rest:.*}", _redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 0, ssl_context=tls).start()
    server.url = f"{'https' if tls else 'http'}://{host}:{runner.addresses[0][1]}"
    return runner, server


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return cert, key


@pytest.fixture
async def servers(certificate: tuple[Path, Path]) -> AsyncIterator[dict[str, Server]]:
    """http and https servers on 127.0.0.1 (trusted), 127.0.0.2 and 127.0.0.3 (internal), one certificate."""
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runners, found = [], {"cert": Server(url=str(cert))}
    for name, host, ctx in (
        ("http", "127.0.0.1", None), ("https", "127.0.0.1", tls),
        ("internal", "127.0.0.2", None), ("internal_tls", "127.0.0.3", tls),
    ):  # fmt: skip
        runner, server = await _serve(host, ctx)
        runners.append(runner)
        found[name] = server
    yield found
    for runner in runners:
        await runner.cleanup()


def _trusting(servers: dict[str, Server]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=servers["cert"].url)


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    async def __call__(self, chunks: Sequence[bytes | memoryview]) -> None:
        for c in chunks:
            self.data += c


async def _range(client: RangeClient, url: str) -> bytes:
    sink = Collect()
    head = await client.get_range(url, {}, 0, 1000, sink, what="w.bin")
    assert head.status == 206
    return bytes(sink.data)


def _via(server: Server, target: str) -> str:
    """A URL of ``server`` that redirects to the absolute URL ``target``."""
    scheme, rest = target.split("://", 1)
    return f"{server.url}/redirect/{scheme}/{rest}"


# -- the range client ---------------------------------------------------------------------


async def test_range_redirect_never_goes_from_https_to_http(
    servers: dict[str, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", servers["cert"].url)
    client = RangeClient(read_timeout=5, policy=AddressPolicy(allow_private=True))  # even when all else is allowed
    try:
        with pytest.raises(AddressRefusedError, match="from https to plain http"):
            await _range(client, _via(servers["https"], f"{servers['http'].url}/file/m.bin"))
        assert servers["http"].seen == []
        assert await _range(client, _via(servers["https"], f"{servers['internal_tls'].url}/file/m.bin")) == DATA[:1000]
    finally:
        await client.close()


async def test_range_redirect_to_a_refused_address_is_not_followed(servers: dict[str, Server]) -> None:
    trusted, internal = servers["http"], servers["internal"]
    client = RangeClient(read_timeout=5, policy=TESTS)
    try:
        # The first hop is the operator's endpoint: trusted even on a refused address, and kept alive.
        assert await _range(client, f"{internal.url}/file/m.bin") == DATA[:1000]
        assert await _range(client, _via(trusted, f"{trusted.url}/file/m.bin")) == DATA[:1000]  # same origin: followed
        internal.seen.clear()
        with pytest.raises(AddressRefusedError, match=r"127.0.0.2 is not a public address") as refused:
            await _range(client, _via(trusted, f"{internal.url}/file/m.bin"))
        assert internal.seen == []  # not even over the kept-alive connection
        assert internal.url.rsplit(":", 1)[1] not in str(refused.value)
    finally:
        await client.close()
    allowing = RangeClient(read_timeout=5, policy=AddressPolicy(allow_private=True, refused=INTERNAL))
    try:
        assert await _range(allowing, _via(trusted, f"{internal.url}/file/m.bin")) == DATA[:1000]
    finally:
        await allowing.close()


async def test_range_redirect_is_judged_on_the_address_a_name_resolves_to(servers: dict[str, Server]) -> None:
    """``localhost`` is only a name: it resolves to loopback, which the default policy refuses."""
    trusted = servers["http"]
    port = trusted.url.rsplit(":", 1)[1]
    client = RangeClient(read_timeout=5)  # the agent's default: every non-public address refused
    try:
        assert await _range(client, f"{trusted.url}/file/m.bin") == DATA[:1000]  # the trusted first hop
        trusted.seen.clear()
        with pytest.raises(AddressRefusedError, match="localhost is not a public address"):
            await _range(client, _via(trusted, f"http://localhost:{port}/file/m.bin"))
        assert [s for s in trusted.seen if s.startswith("GET /file")] == []
    finally:
        await client.close()


async def test_a_refused_redirect_reads_the_same_for_an_open_and_a_closed_port(servers: dict[str, Server]) -> None:
    trusted, internal = servers["http"], servers["internal"]
    closed = free_port(host="127.0.0.2")
    client = RangeClient(read_timeout=5, policy=TESTS)
    messages = []
    try:
        for target in (f"{internal.url}/file/m.bin", f"http://127.0.0.2:{closed}/file/m.bin"):
            with pytest.raises(AddressRefusedError) as refused:
                await _range(client, _via(trusted, target))
            messages.append(str(refused.value))
    finally:
        await client.close()
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert str(closed) not in messages[1] and internal.url.rsplit(":", 1)[1] not in messages[0]


async def test_a_failed_connect_names_no_port_and_no_errno(servers: dict[str, Server]) -> None:
    closed = free_port(host="127.0.0.2")
    client = RangeClient(read_timeout=5, policy=AddressPolicy(allow_private=True))
    try:
        with pytest.raises(Exception) as failed:
            await _range(client, _via(servers["http"], f"http://127.0.0.2:{closed}/file/m.bin"))
    finally:
        await client.close()
    message = str(failed.value)
    assert "cannot connect to http://127.0.0.2" in message
    assert str(closed) not in message and "refused" not in message.lower() and "errno" not in message.lower()


# -- the https origin's HEAD ----------------------------------------------------------------


async def _resolve(servers: dict[str, Server], url: str, policy: AddressPolicy) -> FileEntry:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_trusting(servers))) as session:
        origin = PlainHttpOrigin(session, RangeClient(read_timeout=5, policy=policy), policy)
        manifest = await origin.resolve(parse_ref(url))
        return manifest.files[0]


async def test_head_redirect_never_goes_from_https_to_http(servers: dict[str, Server]) -> None:
    with pytest.raises(AddressRefusedError, match="from https to plain http"):
        await _resolve(
            servers, _via(servers["https"], f"{servers['http'].url}/file/m.bin"), AddressPolicy(allow_private=True)
        )
    assert servers["http"].seen == []


async def test_head_redirect_to_a_refused_address_is_not_followed(servers: dict[str, Server]) -> None:
    https, internal_tls = servers["https"], servers["internal_tls"]
    target = f"{internal_tls.url}/file/m.bin"
    with pytest.raises(AddressRefusedError, match=r"127.0.0.3 is not a public address"):
        await _resolve(servers, _via(https, target), TESTS)
    with pytest.raises(AddressRefusedError, match="localhost is not a public address"):
        await _resolve(servers, _via(https, f"https://localhost:{internal_tls.url.rsplit(':', 1)[1]}/file/m.bin"),
                       AddressPolicy())  # fmt: skip
    assert internal_tls.seen == []
    entry = await _resolve(servers, _via(https, target), AddressPolicy(allow_private=True))
    assert entry.size == len(DATA) and entry.source["etag"] == '"v1"'
    assert internal_tls.seen == [f"HEAD /file/m.bin {target.split('/')[2]}"]


async def test_head_redirect_goes_to_the_address_judged_keeping_the_host_name(servers: dict[str, Server]) -> None:
    """An allowed redirect target is requested at the address judged, with its own Host and TLS name."""
    policy = AddressPolicy(refused=(ipaddress.ip_network("127.0.0.2/32"),))  # 127.0.0.3 counts as public here
    target = f"{servers['internal_tls'].url}/file/m.bin"
    entry = await _resolve(servers, _via(servers["https"], target), policy)
    assert entry.size == len(DATA)
    assert servers["internal_tls"].seen == [f"HEAD /file/m.bin {target.split('/')[2]}"]


# -- what peers may ask for -----------------------------------------------------------------


@dataclass
class PeerNode:
    url: str
    service: ModelService

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session, session.post(self.url + path, json=body, headers=auth) as r:
            return r.status, await r.text()

    async def get(self, path: str, params: dict[str, str]) -> tuple[int, bytes]:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session, session.get(self.url + path, params=params, headers=auth) as r:
            return r.status, await r.read()


@pytest.fixture
async def peer_node(
    request: pytest.FixtureRequest, servers: dict[str, Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PeerNode]:
    """An agent's core and its node app (peer routes) in-process, its origins under the test's policy."""
    policy: AddressPolicy = getattr(request, "param", AddressPolicy())
    monkeypatch.setenv("SSL_CERT_FILE", servers["cert"].url)  # the range client's trust store
    pool = ThreadPoolExecutor(4)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_trusting(servers)))
    store = Store(str(tmp_path / "cache"), 1 << 34, pool, False)
    await store.open()
    origins = Origins(session, pool, read_timeout=5.0, policy=policy)
    metrics = Metrics()
    service = ModelService(store, Fetcher(store, metrics, connections=2, retries=2), origins, MIN_PIECE_SIZE)
    state = PeerState(TOKEN, metrics)
    state.open(service, Artifacts(ArtifactIndex(store), metrics, None), None)
    ready = Readiness()
    ready.ready = True
    runner = web.AppRunner(node_app(ready, state, metrics))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield PeerNode(f"http://127.0.0.1:{runner.addresses[0][1]}", service)
    await runner.cleanup()
    await origins.close()
    await session.close()
    pool.shutdown(wait=True)


def _one_line_error(text: str) -> str:
    message = json.loads(text)["error"]["message"]
    assert isinstance(message, str) and "\n" not in message
    return message


async def test_peer_prefetch_of_a_non_public_host_is_refused(servers: dict[str, Server], peer_node: PeerNode) -> None:
    https = servers["https"]
    port = https.url.rsplit(":", 1)[1]
    for ref in (f"{https.url}/file/m.bin", f"https://localhost:{port}/file/m.bin"):
        status, text = await peer_node.post("/peer/v1/prefetch", {"ref": ref})
        assert status == 403, text
        message = _one_line_error(text)
        assert "not a public address" in message and port not in message
    status, body = await peer_node.get(
        "/peer/v1/piece",
        {"ref": f"{https.url}/file/m.bin", "rev": "x", "path": "m.bin", "key": "k", "index": "0", "piece_size": "1"},
    )
    assert status == 403, body
    assert https.seen == []  # nothing was asked of the internal server


@pytest.mark.parametrize("peer_node", [TESTS], indirect=True)
async def test_peer_prefetch_does_not_follow_a_redirect_inward(servers: dict[str, Server], peer_node: PeerNode) -> None:
    """The probe's finding: an https reference redirecting to an internal http server, named by a peer."""
    https = servers["https"]
    for target, why in (
        (f"{servers['internal'].url}/file/m.bin", "from https to plain http"),
        (f"{servers['http'].url}/file/m.bin", "from https to plain http"),
        (f"{servers['internal_tls'].url}/file/m.bin", "127.0.0.3 is not a public address"),
    ):
        status, text = await peer_node.post("/peer/v1/prefetch", {"ref": _via(https, target)})
        assert status == 403, text
        message = _one_line_error(text)
        assert why in message and target.split("/")[2].rsplit(":", 1)[1] not in message
    assert servers["internal"].seen == servers["http"].seen == servers["internal_tls"].seen == []


@pytest.mark.parametrize("peer_node", [TESTS], indirect=True)
async def test_peer_connect_failures_tell_no_port_apart(servers: dict[str, Server], peer_node: PeerNode) -> None:
    """A closed port and an open one that speaks no TLS fail with the same message, naming neither port."""
    closed, plain = free_port(), servers["http"].url.rsplit(":", 1)[1]
    messages = []
    for port in (closed, plain):
        status, text = await peer_node.post("/peer/v1/prefetch", {"ref": f"https://127.0.0.1:{port}/file/m.bin"})
        assert status == 502, text
        messages.append(_one_line_error(text))
        assert str(port) not in messages[-1]
    assert messages[0] == messages[1]


@pytest.mark.parametrize("peer_node", [TESTS], indirect=True)
async def test_pieces_without_a_whole_file_digest_are_not_served_to_peers(
    servers: dict[str, Server], peer_node: PeerNode
) -> None:
    ref = f"{servers['https'].url}/file/m.bin"
    _, manifest = await peer_node.service.resolve(ref)  # as the peer's own resolve would see it
    entry = manifest.files[0]
    assert entry.sha256 is None and entry.git_sha1 is None  # https: nothing to check pieces against
    status, body = await peer_node.get(
        "/peer/v1/piece",
        {"ref": ref, "rev": manifest.revision, "path": entry.path, "key": entry.fill_key, "index": "0",
         "piece_size": str(entry.piece_size)},
    )  # fmt: skip
    assert status == 409, body
    assert b"no whole-file digest" in body
    assert [s for s in servers["https"].seen if s.startswith("GET")] == []  # nothing fetched on the peer's say-so
