"""The declarative warm set (agent/warmset/reconciler.py) on real agents, a real file, SeaweedFS and the HF endpoint.

The file is laid out the way a mounted ConfigMap is (``warm-set.yaml ->
..data/warm-set.yaml``, ``..data -> ..<timestamp>``) and changed the way the
kubelet changes it: a new timestamped directory, then an atomic rename of a new
``..data`` symlink over the old one. Agents poll it every 0.2 s.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash

from agent.errors import WarmSetError
from agent.warmset.spec import parse_duration, parse_warm_set
from client.transport import AgentConnection
from tests.servers.configmap import ConfigMapDir
from tests.servers.hf_endpoint import HfEndpoint
from tests.servers.seaweedfs import SeaweedS3
from tests.test_peers import _cluster, _relay, _upload, _wait_peers_up

MiB = 1024 * 1024
POLL = ("--warm-set-poll", "0.2")


# ---------------------------------------------------------------------- the file format (pure)


def test_parse_is_strict_and_names_what_is_wrong() -> None:
    spec = parse_warm_set(
        "models:\n  - ref: hf://org/name@main\n    pin: true\n  - ref: s3://models/embedder\n    pin: false\n"
        "refresh: 10m\n"
    )
    assert [(e.ref, e.pin) for e in spec.entries] == [("hf://org/name@main", True), ("s3://models/embedder", False)]
    assert spec.refresh == 600
    assert parse_warm_set("").entries == ()
    clouds = parse_warm_set("models: [{ref: 'gs://models/x'}, {ref: 'az://acct/models/x'}]")
    assert [e.ref for e in clouds.entries] == ["gs://models/x", "az://acct/models/x"]
    assert parse_duration("1h30m") == 5400 and parse_duration("30s") == 30 and parse_duration(45) == 45
    bad = {
        "models: [{ref: s3://models/x, pinned: true}]": "unknown key 'pinned'",
        "modles: []": "unknown key 'modles'",
        "refresh: 10 minutes": "refresh",
        "refresh: 0s": "minimum",
        "models: [{ref: 'ftp://b/x'}]": "models[0]: unknown scheme 'ftp'",
        "models: [{ref: 'gs://b/x'}]": "models[0]: bad GCS bucket name 'b'",
        "models: [{pin: true}]": "'ref' is required",
        "models: [{ref: s3://models/x, pin: 'yes'}]": "'pin' must be true or false",
        "models: [{ref: s3://models/x}, {ref: s3://models/x@abc}]": "list a model once",
        "models: [": "invalid YAML",
        "- a\n- b\n": "top level",
    }
    for text, words in bad.items():
        with pytest.raises(WarmSetError, match=re.escape(words)):
            parse_warm_set(text)


# ---------------------------------------------------------------------- helpers


def _conn(agent: Any) -> AgentConnection:
    return AgentConnection(str(agent.socket_path), timeout=10)


def _status(agent: Any) -> dict[str, Any]:
    return _conn(agent).request_json("GET", "/v1/warm-set")


def _entry(status: dict[str, Any], ref: str) -> dict[str, Any]:
    return next(e for e in status["entries"] if e["ref"] == ref)


def _wait(agent: Any, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(agent)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {st}"
        time.sleep(0.1)


def _all_ready(st: dict[str, Any], n: int | None = None) -> bool:
    return bool(st["entries"]) and all(e["state"] == "ready" for e in st["entries"]) and (
        n is None or len(st["entries"]) == n)


def _pins(agent: Any) -> dict[str, bool]:
    return {m["ref"]: m["pinned"] for m in _conn(agent).request_json("GET", "/v1/models")["models"]}


def _warm_set(*entries: tuple[str, bool], refresh: str = "10m") -> str:
    lines = ["models:"] + [f"  - ref: {r}\n    pin: {'true' if p else 'false'}" for r, p in entries]
    return "\n".join(lines) + f"\nrefresh: {refresh}\n"


# ---------------------------------------------------------------------- one agent


def test_add_remove_symlink_swaps_and_a_bad_file_keeps_the_last_good_set(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    a_files = _upload(seaweed, tmp_path, "ws-a", {"a.bin": 3 * MiB, "config.json": 100})
    b_files = _upload(seaweed, tmp_path, "ws-b", {"b.bin": 2 * MiB})
    ref_a, ref_b = "s3://models/ws-a", "s3://models/ws-b"
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_warm_set((ref_a, True)))
    agent = inproc_factory("n", extra_args=("--warm-set", str(cm.path), *POLL))

    st = _wait(agent, lambda s: _all_ready(s, 1), what="A ready")
    assert _entry(st, ref_a)["total_bytes"] == sum(len(d) for d in a_files.values())
    assert _pins(agent) == {ref_a: True}

    cm.write(_warm_set((ref_a, True), (ref_b, False)))  # add B (evictable)
    st = _wait(agent, lambda s: _all_ready(s, 2), what="A and B ready")
    assert st["generation"] == 2
    assert _pins(agent) == {ref_a: True, ref_b: False}
    for data in (*a_files.values(), *b_files.values()):
        assert (agent.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(data)).read_bytes() == data

    for broken, words in (("models: [\n", "invalid YAML"), ("models: []\nrefresh: 1m\nextra: 1\n", "'extra'"),
                          ("models: [{ref: 's3://models/ws-a', pin: true, size: 3}]", "'size'")):
        cm.write(broken)

        def says(s: dict[str, Any], words: str = words) -> bool:
            return s["file_error"] is not None and words in s["file_error"]["message"]

        st = _wait(agent, says, 10, f"file error {words}")
        assert st["generation"] == 2 and _all_ready(st, 2), st  # the last good set stays in force
        assert agent.alive()
    assert st["file_errors_total"] == 3
    metrics = _conn(agent)._send("GET", "/v1/warm-set/metrics", None)[1].read().decode()
    assert "warmstart_warm_set_file_errors_total 3.0" in metrics
    assert 'warmstart_warm_set_entries{state="ready"} 2.0' in metrics
    assert "warmstart_warm_set_file_valid 0.0" in metrics
    status, body = agent.http_get("/metrics")  # the same series on the agent's Prometheus endpoint
    assert status == 200 and 'warmstart_warm_set_entries{state="ready"} 2.0' in body.decode()
    assert f'warmstart_warm_set_entry_seconds_since_ready{{ref="{ref_a}"}} 0.0' in body.decode()
    assert "invalid YAML" in agent.log_text() and "keeping the last good warm set" in agent.log_text()

    cm.write(_warm_set((ref_b, True)))  # A removed, B now pinned
    st = _wait(agent, lambda s: len(s["entries"]) == 1 and _all_ready(s), what="A removed")
    assert st["file_error"] is None and st["generation"] == 3
    assert _pins(agent) == {ref_a: False, ref_b: True}  # A unpinned (evictable), not deleted
    assert all((agent.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(d)).is_file() for d in a_files.values())

    out = agent.cli("ls", check=True).stdout
    assert "warm set" in out and ref_b in out and "ready" in out
    # A restart reconciles from the file again; nothing is fetched twice.
    agent.restart()
    _wait(agent, lambda s: _all_ready(s, 1), what="ready after restart")
    assert _pins(agent)[ref_b] is True


def test_over_capacity_is_refused_with_the_sizes_and_no_retry_loop(
    inproc_factory: Any, seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    _upload(seaweed, tmp_path, "cap-a", {"a.bin": 5 * MiB})
    b_files = _upload(seaweed, tmp_path, "cap-b", {"b.bin": 4 * MiB})
    relay = _relay(seaweed, relay_factory)
    ref_a, ref_b = "s3://models/cap-a", "s3://models/cap-b"
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_warm_set((ref_a, True), (ref_b, True), refresh="1s"))
    agent = inproc_factory("n", capacity="8MiB", env={"AWS_ENDPOINT_URL": relay.url},
                           extra_args=("--warm-set", str(cm.path), *POLL, "--piece-size", "1MiB"))
    st = _wait(agent, lambda s: {e["state"] for e in s["entries"]} == {"ready", "failed"}, what="one refused")
    refused = next(e for e in st["entries"] if e["state"] == "failed")
    assert refused["error"]["kind"] == "capacity" and refused["next_retry_s"] is None
    msg = refused["error"]["message"]
    assert "does not fit" in msg and "8.0 MiB" in msg, msg
    assert "refused" in agent.log_text() and "8.0 MiB" in agent.log_text()

    # No loop: over several refresh periods the origin sees no request for the refused entry.
    connections = relay.connections
    requests_before = agent.log_text().count("refused")
    time.sleep(3.0)
    assert relay.connections == connections
    assert agent.log_text().count("refused") == requests_before
    ready_ref = next(e["ref"] for e in st["entries"] if e["state"] == "ready")
    assert _pins(agent) == {ready_ref: True}  # the pinned one was never evicted

    # Dropping the pinned one frees the room: the refused one goes in without any file change of its own.
    if refused["ref"] == ref_b:
        cm.write(_warm_set((ref_b, True), refresh="1s"))
        _wait(agent, lambda s: _all_ready(s, 1), what="B in once A is gone")
        blob = agent.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(b_files["b.bin"])
        assert blob.read_bytes() == b_files["b.bin"]


def test_a_missing_file_then_a_failing_entry_backs_off_and_says_why(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "ws-ok", {"ok.bin": 1 * MiB})
    cm = ConfigMapDir(tmp_path / "cm")
    agent = inproc_factory("n", extra_args=("--warm-set", str(cm.path), *POLL))
    st = _wait(agent, lambda s: s["file_error"] is not None, 10, "missing file reported")  # and the agent serves
    assert st["generation"] == 0 and "missing" in st["file_error"]["message"] and st["entries"] == []
    gone, ok = "s3://models/ws-not-there", "s3://models/ws-ok"
    cm.write(_warm_set((gone, True), (ok, True)))
    st = _wait(agent, lambda s: {e["state"] for e in s["entries"]} == {"failed", "ready"}, what="one failed")
    bad = _entry(st, gone)
    assert bad["error"]["kind"] == "not_found" and "ws-not-there" in bad["error"]["message"], bad
    assert bad["attempts"] == 1 and 0 < bad["next_retry_s"] <= 2.5, bad
    st = _wait(agent, lambda s: _entry(s, gone)["attempts"] == 2, timeout=10, what="second attempt")
    assert 0 < _entry(st, gone)["next_retry_s"] <= 5, st  # 2 s, then 4 s (+-20%): exponential
    assert (agent.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(files["ok.bin"])).is_file()
    out = agent.cli("warm-set", "status", check=True).stdout
    assert "not_found" in out and "retry in" in out and "ready" in out


# ---------------------------------------------------------------------- rollover


def _model_dir(root: Path, name: str, size: int) -> dict[str, bytes]:
    root.mkdir(parents=True)
    files = {"config.json": f'{{"name": "{name}"}}'.encode(), "model.safetensors": os.urandom(size)}
    for path, data in files.items():
        (root / path).write_bytes(data)
    return files


def test_moving_main_rolls_over_while_a_reader_keeps_the_old_revision(
    inproc_factory: Any, hf_endpoint: HfEndpoint, relay_factory: Any, tmp_path: Path
) -> None:
    repo = "org/rolling"
    old = _model_dir(tmp_path / "v1", "v1", 4 * MiB)
    new = _model_dir(tmp_path / "v2", "v2", 12 * MiB)
    c1 = hf_endpoint.add_repo(repo, tmp_path / "v1")
    host, port = hf_endpoint.endpoint.removeprefix("http://").split(":")
    relay = relay_factory(host, int(port.rstrip("/")))
    ref = f"hf://{repo}@main"
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_warm_set((ref, True), refresh="1s"))
    agent = inproc_factory("n", env={"HF_ENDPOINT": relay.url},
                           extra_args=("--warm-set", str(cm.path), *POLL, "--piece-size", "1MiB"))
    _wait(agent, lambda s: _all_ready(s, 1) and s["entries"][0]["revision"] == c1, what="v1 ready")

    # A client opens the bare reference and keeps the old weights open (shared flock, as client readers do).
    opened = _conn(agent).stream("POST", "/v1/open", {"ref": f"hf://{repo}"})
    # (a list, not next(): it reads the stream to its end)
    complete = [line for line in opened if line.get("event") == "complete"][0]  # noqa: RUF015
    assert complete["revision"] == c1
    blob = next(f["blob"] for f in complete["files"] if f["path"] == "model.safetensors")
    fd = os.open(agent.cache_dir / blob, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        relay.set_rate(4 * MiB)  # the new revision takes ~3 s to arrive
        c2 = hf_endpoint.set_branch(repo, "main", tmp_path / "v2")
        st = _wait(agent, lambda s: s["entries"][0]["state"] == "fetching", what="rollover started")
        e = st["entries"][0]
        assert (e["revision"], e["target_revision"], e["replacing"]) == (c1, c2, c1)
        seen_fetching = 0
        while _status(agent)["entries"][0]["state"] == "fetching":
            seen_fetching += 1
            # During the rollover the bare reference (and @main's record) still name the complete v1 ...
            named = _conn(agent).request_json("POST", "/v1/resolve", {"ref": f"hf://{repo}"})["revision"]
            if named != c1:  # only because the rollover completed between the two requests
                assert _status(agent)["entries"][0]["state"] != "fetching", named
                break
            # ... and the reader reads it bit-exact.
            assert os.pread(fd, len(old["model.safetensors"]), 0) == old["model.safetensors"]
            time.sleep(0.2)
        assert seen_fetching >= 2
        st = _wait(agent, lambda s: _all_ready(s, 1), what="v2 ready")
        e = st["entries"][0]
        assert (e["revision"], e["replacing"], e["rollovers"], st["rollovers_total"]) == (c2, None, 1, 1)
        assert _conn(agent).request_json("POST", "/v1/resolve", {"ref": f"hf://{repo}"})["revision"] == c2
        assert os.pread(fd, len(old["model.safetensors"]), 0) == old["model.safetensors"]
    finally:
        os.close(fd)
    opened = _conn(agent).stream("POST", "/v1/open", {"ref": f"hf://{repo}"})
    # (a list, not next(): it reads the stream to its end)
    complete = [line for line in opened if line.get("event") == "complete"][0]  # noqa: RUF015
    assert complete["revision"] == c2 and complete["fetched_bytes"] == 0
    blob = next(f["blob"] for f in complete["files"] if f["path"] == "model.safetensors")
    assert (agent.cache_dir / blob).read_bytes() == new["model.safetensors"]
    assert "rolled over" in agent.log_text()
    metrics = _conn(agent)._send("GET", "/v1/warm-set/metrics", None)[1].read().decode()
    assert "warmstart_warm_set_rollovers_total 1.0" in metrics


# ---------------------------------------------------------------------- peers


@pytest.mark.serial  # the origin sends the set about once only if no owner's answer passes the 2 s hedge
def test_two_peers_warm_the_same_set_with_the_origin_sending_it_about_once(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, relay_factory: Any, tmp_path: Path
) -> None:
    files = _upload(seaweed, tmp_path, "ws-peers", {"a.bin": 12 * MiB, "b.bin": 4 * MiB})
    relay = _relay(seaweed, relay_factory)
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_warm_set())
    agents = _cluster(agent_factory, agent_env, tmp_path, 2, relay,
                      extra=("--warm-set", str(cm.path), *POLL))
    _wait_peers_up(agents)
    relay.reset_counters()
    cm.write(_warm_set(("s3://models/ws-peers", True)))
    for a in agents:
        _wait(a, lambda s: _all_ready(s, 1), timeout=60, what=f"{a.name} ready")
    model_bytes = sum(len(d) for d in files.values())
    print(f"origin {relay.bytes_down / model_bytes:.2f}x the model for 2 nodes")
    assert relay.bytes_down <= 1.2 * model_bytes, (relay.bytes_down, model_bytes)
    for a in agents:
        for data in files.values():
            assert (a.cache_dir / "blobs" / xxhash.xxh3_128_hexdigest(data)).read_bytes() == data


# ---------------------------------------------------------------------- deploy (the alert rules: tests/test_operate.py)


def test_node_group_overlay_mounts_its_own_warm_set() -> None:
    import shutil
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1] / "deploy"
    kubectl = shutil.which("kubectl")
    if kubectl is None or not (root / "daemonset" / "kustomization.yaml").is_file():
        pytest.skip("kubectl or the DaemonSet base (deploy/daemonset) is missing")
    cm = yaml.safe_load((root / "daemonset" / "warm-set.yaml").read_text())
    assert parse_warm_set(cm["data"]["warm-set.yaml"]).entries == ()
    done = subprocess.run([kubectl, "kustomize", str(root / "overlays" / "gpu-h100")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (group_cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "warmstart-warm-set-h100"]
    assert len(parse_warm_set(group_cm["data"]["warm-set.yaml"]).entries) == 3
    spec = ds["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "warm-set")
    assert "subPath" not in mount  # a subPath mount never sees the ConfigMap's updates
    assert env["WARMSTART_WARM_SET"] == mount["mountPath"] + "/warm-set.yaml"
    volume = next(v for v in spec["volumes"] if v["name"] == "warm-set")
    assert volume["configMap"]["name"] == "warmstart-warm-set-h100"
    assert spec["nodeSelector"] and ds["metadata"]["name"] == "warmstart-agent-h100"
    labels = ds["spec"]["selector"]["matchLabels"]
    assert labels["warmstart.dev/node-group"] == "h100"
    assert all(ds["spec"]["template"]["metadata"]["labels"][k] == v for k, v in labels.items())
