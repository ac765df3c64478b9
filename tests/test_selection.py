"""Only the files a loader needs (issue 21, item 2): agent/selection.py through prefetch, open and the warm set.

The repo is built in the test from the real MiniLM files plus fake copies of the weights in other formats
(PyTorch, ONNX, OpenVINO, TF, Flax, GGUF) and a ``consolidated.safetensors`` the shard index does not name,
as many Hub repos ship them. What the origin sent is counted from its own request log (HF endpoint) or the
agent's origin byte counter (S3), so a selection that fetched more would fail these tests.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import client
from agent.manifest import FileEntry
from agent.selection import DEFAULT, Selection, indexed_files
from agent.warmset.spec import parse_warm_set
from client.errors import BadRequestError
from tests.test_agent_e2e import assert_bit_exact, expected_tensors

REPO = "org/multi-format"
# Other formats of the same weights (fake bytes: only their names and sizes matter to a selection).
EXTRA = {
    "pytorch_model.bin": 3_000_000,
    "onnx/model.onnx": 2_500_000,
    "onnx/config.json": 300,  # a config that belongs to the ONNX export, not to the loader
    "openvino/openvino_model.bin": 2_000_000,
    "openvino/openvino_model.xml": 40_000,
    "tf_model.h5": 2_200_000,
    "flax_model.msgpack": 1_800_000,
    "model-q4.gguf": 1_500_000,
    "consolidated.safetensors": 2_700_000,  # top level, but the index does not name it
}
LOADER_EXTRA = {"model.safetensors.index.json"}  # files the loader reads besides the MiniLM ones


def make_repo(minilm_dir: Path, where: Path) -> Path:
    """MiniLM's files (links to the real ones), a shard index naming model.safetensors, and EXTRA."""
    where.mkdir()
    for path in minilm_dir.rglob("*"):
        if path.is_file():
            target = where / path.relative_to(minilm_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    index = {"metadata": {"total_size": 90_000_000}, "weight_map": {"embeddings.word_embeddings.weight":
                                                                    "model.safetensors"}}
    (where / "model.safetensors.index.json").write_text(json.dumps(index))
    for i, (name, size) in enumerate(sorted(EXTRA.items())):
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i + 1]) * size)
    return where


def all_files(repo: Path) -> dict[str, int]:
    return {p.relative_to(repo).as_posix(): p.stat().st_size for p in repo.rglob("*") if p.is_file()}


def loader_files(repo: Path) -> set[str]:
    return {name for name in all_files(repo) if name not in EXTRA}


@pytest.fixture
def multi(hf_endpoint: Any, minilm_dir: Path, tmp_path: Path) -> Path:
    repo = make_repo(minilm_dir, tmp_path / "repo")
    hf_endpoint.add_repo(REPO, repo)
    return repo


def snapshot_files(agent: Any, ref: str, **kw: Any) -> set[str]:
    snap = Path(client.snapshot(ref, socket=str(agent.socket_path), timeout=60, **kw))
    return {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file() or p.is_symlink()}


def file_gets(hf_endpoint: Any) -> dict[str, int]:
    """GETs of file bytes per file (HEADs and API calls left out)."""
    out: dict[str, int] = {}
    for r in hf_endpoint.requests:
        if r.method == "GET" and r.file is not None and r.repo_id == REPO:
            out[r.file] = out.get(r.file, 0) + 1
    return out


