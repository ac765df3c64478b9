"""GCS (``gs://``) and Azure Blob (``az://``) origins against their real emulators (issue 20, item 4).

fake-gcs-server and Azurite (tests/servers/clouds.py) hold the real MiniLM files; an in-process agent
prefetches them and ``client.open_tensors`` must be bit-exact with the files. Credentials: the emulator
(no auth), a service-account key exchanged at a token endpoint this test runs (the JWT's RS256
signature is checked there with the key's public half), Azure connection strings with an account key
(the agent makes an account SAS from it: Azurite checks its signature) and with a SAS. A store that
serves other bytes than it lists (GCS: CRC32C; Azure: Content-MD5) is refused, and listings of more
objects than a page are read to the end.
"""

from __future__ import annotations

import base64
import filecmp
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import client
from agent.origins import azure, gcs
from agent.origins.range_http import RangeClient
from agent.refs import parse_ref
from client.errors import BadReferenceError, WarmstartError
from client.transport import AgentConnection
from tests.servers.clouds import Azurite, FakeGcs
from tests.servers.ports import free_port, free_ports
from tests.test_agent_e2e import assert_bit_exact, expected_tensors

MODEL_SIZE = 90_868_376  # model.safetensors of MiniLM: no blob of this size may appear after a refused fill


@pytest.fixture(scope="module")
def gcs_model(fake_gcs: FakeGcs, minilm_dir: Path) -> str:
    """MiniLM under gs://models/minilm (read-only for the tests)."""
    fake_gcs.make_bucket("models")
    fake_gcs.put_dir("models", "minilm", minilm_dir)
    return "gs://models/minilm"


@pytest.fixture(scope="module")
def az_model(azurite: Azurite, minilm_dir: Path) -> str:
    """MiniLM under az://devstoreaccount1/models/minilm (read-only for the tests)."""
    azurite.make_container("models")
    azurite.put_dir("models", "minilm", minilm_dir)
    return f"az://{azurite.account}/models/minilm"


def _check_model(agent: Any, ref: str, local: Path) -> None:
    """Prefetch ``ref``, then the snapshot equals ``local`` file by file and open_tensors is bit-exact."""
    done = agent.cli("prefetch", ref, timeout=240)
    assert done.returncode == 0, done.stderr
    snap = Path(client.snapshot(ref, socket=str(agent.socket_path), timeout=60))
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == names
    for name in names:
        assert filecmp.cmp(snap / name, local / name, shallow=False), name
    assert_bit_exact(client.open_tensors(ref, socket=str(agent.socket_path), timeout=60), expected_tensors(local))


def _no_model_blob(agent: Any) -> bool:
    return not any(p.stat().st_size == MODEL_SIZE for p in (agent.cache_dir / "blobs").iterdir())


# ---------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ("gs://models/minilm", "models/minilm"),
        ("gs://my.bucket_1/a/b/", "my.bucket_1/a/b"),
        ("az://devstoreaccount1/models/minilm", "devstoreaccount1/models/minilm"),
        ("az://acct123/c-1/x/y.safetensors", "acct123/c-1/x/y.safetensors"),
    ],
)
def test_cloud_refs_parse(text: str, location: str) -> None:
    ref = parse_ref(text)
    assert ref.scheme == text.split("://")[0] and ref.location == location


@pytest.mark.parametrize(
    "text",
    ["gs://models", "gs://Models/x", "gs://b/../x", "az://acct/models", "az://Acct/models/x", "az://acct/a--b/x",
     "az://acct/ab/x", "az://a/models/x"],
)
def test_bad_cloud_refs_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(BadReferenceError) as info:
        parse_ref(text)
    assert "\n" not in str(info.value) and text.split("/")[2] in str(info.value)


# ---------------------------------------------------------------------- GCS


def test_gs_prefetch_and_open_tensors_from_the_emulator(
    inproc_factory: Any, fake_gcs: FakeGcs, gcs_model: str, minilm_dir: Path
) -> None:
    agent = inproc_factory(env=fake_gcs.env)
    _check_model(agent, gcs_model, minilm_dir)
    (saved,) = (agent.cache_dir / "manifests").glob("gs--*/*.json")
    files = {f["path"]: f for f in json.loads(saved.read_text())["files"]}
    assert len(files["model.safetensors"]["crc32c"]) == 8 and len(files["model.safetensors"]["md5"]) == 32


