"""Issue 7, access: the local socket's permissions and group, and credentials that never
leave where they belong (logs, metrics, error messages, peer traffic).

Peer routes refusing requests without the token are covered by
tests/test_peers.py (test_peer_routes_need_the_token...) and fuzzed in tests/test_fuzz.py.
"""

from __future__ import annotations

import grp
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import client
from client.errors import WarmstartError
from tests.servers.ports import free_ports
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import SeaweedS3

AWS_KEY_ID = "AKIAWSKEYIDSENTINEL7"
AWS_SECRET = "aws-secret-SENTINEL-5b2f0e9d1c"
HF_TOKEN = "hf_tokenSENTINEL8c1d2e3f4a5b"
PEER_TOKEN = "peer-token-SENTINEL-0a9b8c7d6e"


def test_socket_mode_default_and_configured_with_a_group(
    inproc_factory: Any, agent_factory: Any, agent_env: dict[str, str]
) -> None:
    """Flags on in-process agents; the variables and the exit code of bad values on `agent serve` processes."""
    agent = inproc_factory("default")
    assert stat.S_IMODE(os.stat(agent.socket_path).st_mode) == 0o660
    group = grp.getgrall()[-1]
    strict = inproc_factory("strict", extra_args=("--socket-mode", "600", "--socket-group", group.gr_name))
    st = os.stat(strict.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == group.gr_gid
    by_env = agent_factory(
        "env", env={**agent_env, "WARMSTART_SOCKET_MODE": "640", "WARMSTART_SOCKET_GROUP": str(group.gr_gid)}
    )
    st = os.stat(by_env.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid
    for bad in (("--socket-mode", "rwx"), ("--socket-mode", "1777"), ("--socket-group", "no-such-group-here")):
        proc = agent_factory(f"bad{bad[1][:3]}", extra_args=bad, start=False)
        proc._spawn()
        assert proc.proc.wait(timeout=30) == 2, bad
        assert bad[0] in proc.log_text()


def test_credentials_never_in_logs_metrics_errors_or_peer_traffic(
    agent_factory: Any, agent_env: dict[str, str], seaweed: SeaweedS3, hf_endpoint: Any, hf_model: Any,
    s3_model: Any, tmp_path: Path,
) -> None:
    token_file = tmp_path / "peer-token"
    token_file.write_text(PEER_TOKEN + "\n")
    port_a, port_b = free_ports(2)
    # A reaches B only through a capturing relay: everything A and B say to each other is recorded.
    relay = TcpRelay("127.0.0.1", port_b, capture=True)
    try:
        env = {**agent_env, "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "HF_TOKEN": HF_TOKEN}
        common = ("--peer-token-file", str(token_file), "--piece-size", "1MiB", "--log-level", "DEBUG",
                  "--peer-start-wait", "0")  # started one by one
        a = agent_factory("a", env=env, port=port_a, extra_args=(
            "--peers", f"127.0.0.1:{port_a},127.0.0.1:{relay.port}", "--advertise", f"127.0.0.1:{port_a}", *common))
        b = agent_factory("b", env=env, port=port_b, extra_args=(
            "--peers", f"127.0.0.1:{port_a},127.0.0.1:{port_b}", *common))
        hf_endpoint.require_token = HF_TOKEN
        time.sleep(2.5)  # a ping round: A sees B (through the relay) alive
        errors: list[str] = []
        for agent in (a, b):
            for ref in (s3_model.ref, hf_model.ref):
                done = agent.cli("prefetch", ref)
                assert done.returncode == 0, done.stderr
        for ref in ("s3://no-such-bucket-zz/x", "hf://nobody/nothing", "s3://models/nothing-here", "https://127.0.0.1:9/x.bin"):
            errors.append(a.cli("prefetch", ref).stderr)
        hf_endpoint.require_token = "another-token"  # the hub now refuses ours: an access error
        errors.append(a.cli("prefetch", f"{hf_model.ref}@{'0' * 40}").stderr)
        try:
            client.open_tensors("s3://no-such-bucket-zz/y", socket=str(a.socket_path))
        except WarmstartError as exc:
            errors.append(str(exc))
        # Wrong and missing peer tokens are refused and logged: without the token's value.
        for token in ("wrong-token", None):
            req = urllib.request.Request(
                a.url + "/peer/v1/ping", headers={"Authorization": f"Bearer {token}"} if token else {})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=5)
        assert all(e.strip() for e in errors), errors
        metrics = [ag.http_get("/metrics")[1].decode(errors="replace") for ag in (a, b)]
        stats = [ag.cli("stats", "--json").stdout for ag in (a, b)]
        peer_traffic = bytes(relay.captured or b"")
    finally:
        relay.close()
    assert PEER_TOKEN.encode() in peer_traffic  # the capture is real: peers do send the peer token
    assert b"/peer/v1/" in peer_traffic
    for secret in (AWS_KEY_ID, AWS_SECRET, HF_TOKEN):
        assert secret.encode() not in peer_traffic, secret
    for secret in (AWS_SECRET, HF_TOKEN, PEER_TOKEN):
        for where, text in [("log a", a.log_text()), ("log b", b.log_text()), *[("metrics", m) for m in metrics],
                            *[("stats", s) for s in stats], *[("error", e) for e in errors]]:  # fmt: skip
            assert secret not in text, f"{secret} in {where}"
    # The access key id is not a secret (it names the key); still, it is not logged at INFO or above.
    assert not any(AWS_KEY_ID in line for line in a.log_text().splitlines() if " DEBUG " not in line)
