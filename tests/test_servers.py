"""Self-tests of the test servers: each is real and speaks its protocol right.

Every end-to-end test trusts these servers to tell the truth (what S3 stores,
what the hub reports as sha256, how many bytes crossed the wire), so they are
checked here against independent clients: boto3 and urllib for S3, the real
huggingface_hub for the HF endpoint, httpx for the relay.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import httpx2 as httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest import HfModel, S3Model
from tests.servers.agent_proc import AgentProcess, AgentStartError
from tests.servers.hf_endpoint import HfEndpoint, git_blob_sha1
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3

MiB = 1024 * 1024


def local_files(root: Path) -> dict[str, Path]:
    files = sorted(root.rglob("*"))
    return {p.relative_to(root).as_posix(): p for p in files if p.is_file() and "__pycache__" not in p.parts}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- SeaweedFS


def test_seaweed_put_get_range_list(seaweed: SeaweedS3) -> None:
    seaweed.make_bucket("selftest")
    seaweed.make_bucket("selftest")  # existing bucket: success, not an error
    s3 = seaweed.client()
    data = os.urandom(3 * MiB + 17)
    s3.put_object(Bucket="selftest", Key="dir/blob.bin", Body=data)
    s3.put_object(Bucket="selftest", Key="dir/sub/small.txt", Body=b"hello")

    got = s3.get_object(Bucket="selftest", Key="dir/blob.bin")
    assert got["Body"].read() == data
    etag = got["ETag"]

    part = s3.get_object(Bucket="selftest", Key="dir/blob.bin", Range="bytes=1000-1999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    assert part["Body"].read() == data[1000:2000]

    listing = s3.list_objects_v2(Bucket="selftest", Prefix="dir/")
    assert {o["Key"]: o["Size"] for o in listing["Contents"]} == {"dir/blob.bin": len(data), "dir/sub/small.txt": 5}

    # What the agent does: a presigned GET with Range and If-Match, through a plain HTTP client.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "selftest", "Key": "dir/blob.bin"})
    req = urllib.request.Request(url, headers={"Range": "bytes=0-99", "If-Match": etag})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 206 and r.read() == data[:100]
    stale = urllib.request.Request(url, headers={"Range": "bytes=0-99", "If-Match": '"0123456789abcdef"'})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(stale, timeout=10)
    assert exc.value.code == 412


def test_seaweed_accepts_any_credentials_from_the_environment(
    seaweed: SeaweedS3, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 configured only by the standard environment (AWS_ENDPOINT_URL, dummy keys) reaches SeaweedFS."""
    seaweed.make_bucket("envcheck")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "some-other-key")
    s3 = boto3.session.Session().client("s3")
    assert s3.meta.endpoint_url == seaweed.endpoint_url
    s3.put_object(Bucket="envcheck", Key="k", Body=b"v")
    assert s3.get_object(Bucket="envcheck", Key="k")["Body"].read() == b"v"
    s3.close()


def test_s3_model_is_the_packaged_model(s3_model: S3Model, seaweed: SeaweedS3) -> None:
    ref, local = s3_model
    assert ref == "s3://models/minilm"
    s3 = seaweed.client()
    listing = s3.list_objects_v2(Bucket="models", Prefix="minilm/")["Contents"]
    remote = {o["Key"].removeprefix("minilm/"): o["Size"] for o in listing}
    expected = {rel: p.stat().st_size for rel, p in local_files(local).items()}
    assert remote == expected
    assert "model.safetensors" in remote and remote["model.safetensors"] > 80 * MiB
    weights = (local / "model.safetensors").read_bytes()
    mid = len(weights) // 2
    part = s3.get_object(Bucket="models", Key="minilm/model.safetensors", Range=f"bytes={mid}-{mid + MiB - 1}")
    assert part["Body"].read() == weights[mid : mid + MiB]


# ---------------------------------------------------------------------- HF endpoint


