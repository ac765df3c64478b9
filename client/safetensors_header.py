"""Parse and validate a safetensors header without trusting it.

The loader maps tensors straight out of cache files at the offsets the header
names, so every number in it is checked against the file before any byte is
touched: a corrupt or hostile header must end in :class:`MalformedFileError`
naming the file, never in a crash, a huge allocation or a tensor that aliases
another one.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian
header length ``N``, then ``N`` bytes of UTF-8 JSON, then the data buffer.
The JSON object maps tensor names to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the data buffer) plus an optional ``"__metadata__"``
string-to-string map.

Compared with the reference implementation this reader is deliberately a
little more lenient in one harmless way: it accepts gaps between tensors and
trailing bytes after the last one (it still rejects overlaps), since neither
can make a tensor read wrong bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from client.errors import MalformedFileError

# The reference implementation caps headers at 100 MB; 100 MiB is as generous and
# keeps a corrupt length from making us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

METADATA_KEY = "__metadata__"


def _dtype_table() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes, with the newer ones only where this torch has them."""
    table: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    for name, attr in optional.items():
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            table[name] = dtype
    return table


DTYPES: Mapping[str, torch.dtype] = MappingProxyType(_dtype_table())


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in its file: enough to map or read it without the header again."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file (not relative to the data buffer)
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header: its tensors in file-offset order and its free-form metadata."""

    name: str  # the file name used in error messages
    file_size: int
    data_start: int  # 8 + header length: where the data buffer begins
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def read_header(source: int | str | os.PathLike[str], *, name: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    ``source`` is an open file descriptor (read with ``pread``, its position is
    left alone, it is not closed) or a path. ``name`` is what error messages
    call the file (default: the path, or ``<fd N>``).
    """
    if isinstance(source, int):
        return _read_header_fd(source, name or f"<fd {source}>")
    path = os.fspath(source)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_header_fd(fd, name or path)
    finally:
        os.close(fd)


def read_header_with(
    read: Callable[[int, int], bytes], file_size: int, *, name: str
) -> tuple[SafetensorsHeader, bytes]:
    """Read and validate a header through ``read(offset, nbytes)``; also return the file's bytes before its data.

    For a loader that reads files its own way (client/copy_read.py: waiting for
    bytes still arriving, hashing them itself): ``read`` must return exactly
    ``nbytes`` bytes or raise. The bytes returned (length prefix and header,
    ``header.data_start`` of them) are what that loader hashes with the first piece.
    """
    if file_size < 8:
        raise MalformedFileError(f"{name}: {file_size} bytes is too short for a safetensors file (truncated?)")
    prefix = read(0, 8)
    (n,) = struct.unpack("<Q", prefix)
    _check_length(n, file_size, name)
    raw = read(8, n)
    return parse_header_bytes(raw, file_size=file_size, name=name), prefix + raw


def _check_length(n: int, file_size: int, name: str) -> None:
    if n > MAX_HEADER_BYTES:
        raise MalformedFileError(
            f"{name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
        )
    if n > file_size - 8:
        raise MalformedFileError(
            f"{name}: header length {n} runs past the end of the {file_size}-byte file (truncated?)"
        )


def _pread_exact(fd: int, size: int, offset: int, name: str, what: str) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise MalformedFileError(f"{name}: file ended while reading the {what} (truncated?)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_header_fd(fd: int, name: str) -> SafetensorsHeader:
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise MalformedFileError(f"{name}: {file_size} bytes is too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, name, "header length"))
    _check_length(n, file_size, name)
    raw = _pread_exact(fd, n, 8, name, "header")
    return parse_header_bytes(raw, file_size=file_size, name=name)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def parse_header_bytes(raw: bytes, *, file_size: int, name: str) -> SafetensorsHeader:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes (``raw`` excludes the length prefix)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedFileError(f"{name}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except ValueError as exc:
        raise MalformedFileError(f"{name}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise MalformedFileError(f"{name}: header must be a JSON object, got {type(obj).__name__}")

    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = _parse_metadata(obj.pop(METADATA_KEY, None), name)
    tensors = sorted(
        (_parse_entry(key, entry, data_start, data_size, name) for key, entry in obj.items()),
        key=lambda t: (t.offset, t.nbytes),
    )
    prev: TensorInfo | None = None
    for t in tensors:
        # Zero-byte tensors occupy nothing and may sit anywhere, even at another tensor's offset.
        if t.nbytes == 0:
            continue
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise MalformedFileError(
                f"{name}: tensors {prev.name!r} and {t.name!r} overlap"
                f" (data_offsets [{prev.offset - data_start}, {prev.offset - data_start + prev.nbytes})"
                f" and [{t.offset - data_start}, {t.offset - data_start + t.nbytes}))"
            )
        prev = t
    return SafetensorsHeader(
        name=name,
        file_size=file_size,
        data_start=data_start,
        tensors=tuple(tensors),
        metadata=MappingProxyType(metadata),
    )


def _parse_metadata(meta: Any, name: str) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise MalformedFileError(f"{name}: {METADATA_KEY} must be an object of strings, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise MalformedFileError(f"{name}: {METADATA_KEY}[{key!r}] must be a string, got {type(value).__name__}")
    return dict(meta)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(key: str, entry: Any, data_start: int, data_size: int, name: str) -> TensorInfo:
    where = f"{name}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise MalformedFileError(f"{where}: entry must be an object, got {type(entry).__name__}")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str):
        raise MalformedFileError(f"{where}: missing or non-string dtype")
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise MalformedFileError(
            f"{where}: unknown or unsupported dtype {dtype_name!r} (this client with torch {torch.__version__}"
            f" reads {', '.join(sorted(DTYPES))})"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise MalformedFileError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.100}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise MalformedFileError(
            f"{where}: data_offsets must be [begin, end] with non-negative integers, got {offsets!r:.100}"
        )
    begin, end = offsets
    if begin > end:
        raise MalformedFileError(f"{where}: data_offsets begin {begin} is after end {end}")
    if end > data_size:
        raise MalformedFileError(
            f"{where}: data_offsets end {end} is past the {data_size}-byte data buffer (truncated file?)"
        )
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise MalformedFileError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype_name}"
            f" needs {expected}"
        )
    return TensorInfo(name=key, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)
