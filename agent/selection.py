"""Which files of a revision a request needs: by default only those a loader reads.

Why: many repos ship the same weights several times (safetensors, pytorch_model.bin,
ONNX, OpenVINO, TF, Flax, GGUF); a loader reads one of them. Fetching all of them
costs disk, origin bandwidth and the start-up the cache exists to shorten.

The default (:data:`DEFAULT`) is what transformers, vLLM and ``client.open_tensors``
read: the weights ``model.safetensors.index.json`` names (and the index), else the
top-level ``*.safetensors`` (every ``*.safetensors`` when none is at the top), plus every
file that is not a weight format (configs, tokenizer, generation config, README,
``1_Pooling/config.json`` ...). Skipped: other weight formats (:data:`WEIGHT_SUFFIXES`,
files under :data:`WEIGHT_FOLDERS`) and safetensors the index does not name. A revision
with no ``*.safetensors`` at all is taken whole: nothing then says which of its formats
a loader reads (a GGUF-only prefix, a PyTorch-only repo, a prefix of arbitrary files).

``include`` / ``exclude`` are globs as ``huggingface-cli download --include/--exclude``
reads them (``fnmatch`` on the path; a pattern ending in ``/`` means everything
under that folder). With ``include``, exactly the files it matches are chosen (the
default rule does not apply); ``all_files`` chooses every file; ``exclude`` then
drops files from either. The same rules hold for every scheme (hf, s3, https, file):
they only look at paths.

A selection never changes what is saved as the revision's manifest (the whole
listing, agent/service.py): it only says which of its files a request fetches and
is answered with, so a later request with other patterns fetches only what is
missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from agent.manifest import FileEntry
from client.errors import BadRequestError

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS = ".safetensors"
MAX_INDEX_BYTES = 64 * 1024 * 1024  # an index this large is not one (Llama-405B's is 0.1 MiB)
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 512
# Weight formats a loader of safetensors does not read (lower-case suffixes, matched on the file name).
WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ggml",
    ".tflite", ".ot", ".mlmodel", ".mlpackage", ".pb", ".npz", ".nemo", ".keras", ".pdparams",
)  # fmt: skip
# Folders that hold another format of the weights (their configs and all).
WEIGHT_FOLDERS = ("onnx", "openvino", "coreml", "tf", "flax", "gguf", "mlx", "tflite")


def _is_other_format(path: str) -> bool:
    low = path.lower()
    if low.endswith(WEIGHT_SUFFIXES):
        return True
    parts = low.split("/")
    return any(part in WEIGHT_FOLDERS for part in parts[:-1])


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """huggingface_hub's ``filter_repo_objects``: fnmatch, and ``dir/`` stands for ``dir/*``."""
    return any(fnmatchcase(path, p + "*" if p.endswith("/") else p) for p in patterns)


def _patterns(value: Any, name: str) -> tuple[str, ...]:
    """A request's or spec's list of globs (untrusted): a string or a list of strings, bounded."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise BadRequestError(f'"{name}" must be a glob or a list of globs (strings)')
    if len(value) > MAX_PATTERNS or any(len(p) > MAX_PATTERN_CHARS or "\0" in p for p in value):
        raise BadRequestError(f'"{name}": at most {MAX_PATTERNS} globs of at most {MAX_PATTERN_CHARS} characters')
    return tuple(value)


def indexed_files(raw: bytes) -> frozenset[str]:
    """The shard names of a ``model.safetensors.index.json`` (untrusted); ValueError when it is not one."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v.endswith(SAFETENSORS) for v in weight_map.values()
    ):
        raise ValueError("weight_map must map tensor names to .safetensors file names")
    return frozenset(weight_map.values())


@dataclass(frozen=True)
class Selection:
    """Which files to fetch: the loader's (default), ``all_files``, or ``include`` globs; minus ``exclude``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    all_files: bool = False
    paths: frozenset[str] | None = None  # exact paths (the agent's own use: verify repairs what it held)

    @classmethod
    def parse(cls, include: Any = None, exclude: Any = None, all_files: Any = None) -> Selection:
        """From a request body's or a warm-set entry's fields; BadRequestError names the field at fault."""
        if all_files is not None and not isinstance(all_files, bool):
            raise BadRequestError('"all_files" must be true or false')
        return cls(_patterns(include, "include"), _patterns(exclude, "exclude"), bool(all_files))

    @classmethod
    def of_body(cls, body: dict[str, Any]) -> Selection:
        return cls.parse(body.get("include"), body.get("exclude"), body.get("all_files"))

    def to_body(self) -> dict[str, Any]:
        """The request fields that carry this selection (none for the default)."""
        out: dict[str, Any] = {}
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.all_files:
            out["all_files"] = True
        return out

    @property
    def is_default(self) -> bool:
        return self == DEFAULT

    def needs_index(self, files: Iterable[FileEntry]) -> bool:
        """Whether :meth:`pick` must be given the shard index's names (the default rule, with an index)."""
        default_rule = self.paths is None and not self.include and not self.all_files
        return default_rule and any(f.path == INDEX_FILE for f in files)

    def pick(self, files: Sequence[FileEntry], indexed: frozenset[str] | None = None) -> tuple[FileEntry, ...]:
        """The chosen files of ``files``, in their order. ``indexed``: the index's shard names, when
        :meth:`needs_index` (None there means the index could not be read: the top-level rule stands)."""
        if self.paths is not None:
            chosen = [f for f in files if f.path in self.paths]
        elif self.include:
            chosen = [f for f in files if _matches(f.path, self.include)]
        elif self.all_files:
            chosen = list(files)
        else:
            chosen = self._loader_files(files, indexed)
        return tuple(f for f in chosen if not _matches(f.path, self.exclude))

    @staticmethod
    def _loader_files(files: Sequence[FileEntry], indexed: frozenset[str] | None) -> list[FileEntry]:
        paths = [f.path for f in files]
        tensors = [p for p in paths if p.endswith(SAFETENSORS)]
        if indexed is not None:
            weights = set(indexed)
        elif tensors:
            weights = {p for p in tensors if "/" not in p} or set(tensors)
        else:  # no safetensors at all: nothing says which format the loader reads, so every file
            return list(files)
        return [
            f for f in files
            if f.path in weights or (not f.path.endswith(SAFETENSORS) and not _is_other_format(f.path))
        ]  # fmt: skip

    def describe(self) -> str:
        """For log lines and errors: what was asked for."""
        if self.is_default:
            return "the loader's files"
        parts = ["all files" if self.all_files else ""]
        if self.include:
            parts.append("include " + ",".join(self.include))
        if self.exclude:
            parts.append("exclude " + ",".join(self.exclude))
        return "; ".join(p for p in parts if p)


DEFAULT = Selection()
ALL = Selection(all_files=True)
