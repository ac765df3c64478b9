"""Artifact bundles: directory trees and small files in one plain tar, built and installed safely.

A bundle is an uncompressed tar (stdlib ``tarfile``; compile caches are
mostly already-compact ``.so``/``.py``/pickles, and gzip would cost more CPU
than the bytes it saves on a node-local or cluster link)::

    warmstart-bundle.json     {"format": 1, "trees": [...], "files": [...]}: what is inside
    <tree>/<relative path>    one directory tree per name ("inductor", "triton", "dir", ...)
    <file>                    a named blob of bytes ("mega.bin": save_cache_artifacts())

Installing never trusts the archive. Every member is checked before a byte is
written: no absolute paths, no ``..``, no duplicates, no member below a
symlink or other non-directory member, no non-directory member where an
earlier member needs a directory, no devices/FIFOs, no sparse members, no
member whose data runs past the end of the bundle, symlinks only relative
with no ``..`` component, hard links only to an earlier regular member of the
same tree. The first offending member raises :class:`UnsafeBundleError`
naming it, in one line. The tree is then extracted into a fresh temporary
directory *inside* the target (files opened with ``O_EXCL|O_NOFOLLOW``, modes
stripped to rwx bits, at most the bundle's own size in bytes written in all)
and moved into place file by file with ``rename``: a process reading the
target sees each file old or new, never half, and nothing outside the target
is touched or linked to (each destination's parent, and each symlink's
target, is checked with ``realpath``, so a symlink already in the target
cannot redirect a write or a link). A full disk is a :class:`CapacityError`
and leaves no partial file. Nothing is executed; installing only writes
files.

Why symlink targets may not contain ``..`` at all (rather than judging
``..`` on the target's text): the kernel resolves a link target component by
component, following links as it goes, so with ``a/b -> ..`` the text
``a/b/../outside`` means the parent of the *target*, not ``a/outside``. With
no ``..`` (and no absolute path) every link can only point at or below its own
directory, whatever the other links are, so no chain can climb out. Nothing
valid needs more: :func:`build_bundle` ships no symlinks at all (Inductor,
Triton and vLLM cache directories hold regular files and directories).

Stdlib only (the client's rule).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

from client.errors import CapacityError, UnsafeBundleError

META_NAME = "warmstart-bundle.json"
FORMAT = 1
COPY_CHUNK = 1024 * 1024
MAX_SMALL_FILE = 1024 * 1024 * 1024
# Cache-directory entries that are process-local state, never worth shipping.
SKIP_DIRS = frozenset({"locks"})
SKIP_SUFFIXES = (".lock", ".tmp")


def iter_tree(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of the directories and regular files under ``root``, sorted, skipping lock files.

    Symlinks and special files in a cache directory are not shipped (the
    caches this is for contain none); files that vanish mid-walk are skipped.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if rel_dir == "":
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name.endswith(SKIP_SUFFIXES):
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                yield rel, st


def tree_signature(root: str) -> dict[str, int]:
    """{relative file path: size}: tells whether a cache directory gained anything.

    Not mtimes: a cache hit may rewrite a file it already had with the same bytes.
    """
    if not os.path.isdir(root):
        return {}
    return {rel: st.st_size for rel, st in iter_tree(root) if stat.S_ISREG(st.st_mode)}


def build_bundle(out: IO[bytes], trees: Mapping[str, str], files: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """Write a bundle of ``trees`` ({name: directory}) and ``files`` ({name: bytes}) to ``out``; return its table."""
    files = dict(files or {})
    for name in list(trees) + list(files):
        if not name or "/" in name or name in (".", "..", META_NAME):
            raise ValueError(f"bad bundle entry name {name!r}")
    table: dict[str, Any] = {"format": FORMAT, "trees": sorted(trees), "files": sorted(files)}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_CHUNK) as tar:
        _add_bytes(tar, META_NAME, json.dumps(table, sort_keys=True).encode())
        for name in sorted(files):
            _add_bytes(tar, name, files[name])
        for name in sorted(trees):
            root = trees[name]
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for rel, st in iter_tree(root):
                info = tarfile.TarInfo(f"{name}/{rel}")
                info.mtime = int(st.st_mtime)
                info.mode = stat.S_IMODE(st.st_mode) & 0o755
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    continue
                try:
                    f = open(os.path.join(root, rel), "rb")  # noqa: SIM115 - closed by `with f` below; only the open may vanish
                except FileNotFoundError:
                    continue
                with f:
                    info.size = os.fstat(f.fileno()).st_size
                    tar.addfile(info, f)
    return table


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


class Bundle:
    """A bundle opened for reading; every member is checked when it opens (see the module doc)."""

    def __init__(self, fileobj: IO[bytes], where: str = "bundle") -> None:
        self.where = where
        #: The bundle's length in bytes: no member's data may run past it, and an
        #: install writes at most this many bytes (each one read from the bundle).
        self.size = _stream_size(fileobj)
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 - the Bundle owns it; close() closes it
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise UnsafeBundleError(f"{where}: not a readable bundle ({exc})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        self.trees: dict[str, list[tarfile.TarInfo]] = {}
        links: set[str] = set()
        parents: set[str] = set()  # every path some member needs to be a directory
        for m in members:
            name = _check_member(m, where, links, self.members, parents, self.size)
            self.members[name] = m
            parts = name.split("/")
            parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
            if "/" in name:
                tree, rel = name.split("/", 1)
                self.trees.setdefault(tree, []).append(m)
                if m.issym():
                    _check_symlink(m, tree, rel, where)
                    links.add(name)
                elif m.islnk():
                    _check_hardlink(m, tree, where, self.members)
            elif m.isdir():
                self.trees.setdefault(name, [])
            elif not m.isreg():
                raise UnsafeBundleError(f"{where}: top-level member {name!r} is not a file", name)
        meta = self.read(META_NAME) if META_NAME in self.members else None
        try:
            self.table = json.loads(meta) if meta is not None else {}
        except ValueError:
            raise UnsafeBundleError(f"{where}: {META_NAME} is not JSON", META_NAME) from None

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str) -> bytes | None:
        """The bytes of top-level file ``name``, or None when the bundle has none."""
        m = self.members.get(name)
        if m is None or not m.isreg() or "/" in name:
            return None
        if m.size > MAX_SMALL_FILE:
            raise UnsafeBundleError(f"{self.where}: {name!r} is {m.size} bytes, more than files are allowed", name)
        f = self._tar.extractfile(m)
        assert f is not None
        return f.read()

    def install(self, tree: str, target: str) -> int:
        """Merge tree ``tree`` into directory ``target`` (created); returns how many files were written."""
        members = self.trees.get(tree)
        if members is None:
            raise KeyError(tree)
        try:
            os.makedirs(target, exist_ok=True)
            real_target = os.path.realpath(target)
            tmp = tempfile.mkdtemp(prefix=".warmstart-install-", dir=real_target)
        except OSError as exc:
            raise _no_space(exc, self.where, target, tree) from None
        try:
            budget = self.size
            for m in members:
                budget -= self._extract(m, m.name.split("/", 1)[1], tmp, budget)
            return _move_tree(tmp, real_target, self.where)
        except (tarfile.TarError, EOFError) as exc:
            raise UnsafeBundleError(f"{self.where}: tree {tree!r} is unreadable ({exc})", tree) from None
        except OSError as exc:
            raise _no_space(exc, self.where, target, tree) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _extract(self, m: tarfile.TarInfo, rel: str, tmp: str, budget: int) -> int:
        """Write member ``m`` at ``rel`` under ``tmp``; returns the bytes written, never more than ``budget``."""
        path = os.path.join(tmp, *rel.split("/"))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if m.isdir():
            os.makedirs(path, exist_ok=True)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            os.link(os.path.join(tmp, *m.linkname.split("/", 1)[1].split("/")), path, follow_symlinks=False)
        else:
            src = self._tar.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         (m.mode & 0o755) | 0o600)
            written = 0
            with os.fdopen(fd, "wb") as dst, src:
                while chunk := src.read(COPY_CHUNK):
                    written += len(chunk)
                    if written > budget:
                        raise UnsafeBundleError(
                            f"{self.where}: member {m.name!r} expands past the bundle's own {self.size} bytes", m.name
                        )
                    dst.write(chunk)
            return written
        return 0


def _stream_size(fileobj: IO[bytes]) -> int:
    """The length of the (seekable) bundle stream, from its descriptor or by seeking to its end."""
    try:
        return os.fstat(fileobj.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    try:
        here = fileobj.tell()
        end = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(here)
        return end
    except (AttributeError, OSError, ValueError):
        return 0  # unseekable: tarfile refuses it anyway


def _no_space(exc: OSError, where: str, target: str, tree: str) -> OSError:
    """A full disk or quota as a one-line CapacityError; any other OSError unchanged.

    Raised while extracting (the usual case) nothing is in the target yet; the
    caller's ``finally`` removes the temporary directory either way, so no
    partial file is left.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(
            f"{where}: no space left on the filesystem of {target} to install tree {tree!r}; free some and pull again"
        )
    return exc


