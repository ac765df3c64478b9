"""Hub-compatible mirrors (issue 21, part B): what huggingface_hub can download from one, the agent can.

The HF test endpoint is put in a mirror's modes (tests/servers/hf_endpoint.py); huggingface_hub's own
``snapshot_download`` from the same endpoint is the reference behaviour, and the agent's copy must be
bit-exact with it and checked against the digests the mirror gives.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

import client
from tests.test_agent_e2e import assert_bit_exact, expected_tensors


def test_the_agent_starts_without_importing_huggingface_hub() -> None:
    """huggingface_hub is imported on the hf origin's first use: at import it was 0.3 s of every agent's start.

    The hf tests in this file and tests/test_agent_e2e.py show the origin still works once it is used.
    """
    probe = ("import sys, agent.daemon, agent.cli.main\n"
             "print(sorted(m for m in ('huggingface_hub', 'httpx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_listing_without_sizes_is_completed_per_file(inproc_factory: Any, hf_model: Any, hf_endpoint: Any,
                                                     tmp_path: Path) -> None:
    """A mirror that lists names only: sizes and digests come from a HEAD per file, as huggingface_hub does."""
    hf_endpoint.bare_listing = True
    reference = Path(snapshot_download(hf_model.repo_id, cache_dir=str(tmp_path / "hub")))
    agent = inproc_factory()
    done = agent.cli("prefetch", hf_model.ref)
    assert done.returncode == 0, done.stderr
    snap = Path(client.snapshot(hf_model.ref, socket=str(agent.socket_path), timeout=60))
    names = sorted(hf_endpoint.files(hf_model.repo_id))
    assert names and sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file()) == names
    for name in names:
        assert filecmp.cmp(snap / name, reference / name, shallow=False), name
    assert_bit_exact(client.open_tensors(hf_model.ref, socket=str(agent.socket_path), timeout=60),
                     expected_tensors(hf_model.local_dir))
    heads = [r for r in hf_endpoint.requests if r.method == "HEAD" and r.repo_id == hf_model.repo_id]
    assert len(heads) >= len(names)  # each size was asked for (snapshot_download's too)


def test_listing_without_sizes_still_verifies_against_the_mirrors_digest(
    inproc_factory: Any, hf_model: Any, hf_endpoint: Any
) -> None:
    """The HEAD's X-Linked-Etag (sha256) is checked: a mirror serving other bytes fails the fetch, clearly."""
    hf_endpoint.bare_listing = True
    hf_endpoint.corrupt_paths.add("model.safetensors")
    agent = inproc_factory(extra_args=("--retries", "1"))
    done = agent.cli("prefetch", hf_model.ref, timeout=120)
    assert done.returncode != 0
    assert "internal error" not in done.stderr and "model.safetensors" in done.stderr, done.stderr
    assert not any(p.stat().st_size == 90_868_376 for p in (agent.cache_dir / "blobs").iterdir())


def _snapshot_matches(agent: Any, hf_model: Any) -> None:
    snap = Path(client.snapshot(hf_model.ref, socket=str(agent.socket_path), timeout=60))
    for path in hf_model.local_dir.rglob("*"):
        if path.is_file():
            name = path.relative_to(hf_model.local_dir).as_posix()
            assert filecmp.cmp(snap / name, path, shallow=False), name


def test_mirror_that_ignores_range_is_read_as_one_stream(inproc_factory: Any, hf_model: Any, hf_endpoint: Any,
                                                         tmp_path: Path) -> None:
    """200 with the whole body, chunked, for every range: each file comes as one stream, bit-exact, and the
    model is not sent once per range (4 MiB pieces: 22 of them in model.safetensors)."""
    hf_endpoint.ignore_range = True
    hf_endpoint.bare_listing = True
    reference = Path(snapshot_download(hf_model.repo_id, cache_dir=str(tmp_path / "hub")))
    assert filecmp.cmp(reference / "model.safetensors", hf_model.local_dir / "model.safetensors", shallow=False)
    hf_endpoint.clear_log()
    agent = inproc_factory(extra_args=("--piece-size", "4MiB"))
    done = agent.cli("prefetch", hf_model.ref, timeout=120)
    assert done.returncode == 0, done.stderr
    _snapshot_matches(agent, hf_model)
    size = (hf_model.local_dir / "model.safetensors").stat().st_size
    # The first range request's answer is dropped once it shows the Range was ignored (what the server
    # pushed into the socket before that counts here), then one stream; never a body per range.
    assert hf_endpoint.bytes_served("model.safetensors") < 2 * size
    assert "ignores Range" in agent.log_text()


