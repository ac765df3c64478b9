"""warmstart client: what inference code imports to get a model's tensors from the node cache.

    import client
    tensors = client.open_tensors("hf://org/model")          # {name: torch.Tensor}

:func:`open_tensors` asks the node agent (Unix socket, ``$WARMSTART_SOCKET``)
to make the model complete in the node cache, then loads the tensors straight
from the cache files; :func:`load_safetensors_files` does the loading part
alone, for files already on local disk, with no agent involved.

This package needs only the standard library and torch, so inference
images need nothing else (never the agent's aiohttp, boto3, ...). torch
itself is imported on first use of a loading function, not by ``import
client``: the agent imports ``client.errors`` and ``client.transport`` (which
runs this file) and must not pay torch's seconds and hundreds of MB for it.

CPU tensors are zero-copy views of the cache files by default (see
:mod:`client.loader`): writing to them is safe and private to the process,
and each file stays open with a shared lock while any of its tensors lives.
"""

from __future__ import annotations

import functools
import importlib
import os
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from client.errors import (
    AccessDeniedError,
    AgentUnavailableError,
    ArtifactNotFoundError,
    BadReferenceError,
    BadRequestError,
    CapacityError,
    FetchFailedError,
    IntegrityError,
    MalformedFileError,
    ModelNotFoundError,
    UnsafeBundleError,
    WarmstartError,
)
from client.transport import DEFAULT_TIMEOUT, AgentConnection

# open_tensors asks again when a blob is evicted between the agent's answer and the open (client/stream.py).
EVICTED_RETRIES = 3

if TYPE_CHECKING:
    import torch

    from client.compile_cache import CompileCache, compile_cache
    from client.fingerprint import current_fingerprint
    from client.loader import iter_safetensors_files, load_safetensors_file, load_safetensors_files
    from client.safetensors_header import SafetensorsHeader, TensorInfo, read_header
    from client.stream import ModelStream

# Public names that live in torch-importing modules, loaded on first access (PEP 562).
_LAZY: dict[str, str] = {
    "CompileCache": "client.compile_cache",
    "compile_cache": "client.compile_cache",
    "current_fingerprint": "client.fingerprint",
    "SafetensorsHeader": "client.safetensors_header",
    "TensorInfo": "client.safetensors_header",
    "iter_safetensors_files": "client.loader",
    "load_safetensors_file": "client.loader",
    "load_safetensors_files": "client.loader",
    "read_header": "client.safetensors_header",
}

__all__ = [
    "AccessDeniedError",
    "AgentUnavailableError",
    "ArtifactNotFoundError",
    "BadReferenceError",
    "BadRequestError",
    "CapacityError",
    "CompileCache",
    "FetchFailedError",
    "IntegrityError",
    "MalformedFileError",
    "ModelNotFoundError",
    "SafetensorsHeader",
    "TensorInfo",
    "UnsafeBundleError",
    "WarmstartError",
    "compile_cache",
    "current_fingerprint",
    "iter_safetensors_files",
    "iter_tensors",
    "load_safetensors_file",
    "load_safetensors_files",
    "open_tensors",
    "read_header",
    "snapshot",
]

CACHE_DIR_ENV = "WARMSTART_CACHE_DIR"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
SAFETENSORS_SUFFIX = ".safetensors"