def prefetch(agent: Any, *args: str) -> dict[str, Any]:
    done: subprocess.CompletedProcess[str] = agent.cli("prefetch", f"hf://{REPO}", "--json", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ---------------------------------------------------------------------- the rules, on names only


def entries(*paths: str) -> list[FileEntry]:
    return [FileEntry(path=p, size=1) for p in paths]


def test_default_rule_picks_the_loaders_files() -> None:
    files = entries("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "pytorch_model.bin", "onnx/model.onnx", "onnx/config.json", "sub/x.safetensors", "README.md")
    assert [f.path for f in DEFAULT.pick(files)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "README.md"]
    # Only safetensors in folders: those (a diffusers-like layout) rather than nothing.
    assert {f.path for f in DEFAULT.pick(entries("unet/a.safetensors", "unet/config.json"))} == {
        "unet/a.safetensors", "unet/config.json"}
    # No safetensors at all: nothing says which format is the loader's, so every file.
    assert {f.path for f in DEFAULT.pick(entries("pytorch_model.bin", "tf_model.h5", "config.json"))} == {
        "pytorch_model.bin", "tf_model.h5", "config.json"}
    # With an index, exactly the shards it names (and the index).
    with_index = entries("model.safetensors.index.json", "model-1.safetensors", "consolidated.safetensors")
    assert DEFAULT.needs_index(with_index)
    assert {f.path for f in DEFAULT.pick(with_index, frozenset({"model-1.safetensors"}))} == {
        "model.safetensors.index.json", "model-1.safetensors"}


def test_include_exclude_are_huggingface_cli_globs() -> None:
    files = entries("config.json", "model.safetensors", "onnx/model.onnx", "onnx/config.json", "tf_model.h5")
    assert [f.path for f in Selection(include=("onnx/",)).pick(files)] == ["onnx/model.onnx", "onnx/config.json"]
    assert [f.path for f in Selection(include=("*.json",)).pick(files)] == ["config.json", "onnx/config.json"]
    assert [f.path for f in Selection(all_files=True, exclude=("*.h5", "onnx/*")).pick(files)] == [
        "config.json", "model.safetensors"]
    assert [f.path for f in Selection(exclude=("config.json",)).pick(files)] == ["model.safetensors"]


def test_untrusted_selection_fields_get_one_clear_line() -> None:
    for body, word in (({"include": 3}, "include"), ({"exclude": [""]}, "exclude"), ({"all_files": "yes"}, "all_files"),
                       ({"include": ["*"] * 1000}, "include")):
        with pytest.raises(BadRequestError, match=word):
            Selection.of_body(body)
    for raw in (b"{", b"[]", b'{"weight_map": {"a": "x.bin"}}', b"x" * (64 * 1024 * 1024 + 1)):
        with pytest.raises(ValueError):
            indexed_files(raw)


def test_warm_set_entries_carry_their_selection() -> None:
    spec = parse_warm_set("models:\n  - ref: s3://models/a\n    include: ['*.onnx']\n    exclude: onnx/x*\n"
                          "  - ref: s3://models/b\n    all_files: true\n  - s3://models/c\n")
    assert [e.selection for e in spec.entries] == [
        Selection(include=("*.onnx",), exclude=("onnx/x*",)), Selection(all_files=True), DEFAULT]
    from agent.errors import WarmSetError

    with pytest.raises(WarmSetError, match=r"models\[0\].*all_files"):
        parse_warm_set("models:\n  - ref: s3://models/a\n    all_files: 1\n")


# ---------------------------------------------------------------------- through a real agent


def test_default_prefetch_skips_other_weight_formats(inproc_factory: Any, hf_endpoint: Any, multi: Path) -> None:
    agent = inproc_factory()
    result = prefetch(agent)
    sizes = all_files(multi)
    wanted = loader_files(multi)
    assert result["total_bytes"] == sum(sizes[n] for n in wanted)
    assert result["skipped_files"] == len(EXTRA)
    assert result["skipped_bytes"] == sum(EXTRA.values())
    assert set(file_gets(hf_endpoint)) == wanted  # nothing else was asked of the origin
    assert hf_endpoint.bytes_served(repo_id=REPO) == sum(sizes[n] for n in wanted)
    assert snapshot_files(agent, f"hf://{REPO}") == wanted
    assert_bit_exact(client.open_tensors(f"hf://{REPO}", socket=str(agent.socket_path), timeout=60),
                     expected_tensors(multi))
    plain = agent.cli("prefetch", f"hf://{REPO}")
    assert plain.returncode == 0 and f"skipped {len(EXTRA)} files" in plain.stdout, plain.stdout
    hf_endpoint.clear_log()
    verified = agent.cli("verify", f"hf://{REPO}", "--json")  # re-hashes what is held; grows nothing
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["checked"] == len(wanted) and not file_gets(hf_endpoint)


def test_later_patterns_fill_only_what_is_missing(inproc_factory: Any, hf_endpoint: Any, multi: Path) -> None:
    """Loader files first, then ONNX by --include, then --all-files: each asks the origin only for new files,
    the snapshot grows, and the revision stays the one whole manifest."""
    agent = inproc_factory()
    prefetch(agent)
    first = file_gets(hf_endpoint)
    hf_endpoint.clear_log()
    onnx = prefetch(agent, "--include", "onnx/", "*.json")
    assert set(file_gets(hf_endpoint)) == {"onnx/model.onnx", "onnx/config.json"}
    assert onnx["fetched_bytes"] == EXTRA["onnx/model.onnx"] + EXTRA["onnx/config.json"]
    hf_endpoint.clear_log()
    whole = prefetch(agent, "--all-files", "--exclude", "*.gguf")
    assert set(file_gets(hf_endpoint)) == set(EXTRA) - {"onnx/model.onnx", "onnx/config.json", "model-q4.gguf"}
    assert whole["skipped_files"] == 1
    hf_endpoint.clear_log()
    again = prefetch(agent, "--all-files")
    assert set(file_gets(hf_endpoint)) == {"model-q4.gguf"} and again["skipped_files"] == 0
    assert snapshot_files(agent, f"hf://{REPO}", all_files=True) == set(all_files(multi))
    assert set(first) == loader_files(multi)
    snap = Path(client.snapshot(f"hf://{REPO}", socket=str(agent.socket_path), timeout=60, all_files=True))
    for name in all_files(multi):
        assert (snap / name).read_bytes() == (multi / name).read_bytes(), name
    # the default still answers with the loader's files only, and fetches nothing
    hf_endpoint.clear_log()
    assert prefetch(agent)["fetched_bytes"] == 0 and not file_gets(hf_endpoint)


def test_a_selection_cached_is_served_stale_for_that_selection(inproc_factory: Any, hf_endpoint: Any,
                                                              multi: Path) -> None:
    """The outage fallback counts a revision complete for the files a request picks: the loader's files are
    enough for a default open, not for --all-files."""
    agent = inproc_factory(extra_args=("--resolve-timeout", "2", "--retries", "1"))
    prefetch(agent)
    hf_endpoint.clear_log()
    hf_endpoint.fail_metadata_next(100, 503)
    hf_endpoint.fail_next(100, 503)
    assert snapshot_files(agent, f"hf://{REPO}") == loader_files(multi)
    assert not file_gets(hf_endpoint)  # served from the cache: the complete loader files
    done = agent.cli("prefetch", f"hf://{REPO}", "--all-files", timeout=60)
    assert done.returncode != 0 and "internal error" not in done.stderr, done.stderr
    assert "503" in done.stderr, done.stderr


def test_s3_prefix_gets_the_same_rule(inproc_factory: Any, seaweed: Any, minilm_dir: Path, tmp_path: Path) -> None:
    repo = make_repo(minilm_dir, tmp_path / "repo")
    seaweed.make_bucket("selection")
    seaweed.upload_dir(repo, "selection", "multi")
    agent = inproc_factory()
    done = agent.cli("prefetch", "s3://selection/multi", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["skipped_bytes"] == sum(EXTRA.values())
    stats = json.loads(agent.cli("stats", "--json", check=True).stdout)
    assert stats["origin_bytes"] == result["total_bytes"]
    assert snapshot_files(agent, "s3://selection/multi") == loader_files(repo)


def test_warm_set_entries_fetch_their_selection(inproc_factory: Any, hf_endpoint: Any, multi: Path,
                                                tmp_path: Path) -> None:
    """A default entry warms the loader's files only and stays ready (not re-fetched as incomplete); an entry
    with include fetches just what it names."""
    from tests.servers.configmap import ConfigMapDir
    from tests.test_warm_set import POLL, _all_ready, _entry, _wait

    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(f"models:\n  - ref: hf://{REPO}\n    pin: true\nrefresh: 10m\n")
    agent = inproc_factory(extra_args=("--warm-set", str(cm.path), *POLL))
    st = _wait(agent, lambda s: _all_ready(s, 1), timeout=60, what="ready")
    sizes = all_files(multi)
    assert _entry(st, f"hf://{REPO}")["total_bytes"] == sum(sizes[n] for n in loader_files(multi))
    assert set(file_gets(hf_endpoint)) == loader_files(multi)
    hf_endpoint.clear_log()
    time.sleep(1.0)  # several polls: a ready entry of a selection is not taken for a partial one
    assert _entry(_wait(agent, lambda s: _all_ready(s, 1)), f"hf://{REPO}")["state"] == "ready"
    assert not file_gets(hf_endpoint)
    cm.write(f"models:\n  - ref: hf://{REPO}\n    pin: true\n    include: ['onnx/']\nrefresh: 10m\n")
    _wait(agent, lambda s: _all_ready(s, 1) and _entry(s, f"hf://{REPO}")["total_bytes"] == sum(
        sizes[n] for n in ("onnx/model.onnx", "onnx/config.json")), timeout=60, what="onnx ready")
    assert set(file_gets(hf_endpoint)) == {"onnx/model.onnx", "onnx/config.json"}


def test_local_directory_gets_the_same_rule(inproc_factory: Any, minilm_dir: Path, tmp_path: Path) -> None:
    repo = make_repo(minilm_dir, tmp_path / "repo")
    agent = inproc_factory()
    done = agent.cli("prefetch", str(repo), "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["skipped_files"] == len(EXTRA) and result["skipped_bytes"] == sum(EXTRA.values())
    assert snapshot_files(agent, str(repo)) == loader_files(repo)
    assert snapshot_files(agent, str(repo), all_files=True) == set(all_files(repo))
