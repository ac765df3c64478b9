"""Compile artifacts (issue 5): bundles, the node index, peers, and a real torch.compile warm start.

The compile test runs real Inductor on CPU (it needs the C++ compiler) in
fresh processes: node A compiles a small transformer-like block cold inside
``client.compile_cache(KEY)`` and publishes on exit; node B, another agent
with another cache dir, a fresh process and fresh Inductor directories,
restores the bundle from A through the peer API, and its compile must hit the
caches: Inductor's FX graph cache and AOTAutograd's cache counters, not time.
Hostile archives are checked both in-process and through a real agent.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import xxhash

from client.artifacts import list_artifacts, open_bundle, pull_dir, push_bundle, push_dir
from client.bundles import Bundle, build_bundle
from client.errors import ArtifactNotFoundError, UnsafeBundleError
from client.fingerprint import current_fingerprint, fingerprint_id
from tests.servers.pki import make_signing_key
from tests.servers.ports import free_ports

TOKEN = "artifact-peer-token-0123456789abcdef"
KEY = "tiny-transformer"

# ---------------------------------------------------------------------- bundles (no agent)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes | None = b"x"
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info, data if kind == tarfile.REGTYPE else None


def test_bundle_round_trip_merges_into_the_target(tmp_path: Path) -> None:
    src = _tree(
        tmp_path / "src", {"a/b.so": os.urandom(3000), "c.py": b"print(1)\n", "locks/x.lock": b"", "t.lock": b""}
    )
    buf = io.BytesIO()
    build_bundle(buf, {"inductor": str(src)}, {"mega.bin": b"MEGA"})
    dst = _tree(tmp_path / "dst", {"keep.txt": b"mine", "c.py": b"old"})
    buf.seek(0)
    with Bundle(buf) as b:
        assert sorted(b.trees) == ["inductor"] and b.read("mega.bin") == b"MEGA"
        assert b.install("inductor", str(dst)) == 2
    assert (dst / "a/b.so").read_bytes() == (src / "a/b.so").read_bytes()
    assert (dst / "c.py").read_bytes() == b"print(1)\n" and (dst / "keep.txt").read_bytes() == b"mine"
    assert not (dst / "locks").exists() and not (dst / "t.lock").exists()  # process-local state is not shipped
    assert [p.name for p in dst.iterdir() if p.name.startswith(".warmstart-install")] == []


HOSTILE = {
    "dotdot": [_member("inductor/../../evil.txt")],
    "absolute": [_member("/tmp/warmstart-evil-abs.txt")],
    "symlink-escape": [_member("inductor/link", tarfile.SYMTYPE, "../../outside"), _member("inductor/link/evil.txt")],
    "symlink-absolute": [_member("inductor/abs", tarfile.SYMTYPE, "/etc")],
    "hardlink-outside": [_member("inductor/hl", tarfile.LNKTYPE, "../outside/secret")],
    "device": [_member("inductor/dev", tarfile.CHRTYPE)],
    "fifo": [_member("inductor/fifo", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_rejected_naming_the_member_and_writes_nothing(tmp_path: Path, case: str) -> None:
    target = tmp_path / "box" / "target"
    target.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    members = [_member("inductor", tarfile.DIRTYPE), *HOSTILE[case]]
    with pytest.raises(UnsafeBundleError) as err, Bundle(io.BytesIO(_tar(members))) as b:
        b.install("inductor", str(target))
    assert err.value.member is not None and err.value.member in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/warmstart-evil-abs.txt").exists()


def test_install_refuses_to_write_through_a_symlink_already_in_the_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(outside)
    data = _tar([_member("inductor", tarfile.DIRTYPE), _member("inductor/sub/evil.txt")])
    with pytest.raises(UnsafeBundleError, match="target/sub"), Bundle(io.BytesIO(data)) as b:
        b.install("inductor", str(target))
    assert list(outside.iterdir()) == []


def test_fingerprint_names_the_stack() -> None:
    fp = current_fingerprint("torch-compile", "cfg-123")
    import torch

    assert fp["torch"] == torch.__version__ and fp["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert fp["extra"] == "cfg-123" and fp["gpu"] == "none" and fp["cpu"]
    assert fingerprint_id(fp) != fingerprint_id({**fp, "torch": "2.0.0"})


# ---------------------------------------------------------------------- one agent


def _fp(extra: str | None = None) -> dict[str, str]:
    return current_fingerprint("dir", extra, with_torch=False)


@pytest.mark.slow
def test_push_pull_directory_cli_and_fingerprint_mismatch(inproc_factory: Any, tmp_path: Path) -> None:
    agent = inproc_factory("a")
    src = _tree(
        tmp_path / "vllm-cache", {"torch_compile_cache/abc/rank_0/model.py": b"code", "x/y.bin": os.urandom(70000)}
    )
    out = agent.cli("artifacts", "push", "vllm-8b", "--from", str(src), check=True)
    digest = out.stdout.split()[3]
    assert (agent.cache_dir / "blobs" / digest).is_file(), out.stdout
    dst = tmp_path / "restored"
    out = agent.cli("artifacts", "pull", "vllm-8b", "--into", str(dst), check=True)
    assert "2 files" in out.stdout
    assert (dst / "x/y.bin").read_bytes() == (src / "x/y.bin").read_bytes()
    assert (dst / "torch_compile_cache/abc/rank_0/model.py").read_bytes() == b"code"
    # Another framework config hash: refused, with why; nothing installed.
    other = tmp_path / "other"
    out = agent.cli("artifacts", "pull", "vllm-8b", "--into", str(other), "--fingerprint-extra", "cfg-2")
    assert out.returncode == 1 and "extra: cfg-2 here, (none) in the bundle" in out.stderr, out.stderr
    assert not other.exists()
    out = agent.cli("artifacts", "ls", "--fingerprint-extra", "cfg-2", check=True)
    assert "no: extra" in out.stdout and "vllm-8b" in out.stdout, out.stdout
    out = agent.cli("artifacts", "ls", "--json", check=True)
    (entry,) = json.loads(out.stdout)["artifacts"]
    assert entry["matches"] and entry["present"] and entry["digest"] == digest
    record = json.loads((agent.cache_dir / "artifacts" / "vllm-8b" / f"{entry['fingerprint_id']}.json").read_text())
    assert record["digest"] == digest and record["size"] == entry["size"]
    assert agent.cli("artifacts", "pull", "nothing-here", "--into", str(other)).returncode == 1


def test_hostile_bundle_through_the_agent_is_rejected(inproc_factory: Any, tmp_path: Path) -> None:
    agent = inproc_factory("a")
    sock = str(agent.socket_path)
    hostile = _tar([_member("dir", tarfile.DIRTYPE), _member("dir/ok.txt"), _member("dir/../../escaped.txt")])
    f = io.BytesIO(hostile)
    from client.transport import AgentConnection

    AgentConnection(sock).send_file("POST", "/v1/artifacts/publish", f, len(hostile),
                                    headers={"X-Warmstart-Artifact": json.dumps({"key": "evil", "fingerprint": _fp()})})
    target = tmp_path / "deep" / "target"
    with pytest.raises(UnsafeBundleError, match=r"dir/\.\./\.\./escaped\.txt"):
        pull_dir("evil", str(target), _fp(), socket=sock)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "deep" / "escaped.txt").exists()
    assert not target.exists() or list(target.iterdir()) == []


def test_concurrent_pushes_of_one_key_leave_one_complete_entry(inproc_factory: Any, tmp_path: Path) -> None:
    agent = inproc_factory("a")
    sock = str(agent.socket_path)
    trees = {
        n: _tree(tmp_path / f"src-{n}", {f"{n}-{i}.bin": os.urandom(2 * 1024 * 1024) for i in range(4)}) for n in "ab"
    }
    results: dict[str, Any] = {}

    def push(name: str) -> None:
        results[name] = push_dir("shared", str(trees[name]), _fp(), socket=sock)

    threads = [threading.Thread(target=push, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {"a", "b"}
    (entry,) = list_artifacts("shared", socket=sock)["artifacts"]
    assert entry["digest"] in {r["digest"] for r in results.values()} and entry["present"]
    blob = agent.cache_dir / "blobs" / entry["digest"]
    assert xxhash.xxh3_128_hexdigest(blob.read_bytes()) == entry["digest"] and blob.stat().st_size == entry["size"]
    loser = ({r["digest"] for r in results.values()} - {entry["digest"]}).pop()
    assert not (agent.cache_dir / "blobs" / loser).exists()  # last complete wins; the other bundle is dropped
    dst = tmp_path / "out"
    pull_dir("shared", str(dst), _fp(), socket=sock)
    winner = next(n for n, r in results.items() if r["digest"] == entry["digest"])
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in trees[winner].iterdir())
    for p in trees[winner].iterdir():
        assert (dst / p.name).read_bytes() == p.read_bytes()
    assert list((agent.cache_dir / "partial").iterdir()) == []


def test_capacity_counts_bundles_and_evicts_them_lru(inproc_factory: Any, tmp_path: Path) -> None:
    agent = inproc_factory("a", capacity="5MiB")
    sock = str(agent.socket_path)
    for i in range(3):
        push_bundle(f"k{i}", _fp(), {}, {"blob.bin": os.urandom(2 * 1024 * 1024)}, socket=sock)
    listing = list_artifacts(socket=sock)
    present = {a["key"]: a["present"] for a in listing["artifacts"]}
    assert present == {"k0": False, "k1": True, "k2": True}, present
    assert listing["used_bytes"] <= 5 * 1024 * 1024
    with pytest.raises(ArtifactNotFoundError, match="evicted"), open_bundle("k0", _fp(), socket=sock):
        pass


# ---------------------------------------------------------------------- peers + real torch.compile

COMPILE_SCRIPT = r'''
import json, sys, time
import torch
import client
from torch._dynamo.utils import counters

key, extra = sys.argv[1], (sys.argv[2] or None)

class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.fc = torch.nn.Linear(d, d)
    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return x + self.fc(torch.nn.functional.gelu(att @ v))

torch.manual_seed(0)
model = Block(16).eval()
x = torch.randn(2, 8, 16)
with client.compile_cache(key, fingerprint_extra=extra, strict=True) as cc:
    t = time.perf_counter()
    with torch.no_grad():
        y = torch.compile(model)(x)
    seconds = time.perf_counter() - t
with torch.no_grad():
    assert torch.allclose(y, model(x), atol=1e-5)
print(json.dumps({
    "restored": cc.restored, "source": cc.source, "files": cc.files_restored, "published": cc.published,
    "skipped": cc.skipped_publish, "dir": cc.inductor_dir, "seconds": seconds, "errors": cc.errors,
    "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
}))
'''


def _compile(agent: Any, tmp_path: Path, name: str, extra: str = "") -> dict[str, Any]:
    script = tmp_path / "compile_it.py"
    script.write_text(COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update({"WARMSTART_SOCKET": str(agent.socket_path), "XDG_CACHE_HOME": str(tmp_path / f"home-{name}")})
    done = subprocess.run([sys.executable, str(script), KEY, extra], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.timeout(600)  # two cold torch.compile runs and a probe, each bounded (240 s, 120 s) on its own:
# beside 3 other workers on 2 loaded cores the sum passed the suite's 300 s
def test_compile_on_one_node_restores_from_a_peer_and_hits_the_caches(inproc_factory: Any, tmp_path: Path) -> None:
    token = tmp_path / "peer-token"
    token.write_text(TOKEN)
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    private, public = make_signing_key(tmp_path / "keys")  # A publishes signed; B loads only what A's key signed
    trust = ("--artifact-trust", "signed", "--artifact-trusted-keys", str(public))
    signing = (("--artifact-signing-key", str(private)), ())
    a, b = (inproc_factory(f"node{i}", port=p,
                           extra_args=("--peers", peers, "--peer-token-file", str(token), *trust, *signing[i],
                                       "--peer-start-wait", "0"))
            for i, p in enumerate(ports))
    cold = _compile(a, tmp_path, "a")
    assert cold["restored"] is None and cold["errors"] == [], cold
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1 and not cold["inductor"].get("fxgraph_cache_hit"), cold
    published = cold["published"]
    assert published and (a.cache_dir / "blobs" / published["digest"]).is_file()
    assert str(tmp_path / "home-a") in cold["dir"]  # a per-key Inductor dir, since none was set

    warm = _compile(b, tmp_path, "b")
    assert warm["source"] == f"peer {a.listen}" and warm["restored"]["digest"] == published["digest"], warm
    assert warm["files"] > 0 and warm["errors"] == []
    assert warm["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not warm["inductor"].get("fxgraph_cache_miss"), warm
    assert warm["aot"].get("autograd_cache_hit", 0) >= 1 and not warm["aot"].get("autograd_cache_miss"), warm
    assert warm["published"] is None and warm["skipped"] == "nothing new was compiled"
    blob = b.cache_dir / "blobs" / published["digest"]
    assert xxhash.xxh3_128_hexdigest(blob.read_bytes()) == published["digest"]  # verified copy on B
    print(f"cold compile {cold['seconds']:.2f}s, restored from a peer {warm['seconds']:.2f}s")

    # Another fingerprint (a framework config hash) never gets that bundle; ls on B says why.
    env = {"WARMSTART_SOCKET": str(b.socket_path)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import client, json\n"
         f"with client.compile_cache({KEY!r}, fingerprint_extra='other-cfg', publish=False) as cc: pass\n"
         "print(json.dumps({'restored': cc.restored, 'files': cc.files_restored}))"],
        env={**os.environ, **env, "XDG_CACHE_HOME": str(tmp_path / "home-c")}, capture_output=True, text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.splitlines()[-1]) == {"restored": None, "files": 0}
    out = b.cli("artifacts", "ls", KEY, "--fingerprint-extra", "other-cfg", check=True)
    assert "no: extra" in out.stdout, out.stdout
