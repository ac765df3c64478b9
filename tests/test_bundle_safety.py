"""Bundles never write or link outside their install directory (the probe's findings, one test each).

Each case builds a hostile bundle by hand (stdlib ``tarfile``, plus raw header
bytes for the old GNU sparse type ``tarfile`` cannot write), installs it next to
a sibling ``outside`` directory, and checks that the install is refused with
:class:`UnsafeBundleError` naming the member in one line, and that nothing outside
the install directory was created, modified or linked to. Valid shapes (links
that stay below themselves, ordinary merges) still install.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from client.bundles import Bundle, build_bundle
from client.errors import CapacityError, UnsafeBundleError

Member = tuple[tarfile.TarInfo, bytes | None]
GIB8 = 8 * 1024**3


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x",
           pax: dict[str, str] | None = None) -> Member:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    if pax:
        info.pax_headers = dict(pax)
    return info, data if kind == tarfile.REGTYPE else None


def tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def old_gnu_sparse(name: str, realsize: int, stored: bytes = b"") -> bytes:
    """A one-member tar whose member is an old-GNU sparse file (type ``S``) declaring ``realsize`` bytes.

    ``tarfile`` reads this type but cannot write it, so the header is patched by
    hand: type byte, one sparse struct (offset 0, ``len(stored)`` bytes), the real
    size, and the checksum.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(stored), 0o644
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = b"%011o\0" % 0
    header[398:410] = b"%011o\0" % len(stored)
    header[482] = 0
    header[483:495] = b"%011o\0" % realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    pad = (-len(stored)) % 512
    return bytes(header) + stored + b"\0" * pad + b"\0" * 1024


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str | None]]:
    """Path -> (mode, size, mtime_ns, nlink, link target) of everything under ``root``, never following links."""
    out: dict[str, tuple[int, int, int, int, str | None]] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (
                st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, os.readlink(p) if os.path.islink(p) else None
            )
    return out


def links_resolve_inside(target: Path, preexisting: frozenset[str] = frozenset()) -> None:
    """Every symlink under ``target`` (but the ``preexisting`` ones, relative paths) resolves inside it."""
    real = os.path.realpath(target)
    for d, dirs, files in os.walk(target):
        for n in dirs + files:
            p = os.path.join(d, n)
            if os.path.islink(p) and os.path.relpath(p, target) not in preexisting:
                r = os.path.realpath(p)
                assert r == real or r.startswith(real + os.sep), f"{p} -> {os.readlink(p)} resolves to {r}"


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(install target, sibling outside directory with a file in it)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep")
    return tmp_path / "target", outside


def refused(raw: bytes, target: Path, outside: Path, match: str) -> UnsafeBundleError:
    before = snapshot(outside)
    preexisting = frozenset(p for p, v in snapshot(target).items() if v[4] is not None) if target.exists() else None
    with pytest.raises(UnsafeBundleError, match=match) as err, Bundle(io.BytesIO(raw), where="probe") as b:
        b.install("t", str(target))
    assert "\n" not in str(err.value) and err.value.member is not None and err.value.member in str(err.value)
    assert snapshot(outside) == before
    if target.exists():
        links_resolve_inside(target, preexisting or frozenset())
        assert [p for p in target.iterdir() if p.name.startswith(".warmstart-install")] == []
    return err.value


# ---------------------------------------------------------------------- 1. symlink chains


def test_symlink_chain_through_a_link_to_dotdot_is_refused(box: tuple[Path, Path]) -> None:
    target, outside = box
    raw = tar([member("t", tarfile.DIRTYPE), member("t/a", tarfile.DIRTYPE),
               member("t/a/b", tarfile.SYMTYPE, ".."), member("t/c", tarfile.SYMTYPE, "a/b/../outside")])  # fmt: skip
    refused(raw, target, outside, r"'t/a/b' -> '\.\.'")
    assert not (target / "c").is_symlink()


@pytest.mark.parametrize("link", ["..", "x/..", "../t/a", "a/../b", "./../outside"])
def test_any_dotdot_in_a_link_target_is_refused(box: tuple[Path, Path], link: str) -> None:
    target, outside = box
    refused(tar([member("t", tarfile.DIRTYPE), member("t/a/l", tarfile.SYMTYPE, link)]), target, outside, "'\\.\\.'")


@pytest.mark.parametrize("link", ["/etc", "//etc", "/"])
def test_absolute_link_targets_are_refused(box: tuple[Path, Path], link: str) -> None:
    target, outside = box
    refused(tar([member("t", tarfile.DIRTYPE), member("t/l", tarfile.SYMTYPE, link)]), target, outside, "absolute")


def test_link_through_a_symlink_already_in_the_target_is_refused(box: tuple[Path, Path]) -> None:
    target, outside = box
    target.mkdir()
    (target / "sub").symlink_to(outside)
    raw = tar([member("t", tarfile.DIRTYPE), member("t/x", tarfile.SYMTYPE, "sub/secret.txt")])
    refused(raw, target, outside, "resolves outside")
    assert not (target / "x").exists()


