"""Hugging Face Hub (and Hub-compatible mirrors through ``HF_ENDPOINT``).

huggingface_hub resolves the revision to a commit, lists the files with sizes,
LFS sha256 and git blob ids, and builds the auth headers (``HF_TOKEN`` or the
stored token). Bytes come through aiohttp range requests on the commit-pinned
``resolve`` URLs; redirects to a CDN are followed (to public addresses only,
agent/origins/policy.py). Every file is checked
against the hub's own digest once complete: sha256 for LFS files, the git blob
sha1 for the rest.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time

import aiohttp
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, absent from __all__

from agent.manifest import FileEntry, Manifest
from agent.origins.base import HttpOrigin
from agent.origins.range_http import RangeClient
from agent.refs import ModelRef, check_relative_path
from client.errors import AccessDeniedError, FetchFailedError, ModelNotFoundError


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


_UNREACHABLE: tuple[type[BaseException], ...] = (OSError, *_transport_errors())


class HfOrigin(HttpOrigin):
    scheme = "hf"

    def __init__(self, session: aiohttp.ClientSession, ranges: RangeClient) -> None:
        super().__init__(session, ranges)
        self.endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        self.api = HfApi(endpoint=self.endpoint)

    async def resolve(self, ref: ModelRef) -> Manifest:
        repo, revision = ref.location, ref.revision or "main"
        where = f"hf://{repo}@{revision}"
        try:
            info = await asyncio.to_thread(self.api.model_info, repo, revision=revision, files_metadata=True)
        except GatedRepoError:
            raise AccessDeniedError(f"{where} is gated: accept its terms and set HF_TOKEN") from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(f"revision {revision!r} not found in {repo} ({self.endpoint})") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"{repo} not found at {self.endpoint} (or private: set HF_TOKEN)"
            ) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise AccessDeniedError(f"{self.endpoint} refused access to {where}: set HF_TOKEN") from None
            raise FetchFailedError(f"Hugging Face error resolving {where}: {exc}") from None
        except _UNREACHABLE as exc:
            # huggingface_hub 2.x raises its HTTP library's errors (httpx2.ConnectError, ...), not OSError.
            raise FetchFailedError(f"cannot reach {self.endpoint} for {where}: {type(exc).__name__}: {exc}") from None
        if not info.sha or info.siblings is None:
            raise FetchFailedError(f"{self.endpoint} returned no commit or file list for {where}")
        files = []
        for s in info.siblings:
            if s.size is None:
                raise FetchFailedError(f"{self.endpoint} gave no size for {s.rfilename!r} in {where}")
            files.append(
                FileEntry(
                    path=check_relative_path(s.rfilename),
                    size=int(s.size),
                    source={"repo": repo, "commit": info.sha, "path": s.rfilename},
                    sha256=s.lfs.sha256 if s.lfs else None,
                    git_sha1=None if s.lfs else s.blob_id,
                )
            )
        files.sort(key=lambda f: f.path)
        return Manifest(ref=ref.base, origin="hf", revision=info.sha, files=tuple(files), resolved_at=time.time())

    async def request_target(self, entry: FileEntry) -> tuple[str, dict[str, str]]:
        src = entry.source
        url = hf_hub_url(src["repo"], src["path"], revision=src["commit"], endpoint=self.endpoint)
        return url, build_hf_headers(library_name="warmstart")
