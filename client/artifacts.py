"""Publish and fetch artifact bundles through the node agent (stdlib only).

    entry = push_dir("vllm-llama-8b", "~/.cache/vllm", fingerprint)      # `agent artifacts push`
    entry = pull_dir("vllm-llama-8b", "~/.cache/vllm", fingerprint)      # `agent artifacts pull`

Publishing builds the bundle (client/bundles.py) into an unnamed temporary
file and sends it to the agent as the body of one request, with
``sendfile``; the agent hashes it into its store. Fetching asks the agent
where the bundle's blob is (it fetches it from a peer first when this node
lacks it) and reads it straight from the cache directory under a shared
``flock``, so the agent never evicts it mid-read. ``$WARMSTART_CACHE_DIR``
names the cache where a pod mounts it somewhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from client._flock import lock_shared as _lock_shared
from client.bundles import Bundle, build_bundle
from client.errors import WarmstartError
from client.transport import AgentConnection

HEADER = "X-Warmstart-Artifact"
TIMEOUT = 300.0  # a peer transfer of a GB bundle answers in one piece: allow for it
DIR_TREE = "dir"


def push_bundle(
    key: str,
    fingerprint: Mapping[str, str],
    trees: Mapping[str, str],
    files: Mapping[str, bytes] | None = None,
    *,
    socket: str | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Bundle ``trees`` and ``files`` and publish them as (key, fingerprint); returns the agent's entry."""
    header = json.dumps({"key": key, "fingerprint": dict(fingerprint)}, ensure_ascii=True)
    with tempfile.TemporaryFile(prefix="warmstart-bundle-") as f:
        build_bundle(f, trees, files)
        size = f.tell()
        f.seek(0)
        return AgentConnection(socket, timeout).send_file(
            "POST", "/v1/artifacts/publish", f, size, headers={HEADER: header}
        )


@contextlib.contextmanager
def open_bundle(
    key: str,
    fingerprint: Mapping[str, str],
    *,
    socket: str | None = None,
    timeout: float = TIMEOUT,
    peers: bool = True,
) -> Iterator[tuple[dict[str, Any], Bundle]]:
    """``(answer, bundle)`` for (key, fingerprint), read from the node cache; ArtifactNotFoundError if none.

    ``answer`` is the agent's: ``entry`` (the index record), ``source``
    (``local`` or ``peer ADDR``), ``blob``. The blob stays locked (shared)
    until the block ends.
    """
    from client import _cache_dir, _in_cache

    conn = AgentConnection(socket, timeout)
    answer = conn.request_json(
        "POST", "/v1/artifacts/get", {"key": key, "fingerprint": dict(fingerprint), "peers": peers}
    )
    where = f"artifact {key!r} from {conn.socket_path}"
    path = _in_cache(_cache_dir(answer, where), answer.get("blob"), "artifact blob")
    try:
        f = open(path, "rb")  # noqa: SIM115 - opened apart so only the open's FileNotFoundError is caught; `with f` below
    except FileNotFoundError:
        raise WarmstartError(f"{where}: {path} is gone (evicted just now?); try again") from None
    with f:
        _lock_shared(f.fileno(), path)
        with Bundle(f, where=f"bundle {key!r} ({os.path.basename(path)})") as bundle:
            yield answer, bundle


def list_artifacts(key: str | None = None, *, socket: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """The agent's index: ``{"artifacts": [entry + "present"], "used_bytes", "capacity_bytes"}``."""
    from urllib.parse import quote

    path = "/v1/artifacts" + (f"?key={quote(key, safe='')}" if key is not None else "")
    return AgentConnection(socket, timeout).request_json("GET", path)


def push_dir(key: str, directory: str, fingerprint: Mapping[str, str], *, socket: str | None = None) -> dict[str, Any]:
    """Publish the whole of ``directory`` (a vLLM/Triton/FlashInfer cache) as (key, fingerprint)."""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    return push_bundle(key, fingerprint, {DIR_TREE: directory}, socket=socket)


def pull_dir(key: str, directory: str, fingerprint: Mapping[str, str], *, socket: str | None = None) -> dict[str, Any]:
    """Install the bundle of (key, fingerprint) into ``directory`` (merged; created if missing).

    A directory bundle (``push_dir``) installs its tree; a ``compile_cache``
    bundle installs its Inductor cache tree. Returns the agent's answer plus
    ``files`` (how many were written).
    """
    directory = os.path.expanduser(directory)
    with open_bundle(key, fingerprint, socket=socket) as (answer, bundle):
        tree = DIR_TREE if DIR_TREE in bundle.trees else "inductor"
        if tree not in bundle.trees:
            raise WarmstartError(f"bundle {key!r} has no directory tree to install (trees: {sorted(bundle.trees)})")
        answer["files"] = bundle.install(tree, directory)
    return answer