def _check_member(
    m: tarfile.TarInfo,
    where: str,
    links: set[str],
    seen: Mapping[str, tarfile.TarInfo],
    parents: set[str],
    size: int,
) -> str:
    """The member's normalised name, or UnsafeBundleError naming it.

    ``parents`` are the paths earlier members need as directories; ``size`` is
    the bundle's length (a member's data must lie inside it).
    """
    raw = m.name
    if not raw or "\x00" in raw or "\\" in raw:
        raise UnsafeBundleError(f"{where}: member {raw!r} has a bad name", raw)
    if raw.startswith("/") or posixpath.isabs(raw):
        raise UnsafeBundleError(f"{where}: member {raw!r} is an absolute path", raw)
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeBundleError(f"{where}: member {raw!r} climbs out with '..'", raw)
    if not parts:
        raise UnsafeBundleError(f"{where}: member {raw!r} names no path", raw)
    name = "/".join(parts)
    if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
        # A sparse member's holes expand to zeros: a few KiB of bundle could fill the disk.
        raise UnsafeBundleError(f"{where}: member {raw!r} is a sparse file ({m.size} bytes declared)", raw)
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeBundleError(f"{where}: member {raw!r} is a device, FIFO or other special file", raw)
    if m.isreg() and m.offset_data + m.size > size:
        raise UnsafeBundleError(f"{where}: member {raw!r} declares {m.size} bytes the bundle does not hold", raw)
    if name in seen and not (m.isdir() and seen[name].isdir()):
        raise UnsafeBundleError(f"{where}: member {raw!r} appears twice", raw)
    if name in parents and not m.isdir():
        raise UnsafeBundleError(f"{where}: member {raw!r} is not a directory but earlier members lie below it", raw)
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise UnsafeBundleError(f"{where}: member {raw!r} lies below a symlink member", raw)
        parent = seen.get("/".join(parts[:i]))
        if parent is not None and not parent.isdir():
            raise UnsafeBundleError(f"{where}: member {raw!r} lies below a non-directory member", raw)
    m.name = name
    return name