def test_mirror_that_ignores_range_still_verifies(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    hf_endpoint.ignore_range = True
    hf_endpoint.corrupt_paths.add("model.safetensors")
    agent = inproc_factory(extra_args=("--retries", "1"))
    done = agent.cli("prefetch", hf_model.ref, timeout=120)
    assert done.returncode != 0
    assert "internal error" not in done.stderr and "model.safetensors" in done.stderr, done.stderr
    assert not any(p.stat().st_size == 90_868_376 for p in (agent.cache_dir / "blobs").iterdir())


def test_cdn_redirect_targets_are_reused_and_re_signed_when_refused(inproc_factory: Any, hf_model: Any,
                                                                    hf_endpoint: Any) -> None:
    """Ranges go to the signed CDN URL a file redirected to, without a round trip to the hub each; once
    the signatures expire (403), the hub is asked again and signs anew."""
    hf_endpoint.cdn_redirect = True
    agent = inproc_factory(extra_args=("--piece-size", "4MiB"))
    assert agent.cli("prefetch", hf_model.ref, timeout=120).returncode == 0
    _snapshot_matches(agent, hf_model)
    first = [r for r in hf_endpoint.requests if r.method == "GET" and r.file == "model.safetensors"]
    assert any(r.status == 302 for r in first) and any(r.path.startswith("/cdn/") for r in first)

    def refetch() -> list[Any]:
        assert agent.cli("evict", hf_model.ref).returncode == 0
        hf_endpoint.clear_log()
        done = agent.cli("prefetch", hf_model.ref, timeout=120)
        assert done.returncode == 0, done.stderr
        _snapshot_matches(agent, hf_model)
        return [r for r in hf_endpoint.requests if r.method == "GET" and r.file == "model.safetensors"]

    again = refetch()
    assert again and all(r.path.startswith("/cdn/") and r.status == 206 for r in again), again  # no 302
    hf_endpoint.expire_signatures()
    expired = refetch()
    assert any(r.status == 403 for r in expired) and any(r.status == 302 for r in expired)
    assert sum(r.bytes_sent for r in expired) == 90_868_376


def test_signed_url_expiry_is_read_from_its_query() -> None:
    from agent.origins.range_http import signed_expiry

    assert signed_expiry("https://cdn/x?X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=a") == \
        1767225600.0 + 3600
    assert signed_expiry("https://cdn/x?Expires=1767225600&Signature=s") == 1767225600.0
    assert signed_expiry("https://cdn/x?X-Amz-Date=garbage&X-Amz-Expires=1") is None
    assert signed_expiry("https://cdn/x") is None


def test_endpoint_without_any_digest_is_said_so(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    """Names-only listing and opaque ETags: the files are fetched and checked against their own bytes, and
    `agent ls`, `agent verify` and the metric say which were not checked against the origin."""
    hf_endpoint.bare_listing = True
    hf_endpoint.no_digest = True
    agent = inproc_factory()
    done = agent.cli("prefetch", hf_model.ref, timeout=120)
    assert done.returncode == 0, done.stderr
    _snapshot_matches(agent, hf_model)
    files = len([p for p in hf_model.local_dir.rglob("*") if p.is_file()])
    listed = agent.cli("ls")
    assert f"{files} cached file(s) without an origin digest" in listed.stdout, listed.stdout
    verified = agent.cli("verify", hf_model.ref)
    assert verified.returncode == 0 and f"{files} files without an origin digest" in verified.stdout, verified.stdout
    assert ".gitattributes" in verified.stdout
    metrics = agent.http_get("/metrics")[1].decode()
    assert f'warmstart_files_without_origin_digest_total{{scheme="hf"}} {files}.0' in metrics, metrics[-2000:]


def test_endpoint_with_digests_marks_nothing(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    hf_endpoint.bare_listing = True  # digests from HEAD: sha256 (X-Linked-Etag) and git blob ids (ETag)
    agent = inproc_factory()
    assert agent.cli("prefetch", hf_model.ref, timeout=120).returncode == 0
    assert "without an origin digest" not in agent.cli("ls").stdout
    assert "without an origin digest" not in agent.cli("verify", hf_model.ref).stdout
    assert 'warmstart_files_without_origin_digest_total{scheme="hf"} 0.0' in agent.http_get("/metrics")[1].decode()


async def test_sequential_reader_hands_out_ranges_in_offset_order(hf_model: Any, hf_endpoint: Any) -> None:
    """Three ranges of one file asked at once, out of order, from a server that ignores Range: each gets
    exactly its bytes from one whole-body stream; a range behind the stream, asked after it passed, starts
    one more stream (never one per range)."""
    import asyncio

    import aiohttp

    from agent.origins.policy import AddressPolicy
    from agent.origins.sequential import SequentialReader

    hf_endpoint.ignore_range = True
    url = f"{hf_endpoint.endpoint}/{hf_model.repo_id}/resolve/main/model.safetensors"
    data = (hf_model.local_dir / "model.safetensors").read_bytes()
    mib = 1024 * 1024

    def check(status: int, reason: str) -> None:
        raise AssertionError(f"{status} {reason}")

    async with aiohttp.ClientSession() as session:
        reader = SequentialReader(session, AddressPolicy(allow_private=True), read_timeout=30)
        got: dict[int, bytearray] = {}

        async def read(offset: int, length: int) -> None:
            out = got.setdefault(offset, bytearray())

            async def sink(chunks: Any) -> None:
                for c in chunks:
                    out.extend(c)

            await reader.read("k", url, {}, offset, length, len(data), sink, what="model.safetensors", check=check)

        hf_endpoint.clear_log()
        await asyncio.gather(read(8 * mib, 3 * mib), read(0, mib), read(4 * mib, 2 * mib))
        for offset, length in ((0, mib), (4 * mib, 2 * mib), (8 * mib, 3 * mib)):
            assert bytes(got[offset]) == data[offset: offset + length], offset
        gets = [r for r in hf_endpoint.requests if r.method == "GET"]
        assert len(gets) <= 2, gets  # one stream; one more only if the first range came in after a later one
        await read(mib, mib)  # behind the stream now: a new stream from the start
        assert bytes(got[mib]) == data[mib: 2 * mib]
        await read(len(data) - 100, 100)  # the rest of the file: the stream ends and is closed
        assert bytes(got[len(data) - 100]) == data[-100:]
        await reader.close()
