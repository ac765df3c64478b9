"""The node agent end to end: real agents, real SeaweedFS, a real HF-compatible endpoint,
the real all-MiniLM-L6-v2 model, and the `agent` CLI as users type it.

The agents run in this process (``inproc_factory``, tests/servers/inprocess.py)
except where the process is the point: kill -9 in the middle of a fill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import client
from tests.servers.seaweedfs import SeaweedS3

MODEL_FILE = "model.safetensors"


def expected_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / MODEL_FILE))


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def blob_sizes(agent: Any) -> list[int]:
    return sorted(p.stat().st_size for p in (agent.cache_dir / "blobs").iterdir())


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress may precede it
    return errors[0]


def test_s3_prefetch_then_open_bit_exact(inproc_factory: Any, s3_model: Any) -> None:
    agent = inproc_factory()
    done = agent.cli("prefetch", s3_model.ref, "--pin")
    assert done.returncode == 0, done.stderr
    assert "in cache" in done.stdout and "pinned" in done.stdout
    tensors = client.open_tensors(s3_model.ref, socket=str(agent.socket_path))
    assert_bit_exact(tensors, expected_tensors(s3_model.local_dir))
    listing = json.loads(agent.cli("ls", "--json", check=True).stdout)
    (model,) = listing["models"]
    assert model["ref"] == s3_model.ref and model["pinned"] is True
    assert model["cached_bytes"] == model["total_size"] > 90_000_000
    table = agent.cli("ls", check=True).stdout
    assert s3_model.ref in table and "100%" in table


def test_hf_prefetch_checks_hub_digests(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    agent = inproc_factory()
    ok = agent.cli("prefetch", f"{hf_model.ref}@main")
    assert ok.returncode == 0, ok.stderr
    assert hf_model.commit in ok.stdout  # @main resolved to the commit
    tensors = client.open_tensors(hf_model.ref, socket=str(agent.socket_path))
    assert_bit_exact(tensors, expected_tensors(hf_model.local_dir))

    # The hub serves one flipped byte: the sha256 check refuses it, nothing is published.
    hf_endpoint.corrupt_paths.add(MODEL_FILE)
    fresh = inproc_factory("fresh")
    bad = fresh.cli("prefetch", hf_model.ref)
    assert "sha256" in one_line_error(bad)
    assert 90868376 not in blob_sizes(fresh)
    assert not any((fresh.cache_dir / "partial").iterdir())
    assert fresh.http_status("/readyz") == 200
    hf_endpoint.corrupt_paths.clear()
    assert fresh.cli("prefetch", hf_model.ref).returncode == 0


def test_same_bytes_from_two_origins_stored_once(inproc_factory: Any, s3_model: Any, hf_model: Any) -> None:
    agent = inproc_factory()
    assert agent.cli("prefetch", s3_model.ref).returncode == 0
    assert agent.cli("prefetch", hf_model.ref).returncode == 0
    assert agent.cli("prefetch", str(s3_model.local_dir)).returncode == 0
    assert blob_sizes(agent).count(90868376) == 1
    assert len(json.loads(agent.cli("ls", "--json", check=True).stdout)["models"]) == 3


@pytest.fixture(scope="module")
def bad_refs_agent(module_inproc_factory: Any) -> Any:
    """One agent for every bad reference: a refused prefetch publishes nothing, and that it keeps serving
    (and fetches a good model after each) is what these tests check."""
    return module_inproc_factory("bad-refs")


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("s3://models", "give a prefix"),
        ("s3://models/../etc", "'..'"),
        ("gopher://host/file", "unknown scheme"),
        ("s3://no-such-bucket-here/x", "does not exist"),
        ("s3://models/no-such-prefix", "nothing at"),
        ("hf://nobody/nothing", "not found"),
        ("relative/path", "cannot tell"),
        ("x" * 5000, "limit"),
    ],
)
def test_bad_references_fail_in_one_line_and_agent_keeps_serving(
    bad_refs_agent: Any, hf_endpoint: Any, s3_model: Any, ref: str, says: str
) -> None:
    agent = bad_refs_agent
    assert says in one_line_error(agent.cli("prefetch", ref))
    assert agent.alive() and agent.http_status("/livez") == 200
    assert agent.cli("prefetch", s3_model.ref).returncode == 0


def test_agent_not_running_is_a_clear_error(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "ls"],
        env={**os.environ, "WARMSTART_SOCKET": str(sock)},
        capture_output=True, text=True, timeout=60,
    )
    assert str(sock) in one_line_error(proc)
    with pytest.raises(client.AgentUnavailableError, match=str(sock)):
        client.open_tensors("s3://models/minilm", socket=str(sock))


def _upload_random(seaweed: SeaweedS3, tmp_path: Path, key: str, size: int) -> bytes:
    data = os.urandom(size)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    seaweed.make_bucket("models")
    seaweed.upload_file(path, "models", key)
    return data


def test_kill9_mid_fetch_resumes_with_only_missing_pieces(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    size = 48 * 1024 * 1024
    data = _upload_random(seaweed, tmp_path, "resume/weights.bin", size)
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    relay = relay_factory(host, int(port), rate=12 * 1024 * 1024)  # ~4 s for the whole object
    env = {**agent_env, "AWS_ENDPOINT_URL": relay.url}
    agent = agent_factory(env=env, extra_args=("--piece-size", "1MiB", "--connections", "2"))
    ref = "s3://models/resume"
    prefetch = subprocess.Popen(
        [sys.executable, "-m", "agent", "prefetch", ref],
        env={**env, "WARMSTART_SOCKET": str(agent.socket_path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    done = 0
    while time.monotonic() < deadline:
        states = list((agent.cache_dir / "partial").glob("*.json"))
        if states:
            try:
                done = len(json.loads(states[0].read_text())["done"])
            except (ValueError, OSError):
                done = 0
        if done >= 12:
            break
        time.sleep(0.05)
    assert done >= 12, "the fetch never got going"
    agent.kill9()
    prefetch.communicate(timeout=30)
    assert prefetch.returncode != 0  # the CLI saw its agent die: no false success
    assert not any((agent.cache_dir / "blobs").iterdir())  # nothing partial was published

    relay.set_rate(None)
    relay.reset_counters()
    agent.restart()
    state = json.loads(next((agent.cache_dir / "partial").glob("*.json")).read_text())
    kept = len(state["done"]) * 1024 * 1024
    again = agent.cli("prefetch", ref)
    assert again.returncode == 0, again.stderr
    assert relay.bytes_down < size - kept + 2 * 1024 * 1024  # only missing pieces (+ HTTP overhead)
    (blob,) = list((agent.cache_dir / "blobs").iterdir())
    assert blob.read_bytes() == data


def test_concurrent_opens_of_a_cold_model_fetch_it_once(
    inproc_factory: Any, s3_model: Any, seaweed: SeaweedS3, relay_factory: Any
) -> None:
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    relay = relay_factory(host, int(port))
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": relay.url})
    want = expected_tensors(s3_model.local_dir)
    results: list[dict[str, torch.Tensor] | BaseException] = []

    def open_one() -> None:
        try:
            results.append(client.open_tensors(s3_model.ref, socket=str(agent.socket_path)))
        except BaseException as exc:  # noqa: BLE001 (collected and asserted below)
            results.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 12
    for r in results:
        assert not isinstance(r, BaseException), r
        assert_bit_exact(r, want)
    model_bytes = sum(p.stat().st_size for p in s3_model.local_dir.rglob("*") if p.is_file())
    assert relay.bytes_down < 1.1 * model_bytes, f"{(relay.bytes_down, model_bytes)}\n{relay.traffic()}"


def test_verify_repairs_and_evict_frees(inproc_factory: Any, s3_model: Any) -> None:
    agent = inproc_factory()
    assert agent.cli("prefetch", s3_model.ref).returncode == 0
    blob = next(p for p in (agent.cache_dir / "blobs").iterdir() if p.stat().st_size == 90868376)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(1_000_000)
        f.write(b"bitrot")
    out = agent.cli("verify", s3_model.ref, check=True).stdout
    assert "1 corrupt" in out and "1 re-fetched" in out
    assert_bit_exact(
        client.open_tensors(s3_model.ref, socket=str(agent.socket_path)), expected_tensors(s3_model.local_dir)
    )
    out = agent.cli("evict", s3_model.ref, check=True).stdout
    assert "freed" in out
    assert not any((agent.cache_dir / "blobs").iterdir())
    assert json.loads(agent.cli("ls", "--json", check=True).stdout)["models"] == []


def test_the_verbs_print_json_and_verify_says_what_it_checked(inproc_factory: Any, s3_model: Any) -> None:
    """`--json` on prefetch / verify / evict; verify on a complete model names what it re-hashed (it used to
    print "? files, ..., 0 B already cached": the verify stream carries neither count)."""
    agent = inproc_factory()
    first = json.loads(agent.cli("prefetch", s3_model.ref, "--json", check=True).stdout)
    assert first["ref"] == s3_model.ref and first["fetched_bytes"] == first["total_bytes"] > 0
    assert json.loads(agent.cli("prefetch", s3_model.ref, "--json", check=True).stdout)["fetched_bytes"] == 0
    done = agent.cli("verify", s3_model.ref, check=True)
    assert "?" not in done.stderr and "already cached" not in done.stderr, done.stderr
    report = json.loads(agent.cli("verify", s3_model.ref, "--json", check=True).stdout)
    assert report["revision"] == first["revision"] and report["checked"] > 1
    assert (report["corrupt"], report["repaired"]) == (0, 0)
    assert done.stdout.strip() == (
        f"verified {s3_model.ref}@{first['revision']}: {report['checked']} files checked, 0 corrupt, 0 re-fetched"
    )
    evicted = json.loads(agent.cli("evict", s3_model.ref, "--json", check=True).stdout)
    assert evicted["ref"] == s3_model.ref and evicted["freed_bytes"] > 0 and evicted["kept"] == []


def test_https_single_file_and_local_dir(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    agent = inproc_factory()
    url = f"{hf_endpoint.endpoint}/{hf_model.repo_id}/resolve/{hf_model.commit}/{MODEL_FILE}"
    ok = agent.cli("prefetch", url)
    assert ok.returncode == 0, ok.stderr
    assert_bit_exact(client.open_tensors(url, socket=str(agent.socket_path)), expected_tensors(hf_model.local_dir))
    gone = one_line_error(agent.cli("prefetch", url.replace(MODEL_FILE, "nope.bin")))
    assert "404" in gone and "nope.bin" in gone, gone

    # A local directory is an origin too; its model.safetensors has the same content,
    # so it is stored once (one blob of that size in the whole cache).
    local = agent.cli("prefetch", str(hf_model.local_dir))
    assert local.returncode == 0, local.stderr
    assert_bit_exact(
        client.open_tensors(str(hf_model.local_dir), socket=str(agent.socket_path)),
        expected_tensors(hf_model.local_dir),
    )
    size = (hf_model.local_dir / MODEL_FILE).stat().st_size
    assert sum(1 for b in (agent.cache_dir / "blobs").iterdir() if b.stat().st_size == size) == 1


def test_open_loads_the_indexed_shards_once(inproc_factory: Any, hf_model: Any, tmp_path: Path) -> None:
    """A repo laid out like Mistral's: sharded weights + index, the same weights again as
    consolidated.safetensors, and a variant in a subfolder. open_tensors loads the shards only."""
    from safetensors.torch import save_file

    want = expected_tensors(hf_model.local_dir)
    names = sorted(want)
    repo = tmp_path / "mistral-like"
    (repo / "original").mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: want[n].contiguous() for n in part}, str(repo / shard))
    (repo / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: s for s, part in shards.items() for n in part}})
    )
    save_file({n: t.contiguous() for n, t in want.items()}, str(repo / "consolidated.safetensors"))
    save_file({"other": torch.zeros(3)}, str(repo / "original" / "variant.safetensors"))

    agent = inproc_factory()
    assert_bit_exact(client.open_tensors(str(repo), socket=str(agent.socket_path)), want)

    # Without the index: the top-level files, so here the duplicate is a clear error, not a silent pick.
    (repo / "model.safetensors.index.json").unlink()
    with pytest.raises(client.MalformedFileError, match=r"is in both .*/consolidated.safetensors and .*/model-0000"):
        client.open_tensors(str(repo), socket=str(agent.socket_path))

    # An index naming a shard the model does not have.
    (repo / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}})
    )
    with pytest.raises(client.ModelNotFoundError, match="model-00009-of-00009"):
        client.open_tensors(str(repo), socket=str(agent.socket_path))


def test_snapshot_is_the_repo_as_a_directory_and_goes_with_evict(
    inproc_factory: Any, hf_model: Any, tmp_path: Path
) -> None:
    agent = inproc_factory()
    client.open_tensors(hf_model.ref, socket=str(agent.socket_path))
    assert not any((agent.cache_dir / "snapshots").glob("*"))  # links only for who asks for a directory
    path = Path(client.snapshot(hf_model.ref, socket=str(agent.socket_path)))
    assert path.is_relative_to(agent.cache_dir / "snapshots")
    want = sorted(p.relative_to(hf_model.local_dir) for p in hf_model.local_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    assert got == want and any(len(p.parts) > 1 for p in got)  # nested files (onnx/...) at their paths
    for rel in want:
        assert (path / rel).read_bytes() == (hf_model.local_dir / rel).read_bytes(), rel
        assert os.readlink(path / rel).startswith("../")  # relative: valid wherever the cache is mounted
    assert_bit_exact(load_file(str(path / MODEL_FILE)), expected_tensors(hf_model.local_dir))
    assert client.snapshot(hf_model.ref, socket=str(agent.socket_path)) == str(path)  # made once, found again

    # A pod that mounts the node's cache at another path.
    mount = tmp_path / "pod-mount"
    mount.symlink_to(agent.cache_dir)
    os.environ["WARMSTART_CACHE_DIR"] = str(mount)
    try:
        moved = Path(client.snapshot(hf_model.ref, socket=str(agent.socket_path)))
    finally:
        del os.environ["WARMSTART_CACHE_DIR"]
    assert (
        moved.is_relative_to(mount)
        and (moved / "config.json").read_bytes() == (hf_model.local_dir / "config.json").read_bytes()
    )

    agent.cli("evict", hf_model.ref, check=True)
    assert not path.exists()