def _check_symlink(m: tarfile.TarInfo, tree: str, rel: str, where: str) -> None:
    """Refuse absolute, empty and ``..``-bearing link targets (why not judge ``..`` by text: the module doc)."""
    target = m.linkname
    if not target or target.startswith("/") or posixpath.isabs(target) or "\x00" in target:
        raise UnsafeBundleError(f"{where}: symlink {m.name!r} -> {target!r} is absolute or empty", m.name)
    if ".." in target.split("/"):
        raise UnsafeBundleError(
            f"{where}: symlink {m.name!r} -> {target!r} has a '..' component (links may only point below themselves)",
            m.name,
        )


def _check_hardlink(
    m: tarfile.TarInfo, tree: str, where: str, seen: Mapping[str, tarfile.TarInfo]
) -> None:
    target = posixpath.normpath(m.linkname) if m.linkname else ""
    other = seen.get(target)
    if other is None or not other.isreg() or not target.startswith(f"{tree}/"):
        raise UnsafeBundleError(
            f"{where}: hard link {m.name!r} -> {m.linkname!r} is not to an earlier file of its tree", m.name
        )
    m.linkname = target


def _move_tree(src_root: str, dst_root: str, where: str) -> int:
    """Rename every entry under ``src_root`` into ``dst_root`` (same filesystem); returns files moved."""
    moved = 0
    for dirpath, dirnames, filenames in os.walk(src_root):
        rel_dir = os.path.relpath(dirpath, src_root)
        dst_dir = dst_root if rel_dir == "." else os.path.join(dst_root, rel_dir)
        for d in sorted(dirnames):
            src = os.path.join(dirpath, d)
            if os.path.islink(src):  # a symlink member: os.walk lists it with the directories
                filenames.append(d)
                continue
            dst = os.path.join(dst_dir, d)
            _check_inside(dst, dst_root, where)
            try:
                os.mkdir(dst, 0o755)
            except FileExistsError:
                if os.path.islink(dst) or not os.path.isdir(dst):
                    raise UnsafeBundleError(
                        f"{where}: {dst} exists and is not a directory; not installing over it", d
                    ) from None
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for f in sorted(filenames):
            dst = os.path.join(dst_dir, f)
            _check_inside(dst, dst_root, where)
            if os.path.islink(os.path.join(dirpath, f)):
                _check_link_inside(os.path.join(dirpath, f), dst, dst_root, where)
            if os.path.isdir(dst) and not os.path.islink(dst):
                raise UnsafeBundleError(f"{where}: {dst} is a directory; not replacing it with a file", f)
            try:
                os.replace(os.path.join(dirpath, f), dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                raise UnsafeBundleError(f"{where}: {dst} is on another filesystem than its target", f) from None
            moved += 1
    return moved


def _check_link_inside(src: str, dst: str, root: str, where: str) -> None:
    """Refuse a symlink that, installed at ``dst``, would resolve outside ``root``.

    Its target has no ``..`` (checked when the bundle opened), so only a
    symlink already in the target can lead it out; ``realpath`` follows those.
    Parts not there yet are bundle members, which stay inside by the same rule.
    """
    resolved = os.path.realpath(os.path.join(os.path.dirname(dst), os.readlink(src)))
    if resolved != root and not resolved.startswith(root + os.sep):
        rel = os.path.relpath(dst, root)
        raise UnsafeBundleError(f"{where}: symlink {rel!r} resolves outside {root} (through a symlink there)", rel)


def _check_inside(path: str, root: str, where: str) -> None:
    """Refuse a destination whose parent resolves outside ``root`` (a symlink already in the target)."""
    parent = os.path.realpath(os.path.dirname(path))
    if parent != root and not parent.startswith(root + os.sep):
        raise UnsafeBundleError(f"{where}: {path} would be written outside {root} (through a symlink)", path)
