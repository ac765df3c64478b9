"""S3 as it is run (issue 20, item 5): buckets in another region, addressing styles, a bad setting.

Against real SeaweedFS behind the faulty origin (tests/servers/faulty_origin.py),
which answers as S3 does a request signed for the wrong region: 301
PermanentRedirect naming the bucket's region in ``x-amz-bucket-region``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.servers.cache_check import blob_digest, check_cache
from tests.servers.faulty_origin import FaultyOrigin
from tests.servers.seaweedfs import SeaweedS3
from tests.test_agent_e2e import one_line_error

MiB = 1024 * 1024


def _upload(seaweed: SeaweedS3, tmp_path: Path, key: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"upload-{seed}.bin"
    path.write_bytes(data)
    seaweed.make_bucket("models")
    seaweed.upload_file(path, "models", key)
    path.unlink()
    return data


@pytest.fixture
def faulty(seaweed: SeaweedS3) -> Any:
    proxy = FaultyOrigin(seaweed.endpoint_url, stall_seconds=30)
    yield proxy
    proxy.close()


def test_a_bucket_in_another_region_is_followed_there(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path
) -> None:
    """The agent's region is the test's default; the bucket answers every other region with 301 + its own."""
    data = _upload(seaweed, tmp_path, "region/w.bin", 3 * MiB, seed=41)
    faulty.region = "eu-west-3"
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": faulty.url}, extra_args=("--piece-size", "1MiB"))
    done = agent.cli("prefetch", "s3://models/region")
    assert done.returncode == 0, done.stderr
    assert blob_digest(data) in check_cache(agent.cache_dir)
    asked = [r for r in faulty.requests if r.startswith("GET /models/region/w.bin")]
    # At least one range GET signed for the agent's own region was refused (301), then signed again.
    assert len(asked) > len(faulty.ranged_gets) > 0, faulty.requests
    assert "bucket models is in eu-west-3" in agent.log_text()


def test_a_region_that_keeps_refusing_ends_in_one_error_naming_it(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path
) -> None:
    _upload(seaweed, tmp_path, "region-bad/w.bin", 1 * MiB, seed=42)
    faulty.region = "eu-west-3"
    faulty.claimed_region = "ap-south-1"  # a wrong answer: following it is refused again
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": faulty.url}, extra_args=("--piece-size", "1MiB"))
    err = one_line_error(agent.cli("prefetch", "s3://models/region-bad", timeout=120))
    assert "ap-south-1" in err and "'models'" in err and "AWS_REGION=" in err, err
    assert len(faulty.requests) < 20, faulty.requests  # bounded: no redirect loop
    assert agent.http_status("/livez") == 200


@pytest.mark.parametrize("style", ["path", "PATH", ""])
def test_path_style_addressing_is_honoured(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path, style: str
) -> None:
    data = _upload(seaweed, tmp_path, "style/w.bin", 1 * MiB, seed=43)
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": faulty.url, "AWS_S3_ADDRESSING_STYLE": style})
    done = agent.cli("prefetch", "s3://models/style")
    assert done.returncode == 0, done.stderr
    assert blob_digest(data) in check_cache(agent.cache_dir)
    assert any(r.startswith("GET /models/style/w.bin") for r in faulty.requests), faulty.requests


def test_a_bad_addressing_style_is_one_clear_line_and_the_agent_keeps_serving(
    inproc_factory: Any, seaweed: SeaweedS3, faulty: FaultyOrigin, tmp_path: Path
) -> None:
    _upload(seaweed, tmp_path, "style-bad/w.bin", 1 * MiB, seed=44)
    agent = inproc_factory(env={"AWS_ENDPOINT_URL": faulty.url, "AWS_S3_ADDRESSING_STYLE": "sideways"})
    err = one_line_error(agent.cli("prefetch", "s3://models/style-bad"))
    assert "AWS_S3_ADDRESSING_STYLE='sideways'" in err and "path" in err, err
    assert agent.http_status("/livez") == 200
