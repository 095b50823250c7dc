from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from castore.builders.unpack import unpack_archive
from castore.errors import CastoreError, UnsafeArchive
from castore.hashing import hash_bytes
from tests.conftest import REPO, castore, snapshot
from tests.helpers import NOT_ROOT, returns_within, tarball, tiny_tmpfs


def _write(tmp_path: Path, data: bytes, name: str = "a.tar") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return p


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_formats(tmp_path: Path, mode: str) -> None:
    data = tarball([("./etc", "dir", None), ("./etc/a", "file", b"A"), ("./etc/b", "hard", "etc/a"),
                    ("./bin/sh", "sym", "busybox")], mode)
    res = unpack_archive(_write(tmp_path, data), tmp_path / "scratch")
    types = {e.path: e.type for e in res.tree}
    assert types == {"bin": "dir", "bin/sh": "symlink", "etc": "dir", "etc/a": "file", "etc/b": "hardlink"}
    assert len(res.new_blobs) == 1


def test_zstd_and_deb(tmp_path: Path) -> None:
    plain = tarball([("usr/x", "file", b"x" * 1000)], "w")
    zst = zstandard.ZstdCompressor().compress(plain)
    res = unpack_archive(_write(tmp_path, zst, "a.tar.zst"), tmp_path / "scratch")
    assert res.tree.get("usr/x") is not None
    # a .deb is an ar archive whose data.tar.* member holds the files
    def member(name: str, body: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        return head + body + (b"\n" if len(body) % 2 else b"")
    deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.gz", b"junk") + \
        member("data.tar.zst", zst)
    res = unpack_archive(_write(tmp_path, deb, "p.deb"), tmp_path / "scratch")
    assert res.tree.get("usr/x") is not None


@pytest.mark.parametrize("members, message", [
    ([("../evil", "file", b"x")], "climbs out"),
    ([("a/../../evil", "file", b"x")], "climbs out"),
    ([("/etc/passwd", "file", b"x")], "absolute path"),
    ([("link", "sym", "../../../etc")], "points outside"),
    ([("d/link", "sym", "../../etc")], "points outside"),
    ([("link", "sym", "/etc"), ("link/passwd", "file", b"x")], "beneath 'link'"),
    ([("h", "hard", "/etc/shadow")], "absolute target"),
    ([("h", "hard", "nothing-here")], "does not name an earlier file"),
])
def test_hostile_entries_are_refused(tmp_path: Path, members: list, message: str) -> None:
    with pytest.raises(UnsafeArchive, match=message):
        unpack_archive(_write(tmp_path, tarball(members)), tmp_path / "scratch")


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CastoreError, match=r"not a tar archive|corrupt"):
        unpack_archive(_write(tmp_path, b"\x1f\x8b garbage" * 10), tmp_path / "scratch")


def test_hostile_tarball_through_realize_adds_nothing(tmp_path: Path) -> None:
    """The CLI path: the error names the recipe line, and the store keeps only the fetched archive."""
    data = tarball([("ok", "file", b"fine"), ("../../escape", "file", b"evil")])
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(data)
    env = {"CASTORE_TEST_URL": f"file://{archive}", "CASTORE_TEST_SHA256": hashlib.sha256(data).hexdigest()}
    store = tmp_path / "store"
    proc = castore("realize", "tests/recipes/fetching.py:unpacked", store=store, env=env, check=False)
    assert proc.returncode == 1
    assert "fetching.py:15" in proc.stderr and "climbs out" in proc.stderr
    files, ids = snapshot(store)
    assert len(ids) == 1 and files == set(ids)  # just the archive itself
    assert castore("verify", store=store).returncode == 0
    assert list((store / "tmp").iterdir()) == []


def test_tar_with_symlink_dir_replaced(tmp_path: Path) -> None:
    # a later directory entry replacing a file is fine; contents stay inside the root
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a", "a/b"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    res = unpack_archive(_write(tmp_path, buf.getvalue()), tmp_path / "scratch")
    assert [e.path for e in res.tree] == ["a", "a/b"]


