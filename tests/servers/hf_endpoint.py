"""A small Hugging Face Hub-compatible HTTP server for tests (``HF_ENDPOINT``).

Why: the real hub is unreachable here, and the agent's Hugging Face origin must
be tested through the real ``huggingface_hub`` client (revision resolution, file
metadata, auth headers, error classes), not a mock of it. This server speaks the
few routes that client uses, with the shapes ``huggingface_hub`` 2.4 parses
(read from its source: ``hf_api.model_info``, ``list_repo_tree``,
``file_download.get_hf_file_metadata``, ``utils._http.hf_raise_for_status``):

- ``GET /api/models/{repo_id}[/revision/{rev}]`` (``?blobs=true`` adds size,
  blobId and lfs {sha256,size,pointerSize} to each sibling; ``expand=...``
  limits the keys) -> ``ModelInfo`` JSON with ``sha`` = the commit;
- ``GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=true`` -> tree
  entries (``snapshot_download`` lists files this way);
- ``HEAD``/``GET /{repo_id}/resolve/{rev}/{path}`` -> the bytes, with ``ETag``,
  ``X-Repo-Commit``, ``Accept-Ranges``, single ``Range`` (206 + Content-Range;
  416 out of range), ``If-Match`` (412), and for LFS files ``X-Linked-Etag``
  and ``X-Linked-Size``. The hub redirects LFS files to a CDN; this server
  serves them itself (``huggingface_hub`` handles both).
- errors as the hub sends them: 404 with ``X-Error-Code: RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound`` and a JSON ``{"error": ...}`` body,
  which ``hf_raise_for_status`` turns into ``RepositoryNotFoundError``,
  ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``.

Repos are local directories. Each :meth:`HfEndpoint.add_repo` /
:meth:`HfEndpoint.set_branch` makes a new commit (40-hex sha) of a directory's
files as they are at that moment (hashed then: git blob sha1, and sha256 for
LFS files); branches map to commits and can be moved. Files are served from the
directory, so a file changed after its commit gets a 500 rather than silently
different bytes: give each commit its own directory.

Mirror modes (each one a behaviour of a real mirror, proxy or of the hub itself):
``bare_listing`` (file lists carry names only: sizes and digests come from a HEAD
per file), ``no_digest`` (HEADs give an opaque ETag and no ``X-Linked-Etag``: the
endpoint offers no digest at all), ``ignore_range`` (every GET of file bytes is
answered ``200`` with the whole body, chunked: no ``Content-Length``), and
``cdn_redirect`` (GETs and HEADs of file URLs answer ``302`` to a signed
``/cdn/...?Expires=...&Signature=...`` URL on this server, valid ``cdn_ttl``
seconds; :meth:`expire_signatures` makes every URL signed so far answer ``403``,
as an expired CDN signature does).

Test knobs: ``require_token`` (401 without ``Authorization: Bearer <token>``),
``corrupt_paths`` (serve those files with one byte flipped at
:meth:`corruption_offset`), :meth:`fail_next` (the next N file requests get an
error status), and a request log with the bytes served per file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from tests.servers.threaded import ThreadedServer

LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".gguf", ".npz", ".npy", ".pkl"}
)
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1024 * 1024
LOG_SETTLE_S = 2.0  # the longest a log reader waits for requests still being handled
SKIP_DIRS = frozenset({".git", "__pycache__", ".cache"})
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class RepoFile:
    """One file of a commit: where its bytes are and the digests the hub reports."""

    path: str  # the rfilename, POSIX, relative to the repo root
    source: Path
    size: int
    mtime_ns: int
    sha256: str
    lfs: bool
    blob_id: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    pointer_size: int  # size of the LFS pointer file (0 if not LFS)

    @property
    def etag(self) -> str:
        """The hub's ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.blob_id


@dataclasses.dataclass(frozen=True)
class Commit:
    sha: str
    files: dict[str, RepoFile]
    created: float
    directory: Path


@dataclasses.dataclass
class Repo:
    repo_id: str
    created: float
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HfRequest:
    """One request as the server saw it (for assertions on what a client did)."""

    method: str
    path: str  # raw path, query excluded
    query: str
    status: int
    repo_id: str | None
    revision: str | None
    file: str | None
    range: str | None
    bytes_sent: int
    authorization: bool
    time: float