def test_hf_model_info_and_download_match_the_source(
    hf_model: HfModel, hf_endpoint: HfEndpoint, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hf_endpoint.endpoint)
    info = api.model_info(hf_model.repo_id, revision="main", files_metadata=True)
    assert info.sha == hf_model.commit and len(info.sha) == 40 and int(info.sha, 16) >= 0
    local = local_files(hf_model.local_dir)
    assert info.siblings is not None
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(local)
    for rel, path in local.items():
        s = siblings[rel]
        assert s.size == path.stat().st_size, rel
        if rel.endswith(".safetensors"):
            assert s.lfs is not None and s.lfs.size == s.size
            assert s.lfs.sha256 == sha256_file(path)
        else:
            assert s.lfs is None, rel
            assert s.blob_id == git_blob_sha1(path.read_bytes()), rel  # what `git hash-object` prints

    cache = tmp_path / "hf-cache"
    for rel in ("model.safetensors", "config.json", "1_Pooling/config.json"):
        got = hf_hub_download(hf_model.repo_id, rel, cache_dir=cache, endpoint=hf_endpoint.endpoint)
        assert Path(got).read_bytes() == local[rel].read_bytes(), rel
        assert f"/snapshots/{hf_model.commit}/" in got
    assert hf_endpoint.bytes_served("model.safetensors") == local["model.safetensors"].stat().st_size

    snap = snapshot_download(hf_model.repo_id, cache_dir=cache, endpoint=hf_endpoint.endpoint)
    assert set(local_files(Path(snap))) == set(local)


