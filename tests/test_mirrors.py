"""Hub-compatible mirrors (issue 21, part B): what huggingface_hub can download from one, the agent can.

The HF test endpoint is put in a mirror's modes (tests/servers/hf_endpoint.py); huggingface_hub's own
``snapshot_download`` from the same endpoint is the reference behaviour, and the agent's copy must be
bit-exact with it and checked against the digests the mirror gives.
"""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

import client
from tests.test_agent_e2e import assert_bit_exact, expected_tensors


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
