"""The settings table (agent/config.py) and the `agent` CLI built from it.

Every `agent serve` setting refuses its bad values the same way whether it is
built as ``AgentConfig(...)`` (tests, benches) or typed as a flag or a
``WARMSTART_*`` variable: a ``SettingError`` whose one line names the flag, the
variable and the accepted form; from the CLI, that line and exit status 2.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import _follow, verify_summary
from agent.config import MAX_PIECE_SIZE, MIN_PIECE_SIZE, AgentConfig, SettingError, settings

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

# Bad values of every setting, as the typed value an AgentConfig field holds.
BAD_VALUES: dict[str, list[Any]] = {
    "cache_dir": ["", 7, "a\0b"],
    "socket": ["", None],
    "listen": ["7070", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:http", "", 7070],
    "capacity": [0, -1, "100GiB", 1.5, True],
    "piece_size": [1, MIN_PIECE_SIZE - 1, MAX_PIECE_SIZE + 1, 0, "16MiB"],
    "connections": [0, -3, "eight", 2.0, True],
    "origin_connections": [0, -1, "many", 1.5],
    "origin_inflight": [0, 1024, 65 * 1024**3, "512MiB", True],
    "retries": [0, -1, "6"],
    "read_timeout": [0, -1.0, float("nan"), float("inf"), "30"],
    "resolve_timeout": [0, -1, float("nan"), "5"],
    "drop_behind": ["yes", 1, None],
    "allow_private_redirects": ["yes", 1, None],
    "open_files": [0, 7, "many", 8.5],
    "socket_mode": [0o1777, -1, "660"],
    "socket_gid": [-1, "wheel", 1.0],
    "peers": [("127.0.0.1",), ("127.0.0.1:70000",), ("h:1", ":2"), "127.0.0.1:7070", ["127.0.0.1:1"]],
    "peer_dns": ["", "peers.ns:7070", "a b", 3],
    "peer_dns_interval": [0, -2.5, float("nan")],
    "peer_token_file": ["", 5],
    "advertise": ["10.0.0.1", "10.0.0.1:0", ":7070", ""],
    "peer_hedge_timeout": [0, -0.1, float("inf")],
    "peer_start_wait": [-1, float("nan"), 601, True],
    "warm_set": ["", 1],
    "warm_set_poll": [0, -0.5],
    "log_level": ["verbose", "info", "", None],
    "artifact_trust": ["on", "", None, 1],
    "peer_tls_dir": ["", 3, "/nonexistent/warmstart-tls"],
    "peer_tls_name": ["", "a b", "host:7070", 3],
    "peer_tls_reload": [-1, -0.5, float("nan"), float("inf"), True, "60"],
    "artifact_signing_key": ["", 3, "/nonexistent/warmstart-signing.key"],
    "artifact_trusted_keys": ["", 3, "/nonexistent/warmstart-trusted.pub"],
}


def _cases() -> list[tuple[str, Any]]:
    return [(name, bad) for name, values in BAD_VALUES.items() for bad in values]


def test_the_table_covers_every_field() -> None:
    assert set(BAD_VALUES) == {f.name for f in fields(AgentConfig)}
    flags = [s.flag for _, s, _ in settings()]
    envs = [s.env for _, s, _ in settings()]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    assert all(e.startswith("WARMSTART_") for e in envs)


@pytest.mark.parametrize(("name", "bad"), _cases(), ids=[f"{n}={b!r}" for n, b in _cases()])
def test_every_bad_value_is_refused_by_the_config_itself(name: str, bad: Any) -> None:
    setting = next(s for n, s, _ in settings() if n == name)
    with pytest.raises(SettingError) as info:
        AgentConfig(**{name: bad})
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert setting.flag in message and setting.env in message and setting.form in message, message
    assert (info.value.flag, info.value.env) == (setting.flag, setting.env)


def test_defaults_are_valid_and_help_shows_them_as_typed() -> None:
    """What `agent serve --help` shows as each default parses back to that default (no second definition)."""
    config = AgentConfig()
    for name, setting, default in settings():
        assert getattr(config, name) == default
        if setting.boolean:
            continue
        shown = setting.show(default)
        if default in (None, ()):
            continue
        assert setting.parse(shown) == default, (name, shown)
    assert config.capacity == 100 * 1024**3 and setting_show("capacity") == "100GiB"
    assert setting_show("socket_mode") == "660" and setting_show("piece_size") == "16MiB"


def setting_show(name: str) -> str:
    return next(s.show(d) for n, s, d in settings() if n == name)


def test_peers_need_a_readable_token(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match="--peer-token-file / WARMSTART_PEER_TOKEN_FILE"):
        AgentConfig(peers=("127.0.0.1:7071",))
    with pytest.raises(SettingError, match=r"--peer-token-file.*given without it"):
        AgentConfig(peer_dns="warmstart-peers.kube-system.svc")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(SettingError, match="3 characters"):
        AgentConfig(peer_token_file=str(short))
    with pytest.raises(SettingError, match="cannot read"):
        AgentConfig(peer_token_file=str(tmp_path / "absent"))
    good = tmp_path / "token"
    good.write_text("x" * 32 + "\n")
    config = AgentConfig(peers=("127.0.0.1:7071", "[::1]:7072"), peer_token_file=str(good), advertise="10.0.0.1:7070")
    assert config.peers == ("127.0.0.1:7071", "[::1]:7072")


def test_listen_address() -> None:
    assert AgentConfig().listen_address == ("0.0.0.0", 7070)
    assert AgentConfig(listen="127.0.0.1:9000").listen_address == ("127.0.0.1", 9000)
    assert AgentConfig(listen="[::1]:9000").listen_address == ("::1", 9000)
    assert AgentConfig(listen=":9000").listen_address == ("0.0.0.0", 9000)


def test_from_texts_takes_flag_then_variable_then_default() -> None:
    env = {"WARMSTART_CONNECTIONS": "3", "WARMSTART_CAPACITY": "2TB", "WARMSTART_PIECE_SIZE": "",
           "WARMSTART_DROP_BEHIND": "on", "WARMSTART_SOCKET_MODE": "640", "WARMSTART_LOG_LEVEL": "debug"}
    config = AgentConfig.from_texts({"connections": "5", "peers": None}, env)
    assert config.connections == 5  # the flag wins
    assert config.capacity == 2 * 1000**4 and config.drop_behind is True and config.socket_mode == 0o640
    assert config.piece_size == 16 * MiB  # an empty variable is unset
    assert config.log_level == "DEBUG"
    assert AgentConfig.from_texts({"drop_behind": False}, env).drop_behind is False
    gid = os.getgid()
    assert AgentConfig.from_texts({"socket_gid": grp.getgrgid(gid).gr_name}, {}).socket_gid == gid
    assert AgentConfig.from_texts({"warm_set": "ws.yaml"}, {}).warm_set == os.path.abspath("ws.yaml")
    with pytest.raises(SettingError, match=r"got 'eight' from WARMSTART_CONNECTIONS; expected a whole number"):
        AgentConfig.from_texts({}, {"WARMSTART_CONNECTIONS": "eight"})
    with pytest.raises(SettingError, match=r"--log-level / WARMSTART_LOG_LEVEL: got 'verbose'; expected one of"):
        AgentConfig.from_texts({"log_level": "verbose"}, {})
    with pytest.raises(SettingError, match=r"--drop-behind .*got 'maybe' from WARMSTART_DROP_BEHIND"):
        AgentConfig.from_texts({}, {"WARMSTART_DROP_BEHIND": "maybe"})


# ---------------------------------------------------------------- through the real CLI


def _agent(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_")}
    return subprocess.run([sys.executable, "-m", "agent", *args], check=False, env={**base, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


CLI_CASES = [
    ("--connections", "eight"),
    ("--listen", "7070"),
    ("--listen", "127.0.0.1:99999"),
    ("--log-level", "verbose"),
    ("--capacity", "0"),
    ("--capacity", "12 parsecs"),
    ("--piece-size", "4KiB"),
    ("--piece-size", "1GiB"),
    ("--read-timeout", "-1"),
    ("--read-timeout", "0"),
    ("--peer-hedge-timeout", "0"),
    ("--warm-set-poll", "soon"),
    ("--retries", "0"),
    ("--socket-mode", "rwx"),
    ("--socket-mode", "1777"),
    ("--socket-group", "no-such-group-here"),
    ("--peers", "10.0.0.1"),
    ("--advertise", "10.0.0.1:70000"),
]


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize(("flag", "bad"), CLI_CASES, ids=[f"{f}={b}" for f, b in CLI_CASES])
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path, source: str, flag: str, bad: str) -> None:
    setting = next(s for _, s, _ in settings() if s.flag == flag)
    base = ["--cache-dir", str(tmp_path / "cache"), "--socket", str(tmp_path / "a.sock"), "--listen", "127.0.0.1:1"]
    if source == "flag":
        done = _agent("serve", *base, flag, bad)
    else:
        if flag == "--listen":
            base = base[:4]
        done = _agent("serve", *base, env={setting.env: bad})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: ") and flag in lines[0] and setting.env in lines[0], lines[0]
    assert repr(bad) in lines[0]
    assert not (tmp_path / "cache").exists()  # refused before anything was touched


def test_serve_env_vars_are_read_only_by_serve(tmp_path: Path) -> None:
    """A bad serve setting in the environment used to break every verb (the parser read serve's env defaults)."""
    bad = {
        "WARMSTART_CONNECTIONS": "eight",
        "WARMSTART_READ_TIMEOUT": "x",
        "WARMSTART_SOCKET": str(tmp_path / "n.sock"),
    }
    for verb in (("ls",), ("stats", "--json"), ("prefetch", "s3://b/m"), ("verify", "s3://b/m")):
        done = _agent(*verb, env=bad)
        assert done.returncode == 1, (verb, done.stderr)  # no agent there: the verb ran and said so
        assert "n.sock" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _agent("ls", "--help", env=bad).returncode == 0


def test_serve_help_shows_every_flag_with_its_help_default_and_variable() -> None:
    done = _agent("serve", "--help", env={"COLUMNS": "400"})
    assert done.returncode == 0
    blocks: dict[str, str] = {}  # each option's lines joined: argparse wraps a long one onto the next line
    flag = ""
    for line in done.stdout.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = ""
        if flag:
            blocks[flag] += " " + " ".join(line.split())
    for _, setting, default in settings():
        line = blocks[setting.flag]
        assert setting.help[:30] in line, line
        assert f"(default: {setting.show(default)}; env {setting.env})" in line, line


def test_version() -> None:
    from importlib import metadata

    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    try:
        want = metadata.version("warmstart")
    except metadata.PackageNotFoundError:
        want = declared
    done = _agent("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"warmstart {want}", done


def test_every_verb_that_prints_has_json() -> None:
    for verb in (("prefetch", "r"), ("verify", "r"), ("evict", "r"), ("ls",), ("stats",), ("warm-set",)):
        done = _agent(*verb, "--help")
        assert done.returncode == 0 and "--json" in done.stdout, verb


@pytest.mark.parametrize("doc", ["docs/API.md", "README.md", "docs/OPERATIONS.md"])
def test_the_docs_name_every_setting(doc: str) -> None:
    text = (ROOT / doc).read_text()
    missing = [s.env for _, s, _ in settings() if s.env not in text]
    if doc == "docs/API.md":
        missing += [s.flag for _, s, _ in settings() if s.flag not in text]
    assert not missing, f"{doc} does not name {missing}"
    if doc in ("docs/API.md", "docs/OPERATIONS.md"):  # their tables show each default as --help does
        for _, setting, default in settings():
            row = next(line for line in text.splitlines() if line.startswith("| ") and f"`{setting.env}`" in line)
            assert f"| {setting.show(default)} |" in row, row


# ---------------------------------------------------------------- what verify and prefetch print


def test_verify_on_a_complete_model_says_what_it_did(capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's verify stream has no file count or cached bytes: the CLI used to print '? files ... 0 B
    already cached' for a model that was whole."""
    import io

    err = io.StringIO()
    lines = [
        {"event": "resolved", "ref": "s3://b/m", "revision": "abc123", "total_bytes": 90 * MiB},
        {"event": "progress", "done_bytes": 90 * MiB, "total_bytes": 90 * MiB, "rate_bps": 0.0},
        {"event": "complete", "checked": 5, "corrupt": 0, "repaired": 0},
    ]
    result = _follow(iter(lines), err)
    assert err.getvalue().splitlines()[0] == "s3://b/m@abc123: 90.0 MiB"
    assert "?" not in err.getvalue() and "already cached" not in err.getvalue()
    assert result == {"ref": "s3://b/m", "revision": "abc123", "total_bytes": 90 * MiB,
                      "checked": 5, "corrupt": 0, "repaired": 0}
    assert verify_summary("s3://b/m", result) == "verified s3://b/m@abc123: 5 files checked, 0 corrupt, 0 re-fetched"


def test_verify_on_a_partial_model_counts_the_missing_files_apart() -> None:
    result = {"ref": "s3://b/m", "revision": "abc", "checked": 3, "corrupt": 1, "repaired": 3}
    assert verify_summary("s3://b/m", result) == (
        "verified s3://b/m@abc: 3 files checked, 1 corrupt, 3 re-fetched (2 were not cached)"
    )
    one = {"ref": "s3://b/m", "revision": "abc", "checked": 1, "corrupt": 0, "repaired": 1}
    assert verify_summary("s3://b/m", one).endswith("1 file checked, 0 corrupt, 1 re-fetched (1 was not cached)")


def test_prefetch_resolved_line_is_unchanged() -> None:
    import io

    err = io.StringIO()
    lines = [
        {"event": "resolved", "ref": "s3://b/m", "revision": "r1", "total_bytes": 4 * MiB, "cached_bytes": MiB,
         "files": 2},
        {"event": "complete", "ref": "s3://b/m", "revision": "r1", "total_bytes": 4 * MiB,
         "fetched_bytes": 3 * MiB, "seconds": 0.5},
    ]
    result = _follow(iter(lines), err)
    assert err.getvalue() == "s3://b/m@r1: 2 files, 4.0 MiB, 1.0 MiB already cached\n"
    assert json.loads(json.dumps(result))["fetched_bytes"] == 3 * MiB and "event" not in result