class _TokenServer:
    """An OAuth2 token endpoint (and a GCE metadata server's token route), recording what it was sent.

    A JWT bearer grant's RS256 signature is checked with ``public_key``; other grants and the
    metadata GET are recorded as they came (``forms``, ``gets``). ``refuse`` answers 400 to all.
    """

    def __init__(self, public_key: rsa.RSAPublicKey | None = None, *, refuse: bool = False) -> None:
        self.grants: list[dict[str, Any]] = []
        self.forms: list[dict[str, list[str]]] = []
        self.gets: list[tuple[str, str]] = []  # (path, Metadata-Flavor header)
        self.errors: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                outer.forms.append(form)
                ok = not refuse
                if ok and form.get("grant_type") == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                    try:
                        outer.check(form)
                    except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
                        outer.errors.append(repr(exc))
                        ok = False
                self.answer(ok)

            def do_GET(self) -> None:
                outer.gets.append((self.path, self.headers.get("Metadata-Flavor", "")))
                self.answer(not refuse and self.headers.get("Metadata-Flavor") == "Google")

            def answer(self, ok: bool) -> None:
                body = (json.dumps({"access_token": "ya29.test-token", "expires_in": 3600, "token_type": "Bearer"})
                        if ok else json.dumps({"error": "invalid_grant"}))
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.public_key = public_key
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.host = f"127.0.0.1:{self.server.server_port}"
        self.url = f"http://{self.host}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def check(self, form: dict[str, list[str]]) -> dict[str, Any]:
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        head, payload, sig = form["assertion"][0].split(".")
        pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
        assert self.public_key is not None
        self.public_key.verify(base64.urlsafe_b64decode(pad(sig)), f"{head}.{payload}".encode(),
                               padding.PKCS1v15(), hashes.SHA256())
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(pad(payload)))
        self.grants.append(claims)
        return claims

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def service_account(tmp_path: Path) -> Iterator[tuple[Path, _TokenServer]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = _TokenServer(key.public_key())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"type": "service_account", "project_id": "test", "private_key_id": "k1",
                                "private_key": pem, "client_email": "loader@test.iam.gserviceaccount.com",
                                "token_uri": server.url}))
    try:
        yield path, server
    finally:
        server.close()


