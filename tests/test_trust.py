"""Trust between nodes (issue 24 item 6): peer TLS, and which compile-artifact bundles from peers a node loads.

Real agents, real peer API over loopback, keys and certificates made by
tests/servers/pki.py. TLS: two agents serve and ask each other over mutually
verified HTTPS (one of them through a capturing relay, which must see no token
byte); clients without a certificate of the CA carrying ``--peer-tls-name``
are refused. Renewed certificates (the mounted directory's symlink swapped, as
the kubelet does) are used for new connections without a restart; a broken set
is refused and the old one kept. Model pieces over TLS take the read-and-write
path (not sendfile) and arrive bit-exact.
A bundle pushed on node A is asked for on node B (``open_bundle``, peers on):
under ``--artifact-trust signed`` it loads only when A signed it with a key B
trusts and its bytes match what was signed; every refusal is counted in
``warmstart_artifact_refused_total{reason}`` and B answers "not found".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xxhash

from agent.manifest import Manifest
from client.artifacts import open_bundle, push_bundle
from client.errors import ArtifactNotFoundError
from client.fingerprint import current_fingerprint
from client.transport import AgentConnection
from tests.servers.pki import issue, make_ca, make_signing_key
from tests.servers.ports import free_ports
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3

TOKEN = "trust-peer-token-0123456789abcdef"
KEY = "signed-bundle"


def _fp() -> dict[str, str]:
    return current_fingerprint("dir", None, with_torch=False)


def _refused(agent: Any) -> dict[str, float]:
    status, body = agent.http_get("/metrics")
    assert status == 200
    found = re.findall(rb'^warmstart_artifact_refused_total\{reason="(\w+)"\} ([0-9.e+]+)$', body, re.M)
    return {k.decode(): float(v) for k, v in found}


def _pair(inproc_factory: Any, tmp_path: Path, a_args: tuple[str, ...], b_args: tuple[str, ...]) -> tuple[Any, Any]:
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    common = ("--peers", peers, "--peer-token-file", str(token))
    a = inproc_factory("a", port=ports[0], extra_args=(*common, *a_args))
    b = inproc_factory("b", port=ports[1], extra_args=(*common, *b_args))
    return a, b


def _push(a: Any) -> tuple[dict[str, Any], bytes]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    entry = push_bundle(KEY, _fp(), {}, {"blob.bin": data}, socket=str(a.socket_path))
    return entry, data


def _ask(b: Any) -> tuple[dict[str, Any], bytes]:
    with open_bundle(KEY, _fp(), socket=str(b.socket_path)) as (answer, bundle):
        data = bundle.read("blob.bin")
        assert data is not None
        return answer, data


def test_signed_bundle_loads_on_a_node_that_trusts_the_key(inproc_factory: Any, tmp_path: Path) -> None:
    private, public = make_signing_key(tmp_path / "keys")
    a, b = _pair(inproc_factory, tmp_path,
                 ("--artifact-trust", "signed", "--artifact-trusted-keys", str(public),
                  "--artifact-signing-key", str(private)),
                 ("--artifact-trust", "signed", "--artifact-trusted-keys", str(public)))
    entry, data = _push(a)
    assert entry["signature"] and re.fullmatch(r"[0-9a-f]{16}", entry["signer"]) and len(entry["sha256"]) == 64
    answer, got = _ask(b)
    assert answer["source"] == f"peer {a.listen}" and got == data
    assert answer["entry"]["signature"] == entry["signature"]  # kept: B can pass it on, still verifiable
    assert sum(_refused(b).values()) == 0


@pytest.mark.parametrize("case", ["unsigned", "untrusted_key", "bad_signature", "digest_mismatch"])
def test_untrusted_bundle_is_refused_counted_and_not_stored(inproc_factory: Any, tmp_path: Path, case: str) -> None:
    private, public = make_signing_key(tmp_path / "keys", "publisher")
    other_private, _ = make_signing_key(tmp_path / "keys", "other")
    a_key = {"unsigned": (), "untrusted_key": ("--artifact-signing-key", str(other_private))}.get(
        case, ("--artifact-signing-key", str(private)))
    a, b = _pair(inproc_factory, tmp_path, ("--artifact-trust", "token", *a_key),
                 ("--artifact-trust", "signed", "--artifact-trusted-keys", str(public)))
    entry, _ = _push(a)
    if case == "bad_signature":  # A's record altered on disk (a forged entry): the signature no longer fits
        a.stop()
        record = next((a.cache_dir / "artifacts" / KEY).glob("*.json"))
        forged = {**json.loads(record.read_text()), "size": entry["size"] + 1}
        record.write_text(json.dumps(forged))
        a.start()
    if case == "digest_mismatch":  # A serves other bytes under the signed entry
        blob = a.cache_dir / "blobs" / entry["digest"]
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        blob.write_bytes(bytes(raw))
    deadline = time.monotonic() + 15  # after A's restart (bad_signature), B asks it once its ping finds it again
    while True:
        with pytest.raises(ArtifactNotFoundError):
            _ask(b)
        if _refused(b)[case] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert _refused(b)[case] == 1, _refused(b)
    assert not (b.cache_dir / "blobs" / entry["digest"]).exists()
    assert list((b.cache_dir / "partial").iterdir()) == []


def test_trust_token_loads_unsigned_bundles_and_off_never_asks(inproc_factory: Any, tmp_path: Path) -> None:
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    common = ("--peers", peers, "--peer-token-file", str(token))
    a = inproc_factory("a", port=ports[0], extra_args=common)
    b = inproc_factory("b", port=ports[1], extra_args=(*common, "--artifact-trust", "token"))
    c = inproc_factory("c", port=ports[2], extra_args=common)  # the default: off
    _, data = _push(a)
    answer, got = _ask(b)
    assert answer["source"].startswith("peer ") and got == data and not answer["entry"]["signature"]
    with pytest.raises(ArtifactNotFoundError, match="--artifact-trust off"):
        _ask(c)
    assert sum(_refused(c).values()) == 0


def test_trust_settings_that_cannot_work_stop_the_agent_with_one_line(tmp_path: Path) -> None:
    from agent.config import AgentConfig, SettingError

    with pytest.raises(SettingError, match=r"--artifact-trusted-keys.*signed needs it"):
        AgentConfig(artifact_trust="signed")
    not_a_key = tmp_path / "junk.pub"
    not_a_key.write_text("hello\n")
    with pytest.raises(SettingError, match="no PEM public key"):
        AgentConfig(artifact_trust="signed", artifact_trusted_keys=str(not_a_key))
    private, _ = make_signing_key(tmp_path / "keys")
    with pytest.raises(SettingError, match=r"--artifact-signing-key.*not an unencrypted PEM private key"):
        AgentConfig(artifact_signing_key=str(not_a_key))
    assert AgentConfig(artifact_signing_key=str(private)).artifact_trust == "off"


# ---------------------------------------------------------------------- peer TLS

NAME = "warmstart-peer"


def _https(port: int, path: str, ctx: ssl.SSLContext, token: str | None = TOKEN) -> int:
    """Status of GET ``path`` on 127.0.0.1:``port`` over TLS with ``ctx`` (raises what the handshake raises)."""
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _client_ctx(ca_dir: Path, cert_dir: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    ctx.check_hostname = False  # these checks are about the client's certificate, not the server's name
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
    return ctx


def test_peers_over_tls_verify_each_other_and_the_token_never_crosses_in_clear(
    inproc_factory: Any, tmp_path: Path
) -> None:
    ca = make_ca()
    dirs = {n: issue(ca, tmp_path / f"tls-{n}", (NAME,)) for n in "ab"}
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    pa, pb = free_ports(2)
    with TcpRelay("127.0.0.1", pa, capture=True) as relay:  # B reaches A only through the relay
        tls = ("--peer-token-file", str(token), "--peer-tls-name", NAME, "--artifact-trust", "token")
        a = inproc_factory("a", port=pa, extra_args=(*tls, "--peer-tls-dir", str(dirs["a"]),
                                                      "--peers", f"127.0.0.1:{pa},127.0.0.1:{pb}"))
        b = inproc_factory("b", port=pb, extra_args=(*tls, "--peer-tls-dir", str(dirs["b"]),
                                                      "--peers", f"127.0.0.1:{relay.port},127.0.0.1:{pb}"))
        _, data = _push(a)
        answer, got = _ask(b)
        assert answer["source"] == f"peer 127.0.0.1:{relay.port}" and got == data
        wire = bytes(relay.captured or b"")
    assert len(wire) > len(data) and wire[:1] == b"\x16"  # the bundle crossed, inside a TLS record
    assert TOKEN.encode() not in wire and b"Bearer" not in wire and b"/peer/v1" not in wire

    # A refuses what is not a verified peer; probes still work without a certificate.
    no_cert = _client_ctx(dirs["a"], None)
    assert _https(pa, "/livez", no_cert, token=None) == 200
    assert _https(pa, "/peer/v1/ping", no_cert) == 403
    assert _https(pa, "/peer/v1/ping", _client_ctx(dirs["a"], dirs["b"])) == 200
    wrong_name = issue(ca, tmp_path / "tls-wrong-name", ("someone-else",))
    assert _https(pa, "/peer/v1/ping", _client_ctx(dirs["a"], wrong_name)) == 403
    other_ca = issue(make_ca("another CA"), tmp_path / "tls-other-ca", (NAME,), ca_pem=ca.pem)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _https(pa, "/peer/v1/ping", _client_ctx(dirs["a"], other_ca))
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP gets no answer
        urllib.request.urlopen(f"http://127.0.0.1:{pa}/peer/v1/ping", timeout=5).close()
    assert "refused: no client certificate" in a.log_text()

    # As a client, the agent refuses a server whose certificate lacks --peer-tls-name.
    from agent.peers.client import PeerClient
    from agent.peers.tls import PeerTLS

    async def ping(name: str) -> None:
        async with aiohttp.ClientSession() as session:
            await PeerClient(session, TOKEN, 2.0, 5.0, PeerTLS.load(str(dirs["b"]), name)).ping(f"127.0.0.1:{pa}")

    asyncio.run(ping(NAME))
    with pytest.raises(aiohttp.ClientConnectorCertificateError, match="not-the-peer-name"):
        asyncio.run(ping("not-the-peer-name"))


def _served_serial(port: int, ca_dir: Path) -> int:
    """The serial number of the certificate a new TLS connection to 127.0.0.1:``port`` is shown."""
    ctx = _client_ctx(ca_dir, None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as conn:
        cert = conn.getpeercert()
    assert cert, "no certificate shown"
    return int(str(cert["serialNumber"]), 16)


def _serial_of(cert_dir: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes()).serial_number)


def _point(link: Path, target: Path) -> None:
    """Swap the symlink ``link`` to ``target`` in one rename, as the kubelet updates a mounted Secret."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _reloads(port: int, ca_dir: Path) -> dict[str, float]:
    """warmstart_peer_tls_reloads_total by result, from the agent's /metrics (HTTPS, no client certificate)."""
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=_client_ctx(ca_dir, None),
                                timeout=10) as r:
        body = r.read()
    found = re.findall(rb'^warmstart_peer_tls_reloads_total\{result="(\w+)"\} ([0-9.e+]+)$', body, re.M)
    return {k.decode(): float(v) for k, v in found}


