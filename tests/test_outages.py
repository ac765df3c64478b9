"""A cache that outlives its origin: a moving reference opens the newest complete cached revision when the
origin is down, for every scheme (issue 21, part A).

Each test caches a model through a TCP relay in front of a real origin (SeaweedFS for s3://, the HF endpoint
for hf:// and https://, fake-gcs-server for gs://, Azurite for az://), then takes the origin away in one of
two ways: the relay closes (connections are refused) or pauses (it accepts and never answers: the hang a
black-holed route gives). The bare reference must then open bit-exact within the agent's ``--resolve-timeout``
plus a margin, the stale serve must be counted on /metrics and marked in ``agent ls``, and the exact revision
must open without the origin at all. A local directory's "origin down" is the directory vanishing (an NFS
share that went away).
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import client
from tests.servers.clouds import Azurite, FakeGcs
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3
from tests.test_agent_e2e import assert_bit_exact, expected_tensors

RESOLVE_TIMEOUT = 2.0
# What a stale serve may take beyond the resolve timeout: a loaded 2-core machine, the open itself.
MARGIN = 6.0
ARGS = ("--resolve-timeout", str(RESOLVE_TIMEOUT))
HF_FILE = "model.safetensors"


def _stale_serves(agent: Any, scheme: str) -> float:
    _, body = agent.http_get("/metrics")
    m = re.search(rf'^warmstart_stale_serves_total\{{scheme="{scheme}"\}} (\S+)$', body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def _same_files(snapshot: str, want_dir: Path, names: list[str]) -> None:
    for name in names:
        assert filecmp.cmp(Path(snapshot) / name, want_dir / name, shallow=False), name


def _check_stale_serve(agent: Any, ref: str, scheme: str, want_dir: Path, names: list[str]) -> None:
    """Open ``ref`` (origin down): bit-exact, bounded, counted, marked; then its exact revision, uncounted."""
    socket = str(agent.socket_path)
    before = _stale_serves(agent, scheme)
    started = time.monotonic()
    snap = client.snapshot(ref, socket=socket, timeout=60)
    took = time.monotonic() - started
    assert took < RESOLVE_TIMEOUT + MARGIN, f"stale serve took {took:.1f}s"
    _same_files(snap, want_dir, names)
    assert _stale_serves(agent, scheme) == before + 1
    assert "serving cached revision" in agent.log_text()

    listed = json.loads(agent.cli("ls", "--json", check=True).stdout)["models"]
    (model,) = [m for m in listed if m["ref"] == ref]
    assert model["stale_since"] is not None and model["stale_since"] <= time.time()
    assert "stale since" in agent.cli("ls", check=True).stdout

    started = time.monotonic()
    exact = client.snapshot(f"{ref}@{model['revision']}", socket=socket, timeout=60)
    assert time.monotonic() - started < MARGIN  # no wait for the origin at all
    _same_files(exact, want_dir, names)
    assert _stale_serves(agent, scheme) == before + 1


@pytest.mark.parametrize("how", ["refused", "hang"])
def test_s3_outage_serves_the_cached_revision(
    inproc_factory: Any, s3_model: Any, seaweed: SeaweedS3, how: str
) -> None:
    relay = TcpRelay("127.0.0.1", seaweed.s3_port)
    try:
        agent = inproc_factory(env={"AWS_ENDPOINT_URL": relay.url}, extra_args=ARGS)
        assert agent.cli("prefetch", s3_model.ref).returncode == 0
        relay.close() if how == "refused" else relay.pause()
        names = sorted(p.name for p in s3_model.local_dir.iterdir() if p.is_file())
        _check_stale_serve(agent, s3_model.ref, "s3", s3_model.local_dir, names)
        got = client.open_tensors(s3_model.ref, socket=str(agent.socket_path), timeout=60)
        assert_bit_exact(got, expected_tensors(s3_model.local_dir))
    finally:
        relay.close()


@pytest.mark.parametrize("how", ["refused", "hang"])
def test_gs_outage_serves_the_cached_revision(
    inproc_factory: Any, fake_gcs: FakeGcs, minilm_dir: Path, how: str
) -> None:
    fake_gcs.make_bucket("outage")
    fake_gcs.put_dir("outage", "minilm", minilm_dir)
    relay = TcpRelay("127.0.0.1", fake_gcs.port)
    try:
        agent = inproc_factory(env={"STORAGE_EMULATOR_HOST": relay.url}, extra_args=ARGS)
        ref = "gs://outage/minilm"
        assert agent.cli("prefetch", ref).returncode == 0
        relay.close() if how == "refused" else relay.pause()
        names = sorted(p.name for p in minilm_dir.iterdir() if p.is_file())
        _check_stale_serve(agent, ref, "gs", minilm_dir, names)
        assert_bit_exact(client.open_tensors(ref, socket=str(agent.socket_path), timeout=60),
                         expected_tensors(minilm_dir))
    finally:
        relay.close()


@pytest.mark.parametrize("how", ["refused", "hang"])
def test_az_outage_serves_the_cached_revision(
    inproc_factory: Any, azurite: Azurite, minilm_dir: Path, how: str
) -> None:
    azurite.make_container("outage")
    azurite.put_dir("outage", "minilm", minilm_dir)
    relay = TcpRelay("127.0.0.1", azurite.port)
    try:
        conn = azurite.connection_string().replace(azurite.endpoint, f"{relay.url}/{azurite.account}")
        agent = inproc_factory(env={"AZURE_STORAGE_CONNECTION_STRING": conn}, extra_args=ARGS)
        ref = f"az://{azurite.account}/outage/minilm"
        assert agent.cli("prefetch", ref).returncode == 0
        relay.close() if how == "refused" else relay.pause()
        names = sorted(p.name for p in minilm_dir.iterdir() if p.is_file())
        _check_stale_serve(agent, ref, "az", minilm_dir, names)
    finally:
        relay.close()


@pytest.mark.parametrize("how", ["refused", "hang"])
def test_hf_outage_serves_the_cached_revision(inproc_factory: Any, hf_model: Any, hf_endpoint: Any, how: str) -> None:
    relay = TcpRelay(hf_endpoint.host, hf_endpoint.port)
    try:
        agent = inproc_factory(env={"HF_ENDPOINT": relay.url}, extra_args=ARGS)
        assert agent.cli("prefetch", hf_model.ref).returncode == 0
        relay.close() if how == "refused" else relay.pause()
        names = sorted(hf_endpoint.files(hf_model.repo_id))
        _check_stale_serve(agent, hf_model.ref, "hf", hf_model.local_dir, names)
        got = client.open_tensors(hf_model.ref, socket=str(agent.socket_path), timeout=60)
        assert_bit_exact(got, expected_tensors(hf_model.local_dir))
    finally:
        relay.close()


@pytest.mark.parametrize("how", ["refused", "hang", "5xx"])
def test_https_outage_serves_the_cached_revision(
    inproc_factory: Any, hf_model: Any, hf_endpoint: Any, how: str
) -> None:
    relay = TcpRelay(hf_endpoint.host, hf_endpoint.port)
    try:
        agent = inproc_factory(extra_args=ARGS)
        ref = f"{relay.url}/{hf_model.repo_id}/resolve/main/{HF_FILE}"
        assert agent.cli("prefetch", ref).returncode == 0
        if how == "5xx":
            hf_endpoint.fail_metadata_next(50, status=503)
        else:
            relay.close() if how == "refused" else relay.pause()
        _check_stale_serve(agent, ref, "http", hf_model.local_dir, [HF_FILE])
    finally:
        relay.close()


def test_hf_5xx_serves_the_cached_revision(inproc_factory: Any, hf_model: Any, hf_endpoint: Any) -> None:
    agent = inproc_factory(extra_args=ARGS)
    assert agent.cli("prefetch", hf_model.ref).returncode == 0
    hf_endpoint.fail_metadata_next(50, status=503)
    _check_stale_serve(agent, hf_model.ref, "hf", hf_model.local_dir, [HF_FILE, "config.json"])


def test_local_directory_gone_serves_the_cached_revision(
    inproc_factory: Any, minilm_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "share" / "minilm"
    shutil.copytree(minilm_dir, src, ignore=shutil.ignore_patterns(".*"))
    agent = inproc_factory(extra_args=ARGS)
    assert agent.cli("prefetch", str(src)).returncode == 0
    shutil.move(src, tmp_path / "elsewhere")  # the share went away (an unmounted NFS export)
    _check_stale_serve(agent, str(src), "file", tmp_path / "elsewhere", [HF_FILE, "config.json"])


def test_no_cached_revision_still_fails_clearly(inproc_factory: Any, s3_model: Any, seaweed: SeaweedS3) -> None:
    """Nothing cached: the outage is one typed error line, not an internal error, and not a stale serve."""
    relay = TcpRelay("127.0.0.1", seaweed.s3_port)
    relay.close()
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": relay.url}, extra_args=ARGS)
    done = agent.cli("prefetch", s3_model.ref, timeout=120)
    assert done.returncode != 0
    assert "internal error" not in done.stderr and "cannot reach S3" in done.stderr, done.stderr
    assert _stale_serves(agent, "s3") == 0
