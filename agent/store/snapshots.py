"""Snapshot directories: a model revision as files in the Hugging Face layout, linked to blobs.

Frameworks that want a directory (``from_pretrained(path)``, vLLM ``--model PATH``)
get ``snapshots/<model key>/<revision>/`` under the cache root: every file of the
manifest at its path, as a *relative* symlink to its blob (``../../../blobs/<digest>``),
so the directory works wherever a pod mounts the cache. A snapshot is built in a
hidden temporary directory and renamed into place, so a reader never sees a
half-built one; two agents' requests racing to build it both end with the same
complete directory. The links carry no data: the blobs' read-only bytes are what
is read, and a blob evicted later leaves a dangling link until the next open
fetches it back under the same name. A revision fetched once with some files and
later with more (agent/selection.py) grows its snapshot: the new links are added
in place, each one atomically (a reader sees a file whole or not at all, and no
file ever goes away).

Paths come from manifests, whose file paths were checked as relative, ``..``-free
paths when they were resolved (agent/refs.check_relative_path).

No link is followed on the way (agent/store/safeio.py): ``snapshots/<key>`` is
made without following a link below the root, a link found where the snapshot
directory belongs is replaced by the real snapshot (it was not made here and
would hand pods someone else's files), and every directory is 0755 whatever
the umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable

from agent.store.safeio import DIR_MODE, ensure_dir

SNAPSHOTS = "snapshots"
_TMP_PREFIX = ".building-"


def link_snapshot(root: str, key: str, revision: str, files: Iterable[tuple[str, str]]) -> str:
    """Make (or find) the snapshot of ``files`` ((path, blob digest) pairs); return its path under ``root``."""
    rel = os.path.join(SNAPSHOTS, key, revision)
    final = os.path.join(root, rel)
    parent = ensure_dir(root, SNAPSHOTS, key)
    files = list(files)
    if _is_real_dir(final):
        _grow(final, files)
        return rel
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{revision}-", dir=parent)
    try:
        for path, digest in files:
            link = os.path.join(tmp, path)
            os.makedirs(os.path.dirname(link), exist_ok=True)  # inside our own fresh 0700 directory
            up = [".."] * (path.count("/") + 3)  # out of <subdirs>/, <revision>/, <key>/, snapshots/
            os.symlink(os.path.join(*up, "blobs", digest), link)
        for directory, _, _ in os.walk(tmp):  # mkdtemp makes 0700, makedirs takes the umask; pods read as anyone
            os.chmod(directory, DIR_MODE)
        if os.path.islink(final):
            os.unlink(final)  # not ours: replaced by the real snapshot, never followed
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished the same snapshot first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel


def _grow(final: str, files: list[tuple[str, str]]) -> None:
    """Add the links of ``files`` that the existing snapshot ``final`` lacks (a later, wider selection).

    Each link is made under a temporary name beside its place and renamed there. A directory on the way
    that is not a real one (a link: not made here) stops the growth with an error rather than being followed.
    """
    for path, digest in files:
        link = os.path.join(final, path)
        if os.path.lexists(link):
            continue
        parts = path.split("/")[:-1]
        where = final
        for part in parts:
            where = os.path.join(where, part)
            try:
                os.mkdir(where, DIR_MODE)
                os.chmod(where, DIR_MODE)  # mkdir takes the umask; pods read as anyone
            except FileExistsError:
                pass
            if not _is_real_dir(where):
                raise OSError(errno.ENOTDIR, "not a real directory in a snapshot", where)
        up = [".."] * (path.count("/") + 3)
        tmp = os.path.join(os.path.dirname(link), f"{_TMP_PREFIX}{os.getpid()}-{os.path.basename(link)}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.join(*up, "blobs", digest), tmp)
        os.rename(tmp, link)


def _is_real_dir(path: str) -> bool:
    """A directory at ``path`` itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_snapshots(root: str, key: str) -> None:
    """Drop every snapshot of one model (it was evicted)."""
    shutil.rmtree(os.path.join(root, SNAPSHOTS, key), ignore_errors=True)


def sweep_unfinished(root: str) -> int:
    """Remove snapshot directories a crash left half-built; returns how many."""
    removed = 0
    base = os.path.join(root, SNAPSHOTS)
    if not os.path.isdir(base):
        return 0
    for model in os.scandir(base):
        if not model.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(model.path):
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed
