"""vLLM model-loader plugin: ``--load-format warmstart`` reads the weights from the node cache.

Installing warmstart registers :func:`register` under vLLM's ``vllm.general_plugins``
entry point (name ``warmstart``), so every vLLM process adds the load format
by itself; nothing is imported or passed by hand::

    vllm serve "$(python -m client snapshot s3://models/llama)" --load-format warmstart

vLLM still reads the config and tokenizer from ``--model`` (a directory); the
loader feeds ``model.load_weights`` from :func:`client.iter_tensors`, so the weight
bytes come straight from the cache files through the agent's ``open`` (which
fetches what the node lacks). Which model's weights, in this order:

1. ``ref`` in ``--model-loader-extra-config``, e.g.
   ``--model-loader-extra-config '{"ref": "s3://models/llama"}'``: any reference
   the agent takes. ``--model`` can then be any directory or hub id that has the
   same model's config and tokenizer.
2. else ``--model`` is a snapshot directory (``client.snapshot(ref)`` or
   ``python -m client snapshot REF``, i.e. ``<cache>/snapshots/<key>/<revision>``):
   the reference recorded in ``<cache>/manifests/<key>/<revision>.json``, pinned
   to that revision (``REF@REVISION``), so the weights are exactly the snapshot's.
3. else a :class:`LoaderConfigError` saying how to give one of the two.

Other keys of the extra config (all optional): ``socket`` (the agent's socket;
default ``$WARMSTART_SOCKET``, else ``/run/warmstart/agent.sock``), ``timeout``
(seconds of agent silence before giving up, default 60), ``device`` (where the
tensors are handed to vLLM's weight loaders: default ``"cpu"``, zero-copy views
of the cache files, which vLLM's loaders shard and copy into its parameters on
the GPU, as its own safetensors loader does). Any other key is an error.

This module imports neither vLLM nor torch at import time: ``import
client.vllm_plugin`` works in any image that has the client. :func:`register`
without vLLM installed raises :class:`ImportError` (it only makes sense inside
vLLM, which calls it; calling it by hand without vLLM is a mistake worth
hearing about). The parts that do not need vLLM (:func:`parse_extra_config`,
:func:`ref_from_snapshot`, :func:`resolve_settings`, :func:`weights`) are plain
functions, tested without vLLM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import client
from client.errors import WarmstartError
from client.transport import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    import torch

LOAD_FORMAT = "warmstart"
EXTRA_CONFIG_KEYS = ("ref", "socket", "timeout", "device")
# What the agent takes as a model reference (README "Model references"); anything
# else would only fail later, inside a vLLM worker, with the agent's message.
REF_PREFIXES = ("s3://", "gs://", "az://", "hf://", "https://", "http://", "file://", "/")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# Under vLLM's own logger tree, so the lines show in vLLM's output with its format.
log = logging.getLogger("vllm.warmstart")


class LoaderConfigError(WarmstartError, ValueError):
    """``--model-loader-extra-config`` (or the ``--model`` path) does not say which weights to load, or says it
    wrongly."""

    kind = "bad_loader_config"


@dataclass(frozen=True)
class LoaderSettings:
    """What the loader needs: the model reference and how to reach the agent."""

    ref: str
    socket: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    device: str = "cpu"


_USAGE = (
    "give --model a snapshot directory (`python -m client snapshot REF`) or pass the reference: "
    """--model-loader-extra-config '{"ref": "s3://bucket/prefix"}'"""
)


def parse_extra_config(extra: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Check vLLM's ``model_loader_extra_config`` for this loader; return the keys it set, validated.

    Accepts the dict vLLM passes (``--model-loader-extra-config`` is parsed as JSON),
    a JSON object as a string, or None. Raises :class:`LoaderConfigError` naming the
    offending key and what it should be.
    """
    where = f"--load-format {LOAD_FORMAT}: --model-loader-extra-config"
    if extra is None:
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except ValueError as exc:
            raise LoaderConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(extra, Mapping):
        raise LoaderConfigError(f"{where} must be a JSON object, got {type(extra).__name__}")
    unknown = sorted(str(k) for k in extra if k not in EXTRA_CONFIG_KEYS)
    if unknown:
        raise LoaderConfigError(
            f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(EXTRA_CONFIG_KEYS)}"
        )
    out: dict[str, Any] = {}
    if "ref" in extra:
        out["ref"] = _check_ref(extra["ref"], f"{where} 'ref'")
    if "socket" in extra:
        sock = extra["socket"]
        if not isinstance(sock, str) or not sock:
            raise LoaderConfigError(f"{where} 'socket' must be the agent's socket path, got {sock!r}")
        out["socket"] = sock
    if "timeout" in extra:
        timeout = extra["timeout"]
        if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                or not math.isfinite(timeout) or timeout <= 0):
            raise LoaderConfigError(f"{where} 'timeout' must be a positive number of seconds, got {timeout!r}")
        out["timeout"] = float(timeout)
    if "device" in extra:
        out["device"] = _check_device(extra["device"], f"{where} 'device'")
    return out