def test_gs_service_account_key_is_exchanged_with_a_signed_jwt(
    inproc_factory: Any, fake_gcs: FakeGcs, gcs_model: str, minilm_dir: Path,
    service_account: tuple[Path, _TokenServer],
) -> None:
    """GOOGLE_APPLICATION_CREDENTIALS: a JWT signed with the key, for read-only storage, at the key's token_uri."""
    key_file, tokens = service_account
    agent = inproc_factory(env={**fake_gcs.env, "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)})
    _check_model(agent, gcs_model, minilm_dir)
    assert not tokens.errors, tokens.errors
    assert tokens.grants, "the agent never asked the token endpoint"
    claims = tokens.grants[0]
    assert claims["iss"] == "loader@test.iam.gserviceaccount.com" and claims["aud"] == tokens.url
    assert claims["scope"] == gcs.SCOPE and 0 < claims["exp"] - claims["iat"] <= 3600
    assert len(tokens.grants) == 1  # one token serves every request until it nears expiry


def test_gs_refused_token_is_one_clear_error(inproc_factory: Any, fake_gcs: FakeGcs, gcs_model: str,
                                             tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = _TokenServer(key.public_key(), refuse=True)
    try:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path = tmp_path / "sa.json"
        path.write_text(json.dumps({"type": "service_account", "private_key": pem, "client_email": "x@y",
                                    "token_uri": server.url}))
        agent = inproc_factory(env={**fake_gcs.env, "GOOGLE_APPLICATION_CREDENTIALS": str(path)})
        done = agent.cli("prefetch", gcs_model, timeout=60)
        assert done.returncode != 0
        assert server.url in done.stderr and "400" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert agent.cli("stats", timeout=30).returncode == 0  # the agent keeps serving
    finally:
        server.close()


def test_gs_authorized_user_refresh_token_is_exchanged(
    inproc_factory: Any, fake_gcs: FakeGcs, gcs_model: str, minilm_dir: Path, tmp_path: Path
) -> None:
    """A user's key file (``gcloud auth application-default login``): its refresh token at its token_uri."""
    server = _TokenServer()
    try:
        path = tmp_path / "adc.json"
        path.write_text(json.dumps({"type": "authorized_user", "client_id": "cid", "client_secret": "cs",
                                    "refresh_token": "rt-1", "token_uri": server.url}))
        agent = inproc_factory(env={**fake_gcs.env, "GOOGLE_APPLICATION_CREDENTIALS": str(path)})
        _check_model(agent, gcs_model, minilm_dir)
        assert server.forms and server.forms[0] == {"grant_type": ["refresh_token"], "client_id": ["cid"],
                                                    "client_secret": ["cs"], "refresh_token": ["rt-1"]}
    finally:
        server.close()


async def test_gs_token_from_the_metadata_server_as_on_gke() -> None:
    """No key file and no emulator: the token comes from the metadata server (GKE workload identity),
    asked as Google's libraries ask (Metadata-Flavor), once for many requests."""
    server = _TokenServer()
    try:
        async with aiohttp.ClientSession() as session:
            creds = gcs.GoogleCredentials(session, environ={"GCE_METADATA_HOST": server.host})
            for _ in range(3):
                assert await creds.headers() == {"Authorization": "Bearer ya29.test-token"}
        assert server.gets == [("/computeMetadata/v1/instance/service-accounts/default/token", "Google")]
    finally:
        server.close()


async def test_gs_without_any_credentials_goes_anonymous() -> None:
    """No key, no emulator, no metadata server answering: unauthenticated requests (public buckets)."""
    async with aiohttp.ClientSession() as session:
        creds = gcs.GoogleCredentials(session, environ={"GCE_METADATA_HOST": f"127.0.0.1:{free_port()}"})
        assert await creds.headers() == {}


def test_gs_object_whose_bytes_do_not_match_its_crc32c_is_refused(
    inproc_factory: Any, fake_gcs: FakeGcs, minilm_dir: Path
) -> None:
    fake_gcs.make_bucket("rotten")
    fake_gcs.put_dir("rotten", "minilm", minilm_dir)
    fake_gcs.corrupt("rotten", "minilm/model.safetensors", 50_000_000)
    agent = inproc_factory(env=fake_gcs.env, extra_args=("--retries", "1"))
    done = agent.cli("prefetch", "gs://rotten/minilm", timeout=240)
    assert done.returncode != 0
    assert "model.safetensors" in done.stderr and "crc32c" in done.stderr, done.stderr
    assert _no_model_blob(agent)


def test_gs_listing_of_more_objects_than_a_page(
    inproc_factory: Any, fake_gcs: FakeGcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 3 (the agent runs in this process): 10 objects come back only if every page is read."""
    monkeypatch.setattr(gcs, "PAGE_SIZE", 3)
    fake_gcs.make_bucket("paged")
    want = {f"part-{i:02d}.bin": f"object {i}".encode() * (i + 1) for i in range(10)}
    for name, data in want.items():
        fake_gcs.put("paged", f"many/{name}", data)
    agent = inproc_factory(env=fake_gcs.env)
    done = agent.cli("prefetch", "gs://paged/many", timeout=120)
    assert done.returncode == 0, done.stderr
    snap = Path(client.snapshot("gs://paged/many", socket=str(agent.socket_path), timeout=60))
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == want


# ---------------------------------------------------------------------- Azure Blob


def test_az_prefetch_and_open_tensors_with_an_account_key(
    inproc_factory: Any, azurite: Azurite, az_model: str, minilm_dir: Path
) -> None:
    """A connection string with AccountKey: the agent makes its own account SAS; Azurite checks its signature."""
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()})
    _check_model(agent, az_model, minilm_dir)


def test_az_prefetch_with_a_sas(inproc_factory: Any, azurite: Azurite, az_model: str, minilm_dir: Path) -> None:
    conn = azurite.connection_string(key=False, sas=azurite.sas)
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    _check_model(agent, az_model, minilm_dir)


def test_az_wrong_key_is_one_clear_error(inproc_factory: Any, azurite: Azurite, az_model: str) -> None:
    wrong = base64.b64encode(b"not the key" * 4).decode()
    conn = azurite.connection_string().replace(azurite.key, wrong)
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    done = agent.cli("prefetch", az_model, timeout=60)
    assert done.returncode != 0
    assert "403" in done.stderr and "AZURE_STORAGE" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "sig=" not in done.stderr  # the SAS is a secret
    assert agent.cli("stats", timeout=30).returncode == 0


def test_az_blob_whose_bytes_do_not_match_its_content_md5_is_refused(
    inproc_factory: Any, azurite: Azurite, minilm_dir: Path
) -> None:
    azurite.make_container("rotten")
    azurite.put_dir("rotten", "minilm", minilm_dir)
    azurite.set_md5("rotten", "minilm/model.safetensors", base64.b64encode(b"\x00" * 16).decode())
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()},
                           extra_args=("--retries", "1"))
    done = agent.cli("prefetch", f"az://{azurite.account}/rotten/minilm", timeout=240)
    assert done.returncode != 0
    assert "model.safetensors" in done.stderr and "md5" in done.stderr, done.stderr
    assert _no_model_blob(agent)


def test_az_listing_of_more_blobs_than_a_page(
    inproc_factory: Any, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(azure, "PAGE_SIZE", 3)
    azurite.make_container("paged")
    want = {f"part-{i:02d}.bin": f"blob {i}".encode() * (i + 1) for i in range(10)}
    for name, data in want.items():
        azurite.put("paged", f"many/{name}", data)
    ref = f"az://{azurite.account}/paged/many"
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()})
    done = agent.cli("prefetch", ref, timeout=120)
    assert done.returncode == 0, done.stderr
    snap = Path(client.snapshot(ref, socket=str(agent.socket_path), timeout=60))
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == want


def test_account_sas_is_signed_for_read_and_list_only() -> None:
    """The SAS the agent makes from a key can read and list, nothing else, and expires within the hour."""
    sas = parse_qs(azure.account_sas("acct", base64.b64encode(b"k" * 32).decode(), time.time()))
    assert sas["sp"] == ["rl"] and sas["ss"] == ["b"] and sas["sv"] == [azure.API_VERSION]


async def test_az_workload_identity_exchanges_the_projected_token(tmp_path: Path) -> None:
    """AKS workload identity: the projected token file (read again per exchange) becomes a storage token.

    Azurite accepts bearer tokens only over HTTPS with a certificate of its own, so this exchange is
    checked against a token endpoint the test runs; the SAS and key paths above go through Azurite.
    """
    server = _TokenServer()
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("projected.jwt.one\n")
    try:
        settings = azure.AzureSettings.from_environ({
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file), "AZURE_CLIENT_ID": "client-1",
            "AZURE_TENANT_ID": "tenant-1", "AZURE_AUTHORITY_HOST": f"http://{server.host}/",
        })
        async with aiohttp.ClientSession() as session:
            creds = azure.AzureCredentials(session, settings)
            assert creds.endpoint("acct") == "https://acct.blob.core.windows.net"
            for _ in range(2):
                sas, headers = await creds.auth("acct")
                assert sas == "" and headers["Authorization"] == "Bearer ya29.test-token"
                assert headers["x-ms-version"] == azure.API_VERSION
        assert server.forms == [{
            "client_id": ["client-1"],
            "client_assertion_type": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
            "client_assertion": ["projected.jwt.one"],
            "grant_type": ["client_credentials"],
            "scope": ["https://storage.azure.com/.default"],
        }]
    finally:
        server.close()


def test_connection_string_for_another_account_is_refused(
    inproc_factory: Any, azurite: Azurite, az_model: str
) -> None:
    agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()})
    done = agent.cli("prefetch", "az://otheraccount/models/minilm", timeout=60)
    assert done.returncode != 0 and "otheraccount" in done.stderr and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------- peers


def test_gs_pieces_come_from_a_peer_and_are_checked_against_the_listed_digest(
    agent_factory: Any, agent_env: dict[str, str], fake_gcs: FakeGcs, gcs_model: str, minilm_dir: Path,
    tmp_path: Path,
) -> None:
    """Two nodes: the second takes the first's pieces (gs:// is a peer scheme; the crc32c GCS lists checks them)."""
    token_file = tmp_path / "peer-token"
    token_file.write_text("clouds-peer-token\n")
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    env = {**agent_env, **fake_gcs.env}
    agents = [
        agent_factory(f"node{i}", env=env, port=port, start=True,
                      extra_args=("--peers", peers, "--peer-token-file", str(token_file), "--piece-size", "1MiB"))
        for i, port in enumerate(ports)
    ]
    deadline = time.monotonic() + 60
    while not all(sum(p["alive"] for p in _stats(a)["peers"]) == 1 for a in agents):
        assert time.monotonic() < deadline, [_stats(a)["peers"] for a in agents]
        time.sleep(0.2)
    first = agents[0].cli("prefetch", gcs_model, timeout=240)
    assert first.returncode == 0, first.stderr
    second = agents[1].cli("prefetch", gcs_model, timeout=240)
    assert second.returncode == 0, second.stderr
    stats = _stats(agents[1])
    assert stats["peer_bytes_received"] > 10 * 1024 * 1024, stats
    assert stats["peer_pieces_rejected"] == 0, stats
    assert_bit_exact(client.open_tensors(gcs_model, socket=str(agents[1].socket_path), timeout=60),
                     expected_tensors(minilm_dir))


def _stats(agent: Any) -> dict[str, Any]:
    return AgentConnection(str(agent.socket_path), timeout=10).request_json("GET", "/v1/stats")


# ---------------------------------------------------------------------- hostile answers


class _Answering:
    """An HTTP server that answers every GET with one fixed body (a listing an origin should not give).

    ``pieces`` sends the body in that many writes 50 ms apart, as a slow or loaded server's answer comes.
    """

    def __init__(self, body: bytes, content_type: str, pieces: int = 1) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = -(-len(body) // pieces)
                for start in range(0, len(body), step):
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                    time.sleep(0.05 if pieces > 1 else 0)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.host = f"127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _gcs_item(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "size": "5", "generation": "7", "crc32c": "mnG7TA==", **extra}


@pytest.mark.parametrize(
    ("listing", "says"),
    [
        ({"items": [_gcs_item("elsewhere/x")]}, "outside the prefix"),
        ({"items": [_gcs_item("m/../../etc/passwd")]}, "unsafe object name"),
        ({"items": [_gcs_item("m/a", crc32c="not base64!")]}, "malformed crc32c"),
        ({"items": [_gcs_item("m/a", md5Hash="AAAA")]}, "md5Hash of 3 bytes"),
        ({"items": [_gcs_item("m/a", size="-1")]}, "negative size"),
        ({"items": [_gcs_item("m/a", generation="x")]}, "no valid size or generation"),
        ({"items": [], "nextPageToken": "again"}, "did not end"),
    ],
)
async def test_gs_hostile_listing_is_refused_in_one_line(
    listing: dict[str, Any], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcs, "MAX_OBJECTS", 3 * gcs.PAGE_SIZE)  # a listing that never ends: 5 pages, not 102
    server = _Answering(json.dumps(listing).encode(), "application/json")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
    try:
        async with aiohttp.ClientSession() as session:
            origin = gcs.GcsOrigin(session, RangeClient(10))
            with pytest.raises(WarmstartError) as info:
                await origin.resolve(parse_ref("gs://bucket/m"))
        assert says in str(info.value) and "\n" not in str(info.value)
        assert server.requests <= 5
    finally:
        server.close()


async def test_az_listing_that_is_not_xml_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Answering(b"<EnumerationResults><Blobs><Blob>", "application/xml")
    env = {"AZURE_STORAGE_CONNECTION_STRING": f"AccountName=acct;BlobEndpoint=http://{server.host}/acct;"}
    try:
        async with aiohttp.ClientSession() as session:
            origin = azure.AzureOrigin(session, RangeClient(10), environ=env)
            with pytest.raises(WarmstartError) as info:
                await origin.resolve(parse_ref("az://acct/cont/m"))
        assert "not XML" in str(info.value) and "\n" not in str(info.value)
    finally:
        server.close()


async def test_gs_listing_that_arrives_in_pieces_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing body that comes in several TCP segments is gathered whole (a loaded server's answer)."""
    items = [_gcs_item(f"m/file-{i:03d}.bin") for i in range(200)]
    server = _Answering(json.dumps({"items": items}).encode(), "application/json", pieces=4)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
    try:
        async with aiohttp.ClientSession() as session:
            manifest = await gcs.GcsOrigin(session, RangeClient(10)).resolve(parse_ref("gs://bucket/m"))
        assert [f.path for f in manifest.files] == [f"file-{i:03d}.bin" for i in range(200)]
        assert {f.crc32c for f in manifest.files} == {"9a71bb4c"}
    finally:
        server.close()