def _raw_tar(members: list[tuple[str, str, bytes | str]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar whose names may hold bytes that are not UTF-8 (given as surrogateescape'd str)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(value, bytes)
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            assert isinstance(value, str)
            info.type = tarfile.LNKTYPE if kind == "hard" else tarfile.SYMTYPE
            info.linkname = value
            tar.addfile(info)
    return buf.getvalue()


def _deb(data_tar: bytes) -> bytes:
    def member(name: str, body: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        return head + body + (b"\n" if len(body) % 2 else b"")
    return b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar", data_tar)


@pytest.mark.parametrize("data, shown", [
    (_raw_tar([("caf\udce9/x", "file", b"x")]), r"'caf\xe9/x' has a name"),
    (_raw_tar([("caf\udce9", "file", b"x")], tarfile.PAX_FORMAT), r"'caf\xe9' has a name"),
    (_raw_tar([("ok", "sym", "t\udcff")]), r"'ok' has a link target 't\xff'"),
    (_raw_tar([("a", "file", b"x"), ("b", "hard", "\udcff")]), r"'b' has a link target '\xff'"),
])
@pytest.mark.parametrize("wrap", ["tar", "deb"])
def test_names_that_are_not_utf8_are_refused(tmp_path: Path, data: bytes, shown: str, wrap: str) -> None:
    archive = _write(tmp_path, _deb(data) if wrap == "deb" else data, f"a.{wrap}")
    with pytest.raises(UnsafeArchive) as err:
        unpack_archive(archive, tmp_path / "scratch")
    assert err.value.message == f"a.{wrap}: archive entry {shown} that is not valid UTF-8"
    err.value.message.encode()  # printable as it is


def test_hard_link_to_itself_never_hangs(tmp_path: Path) -> None:
    # GNU tar stores a file named twice on its command line as a link to itself: nothing new
    data = _raw_tar([("h", "file", b"x"), ("./h", "hard", "h")])
    # whole; cut after the link's header (no end-of-archive blocks); cut inside the end blocks
    for cut in (len(data), 1536, 2048):
        with returns_within(10):
            tree = unpack_archive(_write(tmp_path, data[:cut]), tmp_path / "scratch").tree
        assert [(e.path, e.type) for e in tree] == [("h", "file")]
    with returns_within(10), pytest.raises(UnsafeArchive, match=r"hard link './h' -> 'h' names itself"):
        unpack_archive(_write(tmp_path, _raw_tar([("./h", "hard", "h")])), tmp_path / "scratch")
    # compressed and cut anywhere: refused, or a clear error, never a hang or a traceback
    gz = gzip.compress(data, mtime=0)
    for cut in range(len(gz) + 1):
        with returns_within(10), contextlib.suppress(CastoreError):
            unpack_archive(_write(tmp_path, gz[:cut]), tmp_path / "scratch")


def test_non_utf8_name_through_realize_is_one_error_line(tmp_path: Path) -> None:
    data = _raw_tar([("ok", "file", b"fine"), ("caf\udce9", "file", b"x")])
    archive = tmp_path / "latin1.tar"
    archive.write_bytes(data)
    env = {"CASTORE_TEST_URL": f"file://{archive}", "CASTORE_TEST_SHA256": hashlib.sha256(data).hexdigest()}
    proc = castore("realize", "tests/recipes/fetching.py:unpacked", store=tmp_path / "store", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "fetching.py:15" in proc.stderr and r"'caf\xe9' has a name that is not valid UTF-8" in proc.stderr


def test_a_file_added_again_leaves_its_hard_links_the_old_content(tmp_path: Path) -> None:
    """As tar -x: the second `a` replaces the name, while `b` and `c` keep the inode they link to."""
    data = _raw_tar([("a", "file", b"old"), ("b", "hard", "a"), ("c", "hard", "a"), ("a", "file", b"new"),
                     ("d", "hard", "a"), ("b", "file", b"b")])
    tree = unpack_archive(_write(tmp_path, data), tmp_path / "scratch").tree
    rows = {e.path: (e.type, e.blob or e.target) for e in tree}
    assert rows == {"a": ("file", hash_bytes(b"new")), "b": ("file", hash_bytes(b"b")),
                    "c": ("file", hash_bytes(b"old")), "d": ("hardlink", "a")}


def test_a_deb_member_of_negative_size_is_refused_not_looped_on(tmp_path: Path) -> None:
    head = f"{'debian-binary':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{-60:<10}`\n".encode()
    archive = _write(tmp_path, b"!<arch>\n" + head, "loop.deb")
    with returns_within(10), pytest.raises(CastoreError, match=r"loop.deb: corrupt .deb member header \(size -60\)"):
        unpack_archive(archive, tmp_path / "scratch")


def test_a_malformed_sparse_header_is_a_corrupt_archive(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x")
        info.size = 3
        info.pax_headers = {"GNU.sparse.size": "12abc"}
        tar.addfile(info, io.BytesIO(b"abc"))
    archive = _write(tmp_path, buf.getvalue())
    with pytest.raises(CastoreError, match=r"a.tar: corrupt archive: invalid literal for int"):
        unpack_archive(archive, tmp_path / "scratch")


def test_members_are_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """A 33 KiB .tar.zst of 384 MiB of zeros, and the member itself, pass through in pieces."""
    size = 384 << 20
    archive = tmp_path / "zeros.tar.zst"
    with open(archive, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z, \
            tarfile.open(fileobj=z, mode="w|") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, _Zeros(size))
    # RLIMIT_DATA bounds the heap and anonymous mappings, not the file pages a hash maps (which
    # ru_maxrss counted, 130-170 MiB from one run to the next): holding the member would fail
    code = ("import resource, sys; from pathlib import Path; from castore.builders.unpack import unpack_archive; "
            "resource.setrlimit(resource.RLIMIT_DATA, (256 << 20, 256 << 20)); "
            "r = unpack_archive(Path(sys.argv[1]), Path(sys.argv[2])); print(r.tree.entries[0].size)")
    (tmp_path / "scratch").mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(archive), str(tmp_path / "scratch")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == size
    held = subprocess.run([sys.executable, "-c", "import resource; resource.setrlimit(resource.RLIMIT_DATA, "
                           f"(256 << 20, 256 << 20)); bytearray({size})"], capture_output=True, text=True)
    assert held.returncode == 1 and "MemoryError" in held.stderr  # what holding the member would do


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def test_an_entry_larger_than_the_free_space_is_refused_before_it_is_written(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:  # a sparse entry of 2**62
        info = tarfile.TarInfo("huge")  # bytes: a few of data, the rest a hole, in 10 KiB of archive
        info.size = 4
        info.pax_headers = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "huge",
                            "GNU.sparse.realsize": str(2**62), "GNU.sparse.map": "0,4"}
        tar.addfile(info, io.BytesIO(b"data"))
    archive = _write(tmp_path, buf.getvalue())
    with returns_within(10), pytest.raises(CastoreError, match=r"archive entry 'huge' is 4,611,686,018,427,387,904 "
                                                                r"bytes, more than the [0-9,]+ free"):
        unpack_archive(archive, tmp_path / "scratch")


@pytest.mark.parametrize("suffix, compress", [
    ("tar.bz2", lambda b: __import__("bz2").compress(b)), ("tar.gz", gzip.compress),
    ("tar.xz", lambda b: __import__("lzma").compress(b)), ("tar.zst", zstandard.ZstdCompressor().compress)])
def test_an_archive_cut_short_is_corrupt_not_empty(tmp_path: Path, suffix: str, compress: Any) -> None:
    whole = compress(tarball([("a", "file", os.urandom(100_000)), ("b", "file", b"y" * 100_000)], mode="w"))
    archive = _write(tmp_path, whole[: len(whole) // 2], f"a.{suffix}")
    with pytest.raises(CastoreError, match=rf"a\.{suffix}: corrupt archive: "):
        unpack_archive(archive, tmp_path / "scratch")


def test_a_bad_archive_is_named_as_the_recipe_names_it(tmp_path: Path) -> None:
    archive = tmp_path / "garbage.tar.gz"
    archive.write_bytes(b"garbage-garbage")
    sha = hashlib.sha256(b"garbage-garbage").hexdigest()
    env = {"CASTORE_TEST_URL": f"file://{archive}", "CASTORE_TEST_SHA256": sha}
    proc = castore("realize", "tests/recipes/fetching.py:unpacked", store=tmp_path / "s", env=env, check=False)
    assert proc.returncode == 1
    oid = hash_bytes(b"garbage-garbage")
    assert f"\ndownload ({oid[:12]}) is not a tar archive" in proc.stderr, proc.stderr  # the recipe's name for it


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_full_disk_while_unpacking_is_the_disk_s_error_not_the_archive_s(tmp_path: Path) -> None:
    archive = _write(tmp_path, tarball([(f"m{i}", "file", os.urandom(2 << 20)) for i in range(3)], mode="w"))
    with tiny_tmpfs(tmp_path / "small") as scratch, pytest.raises(OSError) as err:
        unpack_archive(archive, scratch)
    assert err.value.errno == errno.ENOSPC