def _check_ref(ref: Any, what: str) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise LoaderConfigError(f"{what} must be a model reference string, got {ref!r}")
    if not ref.startswith(REF_PREFIXES):
        raise LoaderConfigError(
            f"{what} {ref!r} is not a model reference: use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
            "az://ACCOUNT/CONTAINER/PREFIX, hf://ORG/NAME[@REV], https://HOST/PATH, file:///ABS/PATH or /ABS/PATH"
        )
    return ref


def _check_device(device: Any, what: str) -> str:
    if not isinstance(device, str) or not device:
        raise LoaderConfigError(f"{what} must be a torch device string such as 'cpu' or 'cuda', got {device!r}")
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise LoaderConfigError(f"{what} {device!r} is not a torch device: {exc}") from None
    return device


def ref_from_snapshot(path: str | os.PathLike[str]) -> str | None:
    """``REF@REVISION`` of a snapshot directory ``<cache>/snapshots/<key>/<revision>``, or None if ``path`` is not one.

    The agent records the reference of each resolved revision in
    ``<cache>/manifests/<key>/<revision>.json`` (README, "What the agent writes on
    the node"); a directory without that file beside it is not a snapshot. A
    manifest that is there but unreadable or malformed raises
    :class:`LoaderConfigError`.
    """
    snap = os.path.normpath(os.path.abspath(os.fspath(path)))
    revision = os.path.basename(snap)
    key_dir = os.path.dirname(snap)
    snapshots = os.path.dirname(key_dir)
    if os.path.basename(snapshots) != "snapshots" or not revision or not os.path.isdir(snap):
        return None
    manifest_path = os.path.join(os.path.dirname(snapshots), "manifests", os.path.basename(key_dir), revision + ".json")
    try:
        with open(manifest_path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LoaderConfigError(f"snapshot {snap}: cannot read its manifest {manifest_path}: {exc}") from None
    try:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw)
        ref, rev = manifest.get("ref"), manifest.get("revision")
        if not (isinstance(ref, str) and ref and isinstance(rev, str) and rev):
            raise ValueError("no 'ref' and 'revision' strings")
    except (ValueError, AttributeError) as exc:
        raise LoaderConfigError(f"snapshot {snap}: manifest {manifest_path} is not valid: {exc}") from None
    if rev != revision:
        raise LoaderConfigError(f"snapshot {snap}: manifest {manifest_path} is of revision {rev!r}, not {revision!r}")
    return f"{ref}@{rev}"


