"""What makes a compile artifact portable: the fingerprint it is stored and looked up under.

Compiled kernels and framework caches are only valid for the software stack
and hardware that made them: a bundle built with another torch, Triton or
CUDA, for another GPU architecture (another CPU model where there is no GPU,
since Inductor's C++ kernels are built for the host's vector ISA), or by
another Python (bytecode, pickles) is never installed. The fingerprint is a
flat ``{field: value}`` dict of strings, computed in the process that compiles
(it is the one that knows its torch and GPU); its id is a short hash of the
canonical JSON, so the agent never needs torch to compare two.

``extra`` carries what only the framework knows: its own config hash (vLLM's
compile cache key, a model config digest), given by the user.

Stdlib only; torch and triton are imported inside :func:`current_fingerprint`
so ``import client`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Mapping
from typing import Any

# Fields whose difference a reader should see first in `agent artifacts ls`.
FIELDS = ("kind", "python", "torch", "triton", "cuda", "gpu", "cpu", "machine", "extra")


def fingerprint_id(fp: Mapping[str, str]) -> str:
    """16 hex characters naming a fingerprint (sha256 of its canonical JSON)."""
    canon = json.dumps(dict(sorted(fp.items())), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_fingerprint(fp: Any) -> dict[str, str]:
    """A fingerprint from the wire: a flat object of short strings (raises ValueError otherwise)."""
    if not isinstance(fp, dict) or not fp or len(fp) > 32:
        raise ValueError("fingerprint must be a non-empty object of at most 32 fields")
    out = {}
    for k, v in fp.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or len(k) > 64 or len(v) > 512:
            raise ValueError(f"fingerprint field {k!r} must map a short name to a string of at most 512 characters")
        out[k] = v
    return out


def fingerprint_diff(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Fields that differ (present on one side only counts), in :data:`FIELDS` order then by name."""
    names = set(mine) | set(theirs)
    differ = [n for n in names if mine.get(n) != theirs.get(n)]
    order = {n: i for i, n in enumerate(FIELDS)}
    return sorted(differ, key=lambda n: (order.get(n, len(order)), n))


def describe_diff(mine: Mapping[str, str], theirs: Mapping[str, str]) -> str:
    """``torch: 2.13.0+cpu here, 2.12.0 in the bundle; ...`` for the fields that differ."""
    parts = []
    for n in fingerprint_diff(mine, theirs):
        parts.append(f"{n}: {mine.get(n, '(none)')!s} here, {theirs.get(n, '(none)')!s} in the bundle")
    return "; ".join(parts)


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Model", "cpu model"):
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def current_fingerprint(kind: str, extra: str | None = None, *, with_torch: bool = True) -> dict[str, str]:
    """This process's fingerprint for artifacts of ``kind`` (``torch-compile``, ``dir``, ...).

    torch, triton, CUDA and the GPU are read from the installed packages
    (``none`` where absent). The GPU is device 0's name and compute
    capability; a node's GPUs are one model in practice. Where there is no
    GPU the CPU model stands in for it.
    """
    fp = {
        "kind": kind,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine() or "unknown",
        "torch": "none",
        "triton": "none",
        "cuda": "none",
        "gpu": "none",
    }
    torch: Any = None
    if with_torch:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        fp["torch"] = str(torch.__version__)
        hip = getattr(torch.version, "hip", None)
        fp["cuda"] = str(torch.version.cuda or (f"hip-{hip}" if hip else "none"))
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            fp["gpu"] = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
        try:
            import triton

            fp["triton"] = str(triton.__version__)
        except ImportError:
            pass
    if fp["gpu"] == "none":
        fp["cpu"] = _cpu_model()
    if extra:
        fp["extra"] = str(extra)
    return fp
