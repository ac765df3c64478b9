"""Load tensors from complete safetensors files on local disk, bit-exact with ``safetensors.torch.load_file``.

CPU tensors are zero-copy by default: each file is mapped once, privately
(``MAP_PRIVATE``, ``mmap.ACCESS_COPY``), and every tensor is a view of its
bytes in that mapping. Pages come from the page cache and are shared with
every other process that maps the same cache blob until someone writes to
them; a write (an in-place op on a returned tensor) copies just that page
into the process and never reaches the file. A read-only mapping would save
nothing and turn an innocent in-place op into a segfault, so it is not used.

``copy=True`` instead reads each file once into one buffer of its own and
hands out views of it (client/copy_read.py: O_DIRECT for pages not in the page
cache, each piece hashed from the buffer before a tensor over it is handed out);
no page-cache sharing, no file kept open afterwards. The buffer is freed when
the last tensor viewing it is.

While any tensor mapped from a file is alive, the file stays open with a
shared ``flock`` on it: the agent evicts only blobs it can lock exclusively,
so a model in use is never deleted under its readers (deleting would be
harmless for the mapping, but would free no disk space and hide the blob from
the next reader). The lock and file are released when the last such tensor is
garbage-collected.

Other devices (CUDA) are served by :class:`client.device_ring.DeviceRing`: large
positional reads into a few reusable pinned buffers, copied to the device on
a CUDA stream while the next ones are read; the host never holds more than
the ring, and the file is not mapped at all.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from client._buffers import writable_bytes
from client._flock import lock_shared as _lock_shared
from client.copy_read import CHUNK, STREAM_CHUNK, FileCopy, PieceCheck
from client.device_ring import DEFAULT_RING_BYTES, DeviceRing, check_device
from client.errors import MalformedFileError, WarmstartError
from client.safetensors_header import MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo, read_header

# copy=True over several complete files: open the next one ahead and start its reads as soon as the current one's
# are all under way (FileCopy.then), so the disk's queue does not drain between files (bench/RESULTS.md)
READ_AHEAD = True

# Linux returns at most 0x7ffff000 bytes per read; ask for no more than that per call.
_MAX_READ = 1 << 30

PathLike = str | os.PathLike[str]


@dataclass(slots=True)
class _OpenFile:
    """One opened, share-locked safetensors file and its validated header."""

    path: str
    fd: int
    header: SafetensorsHeader


def iter_safetensors_files(
    paths: Iterable[PathLike],
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    copy: bool = False,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one or more safetensors files (the shards of one model), file by file.

    ``names`` restricts loading to those tensor names; a name in no file
    raises ``KeyError``. A name present in two files raises
    :class:`MalformedFileError` (the shards of a model must not disagree).
    Headers of all files are validated before any tensor is yielded.
    ``device`` other than CPU: through a ring of ``ring_bytes`` of pinned host
    buffers (see :mod:`client.device_ring`); host memory stays at the ring's size.
    ``copy``: CPU tensors in memory of their own instead of views of the page
    cache (see module doc).
    """
    target = check_device(device)
    wanted = None if names is None else _as_name_set(names)
    files = _open_all(paths)
    ring: DeviceRing | None = None
    try:
        owner = _check_names(files, wanted)
        if target.type != "cpu":
            ring = DeviceRing(target, ring_bytes)
        for f in files:
            selected = [t for t in f.header.tensors if owner.get(t.name) is f and (wanted is None or t.name in wanted)]
            if ring is not None:
                yield from ring.load(f.fd, f.path, selected)
                continue
            fd, f.fd = f.fd, -1  # the per-file loader owns the descriptor from here on
            yield from _load_one(f.path, fd, selected, copy=copy)
    finally:
        if ring is not None:
            ring.close()
        for f in files:
            if f.fd >= 0:
                os.close(f.fd)