def resolve_settings(
    extra: Mapping[str, Any] | str | None, model_path: str | os.PathLike[str] | None
) -> LoaderSettings:
    """The loader's settings from the extra config and vLLM's ``--model``.

    The ``ref`` key, else the snapshot's reference.
    """
    options = parse_extra_config(extra)
    snapshot_ref = ref_from_snapshot(model_path) if model_path else None
    if "ref" not in options:
        if snapshot_ref is None:
            raise LoaderConfigError(
                f"--load-format {LOAD_FORMAT} does not know which model to read: --model {model_path!r} "
                f"is not a warmstart snapshot directory and no 'ref' was given; {_USAGE}"
            )
        options["ref"] = snapshot_ref
    elif snapshot_ref is not None and _base(snapshot_ref) != _base(options["ref"]):
        log.warning(
            "warmstart: --model is a snapshot of %s but the weights come from ref %s; "
            "make sure they are the same model",
            snapshot_ref, options["ref"],
        )
    return LoaderSettings(**options)


def _base(ref: str) -> str:
    """The reference without a trailing ``@revision`` (for comparing two references of one model)."""
    head, sep, tail = ref.rpartition("@")
    return head if sep and "/" not in tail else ref


def weights(settings: LoaderSettings) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model's weights, from :func:`client.iter_tensors`.

    That is what ``model.load_weights`` takes.
    """
    started = time.perf_counter()
    count = size = 0
    for name, tensor in client.iter_tensors(
        settings.ref, device=settings.device, socket=settings.socket, timeout=settings.timeout
    ):
        count += 1
        size += tensor.numel() * tensor.element_size()
        yield name, tensor
    seconds = time.perf_counter() - started
    log.info(
        "warmstart: %d tensors, %.2f GiB of %s handed to the model in %.2f s",
        count, size / 2**30, settings.ref, seconds,
    )


def unloaded_parameters(model: Any, loaded: set[str]) -> set[str]:
    """Parameters of an unquantized vLLM model that ``load_weights`` did not report as loaded.

    Mirrors vLLM's default loader: parameters of modules whose quantization method
    processes weights after loading (or quantizes online) are not required.
    """
    expected = {name for name, _ in model.named_parameters()}
    exempt: set[str] = set()
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "uses_meta_device", False) or getattr(method, "process_weights_after_loading", None):
            exempt.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters())
    return expected - loaded - exempt


_loader_class: type | None = None


def loader_class() -> type:
    """The ``BaseModelLoader`` subclass (built on first call, importing vLLM)."""
    global _loader_class
    if _loader_class is not None:
        return _loader_class
    from vllm.model_executor.model_loader import BaseModelLoader

    class WarmstartModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM is untyped here: subclassing Any
        """``--load-format warmstart``: weights from the warmstart node cache (see :mod:`client.vllm_plugin`)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            # Fail at engine start, not after the model is built, on a bad extra config.
            parse_extra_config(load_config.model_loader_extra_config)

        def _settings(self, model_config: Any) -> LoaderSettings:
            return resolve_settings(self.load_config.model_loader_extra_config, model_config.model)

        def download_model(self, model_config: Any) -> None:
            """Make the model whole in the node cache (fetching what is missing), without loading it."""
            s = self._settings(model_config)
            client.snapshot(s.ref, socket=s.socket, timeout=s.timeout)

        def load_weights(self, model: Any, model_config: Any) -> None:
            loaded = model.load_weights(weights(self._settings(model_config)))
            if loaded is not None and model_config.quantization is None:
                missing = unloaded_parameters(model, set(loaded))
                if missing:
                    raise ValueError(
                        f"--load-format {LOAD_FORMAT}: these weights were not in the checkpoint: {sorted(missing)}"
                    )

    _loader_class = WarmstartModelLoader
    return _loader_class


_registered = False


def register() -> None:
    """vLLM's ``vllm.general_plugins`` hook: make ``--load-format warmstart`` known in this process.

    Called by vLLM in each of its processes (possibly more than once: idempotent).
    Raises :class:`ImportError` when vLLM is not installed.
    """
    global _registered
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError as exc:
        raise ImportError(
            f"client.vllm_plugin.register() adds --load-format {LOAD_FORMAT} to vLLM, which is not installed "
            f"here ({exc}); install vllm in this environment, or use client.open_tensors / client.snapshot directly"
        ) from exc
    if _registered:
        return
    register_model_loader(LOAD_FORMAT)(loader_class())
    _registered = True
