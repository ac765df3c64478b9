"""How the agent creates files and directories under its cache root: no link followed, modes explicit.

Why: the cache is shared with inference pods (a hostPath) and lives on a node
where other local users and containers exist. Anything the agent writes through
a name it did not just create itself could be a planted link that sends the
bytes (and a later ``chmod 0444`` and a publish into ``blobs/``) to a file
outside the cache. And modes taken from the umask make the whole tree
world-writable under umask 000, which lets anyone plant such links. So:

- directories below the root are walked one component at a time with
  ``O_NOFOLLOW | O_DIRECTORY``; a component that is a symlink (or not a
  directory) is refused with :class:`UnsafePathError`, never followed. The root
  itself may be a link an operator made (a hostPath pointing at the NVMe);
- files are opened with ``O_NOFOLLOW`` or created with ``O_EXCL`` under a fresh
  unguessable name and renamed over their final name (a rename replaces a link,
  it does not write through it);
- every directory the agent creates is DIR_MODE, every state file FILE_MODE,
  partial files PARTIAL_MODE and blobs BLOB_MODE, set with ``fchmod`` so the
  umask cannot widen or narrow them;
- a failed atomic write removes its temporary file before the error goes up.

Everything here blocks: call it from the store's I/O pool.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat

from client.errors import WarmstartError

DIR_MODE = 0o755  # pods may read the cache as another user
FILE_MODE = 0o644  # state files: records, manifests, meta, sources, synced-at
PARTIAL_MODE = 0o600  # a file being filled: nobody else reads it until it is a blob
BLOB_MODE = 0o444  # a verified blob: read-only, for everyone

# The temporary name of an atomic write: "<final name>.tmp<pid>-<hex>" (older versions: "-<thread id>").
TMP_NAME = re.compile(r"\.tmp\d+-[0-9a-f]+$")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(WarmstartError, OSError):
    """A name under the cache root is not what the agent made there (a symlink, or not a directory).

    The agent never follows it; the message names the path so an operator can remove it.
    """


def _refuse(path: str, what: str) -> UnsafePathError:
    return UnsafePathError(
        f"{path} is {what}, not a directory this agent made; it follows no link it did not make: remove it"
    )


def ensure_dir(root: str, *parts: str) -> str:
    """Make ``root/parts...`` (each missing level DIR_MODE), following no symlink below ``root``; return its path.

    ``parts`` may hold slashes. The root is created too when missing (each
    missing ancestor DIR_MODE), and followed if it is a link. An existing
    directory that group or others may write loses those bits (an older
    version under umask 000 made them 0777).
    """
    make_root(root)
    fd = os.open(root, _DIR_FLAGS)
    try:
        path = root
        for name in (n for p in parts for n in p.split("/") if n):
            if name in (".", ".."):
                raise UnsafePathError(f"{os.path.join(path, name)}: a path under the cache root may not hold {name!r}")
            path = os.path.join(path, name)
            created = True
            try:
                os.mkdir(name, DIR_MODE, dir_fd=fd)
            except FileExistsError:
                created = False
            try:
                sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    kind = "a symlink" if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode) else "not a directory"
                    raise _refuse(path, kind) from None
                raise
            os.close(fd)
            fd = sub
            _fix_dir_mode(fd, created)
    finally:
        os.close(fd)
    return os.path.join(root, *parts)


def make_root(root: str) -> None:
    """Create the cache root and its missing ancestors with DIR_MODE (os.makedirs would take the umask's)."""
    missing = []
    path = os.path.abspath(root)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)


def _fix_dir_mode(fd: int, created: bool) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if created and mode != DIR_MODE:
        os.fchmod(fd, DIR_MODE)
    elif mode & 0o022:
        os.fchmod(fd, mode & ~0o022)


def write_atomic(path: str, body: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``body`` so a reader sees the old or the new file, never half, never through a link.

    The bytes go to a fresh ``O_EXCL`` name beside it (``TMP_NAME``), which is
    renamed over ``path``: if ``path`` is a symlink, the link is replaced, its
    target untouched. On any failure (a full disk) the temporary file is removed.
    No fsync: the store's background sync makes state durable (Store.sync).
    """
    directory, name = os.path.split(path)
    dfd = os.open(directory or ".", _DIR_FLAGS)
    try:
        tmp = f"{name}.tmp{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(tmp, _CREATE_FLAGS, mode, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, mode)
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def create_exclusive(path: str, mode: int, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path`` (EEXIST if any name is there, a link included), mode set whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def same_file(path: str, fd: int) -> bool:
    """Whether ``path`` names (without following a link) the regular file open as ``fd``.

    Checked before a partial file is renamed into ``blobs/``: the rename moves
    the name, so a name swapped for a link since the file was opened would
    publish the link.
    """
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return stat.S_ISREG(named.st_mode) and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def sweep_tmp(directory: str) -> int:
    """Remove temporary files of atomic writes a kill left in ``directory`` (not recursive); returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if TMP_NAME.search(entry.name) and not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
