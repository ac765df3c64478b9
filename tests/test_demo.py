"""The quick start's demo (scripts/demo.py), as a new user runs it: ``--keep`` leaves a real S3
server and a real agent running after the demo exits, prints the environment to paste, and
``--stop`` ends both and removes their files.

Why a test: the README tells a new user to paste what ``--keep`` prints; if the servers die with
the demo, or the printed lines do not reach them, the first thing tried by hand fails.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"

pytestmark = pytest.mark.slow


def _demo(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSTART_", "AWS_"))}
    env["WARMSTART_DEMO_STATE"] = str(state)
    return subprocess.run([sys.executable, str(DEMO), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def _exports(out: str) -> dict[str, str]:
    """The variables of the ``export`` lines the demo printed for the user to paste."""
    env: dict[str, str] = {}
    for line in out.splitlines():
        words = shlex.split(line.strip())
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:])  # type: ignore[misc]
    return env


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an S3 error document is an answer
    except OSError:
        return False


def test_keep_leaves_s3_and_agent_running_for_the_printed_environment_and_stop_ends_them(tmp_path: Path) -> None:
    state = tmp_path / "demo-state.json"
    try:
        done = _demo(state, "--keep")
        assert done.returncode == 0, done.stdout + done.stderr
        env = _exports(done.stdout)
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WARMSTART_SOCKET"} <= set(env)
        assert "bash scripts/demo.sh --stop" in done.stdout

        # Another shell: only the pasted variables, nothing inherited from the demo.
        shell = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSTART_", "AWS_"))} | env
        ls = subprocess.run([sys.executable, "-m", "agent", "ls"], env=shell, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
        assert ls.returncode == 0 and "s3://models/minilm" in ls.stdout and "100%" in ls.stdout, ls.stdout + ls.stderr
        # The S3 server takes a new model, and the kept agent fetches it (with its own AWS variables).
        upload = (
            "import boto3; boto3.client('s3').put_object(Bucket='models', Key='mine/config.json', Body=b'{\"a\": 1}')"
        )
        subprocess.run([sys.executable, "-c", upload], env=shell, timeout=60, check=True)
        pre = subprocess.run([sys.executable, "-m", "agent", "prefetch", "s3://models/mine"], env=shell,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert pre.returncode == 0, pre.stdout + pre.stderr

        again = _demo(state, "--keep", timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stop = _demo(state, "--stop", timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    socket = Path(env["WARMSTART_SOCKET"])
    work = socket.parent.parent
    deadline = time.monotonic() + 10
    while _answers(env["AWS_ENDPOINT_URL"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _answers(env["AWS_ENDPOINT_URL"])
    assert not work.exists() and not state.exists()
    assert "nothing to stop" in _demo(state, "--stop", timeout=60).stdout