def open_tensors(
    ref: str,
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    socket: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    copy: bool = False,
    ring_bytes: int | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    all_files: bool = False,
) -> dict[str, torch.Tensor]:
    """Return every tensor of model ``ref`` (its safetensors weights), fetched into the node cache if needed.

    ``dict(iter_tensors(...))``; see :func:`iter_tensors` for the arguments.
    """
    from client.stream import BlobEvictedError

    for attempt in range(EVICTED_RETRIES):
        try:
            return dict(iter_tensors(
                ref, device=device, names=names, socket=socket, timeout=timeout, copy=copy, ring_bytes=ring_bytes,
                include=include, exclude=exclude, all_files=all_files,
            ))  # fmt: skip
        except BlobEvictedError:
            if attempt == EVICTED_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def iter_tensors(
    ref: str,
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    socket: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    copy: bool = False,
    ring_bytes: int | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    all_files: bool = False,
) -> Generator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the weights of model ``ref``, in file order, fetching what the cache lacks.

    This is the shape frameworks consume (vLLM's ``load_weights``, a
    ``load_state_dict`` loop): tensors can be placed as they come instead of
    after the whole model is in memory.

    Tensors come while the model is still arriving: each one as soon as the
    agent has verified the pieces that hold it (see :mod:`client.stream`), so
    loading overlaps fetching. The iteration ends with the agent's verdict on the
    whole model (an origin's sha256, say) and raises if it failed.

    The weight files are those ``model.safetensors.index.json`` names, else the
    top-level ``*.safetensors`` (see :func:`_weight_files`). The agent reports
    progress at least once a second; ``timeout`` seconds of silence mean it is
    gone: :class:`AgentUnavailableError`.
    Blob paths are taken relative to ``$WARMSTART_CACHE_DIR`` when set (a pod that
    mounts the cache elsewhere), else to the agent's own cache directory.
    ``names``, ``device``, ``copy`` and ``ring_bytes`` (host memory for a GPU
    load; default 256 MiB) are as in :func:`iter_safetensors_files`.
    ``include`` / ``exclude`` (globs, as ``huggingface-cli download`` reads them) and
    ``all_files`` choose which files of the revision the agent fetches: by default the
    loader's (the safetensors weights, configs, tokenizer; not other weight formats).
    """
    from client.device_ring import check_device

    options: dict[str, Any] = {"device": check_device(device), "names": names, "copy": copy, "ring_bytes": ring_bytes}
    selection = _selection(include, exclude, all_files)
    first = _open_stream(ref, socket, timeout, selection)  # here, so a dead agent or a bad reference fail at the call
    iteration = _iterate(ref, socket, timeout, first, options, selection)
    # A generator dropped before its first next() never runs its finally: let go of the holds then.
    weakref.finalize(iteration, first[0].release)
    return iteration


def _selection(include: Iterable[str] | None, exclude: Iterable[str] | None, all_files: bool) -> dict[str, Any]:
    """The open request's fields for which files to fetch (the agent checks them: agent/selection.py)."""
    out: dict[str, Any] = {}
    if include is not None:
        out["include"] = [include] if isinstance(include, str) else list(include)
    if exclude is not None:
        out["exclude"] = [exclude] if isinstance(exclude, str) else list(exclude)
    if all_files:
        out["all_files"] = True
    return out


def _open_stream(
    ref: str, socket: str | None, timeout: float, selection: dict[str, Any] | None = None
) -> tuple[ModelStream, list[str]]:
    """The agent's open of ``ref`` and the model's weight files, every one held (share-locked) once named.

    A rotted shard index is repaired once, as weights are. A blob evicted
    between the agent's answer and the client's open is asked for again (up
    to EVICTED_RETRIES opens): nothing was handed out from this open yet.
    """
    from client.stream import BlobEvictedError, ModelStream
    from client.verify import CorruptPieceError

    repaired = False
    evicted = 0
    while True:
        stream = ModelStream(ref, socket, timeout, selection)
        try:
            shards = _weight_files(ref, stream.names(), functools.partial(_read_whole, stream, INDEX_FILE))
            stream.hold(shards)
            return stream, shards
        except CorruptPieceError as exc:
            stream.release()
            if repaired:
                raise IntegrityError(f"{exc} (still, after the agent re-verified the blob: not loaded)") from None
            repaired = True
            _reverify(ref, stream, socket, timeout, str(exc))
        except BlobEvictedError:
            stream.release()
            evicted += 1
            if evicted >= EVICTED_RETRIES:
                raise
        except BaseException:
            stream.release()
            raise


def _iterate(
    ref: str,
    socket: str | None,
    timeout: float,
    first: tuple[ModelStream, list[str]],
    options: dict[str, Any],
    selection: dict[str, Any] | None = None,
) -> Generator[tuple[str, torch.Tensor]]:
    """Load through ``first``; after a cached piece failed its check, have the agent repair the blob and go on once.

    Every tensor handed out was checked (client/verify.py); after a repair the
    load starts over on the fresh open and skips the names already yielded.
    The weight files stay share-locked (held by the stream) until the iteration
    ends or is closed, so the agent cannot evict what is being read; a file
    evicted before the stream could hold it (between the agent naming it and
    the lock, or the lock released for a repair) is opened again the same way,
    up to EVICTED_RETRIES times.
    """
    from client import verify
    from client.loader import iter_streamed_files
    from client.stream import BlobEvictedError

    if options["ring_bytes"] is None:
        del options["ring_bytes"]
    stream, shards = first
    try:
        if not verify.available():  # no xxhash in this image: the agent re-hashes the blobs before we read them
            _warn_no_xxhash()
            stream.release()
            _reverify(ref, stream, socket, timeout)
            stream, shards = _open_stream(ref, socket, timeout, selection)
        yielded: set[str] = set()
        repaired = False
        evicted = 0
        while True:
            tensors = iter_streamed_files(stream, shards, label=ref, **options)
            try:
                for name, tensor in tensors:
                    if name not in yielded:
                        yielded.add(name)
                        yield name, tensor
                return
            except verify.CorruptPieceError as exc:
                if repaired:
                    raise IntegrityError(
                        f"{exc} (still, after the agent re-verified the blob: not loaded; see `agent verify {ref}`"
                        " and the agent's log)"
                    ) from None
                repaired = True
                _reverify(ref, stream, socket, timeout, str(exc))
            except BlobEvictedError:
                evicted += 1
                if evicted >= EVICTED_RETRIES:
                    raise
            finally:
                tensors.close()
            # the new open holds its files before the old one lets go of its own
            old, (stream, shards) = stream, _open_stream(ref, socket, timeout)
            old.release()
    finally:
        stream.release()


def _reverify(ref: str, stream: ModelStream, socket: str | None, timeout: float, why: str = "") -> None:
    """Have the agent re-hash the revision ``stream`` opened; it removes and re-fetches every blob that fails.

    ``POST /v1/verify`` answers once the model is whole again; an error (the
    origin is gone, or gives other bytes now) becomes an IntegrityError naming both.
    """
    target = f"{stream.base}@{stream.revision}" if stream.base and stream.revision else ref
    try:
        with AgentConnection(socket, timeout).stream("POST", "/v1/verify", {"ref": target}) as lines:
            for line in lines:
                if line.get("event") == "complete":
                    return
        raise AgentUnavailableError(f"the agent ended its answer to verify {target!r} before it completed")
    except WarmstartError as exc:
        if not why:
            raise
        raise IntegrityError(f"{why}; the agent could not repair it: {exc}") from None


_warned_no_xxhash = False


def _warn_no_xxhash() -> None:
    global _warned_no_xxhash
    if not _warned_no_xxhash:
        _warned_no_xxhash = True
        import warnings

        warnings.warn(
            "warmstart: the xxhash package is not installed, so the agent re-reads every blob of a model to check"
            " it before each open (slow for large models); pip install xxhash to check as the client reads",
            RuntimeWarning,
            stacklevel=3,
        )


INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024


def snapshot(
    ref: str, *, socket: str | None = None, timeout: float = DEFAULT_TIMEOUT,
    include: Iterable[str] | None = None, exclude: Iterable[str] | None = None, all_files: bool = False,
) -> str:
    """A read-only directory of model ``ref`` in the Hugging Face layout, fetched into the node cache if needed.

    For frameworks that load from a path (``AutoModel.from_pretrained(path)``,
    ``vllm serve PATH``). Every file is a relative symlink to its verified blob, so
    the directory works under ``$WARMSTART_CACHE_DIR`` as well as on the node.
    """
    complete, socket_path = _open(ref, socket, timeout, snapshot=True,
                                  selection=_selection(include, exclude, all_files))
    rel = complete.get("snapshot")
    where = f"agent at {socket_path} (snapshot {ref!r})"
    if rel is None:
        raise WarmstartError(f"{where}: the agent could not lay this model out as a directory (see its log)")
    return _in_cache(_cache_dir(complete, where), rel, f"{where}: snapshot path")


def _open(
    ref: str, socket: str | None, timeout: float, snapshot: bool = False, selection: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """Ask the agent to make ``ref`` whole; return its ``complete`` line and the socket path used."""
    conn = AgentConnection(socket, timeout)
    body: dict[str, Any] = {"ref": ref, "snapshot": True} if snapshot else {"ref": ref}
    body.update(selection or {})
    with conn.stream("POST", "/v1/open", body) as lines:
        for line in lines:
            if line.get("event") == "complete":
                return line, conn.socket_path
    raise AgentUnavailableError(f"agent at {conn.socket_path} ended the answer to open {ref!r} before it completed")


def _cache_dir(complete: dict[str, Any], where: str) -> str:
    """Where this process sees the cache: ``$WARMSTART_CACHE_DIR`` (a pod's mount), else the agent's path."""
    cache_dir = os.environ.get(CACHE_DIR_ENV) or complete.get("cache_dir")
    if not isinstance(cache_dir, str):
        raise WarmstartError(f"{where}: the complete line lacks cache_dir: {complete!r:.300}")
    return cache_dir


def _in_cache(cache_dir: str, rel: Any, what: str) -> str:
    """``cache_dir/rel`` for a path the agent sent, refused unless it stays inside the cache."""
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.split("/"):
        raise WarmstartError(f"{what} {rel!r} is not inside the cache directory")
    return os.path.join(cache_dir, rel)


def _weight_files(ref: str, paths: list[str], read_index: Callable[[], bytes]) -> list[str]:
    """The model's weight files, in load order, from its file list.

    Which files are the weights follows the Hugging Face layout, as transformers
    and vLLM read it: when ``model.safetensors.index.json`` is present, exactly the
    files its ``weight_map`` names (``read_index`` gives its bytes); otherwise every
    top-level ``*.safetensors`` (files in subfolders, such as ``original/`` or
    ``onnx/``, are other formats of the same weights), or every ``*.safetensors``
    when none is at the top. Repos that ship the same weights twice (Mistral's
    ``consolidated.safetensors`` beside the sharded files) therefore load once.
    """
    if INDEX_FILE in paths:
        wanted = _indexed_files(ref, read_index())
        missing = sorted(wanted - set(paths))
        if missing:
            raise ModelNotFoundError(
                f"{ref}: {INDEX_FILE} names files the model does not have: {', '.join(missing[:5])}"
            )
    else:
        every = sorted(p for p in paths if p.endswith(SAFETENSORS_SUFFIX))
        wanted = {p for p in every if "/" not in p} or set(every)
    if not wanted:
        listed = ", ".join(paths[:10])
        raise ModelNotFoundError(f"{ref} has no .safetensors files (files: {listed or 'none'})")
    return sorted(wanted)


def _read_whole(stream: ModelStream, path: str) -> bytes:
    """A small file of the model, once it is complete (bounded: it is read into memory)."""
    state = stream.wait_readable(path, 0, 0)
    if state.size > MAX_INDEX_BYTES:
        raise MalformedFileError(f"{stream.ref}: {path} is larger than {MAX_INDEX_BYTES} bytes")
    fd, local = stream.open(path)
    check = None
    try:
        stream.wait_readable(path, 0, state.size)
        check = stream.check(path, fd, local)
        if check is not None:
            check.ensure(0, state.size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_INDEX_BYTES + 1)
    finally:
        if check is not None:
            check.close()
        os.close(fd)


def _indexed_files(ref: str, raw: bytes) -> set[str]:
    """The shard names in a ``model.safetensors.index.json`` (untrusted: checked, bounded)."""
    import json

    try:
        if len(raw) > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
        weight_map = json.loads(raw).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v.endswith(SAFETENSORS_SUFFIX) for v in weight_map.values()
        ):
            raise ValueError("weight_map must map tensor names to .safetensors file names")
    except (ValueError, AttributeError) as exc:
        raise MalformedFileError(f"{ref}: {INDEX_FILE} is not a valid index: {exc}") from None
    return set(weight_map.values())