# Hashing 90 MB takes ~0.3 s; a session re-adds the same files many times.
_hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
_hash_lock = threading.Lock()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the hub calls blobId)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file the hub stores in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _digests(path: Path, size: int, mtime_ns: int) -> tuple[str, str]:
    """(git blob sha1 of the content, sha256), computed in one pass and cached by (path, size, mtime)."""
    key = (str(path.resolve()), size, mtime_ns)
    with _hash_lock:
        hit = _hash_cache.get(key)
    if hit:
        return hit
    sha1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK):
            sha1.update(chunk)
            sha256.update(chunk)
    out = (sha1.hexdigest(), sha256.hexdigest())
    with _hash_lock:
        _hash_cache[key] = out
    return out


def is_lfs(path: str, size: int) -> bool:
    """The rule this server uses instead of a .gitattributes: weight suffixes and anything over 10 MiB."""
    return Path(path).suffix.lower() in LFS_SUFFIXES or size > LFS_MIN_SIZE


def scan_directory(directory: Path) -> dict[str, RepoFile]:
    """Every regular file under ``directory`` (symlinks followed), hashed as the hub would report it."""
    files: dict[str, RepoFile] = {}
    root = directory.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            st = full.stat()
            if not full.is_file():
                continue
            rel = full.relative_to(root).as_posix()
            blob_sha1, sha256 = _digests(full, st.st_size, st.st_mtime_ns)
            lfs = is_lfs(rel, st.st_size)
            pointer = lfs_pointer(sha256, st.st_size) if lfs else b""
            files[rel] = RepoFile(
                path=rel,
                source=full,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                sha256=sha256,
                lfs=lfs,
                blob_id=git_blob_sha1(pointer) if lfs else blob_sha1,
                pointer_size=len(pointer),
            )
    return files


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answer in the hub's shape (status, X-Error-Code, X-Error-Message, JSON body)."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def response(self) -> web.Response:
        headers = {k: v for k, v in self.headers.items() if k.lower() != "content-type"}
        headers["X-Error-Message"] = self.message
        if self.code:
            headers["X-Error-Code"] = self.code
        return web.Response(
            status=self.status, text=json.dumps({"error": self.message}), content_type="application/json",
            headers=headers,
        )


