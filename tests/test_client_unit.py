"""The client on its own: safetensors parsing and loading on real files, and the transport against real sockets.

Files are written with ``safetensors.torch.save_file`` (or byte by byte, for
the malformed and unusual ones) and every load is compared bit for bit with
``safetensors.torch.load_file``. The agent is played by small stdlib HTTP
servers on real Unix sockets, so the transport's error and timeout handling
runs against the kernel, not a mock.
"""

from __future__ import annotations

import fcntl
import gc
import http.server
import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

import client
from client.errors import (
    AgentUnavailableError,
    FetchFailedError,
    MalformedFileError,
    ModelNotFoundError,
    WarmstartError,
)
from client.safetensors_header import MAX_HEADER_BYTES, read_header
from client.transport import AgentConnection

# ---------------------------------------------------------------------- helpers


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8, so any dtype (float8, bool, 0-d, empty) compares bit-exactly."""
    return t.detach().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.device.type == "cpu", name
        assert torch.equal(raw_bytes(g), raw_bytes(w)), name


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every common dtype, odd sizes, a 0-d tensor and empty ones."""
    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(4, 3, 2, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 11, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 3), dtype=torch.int32, generator=g),
        "i16": torch.randint(-(2**14), 2**14, (9,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (13,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=g),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 4, dtype=torch.float16),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8_e4m3"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
        out["f8_e5m2"] = torch.randn(3, generator=g).to(torch.float8_e5m2)
    if hasattr(torch, "uint16"):
        out["u16"] = torch.tensor([0, 1, 65535], dtype=torch.uint16)
        out["u32"] = torch.tensor([0, 2**32 - 1], dtype=torch.uint32)
        out["u64"] = torch.tensor([0, 2**63 + 5], dtype=torch.uint64)
    return out


def write_raw(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file byte by byte: header (a dict, or raw bytes), then ``data``."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


def can_lock_exclusively(path: Path) -> bool:
    """What the agent does before evicting a blob: LOCK_EX|LOCK_NB on a fresh descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def open_fds() -> int:
    """Descriptors open in this process, after collecting garbage other tests may have left."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path), metadata={"format": "pt", "note": "ünïcode"})
    return path, load_file(str(path))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes; tmp_path can be longer)."""
    d = tempfile.mkdtemp(prefix="ws-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- loading


@pytest.mark.parametrize("copy", [False, True], ids=["mmap", "copy"])
def test_load_matches_safetensors_bit_exact(model_file: tuple[Path, dict[str, torch.Tensor]], copy: bool) -> None:
    path, want = model_file
    got = client.load_safetensors_file(path, copy=copy)
    assert_same(got, want)


def test_header_lists_tensors_in_file_order_with_metadata(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, want = model_file
    header = read_header(path)
    assert dict(header.metadata) == {"format": "pt", "note": "ünïcode"}
    assert {t.name for t in header.tensors} == set(want)
    offsets = [t.offset for t in header.tensors]
    assert offsets == sorted(offsets)
    assert all(header.data_start <= t.offset and t.offset + t.nbytes <= header.file_size for t in header.tensors)
    by_name = {t.name: t for t in header.tensors}
    assert by_name["bf16"].dtype == torch.bfloat16 and by_name["bf16"].shape == (3, 11)
    assert by_name["bf16"].nbytes == 3 * 11 * 2
    assert by_name["scalar"].shape == () and by_name["scalar"].nbytes == 4
    with open(path, "rb") as f:  # the fd form reads the same header and leaves the fd open
        by_fd = read_header(f.fileno(), name="mine")
        assert by_fd.tensors == header.tensors and by_fd.name == "mine"
        assert f.read(8) == path.read_bytes()[:8]  # pread: the file position is untouched


def test_mapped_tensors_are_zero_copy_and_writes_stay_private(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, want = model_file
    before = path.read_bytes()
    got = client.load_safetensors_file(path)
    a, b = got["f32"], got["f64"]
    # Views of one mapping of the file: their addresses are as far apart as their file offsets.
    header = {t.name: t for t in read_header(path).tensors}
    assert a.data_ptr() - b.data_ptr() == header["f32"].offset - header["f64"].offset
    a.add_(1)  # must neither crash (read-only mapping) nor reach the file or other readers
    assert torch.equal(a, want["f32"] + 1)
    assert path.read_bytes() == before
    assert_same(client.load_safetensors_file(path), want)


def test_misaligned_tensor_gets_aligned_memory(tmp_path: Path) -> None:
    """A file save_file would not write but load_file reads: an F32 right after 3 bytes of U8."""
    floats = torch.tensor([1.5, -2.0, 3.0e38], dtype=torch.float32)
    header = {
        "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
    }
    # Pad the header so the data starts 8-aligned, as real files do; "f" is then at an odd offset.
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 8)
    path = write_raw(tmp_path / "odd.safetensors", head, b"\x01\x02\x03" + floats.numpy().tobytes())
    want = load_file(str(path))
    for copy in (False, True):
        got = client.load_safetensors_file(path, copy=copy)
        assert_same(got, want)
        assert got["f"].data_ptr() % 4 == 0


def test_multiple_shards_merge_and_duplicates_are_rejected(tmp_path: Path) -> None:
    tensors = sample_tensors()
    names = sorted(tensors)
    shards = [tmp_path / f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i, shard in enumerate(shards):
        save_file({n: tensors[n] for n in names[i::3]}, str(shard))
    want: dict[str, torch.Tensor] = {}
    for shard in shards:
        want.update(load_file(str(shard)))
    assert_same(client.load_safetensors_files(shards), want)

    dup = tmp_path / "dup.safetensors"
    save_file({names[0]: tensors[names[0]]}, str(dup))
    baseline = open_fds()
    with pytest.raises(MalformedFileError, match=f"{names[0]!r} is in both .*{shards[0].name}.*dup.safetensors"):
        client.load_safetensors_files([*shards, dup])
    assert open_fds() == baseline  # every shard opened for the failed load was closed again


def test_names_filter(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, want = model_file
    got = client.load_safetensors_file(path, names=["bf16", "scalar", "empty"])
    assert_same(got, {n: want[n] for n in ("bf16", "scalar", "empty")})
    assert_same(client.load_safetensors_file(path, names="i8"), {"i8": want["i8"]})  # a lone str is one name
    assert client.load_safetensors_file(path, names=[]) == {}
    with pytest.raises(KeyError) as info:
        client.load_safetensors_file(path, names=["bf16", "no.such.weight"])
    message = str(info.value)
    assert "no.such.weight" in message and "available" in message and "bf16" in message


def test_meta_device_goes_through_the_device_path(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A non-CPU device goes through the device ring; meta exercises that path without a GPU."""
    path, want = model_file
    got = client.load_safetensors_file(path, device="meta", names=["bf16", "scalar"])
    assert {n: (t.device.type, t.dtype, t.shape) for n, t in got.items()} == {
        n: ("meta", want[n].dtype, want[n].shape) for n in ("bf16", "scalar")
    }
    assert can_lock_exclusively(path)  # nothing maps the file once the tensors left the CPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, want = model_file
    got = client.load_safetensors_file(path, device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same({n: t.cpu() for n, t in got.items()}, want)


# ---------------------------------------------------------------------- the shared lock


def test_shared_lock_held_while_mapped_tensors_live(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = model_file
    baseline = open_fds()
    assert can_lock_exclusively(path)
    tensors = client.load_safetensors_file(path)
    assert not can_lock_exclusively(path)
    keep = tensors["bf16"]  # one surviving tensor keeps the whole file locked
    del tensors
    gc.collect()
    assert not can_lock_exclusively(path)
    other_reader = client.load_safetensors_file(path, names=["f32"])  # shared locks coexist
    del keep, other_reader
    gc.collect()
    assert can_lock_exclusively(path)
    assert open_fds() == baseline


def test_copy_mode_and_failures_hold_no_lock(model_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, want = model_file
    baseline = open_fds()
    got = client.load_safetensors_file(path, copy=True)
    assert can_lock_exclusively(path)  # copies own their memory: nothing to protect
    assert_same(got, want)
    bad = write_raw(tmp_path / "bad.safetensors", b"{not json}")
    with pytest.raises(MalformedFileError):
        client.load_safetensors_file(bad)
    assert can_lock_exclusively(bad)
    assert open_fds() == baseline


def test_reader_waits_for_a_short_exclusive_lock(model_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The agent holds LOCK_EX only while it unlinks; a reader arriving then waits instead of failing."""
    path, want = model_file
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(0.3, os.close, (fd,))
    timer.start()
    started = time.monotonic()
    got = client.load_safetensors_file(path)
    assert time.monotonic() - started >= 0.25
    timer.join()
    assert_same(got, want)


# ---------------------------------------------------------------------- malformed headers


def _entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty_file": (lambda p: (p.write_bytes(b""), p)[1], "too short"),
    "truncated_length": (lambda p: (p.write_bytes(b"\x10\x00\x00"), p)[1], "too short"),
    "huge_length": (lambda p: write_raw(p, {}, length=2**62), "exceeds"),
    "just_over_limit": (lambda p: write_raw(p, {}, length=MAX_HEADER_BYTES + 1), "exceeds"),
    "length_past_eof": (lambda p: write_raw(p, {"a": _entry("U8", [1], 0, 1)}, b"\0", length=4096), "past the end"),
    "non_utf8": (lambda p: write_raw(p, b'{"\xff\xfe": 1}'), "not valid UTF-8"),
    "non_json": (lambda p: write_raw(p, b"{this is not json"), "not valid JSON"),
    "nan_constant": (lambda p: write_raw(p, b'{"a": NaN}'), "not valid JSON"),
    "not_an_object": (lambda p: write_raw(p, b"[1, 2, 3]"), "must be a JSON object"),
    "duplicate_name": (
        lambda p: write_raw(p, b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": 1}', b"\0"),
        "duplicate key 'a'",
    ),
    "entry_not_object": (lambda p: write_raw(p, {"w": [1, 2]}), "'w': entry must be an object"),
    "bad_dtype": (
        lambda p: write_raw(p, {"w": _entry("F33", [1], 0, 4)}, b"\0" * 4),
        "unknown or unsupported dtype 'F33'",
    ),
    "missing_dtype": (lambda p: write_raw(p, {"w": {"shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype"),
    "offsets_past_data": (
        lambda p: write_raw(p, {"w": _entry("F32", [4], 0, 16)}, b"\0" * 8),
        "past the 8-byte data buffer",
    ),
    "begin_after_end": (lambda p: write_raw(p, {"w": _entry("U8", [0], 4, 2)}, b"\0" * 8), "begin 4 is after end 2"),
    "negative_offset": (lambda p: write_raw(p, {"w": _entry("U8", [1], -1, 0)}, b"\0"), "data_offsets must be"),
    "offsets_wrong_arity": (
        lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"\0"),
        "data_offsets must be",
    ),
    "overlap": (
        lambda p: write_raw(p, {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12),
        "'a' and 'b' overlap",
    ),
    "contained_overlap": (
        lambda p: write_raw(p, {"big": _entry("U8", [16], 0, 16), "small": _entry("U8", [2], 6, 8)}, b"\0" * 16),
        "'big' and 'small' overlap",
    ),
    "shape_size_mismatch": (
        lambda p: write_raw(p, {"w": _entry("BF16", [3, 2], 0, 8)}, b"\0" * 12),
        "span 8 bytes but shape [3, 2] of BF16 needs 12",
    ),
    "negative_dim": (lambda p: write_raw(p, {"w": _entry("F32", [-1, 2], 0, 0)}), "non-negative integers"),
    "float_dim": (lambda p: write_raw(p, {"w": _entry("F32", [2.0], 0, 8)}, b"\0" * 8), "non-negative integers"),
    "bool_dim": (lambda p: write_raw(p, {"w": _entry("U8", [True], 0, 1)}, b"\0"), "non-negative integers"),
    "metadata_not_strings": (
        lambda p: write_raw(p, {"__metadata__": {"step": 3}}),
        "__metadata__['step'] must be a string",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_malformed_file_error(case: str, tmp_path: Path) -> None:
    make, reason = MALFORMED[case]
    path = make(tmp_path / f"{case}.safetensors")
    with pytest.raises(MalformedFileError) as info:
        client.load_safetensors_file(path)
    message = str(info.value)
    assert str(path) in message, message
    assert reason in message, message
    assert isinstance(info.value, ValueError)  # callers catching ValueError still catch it


def test_truncated_data_is_rejected_before_mapping(
    model_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, _ = model_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(MalformedFileError, match=r"past the .*data buffer"):
        client.load_safetensors_file(cut)


def test_zero_size_tensors_may_share_offsets_and_header_may_be_padded(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"k": "v"},
        "e1": _entry("F32", [0, 5], 4, 4),
        "e2": _entry("I64", [0], 4, 4),
        "x": _entry("F32", [], 0, 4),
        "y": _entry("U8", [2, 2], 4, 8),
    }
    head = json.dumps(header).encode() + b"        "  # trailing spaces, as writers pad to 8 bytes
    path = write_raw(tmp_path / "zero.safetensors", head, torch.tensor(2.5).numpy().tobytes() + bytes([1, 2, 3, 4]))
    assert_same(client.load_safetensors_file(path), load_file(str(path)))


# ---------------------------------------------------------------------- import hygiene


def test_import_client_pulls_in_no_agent_dependencies() -> None:
    code = (
        "import sys\n"
        "import client.errors, client.transport\n"
        "assert 'torch' not in sys.modules, 'the agent imports these two and must not pay for torch'\n"
        "import client, client.loader, client.safetensors_header\n"
        "heavy = {'aiohttp', 'boto3', 'botocore', 'huggingface_hub', 'prometheus_client', 'yaml', 'agent'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
        "assert client.__all__ == sorted(client.__all__)\n"
        "assert all(hasattr(client, n) for n in client.__all__)\n"
        "assert set(client.__all__) <= set(dir(client))\n"
        "from client import load_safetensors_files, read_header\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


def test_the_agent_cli_verbs_start_without_the_daemon_modules() -> None:
    """`agent prefetch` / `agent ls` are short-lived clients, often started on a cold page cache:
    they import the parser's defaults and the client's transport, not the daemon's modules."""
    code = (
        "import sys\n"
        "import agent.cli\n"
        "daemon = {'agent.config', 'agent.manifest', 'agent.store.store', 'agent.daemon',"
        " 'aiohttp', 'botocore', 'hashlib'}\n"
        "bad = sorted(daemon & set(sys.modules))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------- transport


def test_missing_socket_is_agent_unavailable_naming_the_path(sock_dir: Path) -> None:
    path = str(sock_dir / "nobody-home.sock")
    with pytest.raises(AgentUnavailableError) as info:
        AgentConnection(path, timeout=2).request_json("GET", "/v1/models")
    message = str(info.value)
    assert path in message and "agent serve" in message and "WARMSTART_SOCKET" in message
    assert isinstance(info.value, ConnectionError)


def test_refused_socket_is_agent_unavailable(sock_dir: Path) -> None:
    """A socket file left behind by a dead agent: connect is refused."""
    path = str(sock_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # bound but never listening, like a crashed agent's leftover
    with pytest.raises(AgentUnavailableError, match=r"stale.sock"):
        AgentConnection(path, timeout=2).stream("POST", "/v1/open", {"ref": "x"})


def test_socket_path_comes_from_env_at_call_time(monkeypatch: pytest.MonkeyPatch, sock_dir: Path) -> None:
    monkeypatch.delenv("WARMSTART_SOCKET", raising=False)
    assert AgentConnection().socket_path == "/run/warmstart/agent.sock"
    monkeypatch.setenv("WARMSTART_SOCKET", str(sock_dir / "env.sock"))
    assert AgentConnection().socket_path == str(sock_dir / "env.sock")
    assert AgentConnection("/explicit.sock").socket_path == "/explicit.sock"
    with pytest.raises(AgentUnavailableError, match=r"env.sock"):
        client.open_tensors("s3://b/m")
    with pytest.raises(ValueError):
        AgentConnection(timeout=0)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


Handler = Callable[["_AgentHandler", dict[str, Any] | None], None]


class _AgentHandler(http.server.BaseHTTPRequestHandler):
    """Answers from the ``routes`` of its server; records every request it saw."""

    protocol_version = "HTTP/1.1"
    server: FakeAgent.Server

    def log_message(self, format: str, *args: Any) -> None:  # AF_UNIX has no client address to log
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.agent.requests.append((self.command, self.path, body))
        route = self.server.agent.routes.get((self.command, self.path))
        if route is None:
            self.send_json(404, {"error": {"kind": "bad_request", "message": f"no route {self.path}"}})
        else:
            route(self, body)

    do_GET = do_POST = _dispatch

    def send_json(self, status: int, obj: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_ndjson(self, lines: list[dict[str, Any]], delay: float = 0.0, finish: bool = True) -> None:
        """Chunked NDJSON like aiohttp's StreamResponse; ``finish=False`` leaves the stream open (a hung agent)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(delay)
        if finish:
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.server.agent.release.wait(10)


class FakeAgent:
    """A stdlib HTTP server on a real Unix socket standing in for the agent's local API."""

    class Server(_Server):
        agent: FakeAgent

    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.release = threading.Event()
        self.server = FakeAgent.Server(path, _AgentHandler)
        self.server.agent = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_agent(sock_dir: Path) -> Iterator[FakeAgent]:
    agent = FakeAgent(str(sock_dir / "agent.sock"))
    try:
        yield agent
    finally:
        agent.close()


def test_request_json_and_typed_error_bodies(fake_agent: FakeAgent) -> None:
    fake_agent.routes[("GET", "/v1/models")] = lambda h, b: h.send_json(200, {"models": [], "used_bytes": 0})
    fake_agent.routes[("POST", "/v1/resolve")] = lambda h, b: h.send_json(
        404, {"error": {"kind": "not_found", "message": "no bucket nope"}}
    )
    fake_agent.routes[("POST", "/v1/evict")] = lambda h, b: h.send_json(500, None, raw=b"<html>oops</html>")
    conn = AgentConnection(fake_agent.path, timeout=5)
    assert conn.request_json("GET", "/v1/models") == {"models": [], "used_bytes": 0}
    with pytest.raises(ModelNotFoundError, match="no bucket nope"):
        conn.request_json("POST", "/v1/resolve", {"ref": "s3://nope/m"})
    with pytest.raises(WarmstartError, match=r"HTTP 500.*oops"):
        conn.request_json("POST", "/v1/evict", {"ref": "s3://nope/m"})
    assert fake_agent.requests[1] == ("POST", "/v1/resolve", {"ref": "s3://nope/m"})


def test_stream_yields_lines_then_raises_the_typed_error_line(fake_agent: FakeAgent) -> None:
    lines: list[dict[str, Any]] = [
        {"event": "resolved", "ref": "s3://b/m", "total_bytes": 10},
        {"event": "progress", "done_bytes": 5, "total_bytes": 10, "rate_bps": 1.0},
        {"event": "error", "error": {"kind": "fetch_failed", "message": "origin gave 503 five times"}},
    ]
    fake_agent.routes[("POST", "/v1/prefetch")] = lambda h, b: h.send_ndjson(lines)
    seen = []
    with pytest.raises(FetchFailedError, match="origin gave 503 five times"):
        for line in AgentConnection(fake_agent.path, timeout=5).stream("POST", "/v1/prefetch", {"ref": "s3://b/m"}):
            seen.append(line)
    assert seen == lines[:2]


def test_stream_status_error_raises_before_iteration(fake_agent: FakeAgent) -> None:
    fake_agent.routes[("POST", "/v1/open")] = lambda h, b: h.send_json(
        400, {"error": {"kind": "bad_reference", "message": "unsupported scheme ftp"}}
    )
    with pytest.raises(client.BadReferenceError, match="ftp"):
        AgentConnection(fake_agent.path, timeout=5).stream("POST", "/v1/open", {"ref": "ftp://x"})


def test_slow_but_live_agent_is_not_a_timeout(fake_agent: FakeAgent) -> None:
    """The timeout is silence between bytes, not the length of the whole operation."""
    ticks = [{"event": "progress", "done_bytes": i} for i in range(6)] + [{"event": "complete"}]
    fake_agent.routes[("POST", "/v1/prefetch")] = lambda h, b: h.send_ndjson(ticks, delay=0.15)
    started = time.monotonic()
    got = list(AgentConnection(fake_agent.path, timeout=0.5).stream("POST", "/v1/prefetch", {"ref": "r"}))
    assert got == ticks
    assert time.monotonic() - started > 0.6  # longer than the timeout in all


def test_agent_that_goes_silent_mid_stream_times_out(fake_agent: FakeAgent) -> None:
    fake_agent.routes[("POST", "/v1/open")] = lambda h, b: h.send_ndjson([{"event": "resolved"}], finish=False)
    stream = AgentConnection(fake_agent.path, timeout=0.5).stream("POST", "/v1/open", {"ref": "r"})
    assert next(stream) == {"event": "resolved"}
    started = time.monotonic()
    with pytest.raises(AgentUnavailableError, match=r"agent.sock"):
        next(stream)
    assert time.monotonic() - started < 3


def test_agent_that_never_answers_times_out(sock_dir: Path) -> None:
    """Accepts the connection (the kernel does, even with no accept()) and never says a word."""
    path = str(sock_dir / "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        calls: list[Callable[[AgentConnection], object]] = [
            lambda c: c.request_json("GET", "/v1/models"),
            lambda c: c.stream("POST", "/v1/open", {"ref": "r"}),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(AgentUnavailableError) as info:
                call(AgentConnection(path, timeout=0.5))
            assert time.monotonic() - started < 3
            assert path in str(info.value) and "no answer" in str(info.value)
    finally:
        listener.close()


def test_agent_dying_mid_stream_is_agent_unavailable(sock_dir: Path) -> None:
    path = str(sock_dir / "dies.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve_then_die() -> None:
        conn, _ = listener.accept()
        request = b""
        while not request.endswith(b'{"ref": "r"}'):  # the whole request, so our close is no broken pipe
            request += conn.recv(65536)
        line = b'{"event": "resolved"}\n'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(line), line)
            + b"40\r\n{\"event\": \"prog"
        )
        conn.close()

    thread = threading.Thread(target=serve_then_die, daemon=True)
    thread.start()
    try:
        stream = AgentConnection(path, timeout=5).stream("POST", "/v1/open", {"ref": "r"})
        assert next(stream) == {"event": "resolved"}
        with pytest.raises(AgentUnavailableError, match="connection broke"):
            next(stream)
    finally:
        thread.join(5)
        listener.close()


# ---------------------------------------------------------------------- open_tensors end to end


@pytest.fixture
def cache_with_model(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], dict[str, torch.Tensor]]:
    """A cache directory holding a two-shard model as content-addressed blobs, and its ``files`` list."""
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    tensors = sample_tensors()
    names = sorted(tensors)
    files: list[dict[str, Any]] = [{"path": "config.json", "size": 2, "blob": "blobs/c0ffee"}]
    (cache / "blobs" / "c0ffee").write_bytes(b"{}")
    want: dict[str, torch.Tensor] = {}
    for i in range(2):
        scratch = cache / f"shard-{i}.tmp"
        save_file({n: tensors[n] for n in names[i::2]}, str(scratch))
        blob = f"blobs/{xxhash.xxh3_128(scratch.read_bytes()).hexdigest()}"  # named by its content, as the agent does
        scratch.rename(cache / blob)
        want.update(load_file(str(cache / blob)))
        files.append(
            {"path": f"model-0000{i + 1}-of-00002.safetensors", "size": (cache / blob).stat().st_size, "blob": blob}
        )
    return cache, files, want


def _open_route(cache_dir: str, files: list[dict[str, Any]]) -> Handler:
    """The agent's /v1/open: resolved, progress, then complete with ``cache_dir`` and ``files``."""

    def route(h: _AgentHandler, body: dict[str, Any] | None) -> None:
        ref = (body or {}).get("ref")
        h.send_ndjson([
            {"event": "resolved", "ref": ref, "revision": "abc", "total_bytes": 1, "cached_bytes": 0, "files": 3},
            {"event": "progress", "done_bytes": 1, "total_bytes": 1, "rate_bps": 1.0},
            {"event": "complete", "ref": ref, "revision": "abc", "cache_dir": cache_dir, "files": files},
        ])

    return route


def test_open_tensors_loads_every_shard(
    fake_agent: FakeAgent, cache_with_model: tuple[Path, list[dict[str, Any]], dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, files, want = cache_with_model
    monkeypatch.delenv("WARMSTART_CACHE_DIR", raising=False)
    fake_agent.routes[("POST", "/v1/open")] = _open_route(str(cache), files)
    got = client.open_tensors("s3://models/m", socket=fake_agent.path, timeout=5)
    assert_same(got, want)
    assert fake_agent.requests == [("POST", "/v1/open", {"ref": "s3://models/m", "stream": True})]
    some = sorted(want)[:2]
    assert_same(client.open_tensors("s3://models/m", socket=fake_agent.path, names=some), {n: want[n] for n in some})


def test_open_tensors_uses_warmstart_cache_dir_mount(
    fake_agent: FakeAgent, cache_with_model: tuple[Path, list[dict[str, Any]], dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pod mounts the node cache somewhere else than the agent's own path."""
    cache, files, want = cache_with_model
    fake_agent.routes[("POST", "/v1/open")] = _open_route("/var/lib/warmstart-not-here", files)
    with pytest.raises(WarmstartError, match=r"is missing.*WARMSTART_CACHE_DIR"):
        client.open_tensors("hf://o/m", socket=fake_agent.path, timeout=5)
    monkeypatch.setenv("WARMSTART_CACHE_DIR", str(cache))
    monkeypatch.setenv("WARMSTART_SOCKET", fake_agent.path)
    assert_same(client.open_tensors("hf://o/m", timeout=5), want)


def test_open_tensors_protocol_failures(fake_agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARMSTART_CACHE_DIR", raising=False)
    fake_agent.routes[("POST", "/v1/open")] = _open_route(
        str(tmp_path), [{"path": "model.bin", "size": 1, "blob": "blobs/aa"}]
    )
    with pytest.raises(ModelNotFoundError, match=r"no .safetensors files.*model.bin"):
        client.open_tensors("s3://b/bin-only", socket=fake_agent.path, timeout=5)
    fake_agent.routes[("POST", "/v1/open")] = _open_route(
        str(tmp_path), [{"path": "m.safetensors", "size": 1, "blob": "../../etc/passwd"}]
    )
    with pytest.raises(WarmstartError, match="not inside the cache"):
        client.open_tensors("s3://b/m", socket=fake_agent.path, timeout=5)
    fake_agent.routes[("POST", "/v1/open")] = lambda h, b: h.send_ndjson([{"event": "resolved"}])
    with pytest.raises(AgentUnavailableError, match="before it completed"):
        client.open_tensors("s3://b/m", socket=fake_agent.path, timeout=5)


def test_real_model_loads_bit_exact(minilm_dir: Path) -> None:
    """A file nobody here wrote: sentence-transformers/all-MiniLM-L6-v2 as published."""
    path = minilm_dir / "model.safetensors"
    got = client.load_safetensors_file(path)
    assert len(got) > 100
    assert_same(got, load_file(str(path)))