def test_links_that_stay_below_themselves_still_install(tmp_path: Path) -> None:
    raw = tar([member("t", tarfile.DIRTYPE), member("t/lib/k.so", data=b"ELF"),
               member("t/cur", tarfile.SYMTYPE, "lib/k.so"), member("t/dir", tarfile.SYMTYPE, "./lib"),
               member("t/chain", tarfile.SYMTYPE, "dir/k.so")])  # fmt: skip
    with Bundle(io.BytesIO(raw)) as b:
        assert b.install("t", str(tmp_path / "target")) == 4
    assert (tmp_path / "target" / "chain").read_bytes() == b"ELF"
    links_resolve_inside(tmp_path / "target")


# ---------------------------------------------------------------------- 2. sparse members and the byte cap

SPARSE = {
    "pax-0.0": tar([member("t", tarfile.DIRTYPE),
                    member("t/big", data=b"", pax={"GNU.sparse.size": str(GIB8), "GNU.sparse.numblocks": "0"})]),
    "pax-0.1": tar([member("t", tarfile.DIRTYPE),
                    member("t/big", data=b"", pax={"GNU.sparse.map": "0,0", "GNU.sparse.size": str(GIB8)})]),
    "pax-1.0": tar([member("t", tarfile.DIRTYPE),
                    member("t/big", data=b"1\n0\n0\n".ljust(512, b"\0"),
                           pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(GIB8)})]),
    "old-gnu": old_gnu_sparse("t/big", GIB8),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SPARSE))
def test_sparse_members_are_refused_before_a_byte_is_written(box: tuple[Path, Path], case: str) -> None:
    target, outside = box
    raw = SPARSE[case]
    assert len(raw) <= 10 * 1024
    refused(raw, target, outside, "sparse")
    assert sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) == 0 if target.exists() else True


def test_a_member_declaring_more_bytes_than_the_bundle_holds_is_refused(box: tuple[Path, Path]) -> None:
    target, _ = box
    raw = tar([member("t", tarfile.DIRTYPE), member("t/a", data=b"y" * 4096)])
    cut = raw.index(b"y" * 4096) + 100  # the data stops 100 bytes in; the header still says 4096
    with (
        pytest.raises(UnsafeBundleError, match=r"not a readable bundle|declares 4096 bytes"),
        Bundle(io.BytesIO(raw[:cut]), where="probe") as b,
    ):
        b.install("t", str(target))
    assert not target.exists()


def test_a_full_disk_is_a_capacity_error_and_leaves_nothing_half_installed(tmp_path: Path) -> None:
    """On a 256 KiB tmpfs (own mount namespace), a 1 MiB bundle fails typed, and the temp dir is gone."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) missing")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(1024 * 1024))
    with open(tmp_path / "b.tar", "wb") as f:
        build_bundle(f, {"t": str(src)})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", {str(mnt)!r}], check=True)
        from client.bundles import Bundle
        from client.errors import CapacityError
        try:
            with open({str(tmp_path / "b.tar")!r}, "rb") as f, Bundle(f) as b:
                b.install("t", {str(mnt / "target")!r})
        except CapacityError as exc:
            assert "\\n" not in str(exc) and "target" in str(exc), exc
            print("CAPACITY", exc)
        print("LEFT", sorted(os.listdir({str(mnt / "target")!r})))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(["unshare", "-rm", sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         check=False, env=env)  # fmt: skip
    if out.returncode != 0 and "mount" in out.stderr and "CapacityError" not in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr
    assert "CAPACITY" in out.stdout and "LEFT []" in out.stdout, out.stdout
    assert issubclass(CapacityError, OSError)  # ``except OSError`` around install still catches it


# ---------------------------------------------------------------------- 3. member order


ORDER = {
    "file-then-link-over-its-dir": [member("t/d/f"), member("t/d", tarfile.SYMTYPE, "x")],
    "file-then-file-over-its-dir": [member("t/d/f"), member("t/d")],
    "file-then-hardlink-over-its-dir": [member("t/d/f"), member("t/d", tarfile.LNKTYPE, "t/d/f")],
    "deep-file-then-link-over-its-grandparent": [member("t/d/e/f"), member("t/d", tarfile.SYMTYPE, ".")],
    "link-then-file-below-it": [member("t/d", tarfile.SYMTYPE, "x"), member("t/d/f")],
    "file-then-link-same-path": [member("t/f"), member("t/f", tarfile.SYMTYPE, "g")],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ORDER))
def test_member_order_conflicts_are_typed_one_line_errors(box: tuple[Path, Path], case: str) -> None:
    target, outside = box
    err = refused(tar([member("t", tarfile.DIRTYPE), *ORDER[case]]), target, outside, "t/d|t/f")
    assert not isinstance(err, FileExistsError)