class HfEndpoint(ThreadedServer):
    """The server: ``endpoint`` is ``http://127.0.0.1:PORT``; a context manager; thread-safe knobs."""

    def __init__(self, *, require_token: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.require_token = require_token
        #: rfilenames (or "repo_id/rfilename") served with one byte flipped.
        self.corrupt_paths: set[str] = set()
        #: mirror mode: file listings carry names only (no size, blobId or lfs, even with ?blobs=true), as
        #: some Hub mirrors and proxies answer; a client must ask per file (HEAD: X-Linked-Size/-Etag, ETag).
        self.bare_listing = False
        #: mirror mode: HEADs give no digest (an opaque ETag, no X-Linked-Etag); implies nothing about listings.
        self.no_digest = False
        #: mirror mode: Range is ignored; file GETs answer 200 with the whole body, chunked.
        self.ignore_range = False
        #: hub/CDN mode: file URLs redirect (302) to signed /cdn/ URLs valid for ``cdn_ttl`` seconds.
        self.cdn_redirect = False
        self.cdn_ttl = 3600.0
        self._cdn_epoch = 0  # bumped by expire_signatures(): older signatures are refused
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # requests being handled: their log entry may not be written yet
        self._repos: dict[str, Repo] = {}
        self._seq = 0
        self._log: list[HfRequest] = []
        self._faults: list[tuple[int, str | None]] = []  # (status, file or None) consumed in order
        self._meta_faults: list[int] = []  # statuses for the next metadata requests (API, HEAD of a file)
        self._runner: web.AppRunner | None = None
        super().__init__(host, port, backlog=128, name="hf-endpoint")

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops serving and closes open connections

    # ------------------------------------------------------------------ repos

    def add_repo(self, repo_id: str, directory: str | os.PathLike[str], branch: str = "main") -> str:
        """Create ``repo_id`` (if new) with a commit of ``directory`` on ``branch``; returns the commit sha."""
        return self.set_branch(repo_id, branch, directory)

    def set_branch(self, repo_id: str, branch: str, directory: str | os.PathLike[str]) -> str:
        """Make a new commit of ``directory`` and point ``branch`` at it (creating repo/branch as needed)."""
        if repo_id.count("/") > 1 or not repo_id.strip("/") or COMMIT_RE.match(branch):
            raise ValueError(f"bad repo id or branch: {repo_id!r} @ {branch!r}")
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        files = scan_directory(directory)
        with self._lock:
            self._seq += 1
            repo = self._repos.setdefault(repo_id, Repo(repo_id=repo_id, created=time.time()))
            parent = repo.branches.get(branch, "")
            head = f"commit\n{repo_id}\n{branch}\n{parent}\n{self._seq}\n{time.time_ns()}\n"
            h = hashlib.sha1(head.encode(), usedforsecurity=False)
            for f in files.values():
                h.update(f"{f.path}\0{f.blob_id}\n".encode())
            sha = h.hexdigest()
            repo.commits[sha] = Commit(sha=sha, files=files, created=time.time(), directory=directory)
            repo.branches[branch] = sha
            return sha

    def commit_of(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def delete_branch(self, repo_id: str, branch: str) -> None:
        with self._lock:
            del self._repos[repo_id].branches[branch]

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, RepoFile]:
        """The files of a revision, as the server reports them (for expected values in tests)."""
        with self._lock:
            return dict(self._resolve(repo_id, revision)[1].files)

    def reset(self) -> None:
        """Forget repos, knobs and the request log (a session-scoped server between tests)."""
        with self._lock:
            self._repos.clear()
            self._log.clear()
            self._faults.clear()
            self._meta_faults.clear()
        self.corrupt_paths.clear()
        self.require_token = None
        self.bare_listing = False
        self.no_digest = False
        self.ignore_range = False
        self.cdn_redirect = False
        self.cdn_ttl = 3600.0

    # ------------------------------------------------------------------ knobs and log

    @staticmethod
    def corruption_offset(size: int) -> int:
        """The byte flipped in a corrupt file: the middle one (inside a tensor, past any header)."""
        return size // 2

    def fail_next(self, count: int = 1, status: int = 500, file: str | None = None) -> None:
        """The next ``count`` GETs of file bytes (of ``file`` only, if given) answer ``status``."""
        with self._lock:
            self._faults.extend([(status, file)] * count)

    def expire_signatures(self) -> None:
        """Every /cdn/ URL signed so far answers 403 from now on (its signature expired)."""
        with self._lock:
            self._cdn_epoch += 1

    def _sign(self, path: str, expires: int, epoch: int) -> str:
        return hashlib.sha256(f"{epoch}\0{expires}\0{path}".encode()).hexdigest()[:32]

    def _check_signature(self, path: str, query: dict[str, str]) -> None:
        """A /cdn/ URL's signature and expiry: 403 as a CDN answers for an expired or forged one."""
        expires = query.get("Expires", "")
        with self._lock:
            epoch = self._cdn_epoch
        if not expires.isdigit() or int(expires) < time.time() or query.get("Signature") != self._sign(
            path, int(expires), epoch
        ):
            raise HubError(403, None, "Request has expired or the signature does not match")

    def fail_metadata_next(self, count: int = 1, status: int = 500) -> None:
        """The next ``count`` metadata requests (``/api/models/...``, HEAD of a file) answer ``status``:
        a hub or mirror that is up but failing, as a 5xx outage looks to a client that resolves first."""
        with self._lock:
            self._meta_faults.extend([status] * count)

    def _meta_fault(self) -> None:
        with self._lock:
            status = self._meta_faults.pop(0) if self._meta_faults else None
        if status is not None:
            raise HubError(status, None, f"injected fault {status}")

    @property
    def requests(self) -> list[HfRequest]:
        with self._lock:
            self._settle()
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def bytes_served(self, file: str | None = None, repo_id: str | None = None) -> int:
        """Bytes of file content sent (GET bodies), optionally of one rfilename and/or repo."""
        with self._lock:
            self._settle()
            return sum(
                r.bytes_sent
                for r in self._log
                if (file is None or r.file == file) and (repo_id is None or r.repo_id == repo_id)
            )

    def served_by_path(self) -> dict[str, int]:
        """{"repo_id/rfilename": bytes sent} over the whole log."""
        out: dict[str, int] = {}
        with self._lock:
            self._settle()
            for r in self._log:
                if r.file is not None and r.bytes_sent:
                    key = f"{r.repo_id}/{r.file}"
                    out[key] = out.get(key, 0) + r.bytes_sent
        return out

    # ------------------------------------------------------------------ request handling

    def _resolve(self, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        """(repo, commit) for a branch name or full commit sha; HubError otherwise. Caller holds the lock."""
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        sha = repo.branches.get(revision)
        if sha is None and revision in repo.commits:
            sha = revision
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, repo.commits[sha]

    def _check_auth(self, request: web.Request) -> None:
        token = self.require_token
        if token is None:
            return
        auth = request.headers.get("Authorization", "")
        if not auth:
            # What the hub answers for a private repo without credentials: it does not reveal that the
            # repo exists (huggingface_hub raises RepositoryNotFoundError).
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        if auth != f"Bearer {token}":
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _record(self, request: web.Request, status: int, **kw: Any) -> None:
        raw = request.raw_path
        path, _, query = raw.partition("?")
        entry = HfRequest(
            method=request.method,
            path=path,
            query=query,
            status=status,
            repo_id=kw.get("repo_id"),
            revision=kw.get("revision"),
            file=kw.get("file"),
            range=request.headers.get("Range"),
            bytes_sent=kw.get("bytes_sent", 0),
            authorization="Authorization" in request.headers,
            time=time.time(),
        )
        with self._lock:
            self._log.append(entry)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Count the request while it is handled, so log readers can wait for its entry."""
        with self._lock:
            self._active += 1
        try:
            return await self._dispatch(request)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _settle(self) -> None:
        """(Lock held.) Wait briefly for requests in progress: a streamed body can reach the
        client before the handler writes its log entry."""
        self._idle.wait_for(lambda: self._active == 0, timeout=LOG_SETTLE_S)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        segs = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        expand = [v for k, v in parse_qsl(raw_query) if k in ("expand", "expand[]")]
        info: dict[str, Any] = {}
        try:
            if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
                if request.method not in ("GET", "HEAD"):
                    raise HubError(405, None, "Method not allowed")
                return await self._api_models(request, segs[2:], query, expand, info)
            cdn = bool(segs) and segs[0] == "cdn"
            split = self._split_resolve(segs[1:] if cdn else segs)
            if split is not None:
                if request.method not in ("GET", "HEAD"):
                    raise HubError(405, None, "Method not allowed")
                repo_id, revision, file = split
                info.update(repo_id=repo_id, revision=revision, file=file)
                if cdn:
                    self._check_signature(raw_path, query)
                return await self._resolve_file(request, repo_id, revision, file, info, cdn=cdn)
            raise HubError(404, None, "Not Found")
        except HubError as err:
            self._record(request, err.status, **info)
            return err.response()

    def _split_resolve(self, segs: list[str]) -> tuple[str, str, str] | None:
        """``org/name/resolve/rev/path...`` or ``name/resolve/rev/path...`` -> (repo_id, rev, path)."""
        for i in (2, 1):
            if len(segs) > i + 2 and segs[i] == "resolve":
                repo_id = "/".join(segs[:i])
                with self._lock:
                    known = repo_id in self._repos
                if known or i == 2:
                    return repo_id, segs[i + 1], "/".join(segs[i + 2 :])
        return None

    def _split_repo(self, rest: list[str]) -> tuple[str, list[str]]:
        """Split ``org/name/...`` or ``name/...`` after /api/models/ into (repo_id, remaining segments)."""
        with self._lock:
            if len(rest) >= 2 and "/".join(rest[:2]) in self._repos:
                return "/".join(rest[:2]), rest[2:]
            if rest[0] in self._repos:
                return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] not in ("revision", "tree"):
            return "/".join(rest[:2]), rest[2:]
        return rest[0], rest[1:]

    async def _api_models(
        self, request: web.Request, rest: list[str], query: dict[str, str], expand: list[str], info: dict[str, Any]
    ) -> web.StreamResponse:
        repo_id, tail = self._split_repo(rest)
        info["repo_id"] = repo_id
        self._check_auth(request)
        self._meta_fault()
        if not tail:
            revision = "main"
        elif tail[0] == "revision" and len(tail) == 2:
            revision = tail[1]
        elif tail[0] == "tree" and len(tail) >= 2:
            info["revision"] = tail[1]
            return self._tree(request, repo_id, tail[1], "/".join(tail[2:]), query, info)
        else:
            raise HubError(404, None, "Not Found")
        info["revision"] = revision
        with self._lock:
            repo, commit = self._resolve(repo_id, revision)
        body = self._model_info(repo, commit, blobs=query.get("blobs", "").lower() == "true", expand=expand)
        self._record(request, 200, **info)
        return web.json_response(body)

    def _model_info(self, repo: Repo, commit: Commit, *, blobs: bool, expand: list[str]) -> dict[str, Any]:
        siblings = []
        for f in sorted(commit.files.values(), key=lambda f: f.path):
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs and not self.bare_listing:
                s["size"] = f.size
                s["blobId"] = f.blob_id
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        full: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _iso(commit.created),
            "createdAt": _iso(repo.created),
            "private": self.require_token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if expand:
            return {k: v for k, v in full.items() if k in ("_id", "id") or k in expand}
        return full

    def _tree(
        self, request: web.Request, repo_id: str, revision: str, path: str, query: dict[str, str], info: dict[str, Any]
    ) -> web.StreamResponse:
        with self._lock:
            _repo, commit = self._resolve(repo_id, revision)
        recursive = query.get("recursive", "").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and path.strip("/") not in commit.files and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}",
                           {"X-Repo-Commit": commit.sha})
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for f in sorted(commit.files.values(), key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rel = f.path[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and d not in dirs:
                    dirs.add(d)
                    oid = hashlib.sha1(f"tree\0{commit.sha}\0{d}".encode(), usedforsecurity=False).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
            if len(parts) > 1 and not recursive:
                continue
            e: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(e)
        self._record(request, 200, **info)
        return web.json_response(entries)

    async def _resolve_file(
        self, request: web.Request, repo_id: str, revision: str, file: str, info: dict[str, Any],
        cdn: bool = False,
    ) -> web.StreamResponse:
        self._check_auth(request)
        if request.method == "HEAD":
            self._meta_fault()
        with self._lock:
            _repo, commit = self._resolve(repo_id, revision)
            entry = commit.files.get(file)
            fault = None
            if entry is not None and request.method == "GET":
                for i, (_status, only) in enumerate(self._faults):
                    if only is None or only == file:
                        fault = self._faults.pop(i)[0]
                        break
        headers = {"X-Repo-Commit": commit.sha}
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{file} does not exist on {revision}", headers)
        if fault is not None:
            raise HubError(fault, None, f"injected fault {fault}", headers)
        st = entry.source.stat()
        if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            raise HubError(
                500, None, f"{entry.source} changed after commit {commit.sha[:12]}: give each commit its own directory"
            )
        etag = f'"{entry.etag}"'
        if self.no_digest:
            etag = f'W/"{entry.size:x}-{entry.mtime_ns:x}"'  # what a plain file server sends: no content digest
        headers.update({"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if self.ignore_range:
            del headers["Accept-Ranges"]
        if entry.lfs:
            headers["X-Linked-Size"] = str(entry.size)
            if not self.no_digest:
                headers["X-Linked-Etag"] = etag
        if self.cdn_redirect and not cdn:
            path = f"/cdn/{repo_id}/resolve/{commit.sha}/{file}"
            expires = int(time.time() + self.cdn_ttl)
            with self._lock:
                epoch = self._cdn_epoch
            headers["Location"] = f"{path}?Expires={expires}&Signature={self._sign(path, expires, epoch)}"
            self._record(request, 302, **info)
            return web.Response(status=302, headers=headers)
        if_match = request.headers.get("If-Match")
        if if_match is not None:
            wanted = {t.strip().removeprefix("W/").strip('"') for t in if_match.split(",")}
            if "*" not in wanted and entry.etag not in wanted:
                raise HubError(412, None, "Precondition Failed", headers)
        start, end = 0, entry.size  # [start, end)
        status = 200
        rng = None if self.ignore_range else request.headers.get("Range")
        if rng is not None:
            parsed = _parse_range(rng, entry.size)
            if isinstance(parsed, str):  # unsatisfiable
                unsatisfiable = {**headers, "Content-Range": f"bytes */{entry.size}"}
                raise HubError(416, None, "Requested Range Not Satisfiable", unsatisfiable)
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        if self.ignore_range and request.method == "GET":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = end - start
        await resp.prepare(request)
        sent = 0
        if request.method == "GET":
            corrupt = file in self.corrupt_paths or f"{repo_id}/{file}" in self.corrupt_paths
            flip = self.corruption_offset(entry.size) if corrupt else -1
            try:
                fd = os.open(entry.source, os.O_RDONLY)
                try:
                    pos = start
                    while pos < end:
                        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                        if not chunk:
                            break
                        if pos <= flip < pos + len(chunk):
                            b = bytearray(chunk)
                            b[flip - pos] ^= 0xFF
                            chunk = bytes(b)
                        await resp.write(chunk)
                        sent += len(chunk)
                        pos += len(chunk)
                finally:
                    os.close(fd)
                await resp.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                self._record(request, status, bytes_sent=sent, **info)
                raise
        else:
            await resp.write_eof()
        self._record(request, status, bytes_sent=sent, **info)
        return resp


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as [start, end); "unsatisfiable"; or None to ignore it (not bytes, or several ranges)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, min(end, size)


def serve_dirs(repos: Iterable[tuple[str, str | os.PathLike[str]]], **kw: Any) -> HfEndpoint:
    """An endpoint with ``(repo_id, directory)`` pairs already added on ``main`` (for benchmarks and scripts)."""
    hf = HfEndpoint(**kw)
    for repo_id, directory in repos:
        hf.add_repo(repo_id, directory)
    return hf
