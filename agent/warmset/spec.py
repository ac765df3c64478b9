"""The warm-set file: its format, parsed strictly (a bad file names the key or entry at fault).

```yaml
models:
  - ref: hf://meta-llama/Llama-3.1-8B-Instruct@main   # a moving revision: followed
    pin: true
  - ref: s3://models/qwen2.5-7b@v3
    pin: true
  - ref: s3://models/embedder
    pin: false                                        # prefetched, evictable
  - ref: hf://org/model-with-onnx
    include: ["*.onnx", "*.json"]                     # which files (default: the loader's; or all_files: true)
    exclude: ["onnx/*quantized*"]
refresh: 10m                                          # how often references are re-resolved
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import yaml

from agent.errors import WarmSetError
from agent.refs import ModelRef, parse_ref
from agent.selection import DEFAULT, Selection
from client.errors import WarmstartError

DEFAULT_REFRESH = 600.0
MIN_REFRESH = 1.0
MAX_ENTRIES = 1000
ENTRY_KEYS = ("ref", "pin", "include", "exclude", "all_files")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, what: str = "refresh") -> float:
    """``10m``, ``30s``, ``1h30m``, ``500ms``, or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise WarmSetError(f"{what}: expected a duration like 10m, 30s or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise WarmSetError(f"{what}: expected a duration like 10m, 30s or 1h, got {value!r}")
    else:
        raise WarmSetError(f"{what}: expected a duration like 10m, 30s or 1h, got {value!r}")
    if seconds < MIN_REFRESH:
        raise WarmSetError(f"{what}: {value!r} is shorter than the minimum of {MIN_REFRESH:g}s")
    return seconds


@dataclass(frozen=True)
class EntrySpec:
    ref: str  # as written
    pin: bool
    selection: Selection = DEFAULT  # which files (agent/selection.py): the loader's unless the entry says

    @property
    def parsed(self) -> ModelRef:
        return parse_ref(self.ref)


@dataclass(frozen=True)
class WarmSetSpec:
    entries: tuple[EntrySpec, ...]
    refresh: float


def parse_warm_set(text: str) -> WarmSetSpec:
    """Parse and validate a warm-set file strictly; raise WarmSetError naming what is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WarmSetError(f"invalid YAML: {exc}".replace("\n", " ")) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise WarmSetError(f"the top level must be a mapping with 'models' (and 'refresh'), not {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in ("models", "refresh"))
    if unknown:
        raise WarmSetError(f"unknown key {unknown[0]!r} at the top level (allowed: models, refresh)")
    refresh = parse_duration(doc["refresh"]) if doc.get("refresh") is not None else DEFAULT_REFRESH
    models = doc.get("models") or []
    if not isinstance(models, list):
        raise WarmSetError("'models' must be a list of {ref, pin} entries")
    if len(models) > MAX_ENTRIES:
        raise WarmSetError(f"'models' has {len(models)} entries; at most {MAX_ENTRIES}")
    entries: list[EntrySpec] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(models):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"ref": item}
        if not isinstance(item, dict):
            raise WarmSetError(f"{where}: expected a mapping with 'ref' (and 'pin'), got {type(item).__name__}")
        unknown = sorted(str(k) for k in item if k not in ENTRY_KEYS)
        if unknown:
            raise WarmSetError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(ENTRY_KEYS)})")
        try:
            selection = Selection.parse(item.get("include"), item.get("exclude"), item.get("all_files"))
        except WarmstartError as exc:
            raise WarmSetError(f"{where}: {exc}") from None
        ref = item.get("ref")
        if not isinstance(ref, str) or not ref.strip():
            raise WarmSetError(f"{where}: 'ref' is required and must be a string")
        pin = item.get("pin", True)
        if not isinstance(pin, bool):
            raise WarmSetError(f"{where}: 'pin' must be true or false, got {pin!r}")
        try:
            parsed = parse_ref(ref.strip())
        except WarmstartError as exc:
            raise WarmSetError(f"{where}: {exc}") from None
        if parsed.key in seen:
            raise WarmSetError(f"{where}: {parsed.base} is already listed as {seen[parsed.key]!r}; list a model once")
        seen[parsed.key] = ref.strip()
        entries.append(EntrySpec(ref.strip(), pin, selection))
    return WarmSetSpec(tuple(entries), refresh)


@dataclass(frozen=True)
class FileStamp:
    """What is looked at every poll: cheap to compare; the content hash only when these move."""

    realpath: str
    inode: int
    mtime_ns: int
    size: int


def stamp(path: str) -> FileStamp:
    real = os.path.realpath(path)
    st = os.stat(real)
    return FileStamp(real, st.st_ino, st.st_mtime_ns, st.st_size)