def _until(what: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.1)


def test_renewed_peer_certificates_are_used_without_a_restart_and_a_broken_set_is_refused(
    inproc_factory: Any, tmp_path: Path
) -> None:
    """cert-manager rewrites the Secret (the kubelet swaps the mount's symlink): within --peer-tls-reload
    seconds new connections are shown the new certificate and peers keep working; a renewed set whose key
    does not match its certificate is logged, counted, and the previous certificate keeps serving."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = make_ca()
    versions = {n: issue(ca, tmp_path / f"tls-{n}-v1", (NAME,)) for n in "ab"}
    mounted = {n: tmp_path / f"tls-{n}" for n in "ab"}
    for n in "ab":
        mounted[n].symlink_to(versions[n])
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    pa, pb = free_ports(2)
    tls = ("--peer-token-file", str(token), "--peer-tls-name", NAME, "--artifact-trust", "token",
           "--peers", f"127.0.0.1:{pa},127.0.0.1:{pb}", "--peer-tls-reload", "0.2")
    a = inproc_factory("a", port=pa, extra_args=(*tls, "--peer-tls-dir", str(mounted["a"])))
    b = inproc_factory("b", port=pb, extra_args=(*tls, "--peer-tls-dir", str(mounted["b"])))
    first = _serial_of(versions["a"])
    assert _served_serial(pa, mounted["a"]) == first
    _, data = _push(a)
    assert _ask(b)[1] == data

    # Renewed: same CA, new key and serial.
    renewed = issue(ca, tmp_path / "tls-a-v2", (NAME,))
    second = _serial_of(renewed)
    assert second != first
    _point(mounted["a"], renewed)
    _until(lambda: _served_serial(pa, mounted["a"]) == second)
    assert "peer TLS certificates reloaded from" in a.log_text()
    assert _reloads(pa, mounted["a"]) == {"loaded": 1, "refused": 0}
    # A's new certificate works both ways: B asks A (new connections to A), A asks B (A's client context).
    other = os.urandom(1024 * 1024 + 5)
    push_bundle("after-renewal", _fp(), {}, {"blob.bin": other}, socket=str(a.socket_path))
    with open_bundle("after-renewal", _fp(), socket=str(b.socket_path)) as (answer, bundle):
        assert answer["source"] == f"peer 127.0.0.1:{pa}" and bundle.read("blob.bin") == other
    assert _https(pb, "/peer/v1/ping", _client_ctx(mounted["a"], mounted["a"])) == 200
    assert _https(pa, "/peer/v1/ping", _client_ctx(mounted["a"], mounted["b"])) == 200

    # A broken renewal: a certificate with a key that is not its own. The old one keeps serving.
    broken = issue(ca, tmp_path / "tls-a-v3", (NAME,))
    stray = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (broken / "tls.key").write_bytes(stray)
    _point(mounted["a"], broken)
    _until(lambda: "were not loaded, the previous ones stay in use" in a.log_text())
    time.sleep(1.0)  # several more looks at the same broken set: one line, one count
    assert a.log_text().count("were not loaded, the previous ones stay in use") == 1
    assert _reloads(pa, mounted["a"]) == {"loaded": 1, "refused": 1}
    assert _served_serial(pa, mounted["a"]) == second
    assert _https(pa, "/peer/v1/ping", _client_ctx(mounted["a"], mounted["b"])) == 200
    assert _https(pb, "/peer/v1/ping", _client_ctx(mounted["a"], renewed)) == 200

    # Fixed: the next good set is loaded.
    fixed = issue(ca, tmp_path / "tls-a-v4", (NAME,))
    _point(mounted["a"], fixed)
    _until(lambda: _served_serial(pa, mounted["a"]) == _serial_of(fixed))
    assert _reloads(pa, mounted["a"]) == {"loaded": 2, "refused": 1}


def test_pieces_over_tls_take_the_copy_path_bit_exact_and_counted(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    """Over TLS a held piece cannot go out with sendfile (the kernel would send it unencrypted): it is read
    and written through the TLS transport, every byte at its offset, the digest after it, and counted."""
    mib = 1024 * 1024
    data = os.urandom(2 * mib + 4099)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    seaweed.make_bucket("models")
    seaweed.upload_file(src, "models", "trust/tls-pieces/w.bin")
    ref = "s3://models/trust/tls-pieces"
    ca = make_ca()
    certs = {n: issue(ca, tmp_path / f"tls-{n}", (NAME,)) for n in "ab"}
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    a = inproc_factory("a", extra_args=("--peer-token-file", str(token), "--peer-tls-name", NAME,
                                        "--peer-tls-dir", str(certs["a"]), "--piece-size", str(mib + 3)))
    a.cli("prefetch", ref, check=True)
    rev = AgentConnection(str(a.socket_path), timeout=10).request_json("POST", "/v1/resolve", {"ref": ref})["revision"]
    (manifest,) = (a.cache_dir / "manifests").rglob(f"{rev}.json")
    (entry,) = Manifest.from_json(json.loads(manifest.read_text())).files
    ctx = _client_ctx(certs["a"], certs["b"])
    port = int(a.listen.rsplit(":", 1)[1])
    for index in range(entry.piece_count):
        q = {"ref": ref, "rev": rev, "path": "w.bin", "key": entry.fill_key, "piece_size": str(entry.piece_size),
             "index": str(index)}
        req = urllib.request.Request(f"https://127.0.0.1:{port}/peer/v1/piece?" + urllib.parse.urlencode(q),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            body = r.read()
        start, length = entry.piece_range(index)
        assert body[:-32] == data[start:start + length] and len(body) == length + 32, index
        assert body[-32:].decode() == xxhash.xxh3_128_hexdigest(body[:-32])
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=_client_ctx(certs["a"], None),
                                timeout=10) as r:
        served = re.search(rb'^warmstart_served_bytes_total\{to="peer"\} (\S+)$', r.read(), re.M)
    assert served is not None and float(served[1]) == len(data)