def test_hf_resolve_headers_ranges_and_preconditions(hf_model: HfModel, hf_endpoint: HfEndpoint) -> None:
    weights = (hf_model.local_dir / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    url = hf_hub_url(hf_model.repo_id, "model.safetensors", revision="main", endpoint=hf_endpoint.endpoint)
    assert url == f"{hf_endpoint.endpoint}/{hf_model.repo_id}/resolve/main/model.safetensors"
    with httpx.Client(timeout=30) as http:
        head = http.head(url)
        assert head.status_code == 200
        assert head.headers["X-Repo-Commit"] == hf_model.commit
        assert head.headers["ETag"] == f'"{sha256}"' == head.headers["X-Linked-Etag"]
        assert int(head.headers["X-Linked-Size"]) == len(weights) == int(head.headers["Content-Length"])
        assert head.headers["Accept-Ranges"] == "bytes"

        r = http.get(url, headers={"Range": "bytes=100-1123"})
        assert r.status_code == 206
        assert r.headers["Content-Range"] == f"bytes 100-1123/{len(weights)}"
        assert r.content == weights[100:1124]
        r = http.get(url, headers={"Range": "bytes=-10"})
        assert r.status_code == 206 and r.content == weights[-10:]
        r = http.get(url, headers={"Range": f"bytes={len(weights)}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(weights)}"
        r = http.get(url, headers={"Range": "bytes=0-9", "If-Match": '"deadbeef"'})
        assert r.status_code == 412
        r = http.get(url, headers={"Range": "bytes=0-9", "If-Match": f'"{sha256}"'})
        assert r.status_code == 206 and r.content == weights[:10]

        config_url = hf_hub_url(
            hf_model.repo_id, "config.json", revision=hf_model.commit, endpoint=hf_endpoint.endpoint
        )
        small = http.head(config_url)
        blob = git_blob_sha1((hf_model.local_dir / "config.json").read_bytes())
        assert small.headers["ETag"] == f'"{blob}"' and "X-Linked-Etag" not in small.headers


def test_hf_moving_a_branch_makes_a_new_commit(hf_endpoint: HfEndpoint, tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "weights.bin").write_bytes(b"one" * 1000)
    (v2 / "weights.bin").write_bytes(b"two" * 1000)
    (v2 / "extra.json").write_text("{}")
    c1 = hf_endpoint.add_repo("acme/tiny", v1)
    api = HfApi(endpoint=hf_endpoint.endpoint)
    assert api.model_info("acme/tiny").sha == c1
    c2 = hf_endpoint.set_branch("acme/tiny", "main", v2)
    assert c2 != c1
    assert api.model_info("acme/tiny", revision="main").sha == c2
    assert api.model_info("acme/tiny", revision=c1, files_metadata=True).sha == c1  # old commits stay
    cache = tmp_path / "cache"
    old = hf_hub_download("acme/tiny", "weights.bin", revision=c1, cache_dir=cache, endpoint=hf_endpoint.endpoint)
    new = hf_hub_download("acme/tiny", "weights.bin", revision="main", cache_dir=cache, endpoint=hf_endpoint.endpoint)
    assert Path(old).read_bytes() == b"one" * 1000 and Path(new).read_bytes() == b"two" * 1000
    c3 = hf_endpoint.set_branch("acme/tiny", "dev", v1)
    assert api.model_info("acme/tiny", revision="dev").sha == c3 != c1


def test_hf_errors_are_the_hubs(hf_model: HfModel, hf_endpoint: HfEndpoint, tmp_path: Path) -> None:
    api = HfApi(endpoint=hf_endpoint.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing", files_metadata=True)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(hf_model.repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(hf_model.repo_id, revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(hf_model.repo_id, "missing.bin", cache_dir=tmp_path, endpoint=hf_endpoint.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", cache_dir=tmp_path, endpoint=hf_endpoint.endpoint)


def test_hf_require_token(hf_model: HfModel, hf_endpoint: HfEndpoint, tmp_path: Path) -> None:
    hf_endpoint.require_token = "hf_secret"
    api = HfApi(endpoint=hf_endpoint.endpoint)
    with pytest.raises(RepositoryNotFoundError):  # the hub hides private repos from anonymous callers
        api.model_info(hf_model.repo_id, token=False)
    with pytest.raises(HfHubHTTPError) as exc:
        api.model_info(hf_model.repo_id, token="hf_wrong")
    assert exc.value.response is not None and exc.value.response.status_code == 401
    assert api.model_info(hf_model.repo_id, token="hf_secret").sha == hf_model.commit
    got = hf_hub_download(
        hf_model.repo_id, "config.json", token="hf_secret", cache_dir=tmp_path, endpoint=hf_endpoint.endpoint
    )
    assert Path(got).read_bytes() == (hf_model.local_dir / "config.json").read_bytes()
    assert all(r.authorization for r in hf_endpoint.requests if r.status == 200)


def test_hf_fault_knobs_and_request_log(hf_model: HfModel, hf_endpoint: HfEndpoint) -> None:
    original = (hf_model.local_dir / "tokenizer.json").read_bytes()
    url = hf_hub_url(hf_model.repo_id, "tokenizer.json", revision="main", endpoint=hf_endpoint.endpoint)
    hf_endpoint.corrupt_paths.add("tokenizer.json")
    with httpx.Client(timeout=30) as http:
        bad = http.get(url).content
        assert len(bad) == len(original)
        diff = [i for i, (a, b) in enumerate(zip(bad, original, strict=True)) if a != b]
        assert diff == [HfEndpoint.corruption_offset(len(original))]
        off = diff[0]
        r = http.get(url, headers={"Range": f"bytes={off - 5}-{off + 5}"})  # ranges see the same flip
        assert r.content != original[off - 5 : off + 6] and r.content[5] == original[off] ^ 0xFF
        hf_endpoint.corrupt_paths.clear()
        assert http.get(url).content == original

        hf_endpoint.fail_next(1, status=503, file="tokenizer.json")
        assert http.get(url).status_code == 503
        assert http.get(url).content == original

    log = [r for r in hf_endpoint.requests if r.file == "tokenizer.json"]
    assert [r.status for r in log] == [200, 206, 200, 503, 200]
    assert hf_endpoint.bytes_served("tokenizer.json") == 3 * len(original) + 11
    assert hf_endpoint.served_by_path()[f"{hf_model.repo_id}/tokenizer.json"] == 3 * len(original) + 11


# ---------------------------------------------------------------------- relay


def test_relay_counts_throttles_pauses(hf_endpoint: HfEndpoint, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    data = os.urandom(4 * MiB)
    (repo / "w.bin").write_bytes(data)
    hf_endpoint.add_repo("acme/relay", repo)
    with TcpRelay(hf_endpoint.host, hf_endpoint.port) as relay, httpx.Client(timeout=30) as http:
        url = f"{relay.url}/acme/relay/resolve/main/w.bin"
        assert http.get(url).content == data
        assert len(data) < relay.bytes_down < len(data) + 4096  # body plus response headers
        assert relay.connections == 1 and relay.bytes_up > 0
        assert http.get(url, headers={"Range": "bytes=0-99"}).content == data[:100]
        traffic = relay.traffic()  # what an origin-once assertion prints when it fails
        assert traffic.startswith("2 requests, repeated: none"), traffic
        assert "GET /acme/relay/resolve/main/w.bin; GET /acme/relay/resolve/main/w.bin bytes=0-99" in traffic, traffic

        relay.reset_counters()
        assert relay.traffic() == "0 requests, repeated: none"
        relay.set_rate(8 * MiB)
        t0 = time.monotonic()
        assert http.get(url).content == data
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.4, f"4 MiB at 8 MiB/s took {elapsed:.3f}s"
        assert elapsed < 5
        assert len(data) < relay.bytes_down < len(data) + 4096

        relay.set_rate(None)
        relay.pause()
        relay.reset_counters()
        result: dict[str, bytes] = {}
        worker = threading.Thread(target=lambda: result.setdefault("body", httpx.get(url, timeout=30).content))
        worker.start()
        time.sleep(0.5)
        assert relay.bytes_down == 0 and worker.is_alive()
        relay.resume()
        worker.join(timeout=30)
        assert result["body"] == data

        relay.set_rate(256 * 1024)
        relay.reset_counters()
        failure: dict[str, BaseException] = {}

        def slow_get() -> None:
            try:
                httpx.get(url, timeout=30)
            except httpx.HTTPError as exc:
                failure["exc"] = exc

        worker = threading.Thread(target=slow_get)
        worker.start()
        for _ in range(100):
            if relay.bytes_down > 100_000:
                break
            time.sleep(0.05)
        assert 100_000 < relay.bytes_down < len(data)  # mid-transfer
        assert relay.drop_connections() >= 1
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert "exc" in failure  # the client saw the transfer break
        assert relay.bytes_down < len(data)


def test_relay_in_front_of_s3(seaweed: SeaweedS3) -> None:
    seaweed.make_bucket("relayed")
    seaweed.client().put_object(Bucket="relayed", Key="obj", Body=b"x" * 100_000)
    host, port = seaweed.endpoint_url.removeprefix("http://").split(":")
    with TcpRelay(host, int(port)) as relay:
        s3 = boto3.session.Session().client("s3", endpoint_url=relay.url)
        assert s3.get_object(Bucket="relayed", Key="obj")["Body"].read() == b"x" * 100_000
        assert relay.bytes_down > 100_000
        s3.close()


# ---------------------------------------------------------------------- agent process harness


def test_agent_process_start_failure_reports_the_log(tmp_path: Path, agent_env: dict[str, str]) -> None:
    """A daemon that cannot start is reported at once with its output, not after a timeout."""
    agent = AgentProcess(tmp_path / "bad", env=agent_env, capacity="not-a-size", start_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(AgentStartError) as exc:
        agent.start()
    assert time.monotonic() - t0 < 30
    assert "exited with" in str(exc.value) and str(agent.log_path) in str(exc.value)
    assert "agent serve" in agent.log_text()
    assert not agent.alive()
    agent.close()


# ---------------------------------------------------------------------- in-process agent harness


def test_inprocess_agent_serves_logs_its_own_lines_restarts_and_stops(inproc_factory: Any, s3_model: S3Model) -> None:
    """Two agents in this process: each one's log holds its own lines only; a restart keeps the port and
    the cache; stop() leaves nothing listening and removes the socket."""
    a = inproc_factory("a")
    b = inproc_factory("b")
    assert a.http_status("/readyz") == 200 and b.http_status("/readyz") == 200 and a.port != b.port
    assert a.cli("prefetch", s3_model.ref).returncode == 0
    assert "filled model.safetensors" in a.log_text()
    assert "filled model.safetensors" not in b.log_text()  # a's fill was logged on a's loop: not in b's log
    assert str(a.cache_dir) in a.log_text() and str(a.cache_dir) not in b.log_text()
    port = a.port
    a.restart()
    assert a.port == port and a.http_status("/readyz") == 200 and a.starts == 2
    listed = json.loads(a.cli("ls", "--json", check=True).stdout)["models"]
    assert [m["ref"] for m in listed] == [s3_model.ref]  # the cache survived the restart
    a.stop()
    assert not a.alive() and a.http_status("/livez") is None and not a.socket_path.exists()
    assert b.alive() and b.http_status("/livez") == 200  # the other agent is untouched


def test_inprocess_agent_start_failures_are_reported_at_once(inproc_factory: Any) -> None:
    """A bad setting, or a socket another live agent serves, fails start() with the reason, not a timeout."""
    first = inproc_factory("first")
    with pytest.raises(AgentStartError, match="--capacity"):
        inproc_factory("bad", capacity="not-a-size")
    t0 = time.monotonic()
    with pytest.raises(AgentStartError, match="another agent already serves"):
        inproc_factory("twin", socket_path=first.socket_path)
    assert time.monotonic() - t0 < 10
    assert first.http_status("/readyz") == 200 and first.socket_path.exists()  # the live one keeps its socket