def load_safetensors_files(
    paths: Iterable[PathLike],
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    copy: bool = False,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> dict[str, torch.Tensor]:
    """Every selected tensor of the files in one dict; see :func:`iter_safetensors_files`."""
    return dict(iter_safetensors_files(paths, device=device, names=names, copy=copy, ring_bytes=ring_bytes))


def load_safetensors_file(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    copy: bool = False,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> dict[str, torch.Tensor]:
    """:func:`load_safetensors_files` for a single file."""
    return load_safetensors_files([path], device=device, names=names, copy=copy, ring_bytes=ring_bytes)


class ShardSource(Protocol):
    """A model file that may still be arriving (see client/stream.py's ModelStream)."""

    def open(self, path: str) -> tuple[int, str]:
        """A read-only descriptor of model file ``path`` and the local file it is."""

    def wait_readable(self, path: str, start: int, end: int) -> object:
        """Block until bytes [start, end) of ``path`` are verified on disk."""

    def finish(self) -> object:
        """Block until the whole model is verified; raise if it was not."""

    def close(self) -> None:
        """Stop: every wait still blocked raises. Idempotent."""

    def check(self, path: str, fd: int, local: str) -> Checker | None:
        """What checks the bytes of ``path`` (open as ``fd``, the file ``local``) before they are handed out."""

    def is_complete(self, path: str) -> bool:
        """Whether ``path`` is known to be a complete blob now (:meth:`open` would not wait for it to arrive)."""


class Checker(PieceCheck, Protocol):
    """Verifies ranges of one open file against recorded hashes (client/verify.py's BlobCheck).

    Checks ranges itself (:meth:`ensure`) or pieces read by the loader (:class:`PieceCheck`).
    """

    def ensure(self, offset: int, nbytes: int) -> None:
        """Block until bytes [offset, offset + nbytes) are checked; raise IntegrityError if they are not intact."""

    def close(self) -> None:
        """Stop checking; idempotent."""


def iter_streamed_files(
    source: ShardSource,
    shards: Sequence[str],
    *,
    label: str,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    copy: bool = False,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> Generator[tuple[str, torch.Tensor]]:
    """:func:`iter_safetensors_files` for files that may still be filling: each tensor once its bytes are verified.

    Files are taken in order; a file's header is read once its first bytes are
    there, and each tensor once the pieces holding it are. Names are checked as
    files arrive (a duplicate raises when its second file is reached, a
    requested name no file has raises at the end). ``label`` prefixes file names
    in error messages (the model reference). A file ``source.check`` gives a
    checker for (a complete cached blob) has its header and every tensor's bytes
    checked against their piece hashes before they are parsed or handed out; a
    mismatch raises :class:`client.verify.CorruptPieceError`. The last tensor is followed by
    ``source.finish()`` (the whole-model verdict); ``source`` is closed on the
    way out, whatever happens.
    """
    if sys.byteorder != "little":
        raise WarmstartError("safetensors data is little-endian; this client does not byte-swap on big-endian hosts")
    target = check_device(device)
    wanted = None if names is None else _as_name_set(names)
    owner: dict[str, str] = {}
    ring = DeviceRing(target, ring_bytes) if target.type != "cpu" else None
    ahead: _CopyAhead | None = None  # copy=True: the next file, opened and due to start reading early
    try:
        for n, shard in enumerate(shards):
            display = f"{label}/{shard}"
            prepared, ahead = ahead, None
            check: Checker | None = None
            if prepared is not None:
                fd, check = prepared.fd, prepared.check
            else:
                fd, local = source.open(shard)
            handed_over = False
            try:
                if prepared is None:
                    _lock_shared(fd, display)
                    check = source.check(shard, fd, local)
                if ring is None and copy:
                    # read once into memory of its own, hashing what it read (client/copy_read.py, _file_copy)
                    arriving = check is None
                    copier = prepared.copier if prepared is not None else _file_copy(source, shard, display, fd, check)
                    # the same tensors a prepared copy started on: owner then held the same names
                    selected = _select(copier.header, display, owner, wanted)
                    handed_over = True
                    tensors = _copied(fd, copier, selected)
                    if READ_AHEAD and not arriving and n + 1 < len(shards):
                        # the next file's reads start once this one's are all under way (FileCopy.then)
                        ahead = _copy_ahead(source, shards[n + 1], f"{label}/{shards[n + 1]}", owner, wanted)
                        if ahead is not None:
                            copier.then(partial(ahead.copier.start, ahead.selected))
                    try:
                        yield from _without_closing(tensors)
                    except BaseException:
                        source.close()
                        tensors.close()
                        raise
                    continue
                source.wait_readable(shard, 0, 8)
                if check is not None:
                    check.ensure(0, 8)
                raw = os.pread(fd, 8, 0)
                length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                source.wait_readable(shard, 0, 8 + min(length, MAX_HEADER_BYTES))  # read_header rejects more
                if check is not None:
                    check.ensure(0, 8 + min(length, MAX_HEADER_BYTES))
                header = read_header(fd, name=display)
                selected = _select(header, display, owner, wanted)

                def wait(offset: int, nbytes: int, shard: str = shard, check: Checker | None = check) -> None:
                    source.wait_readable(shard, offset, offset + nbytes)
                    if check is not None:
                        check.ensure(offset, nbytes)

                if ring is not None:
                    tensors = ring.load(fd, display, selected, wait=wait)
                else:
                    handed_over = True
                    tensors = _load_one(display, fd, selected, copy=copy, wait=wait)
                try:
                    yield from _without_closing(tensors)
                except BaseException:
                    # A consumer that stops early, or a failure: close the source first, so
                    # reader threads blocked waiting for bytes wake up, then the generator.
                    source.close()
                    tensors.close()
                    raise
            finally:
                if check is not None:
                    check.close()
                if not handed_over:
                    if prepared is not None:
                        prepared.copier.close()
                    os.close(fd)
        if wanted is not None:
            missing = sorted(wanted - owner.keys())
            if missing:
                raise KeyError(f"no tensor named {_some(missing)} in {label}; available: {_some(sorted(owner))}")
        source.finish()
    finally:
        if ahead is not None:  # stopped before reaching the file read ahead
            ahead.close()
        source.close()
        if ring is not None:
            ring.close()


@dataclass
class _CopyAhead:
    """The next complete file of a ``copy=True`` load, open, locked and planned before its turn."""

    fd: int
    check: Checker
    copier: FileCopy
    selected: list[TensorInfo]

    def close(self) -> None:
        """Stop its reads and let go of it (the load ended before its turn)."""
        self.copier.close()
        self.check.close()
        os.close(self.fd)


def _copy_ahead(
    source: ShardSource, shard: str, display: str, owner: dict[str, str], wanted: set[str] | None
) -> _CopyAhead | None:
    """Open and plan ``shard`` ahead of its turn, when it is a complete blob; None otherwise or on any failure.

    Why: so that its reads start while the current file's last ones finish
    (:meth:`FileCopy.then`), not after, when the disk's queue has drained. A file
    still arriving is not opened ahead (the open would wait for it). A failure is
    not raised here: the file is opened again in its turn, where it raises, after
    the current file's tensors. The names are checked against a copy of ``owner``
    for the same reason; the real check runs in its turn. Memory: the next file's
    buffer is allocated while the current one's tensors are still being handed out.
    """
    if not source.is_complete(shard):
        return None
    fd = -1
    check: Checker | None = None
    try:
        fd, local = source.open(shard)
        _lock_shared(fd, display)
        check = source.check(shard, fd, local)
        if check is not None:
            copier = _file_copy(source, shard, display, fd, check)
            return _CopyAhead(fd, check, copier, _select(copier.header, display, dict(owner), wanted))
    except Exception:  # noqa: BLE001 - raised again, in its turn
        pass
    if check is not None:
        check.close()
    if fd >= 0:
        os.close(fd)
    return None


def _file_copy(source: ShardSource, shard: str, display: str, fd: int, check: Checker | None) -> FileCopy:
    """The ``copy=True`` reader of ``shard``: a complete blob (it has a checker) in big O_DIRECT-capable
    chunks; a file still arriving (no checker) from the page cache in small ones, so tensors come as their
    bytes do."""
    arriving = check is None
    return FileCopy(
        fd, display, check=check, wait=partial(_arrived, source, shard),
        chunk=STREAM_CHUNK if arriving else CHUNK, direct=not arriving,
    )  # fmt: skip


def _arrived(source: ShardSource, shard: str, offset: int, nbytes: int) -> None:
    """Block until bytes [offset, offset + nbytes) of ``shard`` are on disk (verified by the agent as written)."""
    source.wait_readable(shard, offset, offset + nbytes)


def _select(
    header: SafetensorsHeader, display: str, owner: dict[str, str], wanted: set[str] | None
) -> list[TensorInfo]:
    """The tensors of ``header`` to load; records each name's file in ``owner``, refusing one two files have."""
    selected = []
    for t in header.tensors:
        if t.name in owner:
            raise MalformedFileError(f"tensor {t.name!r} is in both {owner[t.name]} and {display}")
        owner[t.name] = display
        if wanted is None or t.name in wanted:
            selected.append(t)
    return selected


def _copied(fd: int, copier: FileCopy, infos: Sequence[TensorInfo]) -> Generator[tuple[str, torch.Tensor]]:
    """``copier``'s tensors; closes ``fd`` (its own, share-locked descriptor) at the end, whatever happens."""
    try:
        yield from copier.tensors(infos)
    finally:
        copier.close()
        os.close(fd)


def _without_closing(gen: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``gen``'s items; closing this does not close ``gen`` (the caller does, after its own clean-up)."""
    for item in gen:  # noqa: UP028 (``yield from`` would pass close() on to ``gen``: the point is not to)
        yield item


def _as_name_set(names: Iterable[str]) -> set[str]:
    if isinstance(names, str):  # a lone name would otherwise become a set of characters
        return {names}
    return set(names)


def _open_all(paths: Iterable[PathLike]) -> list[_OpenFile]:
    """Open, share-lock and parse every file; on any failure close what was opened."""
    if sys.byteorder != "little":
        raise WarmstartError("safetensors data is little-endian; this client does not byte-swap on big-endian hosts")
    files: list[_OpenFile] = []
    try:
        for p in paths:
            path = os.fspath(p)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _lock_shared(fd, path)
                header = read_header(fd, name=path)
            except BaseException:
                os.close(fd)
                raise
            files.append(_OpenFile(path, fd, header))
    except BaseException:
        for f in files:
            os.close(f.fd)
        raise
    return files


def _check_names(files: Sequence[_OpenFile], wanted: set[str] | None) -> dict[str, _OpenFile]:
    """Map each tensor name to its file; reject duplicates across files and requested names no file has."""
    owner: dict[str, _OpenFile] = {}
    for f in files:
        for t in f.header.tensors:
            other = owner.get(t.name)
            if other is not None:
                raise MalformedFileError(f"tensor {t.name!r} is in both {other.path} and {f.path}")
            owner[t.name] = f
    if wanted is not None:
        missing = sorted(wanted - owner.keys())
        if missing:
            raise KeyError(
                f"no tensor named {_some(missing)} in {', '.join(f.path for f in files) or 'no files'};"
                f" available: {_some(sorted(owner))}"
            )
    return owner


def _some(names: Sequence[str], shown: int = 5) -> str:
    """A few names for a message, and how many more there are."""
    text = ", ".join(map(repr, names[:shown])) or "none"
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


# wait(offset, length) blocks until those bytes of the file are verified (streaming loads)
Wait = Callable[[int, int], None]


def _load_one(
    path: str, fd: int, infos: Sequence[TensorInfo], *, copy: bool, wait: Wait | None = None
) -> Generator[tuple[str, torch.Tensor]]:
    """Yield ``infos``' tensors from the open, share-locked ``fd``; takes ownership of ``fd``.

    The descriptor (and with it the lock) is closed here unless some tensor
    maps the file, in which case it closes when the mapping is collected.
    """
    if not copy and any(t.nbytes for t in infos):
        yield from _map_tensors(path, fd, infos, wait)
        return
    if copy:
        try:
            copier = FileCopy(fd, path, wait=wait)
        except BaseException:
            os.close(fd)
            raise
        yield from _copied(fd, copier, infos)
        return
    try:
        for t in infos:
            yield t.name, torch.empty(t.shape, dtype=t.dtype)
    finally:
        os.close(fd)


def _map_tensors(
    path: str, fd: int, infos: Sequence[TensorInfo], wait: Wait | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero-copy views of a private mapping; hands ``fd`` to a finalizer of the mapping.

    A file still being filled is mapped whole (it is preallocated); a tensor's
    view is made only after ``wait`` says its bytes are verified.
    """
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except BaseException:
        os.close(fd)
        raise
    # Tensors keep a memoryview (and so the mapping) alive; once the last one is
    # gone the mapping is collected, and the file and its shared lock go with it.
    # (mmap holds a dup of fd; both must close for the flock to be released.)
    weakref.finalize(mm, os.close, fd)
    view = memoryview(mm)
    del mm  # from here only memoryviews, and through them the tensors, keep the mapping alive
    for t in infos:
        if wait is not None:
            wait(t.offset, t.nbytes)
        if t.nbytes == 0:
            yield t.name, torch.empty(t.shape, dtype=t.dtype)
        elif t.offset % t.dtype.itemsize:
            # Misaligned for its element type: give it aligned memory of its own.
            yield t.name, _read_tensor(fd, t, path)
        else:
            flat = torch.frombuffer(view[t.offset : t.offset + t.nbytes], dtype=t.dtype)
            yield t.name, flat.view(t.shape)


def _read_tensor(fd: int, t: TensorInfo, path: str) -> torch.Tensor:
    """Read one tensor into fresh (allocator-aligned) memory with large positional reads."""
    buf = torch.empty(t.nbytes, dtype=torch.uint8)
    if t.nbytes:
        dest = writable_bytes(buf)
        done = 0
        while done < t.nbytes:
            n = os.preadv(fd, [dest[done : done + _MAX_READ]], t.offset + done)
            if n == 0:
                raise MalformedFileError(f"{path}: file ended inside tensor {t.name!r} (truncated while loading?)")
            done += n
    return buf.view(t.dtype).view(t.shape)
