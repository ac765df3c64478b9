"""Operating the agent: metrics that move with real traffic, the manifests, the alerts, a real Prometheus.

- ``/metrics`` of real agent processes after real fetches from SeaweedFS (through
  the fault-injecting proxy where errors are the point), parsed with
  prometheus_client's own parser; values asserted, not only names.
- Two agents that are peers: bytes by source and peer states.
- ``deploy/daemonset`` renders with ``kubectl kustomize`` and every object with a
  schema passes ``kubernetes-validate --strict``.
- The alert rules (deploy/daemonset/monitoring/rules.yaml) pass ``promtool check rules`` and
  ``promtool test rules`` (monitoring/rules_test.yaml: should-fire and
  should-not-fire cases for every alert); the PrometheusRule is generated from them.
- A real ``prometheus`` scrapes a real agent; the hit-ratio expression the alert uses,
  queried through its HTTP API, equals the hits and misses the test caused.
- The Grafana dashboard only queries metrics the agent exports.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from client.transport import AgentConnection
from tests.servers.faulty_origin import FaultyOrigin
from tests.servers.ports import free_port, free_ports
from tests.servers.proc import kill_group, spawn_logged, stop_group
from tests.servers.seaweedfs import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "daemonset"
MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "rules.yaml"
MiB = 1024 * 1024
TOKEN = "peer-token-for-tests-0123456789abcdef"


# ---------------------------------------------------------------------- helpers


WARM_SET_ENTRY_SERIES = {"warmstart_warm_set_entry_seconds_since_ready", "warmstart_warm_set_entry_state"}


def scrape(agent: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` of ``agent`` parsed by prometheus_client: {(sample name, sorted labels): value}."""
    status, body = agent.http_get("/metrics")
    assert status == 200, body[:200]
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _upload(seaweed: SeaweedS3, tmp_path: Path, prefix: str, sizes: dict[str, int], seed: int) -> dict[str, int]:
    rnd = random.Random(seed)
    seaweed.make_bucket("models")
    for name, size in sizes.items():
        path = tmp_path / f"up-{seed}-{name}"
        path.write_bytes(rnd.randbytes(size))
        seaweed.upload_file(path, "models", f"{prefix}/{name}")
        path.unlink()
    return sizes


def pieces(sizes: dict[str, int], piece: int = MiB) -> int:
    return sum(max(1, math.ceil(s / piece)) for s in sizes.values())


def _open(agent: Any, ref: str) -> dict[str, Any]:
    """``/v1/open`` over the socket, as client.open_tensors asks; the ``complete`` line."""
    last: dict[str, Any] = {}
    for line in AgentConnection(str(agent.socket_path), timeout=60).stream("POST", "/v1/open", {"ref": ref}):
        last = line
    assert last.get("event") == "complete", last
    return last


def _stats(agent: Any) -> dict[str, Any]:
    return AgentConnection(str(agent.socket_path), timeout=10).request_json("GET", "/v1/stats")


MODEL_A = {"config.json": 1200, "w-1.safetensors": 5 * MiB + 10, "w-2.safetensors": 3 * MiB}
MODEL_B = {"w.safetensors": 7 * MiB}


# ---------------------------------------------------------------------- metrics with real traffic


