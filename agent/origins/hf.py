"""Hugging Face Hub (and Hub-compatible mirrors through ``HF_ENDPOINT``).

huggingface_hub resolves the revision to a commit, lists the files with sizes,
LFS sha256 and git blob ids, and builds the auth headers (``HF_TOKEN`` or the
stored token). Bytes come through aiohttp range requests on the commit-pinned
``resolve`` URLs; redirects to a CDN are followed (to public addresses only,
agent/origins/policy.py). Every file is checked
against the hub's own digest once complete: sha256 for LFS files, the git blob
sha1 for the rest. A mirror whose listing carries names only is asked per file
(:meth:`HfOrigin._file_metadata`), as huggingface_hub's downloads do.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.manifest import FileEntry, Manifest
from agent.origins.base import HttpOrigin
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError

log = logging.getLogger(__name__)

HEAD_PARALLEL = 8  # HEADs at once for a listing without sizes (a mirror's; one per file)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The "could not talk to the server" errors of whichever HTTP library this huggingface_hub uses.

    huggingface_hub 1.x raised requests' errors, 2.x raises httpx2's (earlier ones httpx's): none of them
    are OSError. They are looked up, not imported by name, so the agent depends on none in particular.
    """
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):  # fmt: skip
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


@dataclass(frozen=True)
class _Hub:
    """What this origin uses of huggingface_hub, imported on first use (:meth:`HfOrigin.hub`)."""

    api: Any  # HfApi
    errors: Any  # huggingface_hub.errors
    hf_hub_url: Any
    get_hf_file_metadata: Any
    build_hf_headers: Any
    unreachable: tuple[type[BaseException], ...]


def _import_hub(endpoint: str) -> _Hub:
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, absent from __all__

    return _Hub(
        api=huggingface_hub.HfApi(endpoint=endpoint),
        errors=errors,
        hf_hub_url=huggingface_hub.hf_hub_url,
        get_hf_file_metadata=huggingface_hub.get_hf_file_metadata,
        build_hf_headers=build_hf_headers,
        unreachable=(OSError, *_transport_errors()),
    )


class HfOrigin(HttpOrigin):
    """``hf://`` through huggingface_hub's API, bytes through the range client.

    huggingface_hub (with the HTTP library under it) is imported on this origin's first use, on a
    thread: at import it was 0.30 s of the agent's 0.74 s start (``python -X importtime -c "import
    agent.daemon"``), paid by every node at every start, hf:// user or not.
    """

    scheme = "hf"

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        super().__init__(session, ranges)
        self.endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        self._hub: _Hub | None = None
        self._hub_lock = asyncio.Lock()

    async def hub(self) -> _Hub:
        """huggingface_hub's parts, imported once (on a thread: the import takes ~0.3 s)."""
        async with self._hub_lock:
            if self._hub is None:
                self._hub = await asyncio.to_thread(_import_hub, self.endpoint)
            return self._hub

    async def resolve(self, ref: ModelRef) -> Manifest:
        repo, revision = ref.location, ref.revision or "main"
        where = f"hf://{repo}@{revision}"
        hub = await self.hub()
        try:
            info = await asyncio.to_thread(hub.api.model_info, repo, revision=revision, files_metadata=True)
        except hub.errors.GatedRepoError:
            raise AccessDeniedError(f"{where} is gated: accept its terms and set HF_TOKEN") from None
        except hub.errors.RevisionNotFoundError:
            raise ModelNotFoundError(f"revision {revision!r} not found in {repo} ({self.endpoint})") from None
        except hub.errors.RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"{repo} not found at {self.endpoint} (or private: set HF_TOKEN)"
            ) from None
        except hub.errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise AccessDeniedError(f"{self.endpoint} refused access to {where}: set HF_TOKEN") from None
            raise FetchFailedError(f"Hugging Face error resolving {where}: {exc}") from None
        except hub.unreachable as exc:
            # huggingface_hub 2.x raises its HTTP library's errors (httpx2.ConnectError, ...), not OSError.
            raise FetchFailedError(f"cannot reach {self.endpoint} for {where}: {type(exc).__name__}: {exc}") from None
        if not info.sha or info.siblings is None:
            raise FetchFailedError(f"{self.endpoint} returned no commit or file list for {where}")
        commit = info.sha
        files = []
        bare = [s.rfilename for s in info.siblings if s.size is None]
        asked = await self._file_metadata(repo, commit, bare, where) if bare else {}
        for s in info.siblings:
            source = {"repo": repo, "commit": commit, "path": s.rfilename}
            if s.size is None:
                size, sha256, git_sha1 = asked[s.rfilename]
            else:
                size, sha256, git_sha1 = int(s.size), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id
            files.append(
                FileEntry(
                    path=check_relative_path(s.rfilename), size=size, source=source, sha256=sha256, git_sha1=git_sha1
                )
            )
        files.sort(key=lambda f: f.path)
        return Manifest(ref=ref.base, origin="hf", revision=info.sha, files=tuple(files), resolved_at=time.time())

    async def _file_metadata(
        self, repo: str, commit: str, paths: list[str], where: str
    ) -> dict[str, tuple[int, str | None, str | None]]:
        """Size and digest of each of ``paths`` from a HEAD of its commit-pinned URL, as huggingface_hub
        downloads from a mirror whose listing names files only: ``X-Linked-Size`` / ``Content-Length``,
        and ``X-Linked-Etag`` / ``ETag`` as the digest (a 64-hex one is the LFS sha256, a 40-hex one the
        git blob id). A file whose ETag is neither gets no origin digest: it is checked only against its
        own bytes, and a warning says so. At most HEAD_PARALLEL HEADs at once."""
        gate = asyncio.Semaphore(HEAD_PARALLEL)
        hub = await self.hub()
        headers = hub.build_hf_headers(library_name="warmstart")

        async def one(path: str) -> tuple[int, str | None, str | None]:
            url = hub.hf_hub_url(repo, path, revision=commit, endpoint=self.endpoint)
            async with gate:
                try:
                    meta = await asyncio.to_thread(
                        hub.get_hf_file_metadata, url, headers=headers, endpoint=self.endpoint
                    )
                except hub.errors.HfHubHTTPError as exc:
                    raise FetchFailedError(f"{self.endpoint}: HEAD of {path!r} in {where} failed: {exc}") from None
            if meta.size is None:
                raise FetchFailedError(f"{self.endpoint} gave no size for {path!r} in {where}, listed or on HEAD")
            etag = (meta.etag or "").removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", etag):
                return int(meta.size), etag, None
            if re.fullmatch(r"[0-9a-f]{40}", etag):
                return int(meta.size), None, etag
            log.warning("%s gives no digest for %r in %s (ETag %r): checked against its own bytes only",
                        self.endpoint, path, where, meta.etag)
            return int(meta.size), None, None

        found = await asyncio.gather(*(one(p) for p in paths))
        return dict(zip(paths, found, strict=True))

    def host_key(self, entry: FileEntry) -> str:
        return f"hf {self.endpoint}"

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        hub = await self.hub()
        url = hub.hf_hub_url(src["repo"], src["path"], revision=src["commit"], endpoint=self.endpoint)
        return url, hub.build_hf_headers(library_name="warmstart")
