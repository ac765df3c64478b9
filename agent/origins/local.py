"""A local or NFS directory (or one file): ``/models/llama`` or ``file:///models/llama``.

Files are copied into the cache with large positional reads off the event loop,
so an NFS mount is read in parallel pieces like any other origin. Symlinked
files are followed (a Hugging Face cache snapshot is links into ``blobs/``);
dot-directories (``.git``, ``.cache``) are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

from agent.errors import TransientOriginError
from agent.manifest import FileEntry, Manifest, listing_revision
from agent.origins.base import READ_BLOCK, Origin, Sink
from agent.refs import ModelRef, check_relative_path
from client.errors import FetchFailedError, ModelNotFoundError, ResourceError

MAX_FILES = 100_000


class LocalOrigin(Origin):
    scheme = "file"

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool

    async def resolve(self, ref: ModelRef) -> Manifest:
        files = await asyncio.get_running_loop().run_in_executor(self.pool, _walk, ref.location)
        revision = listing_revision([(f.path, f.size, f.source["mtime_ns"]) for f in files])
        if ref.revision and ref.revision != revision:
            raise ModelNotFoundError(
                f"revision {ref.revision} of {ref.location} is not cached; the directory is now {revision}"
            )
        return Manifest(ref=ref.base, origin="file", revision=revision, files=tuple(files), resolved_at=time.time())

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        path = entry.source["path"]
        try:
            fd = await loop.run_in_executor(self.pool, os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{path} disappeared since it was resolved") from None
        try:
            st = os.fstat(fd)
            if st.st_size != entry.size or st.st_mtime_ns != entry.source["mtime_ns"]:
                raise FetchFailedError(f"{path} changed since it was resolved; prefetch again")
            end = offset + length
            while offset < end:
                block = await loop.run_in_executor(self.pool, os.pread, fd, min(READ_BLOCK, end - offset), offset)
                if not block:
                    raise TransientOriginError(f"{path} ended early at {offset}")
                offset += len(block)
                await sink([block])
        finally:
            os.close(fd)


def _walk(root: str) -> list[FileEntry]:
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise ModelNotFoundError(f"no such file or directory: {root}") from None
    except PermissionError:
        raise FetchFailedError(f"cannot read {root}: permission denied") from None
    if stat.S_ISREG(st.st_mode):
        return [_entry(os.path.basename(root), root, st)]
    files: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_failed):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            fst = os.stat(full)
            if not stat.S_ISREG(fst.st_mode):
                continue
            files.append(_entry(check_relative_path(os.path.relpath(full, root)), full, fst))
            if len(files) > MAX_FILES:
                raise FetchFailedError(f"{root} has more than {MAX_FILES} files")
    if not files:
        raise ModelNotFoundError(f"{root} contains no files")
    return files


def _walk_failed(exc: OSError) -> None:
    """os.walk skips what it cannot list unless told otherwise: a model must never be resolved short."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        raise ResourceError(
            f"the agent ran out of file descriptors listing {exc.filename}; raise its open-file limit"
        ) from None
    raise FetchFailedError(f"cannot list {exc.filename}: {exc.strerror}") from None


def _entry(rel: str, full: str, st: os.stat_result) -> FileEntry:
    source = {"path": os.path.abspath(full), "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    return FileEntry(path=rel, size=st.st_size, source=source)
