"""``client.compile_cache(key)``: the first node compiles, every other node starts with warm caches.

    import client
    with client.compile_cache("llama-3.1-8b"):        # restores from the agent on enter
        model = torch.compile(model); model(example)  # compiles only what is missing
                                                      # publishes new artifacts on exit

What a bundle carries, and why: measured on CPU (bench/RESULTS.md), PyTorch's
portable Mega-Cache alone (``save_cache_artifacts``/``load_cache_artifacts``)
saves almost nothing, because Inductor rebuilds the C++ (or Triton) kernels it
names; a copy of the whole ``TORCHINDUCTOR_CACHE_DIR`` is what makes the
second compile fast. So the bundle holds the Inductor cache directory (and
``TRITON_CACHE_DIR`` when that is set apart), plus the Mega-Cache bytes, which
are loaded only when asked (``mega=True``) or when the bundle has no
directory tree: with the directory in place they add load time and no hits.

On enter, before anything is compiled: the fingerprint of this process
(client/fingerprint.py), then ``TORCHINDUCTOR_CACHE_DIR`` -- the user's when
set (Inductor's own default ``/tmp/torchinductor_$USER`` does not count), else a directory per key and fingerprint under
``$XDG_CACHE_HOME/warmstart/compile`` (``~/.cache``), set in the environment
so Inductor, which reads the variable at each use, writes there; its
in-process memo of paths is cleared if Inductor is already loaded. Then the
matching bundle, if the node or a peer has one, is merged into those
directories. On a clean exit, if the directories gained files (something was
compiled that the bundle lacked), the whole directory is published again:
last complete wins, and since it holds what was restored plus what was
compiled, it is a superset of the bundle it started from.

The cache is an optimisation: an absent agent, no bundle, or a failed publish
is logged and the compile goes on cold (``strict=True`` raises instead). A
bundle under another fingerprint is never installed, and installing one only
writes files under the cache directories (client/bundles.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from client.artifacts import TIMEOUT, open_bundle, push_bundle
from client.bundles import tree_signature
from client.errors import ArtifactNotFoundError, WarmstartError
from client.fingerprint import current_fingerprint, fingerprint_id

log = logging.getLogger(__name__)

KIND = "torch-compile"
MEGA = "mega.bin"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"


@dataclass
class CompileCache:
    """What ``compile_cache`` did; the object the ``with`` statement gives."""

    key: str
    fingerprint: dict[str, str]
    inductor_dir: str
    triton_dir: str | None = None
    restored: dict[str, Any] | None = None  # the index entry installed on enter
    source: str | None = None  # "local" or "peer ADDR"
    files_restored: int = 0
    mega_loaded: bool = False
    restore_seconds: float = 0.0
    published: dict[str, Any] | None = None  # the entry published on exit
    skipped_publish: str | None = None  # why nothing was published
    errors: list[str] = field(default_factory=list)

    @property
    def fingerprint_id(self) -> str:
        return fingerprint_id(self.fingerprint)


def default_dir(key: str, fpid: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "warmstart", "compile", urllib.parse.quote(key, safe=""), fpid)


@contextlib.contextmanager
def compile_cache(
    key: str,
    *,
    directory: str | None = None,
    fingerprint_extra: str | None = None,
    publish: bool = True,
    mega: bool | None = None,
    peers: bool = True,
    socket: str | None = None,
    timeout: float = TIMEOUT,
    strict: bool = False,
) -> Iterator[CompileCache]:
    """Restore the compile caches of ``key`` on enter, publish what was added on a clean exit.

    ``directory``: the Inductor cache directory to use when
    ``$TORCHINDUCTOR_CACHE_DIR`` is not set (default: one per key and
    fingerprint under ``~/.cache/warmstart/compile``). ``fingerprint_extra``:
    the framework's own config hash, part of the fingerprint. ``mega``: also
    load the bundle's Mega-Cache (default: only when it has no directory
    tree). ``peers``: let the agent fetch the bundle from a peer. ``strict``:
    raise instead of logging when the agent cannot restore or publish.
    """
    fp = current_fingerprint(KIND, fingerprint_extra)
    fpid = fingerprint_id(fp)
    base = default_dir(key, fpid)
    inductor_dir = _user_inductor_dir() or directory or os.path.join(base, "inductor")
    inductor_dir = os.path.abspath(os.path.expanduser(inductor_dir))
    if os.environ.get(INDUCTOR_ENV) != inductor_dir:
        os.environ[INDUCTOR_ENV] = inductor_dir
        _clear_inductor_memo()
    os.makedirs(inductor_dir, exist_ok=True)
    state = CompileCache(key=key, fingerprint=fp, inductor_dir=inductor_dir, triton_dir=os.environ.get(TRITON_ENV))

    started = time.perf_counter()
    try:
        _restore(state, mega, peers, socket, timeout)
    except ArtifactNotFoundError as exc:
        log.info("compile_cache %r: nothing to restore (%s); compiling cold", key, str(exc).splitlines()[0])
    except WarmstartError as exc:
        if strict:
            raise
        state.errors.append(f"restore: {exc}")
        log.warning("compile_cache %r: could not restore (%s); compiling cold", key, exc)
    state.restore_seconds = time.perf_counter() - started
    before = _signature(state)

    yield state

    if not publish:
        state.skipped_publish = "publish=False"
        return
    if state.restored is not None and _signature(state) == before:
        state.skipped_publish = "nothing new was compiled"
        return
    try:
        state.published = _publish(state, socket, timeout)
    except (WarmstartError, OSError) as exc:
        if strict:
            raise
        state.errors.append(f"publish: {exc}")
        log.warning("compile_cache %r: could not publish (%s)", key, exc)


def _restore(state: CompileCache, mega: bool | None, peers: bool, socket: str | None, timeout: float) -> None:
    with open_bundle(state.key, state.fingerprint, socket=socket, timeout=timeout, peers=peers) as (answer, bundle):
        entry = answer["entry"]
        if entry.get("fingerprint") != state.fingerprint:  # the agent looked it up by id: never trust, compare
            raise WarmstartError(f"agent answered a bundle of another fingerprint for {state.key!r}")
        if "inductor" in bundle.trees:
            state.files_restored += bundle.install("inductor", state.inductor_dir)
        if "triton" in bundle.trees:
            if state.triton_dir is None:
                state.triton_dir = os.path.join(state.inductor_dir, "triton-bundle")
                os.environ[TRITON_ENV] = state.triton_dir
            state.files_restored += bundle.install("triton", state.triton_dir)
        if mega or (mega is None and "inductor" not in bundle.trees):
            data = bundle.read(MEGA)
            if data:
                import torch

                state.mega_loaded = torch.compiler.load_cache_artifacts(data) is not None
        state.restored, state.source = entry, answer.get("source")
        log.info("compile_cache %r: restored %d files from %s (bundle %s, %d bytes)", state.key,
                 state.files_restored, state.source, entry.get("digest"), entry.get("size", 0))


def _publish(state: CompileCache, socket: str | None, timeout: float) -> dict[str, Any]:
    trees = {"inductor": state.inductor_dir}
    if state.triton_dir and os.path.isdir(state.triton_dir) and not _inside(state.triton_dir, state.inductor_dir):
        trees["triton"] = state.triton_dir
    files = {}
    if "torch" in sys.modules:
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            files[MEGA] = saved[0]
    entry = push_bundle(state.key, state.fingerprint, trees, files, socket=socket, timeout=timeout)
    log.info("compile_cache %r: published bundle %s (%d bytes)", state.key, entry.get("digest"), entry.get("size", 0))
    return entry


def _signature(state: CompileCache) -> tuple[Any, ...]:
    triton = state.triton_dir if state.triton_dir and not _inside(state.triton_dir, state.inductor_dir) else None
    return (tree_signature(state.inductor_dir), tree_signature(triton) if triton else None)


def _inside(path: str, root: str) -> bool:
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root + os.sep)


def _user_inductor_dir() -> str | None:
    """``$TORCHINDUCTOR_CACHE_DIR`` if the user set it. Inductor writes its default
    (``/tmp/torchinductor_$USER``) into the environment the first time it asks
    (importing ``torch._dynamo`` does), so that value counts as not set: a shared
    default directory is exactly what a per-key directory is for."""
    value = os.environ.get(INDUCTOR_ENV)
    if not value or "torch._inductor.runtime.cache_dir_utils" not in sys.modules:
        return value or None
    default = sys.modules["torch._inductor.runtime.cache_dir_utils"].default_cache_dir()
    return None if os.path.abspath(value) == os.path.abspath(default) else value


def _clear_inductor_memo() -> None:
    """Inductor reads its cache dir from the environment at each use, but memoises some paths: drop them."""
    utils = sys.modules.get("torch._inductor.utils")
    if utils is not None:
        with contextlib.suppress(Exception):
            utils.clear_caches()