def test_metrics_move_with_real_fetches_hits_evictions_and_errors(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    a = _upload(seaweed, tmp_path, "op-a", MODEL_A, seed=1)
    b = _upload(seaweed, tmp_path, "op-b", MODEL_B, seed=2)
    bad = _upload(seaweed, tmp_path, "op-bad", {"w.bin": 100_000}, seed=3)
    proxy = FaultyOrigin(seaweed.endpoint_url, stall_seconds=5)
    try:
        agent = inproc_factory(
            env={"AWS_ENDPOINT_URL": proxy.url}, capacity="12MiB",
            extra_args=("--piece-size", "1MiB", "--connections", "2", "--retries", "3"),
        )
        m = scrape(agent)
        assert value(m, "warmstart_cache_capacity_bytes") == 12 * MiB
        assert value(m, "warmstart_cache_used_bytes") == 0
        assert value(m, "warmstart_cache_hits_total", kind="model") == 0
        assert value(m, "warmstart_peers", state="live") == 0
        assert value(m, "warmstart_build_info", version=_version()) == 1

        # Cold: every piece of A is a miss, its bytes come from the origin, two 503s are retried.
        proxy.inject("503", "503")
        agent.cli("prefetch", "s3://models/op-a", check=True)
        m = scrape(agent)
        n_a, size_a = pieces(a), sum(a.values())
        assert n_a == 10
        assert value(m, "warmstart_cache_misses_total", kind="model") == n_a
        assert value(m, "warmstart_cache_hits_total", kind="model") == 0
        assert value(m, "warmstart_fetched_bytes_total", source="origin") == size_a
        assert value(m, "warmstart_fetched_bytes_total", source="peer") == 0
        assert value(m, "warmstart_piece_fetch_duration_seconds_count", source="origin") == n_a  # tries that succeeded
        assert value(m, "warmstart_piece_fetch_duration_seconds_bucket", source="origin", le="+Inf") == n_a
        assert value(m, "warmstart_piece_fetch_duration_seconds_sum", source="origin") > 0
        assert value(m, "warmstart_fetch_errors_total", source="origin", kind="transient") == 2
        assert value(m, "warmstart_fetch_errors_total", source="origin", kind="failed") == 0
        assert value(m, "warmstart_fetches_in_flight", source="origin") == 0
        assert value(m, "warmstart_fills_in_flight") == 0
        assert value(m, "warmstart_cache_used_bytes") == size_a
        assert value(m, "warmstart_cache_blobs") == 3
        assert value(m, "warmstart_served_bytes_total", to="client") == 0  # a prefetch hands nothing out

        # Warm: an open finds every piece here, hands the files to the client, fetches nothing.
        _open(agent, "s3://models/op-a")
        m = scrape(agent)
        assert value(m, "warmstart_cache_hits_total", kind="model") == n_a
        assert value(m, "warmstart_cache_misses_total", kind="model") == n_a
        assert value(m, "warmstart_served_bytes_total", to="client") == size_a
        assert value(m, "warmstart_fetched_bytes_total", source="origin") == size_a
        assert value(m, "warmstart_evictions_total") == 0

        # B does not fit beside A in 12 MiB: least recently used blobs of A go.
        agent.cli("prefetch", "s3://models/op-b", check=True)
        m = scrape(agent)
        resolved = AgentConnection(str(agent.socket_path)).request_json("POST", "/v1/resolve", {"ref": "s3://models/op-a"})
        gone = sum(not f["cached"] for f in resolved["files"])
        assert gone >= 1
        assert value(m, "warmstart_evictions_total") == gone
        assert value(m, "warmstart_cache_misses_total", kind="model") == n_a + pieces(b)
        used = AgentConnection(str(agent.socket_path)).request_json("GET", "/v1/models")["used_bytes"]
        assert value(m, "warmstart_cache_used_bytes") == used <= 12 * MiB

        # An origin that keeps failing: the piece gives up after --retries, the request fails with its kind.
        proxy.always = "503"
        done = agent.cli("prefetch", "s3://models/op-bad")
        assert done.returncode == 1, done.stderr
        proxy.clear()
        m = scrape(agent)
        assert value(m, "warmstart_fetch_errors_total", source="origin", kind="failed") == pieces(bad) == 1
        assert value(m, "warmstart_fetch_errors_total", source="origin", kind="transient") == 2 + 3
        assert value(m, "warmstart_api_errors_total", kind="fetch_failed") == 1
        # A bad reference is counted by its kind too.
        assert agent.cli("prefetch", "s3://models/op-missing").returncode == 1
        assert value(scrape(agent), "warmstart_api_errors_total", kind="not_found") == 1
    finally:
        proxy.close()


def _version() -> str:
    from importlib import metadata

    return metadata.version("warmstart")


def test_metrics_of_two_peers_bytes_by_source_and_peer_states(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    sizes = _upload(seaweed, tmp_path, "op-peers", {"config.json": 900, "w.safetensors": 12 * MiB + 5}, seed=4)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    nodes = [
        inproc_factory(f"node{i}", port=port,
                      extra_args=("--peers", peers, "--peer-token-file", str(token), "--piece-size", "1MiB",
                                  "--peer-start-wait", "0"))
        for i, port in enumerate(ports)
    ]  # fmt: skip
    deadline = time.monotonic() + 20
    while not all(value(scrape(n), "warmstart_peers", state="live") == 1 for n in nodes):
        assert time.monotonic() < deadline, [_stats(n) for n in nodes]
        time.sleep(0.2)
    total = sum(sizes.values())
    nodes[0].cli("prefetch", "s3://models/op-peers", check=True)
    nodes[1].cli("prefetch", "s3://models/op-peers", check=True)
    m0, m1 = scrape(nodes[0]), scrape(nodes[1])
    # The origin sent the model once: each piece was fetched by its owner (for itself, or for the
    # other node asking it); every byte one node received from its peer, the peer served.
    origin = [value(m, "warmstart_fetched_bytes_total", source="origin") for m in (m0, m1)]
    got = [value(m, "warmstart_fetched_bytes_total", source="peer") for m in (m0, m1)]
    served = [value(m, "warmstart_served_bytes_total", to="peer") for m in (m0, m1)]
    assert sum(origin) == total
    assert got[1] > 0 and got[1] + origin[1] >= total  # node1 took the pieces node0 owns from node0
    assert got == [served[1], served[0]]
    assert got == [_stats(n)["peer_bytes_received"] for n in nodes]
    # One observation per piece from a peer: 1 MiB ones, and the 900 and 5 B ones.
    for m, nbytes in zip((m0, m1), got, strict=True):
        small = {0: 0, 5: 1, 900: 1, 905: 2}[int(nbytes) % MiB]
        assert value(m, "warmstart_piece_fetch_duration_seconds_count", source="peer") == nbytes // MiB + small
    assert value(m0, "warmstart_cache_misses_total", kind="model") == pieces(sizes)
    assert value(m1, "warmstart_fetch_errors_total", source="peer", kind="rejected") == 0
    # node0 stops: node1 sees it down within a ping or two (the PeersUnreachable alert's series).
    nodes[0].stop()
    deadline = time.monotonic() + 15
    while value(m1 := scrape(nodes[1]), "warmstart_peers", state="down") != 1:
        assert time.monotonic() < deadline, _stats(nodes[1])
        time.sleep(0.2)
    assert value(m1, "warmstart_peers", state="live") == 0


def test_metrics_route_needs_no_token_and_peer_routes_still_do(inproc_factory: Any, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    agent = inproc_factory(extra_args=("--peer-token-file", str(token)))
    status, body = agent.http_get("/metrics")
    assert status == 200 and b"warmstart_cache_used_bytes" in body
    assert agent.http_status("/peer/v1/ping") == 401


# ---------------------------------------------------------------------- manifests


def _tool(name: str) -> str:
    """A command-line tool scripts/install.sh installs; missing is a failure, not a skip (CI installs it)."""
    path = shutil.which(name) or (
        str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None
    )
    assert path, f"{name} is not installed: run scripts/install.sh"
    return path


def _kustomize(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run([_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# Custom resources of the Prometheus Operator: kubernetes-validate ships no schema for them,
# so they are checked here against what they must say instead.
NO_SCHEMA = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def test_manifests_render_and_validate_strictly(tmp_path: Path) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    docs = _kustomize(DEPLOY)
    example = _kustomize(DEPLOY / "example")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {
        ("Namespace", "warmstart"), ("ServiceAccount", "warmstart-agent"), ("Secret", "warmstart-peer-token"),
        ("DaemonSet", "warmstart-agent"), ("Service", "warmstart-agents"), ("PodMonitor", "warmstart-agent"),
        ("PrometheusRule", "warmstart-agent"), ("ConfigMap", "warmstart-dashboard"),
    }
    skipped = set()
    for doc in docs + example:
        for version in ("1.29.0", kubernetes_validate.latest_version()):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                skipped.add((doc["apiVersion"], doc["kind"]))
    assert skipped == NO_SCHEMA  # nothing else went unchecked
    # The CLI the issue names agrees, on the rendered files.
    for name, objs in (("agent", docs), ("example", example)):
        out = tmp_path / f"{name}.yaml"
        out.write_text(yaml.safe_dump_all(objs))
        done = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    by_kind = {d["kind"]: d for d in docs}
    ds = by_kind["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert ds["metadata"]["namespace"] == "warmstart"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {e["key"] for t in terms for e in t["matchExpressions"]} >= {"nvidia.com/gpu.present"}
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    env = {e["name"]: e.get("value") for e in agent["env"]}
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert env["WARMSTART_CACHE_DIR"] == mounts["cache"] and "cache" in host
    assert os.path.dirname(env["WARMSTART_SOCKET"]) == mounts["socket-dir"] and "socket-dir" in host
    assert env["WARMSTART_ADVERTISE"] == "$(POD_IP):7070" and env["WARMSTART_LISTEN"].endswith(":7070")
    # The flags those variables stand for exist (an unknown WARMSTART_* would be ignored silently).
    helptext = subprocess.run([sys.executable, "-m", "agent", "serve", "--help"], capture_output=True, text=True).stdout
    for name in env:
        if name.startswith("WARMSTART_"):
            assert "--" + name.removeprefix("WARMSTART_").lower().replace("_", "-") in helptext, name
    svc = by_kind["Service"]
    assert svc["spec"]["clusterIP"] == "None" and env["WARMSTART_PEER_DNS"].startswith(svc["metadata"]["name"] + ".")
    assert svc["spec"]["selector"].items() <= pod_labels(ds).items()
    token_mount = next(m for m in agent["volumeMounts"] if m["name"] == "peer-token")["mountPath"]
    assert env["WARMSTART_PEER_TOKEN_FILE"] == token_mount + "/token"
    # The placeholder token is refused by the agent (too short), so nobody runs with a known token.
    assert len(by_kind["Secret"]["stringData"]["token"]) < 16
    pm = by_kind["PodMonitor"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels(ds).items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in agent["ports"]}
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert pod_labels(ds)[pm["spec"]["jobLabel"]] == "warmstart-agent"  # the job the rules select
    assert by_kind["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert json.loads(by_kind["ConfigMap"]["data"]["warmstart.json"])["uid"] == "warmstart-agents"

    # The example pod talks to the agent's socket directory and reads the cache read-only.
    dep = next(d for d in example if d["kind"] == "Deployment")
    epod = dep["spec"]["template"]["spec"]
    ehost = {v["name"]: v["hostPath"]["path"] for v in epod["volumes"]}
    emounts = {m["name"]: m for m in epod["containers"][0]["volumeMounts"]}
    assert set(ehost.values()) == {host["cache"], host["socket-dir"]}
    cache_mount = next(m for n, m in emounts.items() if ehost[n] == host["cache"])
    assert cache_mount.get("readOnly") is True
    assert "client.open_tensors" in "".join(epod["containers"][0]["args"])
    assert 65532 in epod["securityContext"]["supplementalGroups"]  # the agent's group owns the socket


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_the_documented_overlay_sets_token_image_cache_path_and_capacity(tmp_path: Path) -> None:
    """docs/OPERATIONS.md "Install on a cluster", step 2, as written there."""
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    overlay = re.search(r"cat > kustomization.yaml <<'EOF'\n(.*?)\n\s*EOF", ops, flags=re.S)
    assert overlay
    text = "\n".join(line[3:] for line in overlay.group(1).splitlines())  # the block is indented 3
    text = text.replace("../warmstart/deploy/daemonset", os.path.relpath(DEPLOY, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(text)
    (tmp_path / "peer-token").write_text("0123456789abcdef0123456789abcdef")
    docs = _kustomize(tmp_path)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["WARMSTART_CAPACITY"] == "3TiB"
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["hostPath"]["path"] == "/mnt/nvme0/warmstart"
    assert (
        pod["containers"][0]["image"]
        == pod["initContainers"][0]["image"]
        == "registry.example.com/warmstart-agent:0.1.0"
    )
    secret = next(d for d in docs if d["kind"] == "Secret")
    import base64

    assert base64.b64decode(secret["data"]["token"]).decode() == "0123456789abcdef0123456789abcdef"
    vol = next(v for v in pod["volumes"] if v["name"] == "peer-token")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]  # hashed name: a new token rolls the agents


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_prometheusrule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_containerfile_installs_the_agents_dependencies() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    name = lambda d: re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    client_only = {"torch", "safetensors", "numpy"}
    text = (ROOT / "deploy" / "Containerfile").read_text()
    installed = {name(d) for d in re.findall(r'"([A-Za-z0-9_.-]+[<>=][^"]*)"', text)}
    assert installed == {name(d) for d in deps} - client_only


# ---------------------------------------------------------------------- alerts


def test_alert_rules_check_and_unit_tests_pass() -> None:
    promtool = _tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 10 rules found" in done.stdout
    done = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert has a case where it fires and one where it must not; every alert is mixin-style.
    tests = yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    alerts = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == {
        "WarmstartCacheHitRateLow", "WarmstartOriginEgressHigh", "WarmstartCacheDiskNearlyFull",
        "WarmstartPeersUnreachable", "WarmstartAgentDown", "WarmstartFetchErrors",
        "WarmstartWarmSetEntryNotReady", "WarmstartWarmSetFileInvalid",
    }
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", ops, flags=re.M)}
    for a in alerts:
        assert any(c["alertname"] == a["alert"] and c["exp_alerts"] for c in cases), a["alert"]
        assert any(c["alertname"] == a["alert"] and not c["exp_alerts"] for c in cases), a["alert"]
        assert a["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= a["annotations"].keys()
        path, _, anchor = a["annotations"]["runbook_url"].partition("#")
        assert path == "docs/OPERATIONS.md" and anchor in anchors, a["annotations"]["runbook_url"]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ---------------------------------------------------------------------- dashboard


def test_dashboard_queries_only_metrics_the_agent_exports(inproc_factory: Any) -> None:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    agent = inproc_factory()
    # + the warm set's per-entry series, exported only by agents with --warm-set entries
    # (tests/test_warm_set.py checks them on /metrics).
    exported = {name for name, _ in scrape(agent)} | {"up"} | WARM_SET_ENTRY_SERIES
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    assert len(exprs) >= 10
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("hit rate", "source", "fill", "peers", "latency"):
        assert topic in titles, topic
    for expr in exprs:
        names = set(re.findall(r"\b(warmstart_[a-z_]+|up)\b(?=\s*[{\[(])", expr))
        assert names, expr
        assert names <= exported, (names - exported, expr)
    # Rules too: every metric they read is exported.
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            names = set(re.findall(r"\b(warmstart_[a-z_]+|up)\b(?=\s*[{\[(])", r["expr"]))
            assert names <= exported, (names - exported, r["expr"])


# ---------------------------------------------------------------------- a real Prometheus


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(base: str, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = _query(base, expr)
        except OSError:
            result = []
        if result:
            return result
        assert time.monotonic() < deadline, f"no result for {expr}"
        time.sleep(0.25)


def test_real_prometheus_scrapes_an_agent_and_the_alerts_hit_ratio_is_exact(
    inproc_factory: Any, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    sizes = _upload(seaweed, tmp_path, "op-prom", {"config.json": 700, "w.safetensors": 3 * MiB + 1}, seed=5)
    n = pieces(sizes)
    assert n == 5
    agent = inproc_factory(extra_args=("--piece-size", "1MiB"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "warmstart-agent",
                            "static_configs": [{"targets": [agent.listen], "labels": {"namespace": "test"}}]}],
    }))
    proc = spawn_logged(
        [_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log", banner="prometheus", cwd=tmp_path,
    )  # fmt: skip
    try:
        # Two scrapes with the counters at zero, so rate() over the window starts from 0 for both.
        _wait_for(base, 'count_over_time(warmstart_cache_hits_total{kind="model"}[1h]) >= 2')
        agent.cli("prefetch", "s3://models/op-prom", check=True)  # n misses
        agent.cli("prefetch", "s3://models/op-prom", check=True)  # n hits
        _open(agent, "s3://models/op-prom")                       # n hits
        _wait_for(base, f'warmstart_cache_hits_total{{kind="model"}} == {2 * n}')
        _wait_for(base, f'warmstart_cache_misses_total{{kind="model"}} == {n}')
        rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
        ratio_expr = next(r["expr"] for r in rules if r["record"] == "warmstart:cache_hit_ratio:rate1h")
        (got,) = _query(base, ratio_expr)
        assert got["metric"] == {"job": "warmstart-agent", "namespace": "test"}
        assert float(got["value"][1]) == pytest.approx(2 / 3, abs=1e-9)
        # Prometheus itself loaded the rules and evaluates the recorded series the alert reads.
        (recorded,) = _wait_for(base, "warmstart:cache_hit_ratio:rate1h > 0.6")
        assert float(recorded["value"][1]) == pytest.approx(2 / 3, abs=1e-9)
        (up,) = _query(base, 'up{job="warmstart-agent"}')
        assert up["value"][1] == "1"
        with urllib.request.urlopen(base + "/api/v1/rules", timeout=10) as r:
            loaded = {rule["name"] for g in json.load(r)["data"]["groups"] for rule in g["rules"]}
        assert "WarmstartCacheHitRateLow" in loaded and "WarmstartAgentDown" in loaded
    finally:
        stop_group(proc, 5)
        kill_group(proc)
