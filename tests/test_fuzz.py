"""Issue 7, hostile input, fuzzed with hypothesis: safetensors headers, model references,
artifact archives, and requests to the local API and the peer API of a real agent.

Each input must end in a typed error (or a correct answer): no crash, no hang (every
request has a socket timeout, the whole file a pytest timeout), no "internal error", the agent
still answers /livez, and no file outside the cache is written (a sentinel
directory is snapshotted before and after) or read (a sentinel secret never appears
in an answer). Examples are bounded and derandomized so the file runs in well under
a minute; the counts are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import socket
import stat
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.refs import MAX_REF_LENGTH, ModelRef, parse_ref
from client.bundles import Bundle
from client.errors import BadReferenceError, MalformedFileError, UnsafeBundleError
from client.safetensors_header import SafetensorsHeader, parse_header_bytes, read_header
from tests.servers.cache_check import cache_files
from tests.test_bundle_safety import links_resolve_inside, old_gnu_sparse, snapshot

PURE = settings(max_examples=300, deadline=None, derandomize=True, database=None)
AGENT = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
SECRET = "sentinel-9f3c1e-never-served"

# Strings that tend to break parsers and path handling.
NASTY = st.sampled_from([
    "..", "../..", "../../etc/passwd", "/etc/passwd", "%2e%2e/%2e%2e", "..%2f..", "a/../../b", ".", "",
    "\x00", "a\x00b", "\n", "\r\n", "\udcff", "é", "\u202e", "a" * 5000, "//", "\\..\\..", "~", "$HOME",
    "file:///etc/passwd", "s3://", "hf://", "http://", "@", "@@", "a@..", "models/../../x",
])  # fmt: skip
TEXT = st.one_of(NASTY, st.text(max_size=64), st.text(alphabet="./@:%a-z\\", max_size=32))


# ---------------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "x", "", "f32", "F32 ", "C64", "\u00e9"]
BIG = st.integers(min_value=-(2**70), max_value=2**70)
SMALL = st.integers(min_value=0, max_value=256)
OFFSET = st.one_of(SMALL, BIG)


@st.composite
def header_json(draw: Any) -> tuple[bytes, int]:
    """A header that is structurally plausible and wrong in a few drawn ways, and a file size."""
    entries: dict[str, Any] = {}
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.just(f"t{i}"), TEXT))
        entry = {
            "dtype": draw(st.one_of(st.sampled_from(DTYPES), st.integers(), st.none())),
            "shape": draw(st.one_of(st.lists(st.one_of(SMALL, BIG), max_size=4), st.text(max_size=3), st.none())),
            "data_offsets": draw(st.one_of(st.lists(OFFSET, min_size=0, max_size=3), st.text(max_size=3))),
        }
        for k in draw(st.sets(st.sampled_from(list(entry)), max_size=1)):
            del entry[k]
        entries[name] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(TEXT, TEXT, max_size=3), TEXT, st.integers()))
    raw = json.dumps(entries).encode()
    raw = draw(st.sampled_from([raw, raw + b" " * 7, raw[: max(0, len(raw) - 3)], raw.replace(b'"', b"\xff", 1)]))
    return raw, draw(st.integers(0, 4096))


def _check_header(h: SafetensorsHeader, file_size: int) -> None:
    spans = sorted((t.offset, t.offset + t.nbytes) for t in h.tensors if t.nbytes)
    for lo, hi in spans:
        assert h.data_start <= lo <= hi <= file_size
    for (_, a_hi), (b_lo, _) in itertools.pairwise(spans):
        assert a_hi <= b_lo  # no tensor aliases another


@pytest.mark.slow
@PURE
@given(case=st.one_of(header_json(), st.tuples(st.binary(max_size=256), st.integers(0, 4096))))
def test_fuzz_safetensors_header_bytes(case: tuple[bytes, int]) -> None:
    raw, extra = case
    try:
        h = parse_header_bytes(raw, file_size=8 + len(raw) + extra, name="fuzz.safetensors")
    except MalformedFileError as exc:
        assert "fuzz.safetensors" in str(exc)
        return
    _check_header(h, 8 + len(raw) + extra)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(case=header_json(), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_safetensors_file_with_a_lying_length(
    tmp_path_factory: Any, case: tuple[bytes, int], length: int | None
) -> None:
    raw, extra = case
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + b"\0" * extra)
    try:
        h = read_header(str(path))
    except MalformedFileError:
        return
    _check_header(h, path.stat().st_size)


# ---------------------------------------------------------------------- model references

REF = st.one_of(
    TEXT,
    st.builds(
        lambda s, r: s + r,
        st.sampled_from(["s3://", "hf://", "https://", "http://", "file://", "/", "S3://", "gopher://"]),
        TEXT,
    ),
    st.builds(lambda a, b, c: f"s3://{a}/{b}@{c}", TEXT, TEXT, TEXT),
    st.builds(lambda a, b: f"hf://{a}/{b}", TEXT, TEXT),
    st.builds(lambda a, b: f"https://{a}/{b}", TEXT, TEXT),
    st.text(min_size=MAX_REF_LENGTH - 2, max_size=MAX_REF_LENGTH + 2, alphabet="ab/"),
)


@pytest.mark.slow
@PURE
@given(ref=st.one_of(REF, st.integers(), st.none(), st.binary(max_size=8)))
def test_fuzz_model_references(ref: Any) -> None:
    try:
        parsed = parse_ref(ref)
    except BadReferenceError as exc:
        assert "\n" not in str(exc).replace("\\n", "")  # one line
        return
    assert isinstance(parsed, ModelRef) and isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH
    segments = parsed.location.split("/")
    assert ".." not in segments and not any(ord(c) < 0x20 for c in parsed.location)
    # The key names files in the cache: one plain component.
    assert "/" not in parsed.key and parsed.key not in (".", "..") and "\0" not in parsed.key
    if parsed.revision is not None:
        assert ".." not in parsed.revision and not parsed.revision.startswith("/")


# ---------------------------------------------------------------------- artifact archives

MEMBER_NAME = st.one_of(
    st.builds(lambda t, r: f"{t}/{r}", st.sampled_from(["dir", "inductor", "x"]), TEXT),
    NASTY, st.sampled_from(["dir", "dir/", "warmstart.json", "dir/a", "dir/sub/b"]),
)  # fmt: skip
KIND = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)


@st.composite
def archive(draw: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2048))  # not a tar at all
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _ in range(draw(st.integers(1, 5))):
            info = tarfile.TarInfo(draw(MEMBER_NAME))
            info.type = draw(KIND)
            info.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o777]))
            data = b""
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(st.one_of(NASTY, st.sampled_from(["a", "../a", "/tmp", "dir/a", "../../.."])))
            elif info.type == tarfile.REGTYPE:
                data = draw(st.binary(max_size=64))
                info.size = len(data)
            with contextlib.suppress(ValueError, UnicodeError):
                tar.addfile(info, io.BytesIO(data) if data else None)
    raw = buf.getvalue()
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut]
    return raw


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(raw=archive())
def test_fuzz_artifact_archives(tmp_path_factory: Any, raw: bytes) -> None:
    root = tmp_path_factory.mktemp("bundle")
    (root / "outside.txt").write_text(SECRET)
    target = root / "target"
    before = cache_files(root)
    try:
        with Bundle(io.BytesIO(raw), where="fuzz") as bundle:
            for tree in list(bundle.trees):
                bundle.install(tree, str(target / tree.replace("/", "_")))
    except UnsafeBundleError:
        pass
    except MalformedFileError:
        pass
    after = cache_files(root)
    outside = {p for p in after if not p.startswith("target/") and p != "target"}
    assert outside == set(before), outside ^ set(before)  # nothing written outside the target
    assert (root / "outside.txt").read_text() == SECRET
    for p in target.rglob("*") if target.exists() else ():
        if p.is_symlink():
            assert os.path.realpath(p).startswith(os.path.realpath(target)), p


# Bundle shapes the probe found dangerous: symlink chains (``..`` through links), sparse
# members, hard links, and member orders (a file then a link at the same path, a link then
# a file below it), drawn from a small vocabulary so that paths collide often.
SHAPE_NAMES = st.sampled_from([
    "t", "t/a", "t/a/b", "t/a/b/c", "t/c", "t/c/d", "t/d", "t/d/f", "t/outside", "t/a/outside", "u", "u/a",
])  # fmt: skip
SHAPE_LINKS = st.sampled_from([
    "..", "../outside", "../../outside", "a/b/../outside", "a/b/../../outside", "a/b/..", "a", "a/b", ".", "c/d",
    "c/../../outside", "b/../../..", "/abs", "//outside", "outside", "a/b/c", "d/f", "./a/./b/../..", "",
])  # fmt: skip
SHAPE_HARD = st.sampled_from(["t/a", "t/d/f", "t/a/b", "t/c", "outside/secret.txt", "../outside/secret.txt", "u/a"])
SPARSE_DECLARED = 64 * 1024 * 1024  # big against the bundle, small enough not to hurt a shared disk if it regressed


def _raw_member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    info.size = len(data)
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * ((-len(data)) % 512)


@st.composite
def shaped_bundle(draw: Any) -> bytes:
    """A bundle (raw tar bytes, written member by member so old-GNU sparse headers can be mixed in)."""
    out = b""
    for _ in range(draw(st.integers(1, 7))):
        name = draw(SHAPE_NAMES)
        kind = draw(st.sampled_from(["file", "file", "dir", "dir", "link", "link", "link", "hard", "sparse"]))
        if kind == "sparse":
            kind = draw(st.sampled_from(["sparse-pax-0.1", "sparse-pax-1.0", "sparse-gnu"]))
        info = tarfile.TarInfo(name)
        info.mode = 0o644
        if kind == "file":
            out += _raw_member(info, draw(st.binary(max_size=32)))
        elif kind == "dir":
            info.type = tarfile.DIRTYPE
            out += _raw_member(info)
        elif kind in ("link", "hard"):
            info.type = tarfile.SYMTYPE if kind == "link" else tarfile.LNKTYPE
            info.linkname = draw(SHAPE_LINKS if kind == "link" else SHAPE_HARD)
            out += _raw_member(info)
        elif kind == "sparse-pax-0.1":
            info.pax_headers = {
                "GNU.sparse.map": f"0,4,{SPARSE_DECLARED - 1},1",
                "GNU.sparse.size": str(SPARSE_DECLARED),
            }
            out += _raw_member(info, b"abcde")
        elif kind == "sparse-pax-1.0":
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                "GNU.sparse.realsize": str(SPARSE_DECLARED)}  # fmt: skip
            out += _raw_member(info, b"1\n0\n0\n".ljust(512, b"\0"))
        else:
            out += old_gnu_sparse(name, SPARSE_DECLARED, b"z" * draw(st.integers(0, 600)))[:-1024]
    return out + b"\0" * 1024


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(raw=shaped_bundle())
def test_fuzz_bundle_shapes_never_leave_the_install_directory(tmp_path_factory: Any, raw: bytes) -> None:
    """After install or its refusal, nothing outside each install directory was created, modified or linked to."""
    box = tmp_path_factory.mktemp("shapes")
    outside = box / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "link").symlink_to("secret.txt")

    def around() -> dict[str, Any]:  # everything but the install directories, links not followed
        return {p: v for p, v in snapshot(box).items() if not p.startswith("in-")}

    before = around()
    installed: list[Path] = []
    try:
        with Bundle(io.BytesIO(raw), where="fuzz") as bundle:
            for tree in sorted(bundle.trees):
                installed.append(box / f"in-{tree}")
                bundle.install(tree, str(installed[-1]))
    except UnsafeBundleError as exc:
        assert "\n" not in str(exc), exc  # one line, typed: never a raw FileExistsError/OSError
    assert around() == before
    assert (outside / "secret.txt").read_text() == SECRET
    written = 0
    for target in installed:
        if target.exists():
            links_resolve_inside(target)
            assert not [p for p in target.iterdir() if p.name.startswith(".warmstart-install")]
            written += sum(v[1] for v in snapshot(target).values() if stat.S_ISREG(v[0]))
    assert written <= len(raw)  # no member type expands past the bundle


# ---------------------------------------------------------------------- the local API of a real agent


def _unix_request(
    sock_path: str, method: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(sock_path)
        head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        s.sendall(head.encode("latin-1", "replace") + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent may close on a refused huge body after answering
    finally:
        s.close()
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), (method, path, data[:200])
    return int(status_line.split()[1]), data.split(b"\r\n\r\n", 1)[-1]


def _assert_typed(status: int, body: bytes) -> None:
    assert status < 500 or status in (502, 503, 507), (status, body[:300])
    assert b"internal error" not in body, body[:300]
    assert SECRET.encode() not in body


@pytest.fixture
def fuzz_agent(inproc_factory: Any, tmp_path: Path) -> Any:
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "secret.txt").write_text(SECRET)
    token = tmp_path / "peer-token"
    token.write_text("fuzz-token-0123456789")
    agent = inproc_factory("fuzzed", extra_args=("--peer-token-file", str(token)))
    return agent, tmp_path / "sentinel", "fuzz-token-0123456789"


# Local refs read directories by design (an operator's NFS path): the fuzzer stays on
# remote schemes and the traversal forms, so it never asks the agent to copy "/" in.
SAFE_REF = st.one_of(
    st.builds(lambda a, b: f"s3://{a}/{b}", st.sampled_from(["models", "nobucket-x", "../..", "a"]), TEXT),
    st.builds(lambda a, b: f"hf://{a}/{b}", st.sampled_from(["org", "..", "nobody"]), TEXT),
    st.builds(lambda a: f"http://127.0.0.1:9/{a}", TEXT),
    st.sampled_from(["file:///../../etc", "file://../etc", "/../../etc/passwd", "relative/../x", "file:///etc/../..\x00"]),
    NASTY, st.integers(), st.none(), st.lists(st.integers(), max_size=2),
)
ROUTE = st.sampled_from([
    ("POST", "/v1/resolve"), ("POST", "/v1/prefetch"), ("POST", "/v1/open"), ("POST", "/v1/evict"),
    ("POST", "/v1/verify"), ("POST", "/v1/artifacts/get"), ("POST", "/v1/artifacts/remove"),
    ("POST", "/v1/artifacts/publish"), ("GET", "/v1/models"), ("GET", "/v1/artifacts"),
    ("GET", "/v1/../../etc/passwd"), ("POST", "/v1/nothing"), ("DELETE", "/v1/models"),
])  # fmt: skip


@st.composite
def local_body(draw: Any) -> tuple[bytes, dict[str, str]]:
    how = draw(st.integers(0, 4))
    headers: dict[str, str] = {}
    if how == 0:
        return draw(st.binary(max_size=512)), headers
    if how == 1:
        return b'{"ref": ' + draw(st.binary(max_size=64)) + b"}", headers
    obj: Any = {
        "ref": draw(SAFE_REF), "pin": draw(st.one_of(st.booleans(), TEXT)), "snapshot": draw(st.booleans()),
        "key": draw(st.one_of(TEXT, st.integers())),
        "fingerprint": draw(st.one_of(st.dictionaries(TEXT, TEXT, max_size=3), TEXT)),
        "fingerprint_id": draw(TEXT), "peers": draw(st.booleans()),
    }  # fmt: skip
    if how == 3:
        obj = draw(st.one_of(st.lists(st.integers(), max_size=3), TEXT, st.integers()))
    if how == 4:
        headers["X-Warmstart-Artifact"] = json.dumps({"key": draw(TEXT), "fingerprint": {"a": draw(TEXT)}})
        return draw(st.binary(max_size=1024)), headers
    return json.dumps(obj).encode(), headers


def test_fuzz_local_api_requests(fuzz_agent: Any) -> None:
    agent, sentinel, _ = fuzz_agent
    sock = str(agent.socket_path)
    outside_before = cache_files(sentinel)
    seen: dict[int, int] = {}

    @AGENT
    @given(route=ROUTE, body=local_body())
    def one(route: tuple[str, str], body: tuple[bytes, dict[str, str]]) -> None:
        status, answer = _unix_request(sock, route[0], route[1], body[0], body[1])
        seen[status] = seen.get(status, 0) + 1
        _assert_typed(status, answer)

    one()
    # A body far over the limit is refused, not buffered.
    status, _ = _unix_request(sock, "POST", "/v1/resolve", b"{" + b" " * (8 * 1024 * 1024) + b"}")
    assert status == 413
    assert agent.alive() and agent.http_status("/livez") == 200
    assert cache_files(sentinel) == outside_before
    print(f"local API statuses: {dict(sorted(seen.items()))}")


def test_fuzz_peer_api_requests(fuzz_agent: Any, s3_model: Any) -> None:
    agent, sentinel, token = fuzz_agent
    outside_before = cache_files(sentinel)
    import urllib.error
    import urllib.parse
    import urllib.request

    def get(path: str, auth: bool) -> tuple[int, bytes]:
        req = urllib.request.Request(agent.url + path, headers={"Authorization": f"Bearer {token}"} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    q = st.one_of(TEXT, st.integers().map(str), st.just(s3_model.ref), st.just("s3://models/minilm/../../x"))
    seen: dict[int, int] = {}

    @AGENT
    @given(
        route=st.sampled_from(["/peer/v1/piece", "/peer/v1/artifacts/entry", "/peer/v1/artifacts/blob", "/peer/v1/ping",
                               "/peer/v1/../../etc/passwd", "/peer/v1/piece/../../x"]),
        params=st.dictionaries(st.sampled_from(["ref", "rev", "path", "key", "piece_size", "index", "digest", "fp"]), q,
                               max_size=8),
        auth=st.booleans(),
    )  # fmt: skip
    def one(route: str, params: dict[str, str], auth: bool) -> None:
        qs = urllib.parse.urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in params.items()})
        status, body = get(f"{route}?{qs}", auth)
        seen[status] = seen.get(status, 0) + 1
        if not auth and route.startswith("/peer/v1/") and "/../" not in route:
            assert status == 401, (route, status)
        if status == 200:
            assert route in ("/peer/v1/ping",), (route, params, body[:200])
        _assert_typed(status, body)

    one()
    assert agent.alive() and agent.http_status("/livez") == 200
    assert cache_files(sentinel) == outside_before
    print(f"peer API statuses: {dict(sorted(seen.items()))}")
