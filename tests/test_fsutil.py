"""File helpers: hole-preserving copies, materialized trees, atomic writes, early writeback, syncfs."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from castore import fsutil
from castore.errors import CastoreError
from castore.fsutil import (
    DirectWriter,
    atomic_write,
    copy_range,
    copy_sparse,
    materialize,
    read_regular,
    start_writeback,
    syncfs,
)
from castore.store import LocalStore
from tests.helpers import sparse_file


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs /dev/shm on another filesystem than /tmp")
def test_copies_cross_filesystems(tmp_path: Path) -> None:
    """copy_file_range refuses another filesystem (EXDEV): the copy goes through a buffer."""
    data = os.urandom(3 << 20)
    src = sparse_file(tmp_path / "src", {0: data}, 64 << 20)  # then a hole
    shm = Path("/dev/shm") / f"castore-test-{os.getpid()}"
    shm.mkdir()
    try:
        copy_sparse(src, shm / "copy")
        assert (shm / "copy").stat().st_size == 64 << 20 and (shm / "copy").stat().st_blocks * 512 < 8 << 20
        with open(shm / "copy", "rb") as f:
            assert f.read(3 << 20) == data
        with open(src, "rb") as fi, open(shm / "part", "wb") as fo:
            # from offset 1 MiB, asking past the data: what is there is copied, at `at`
            assert copy_range(fi.fileno(), fo.fileno(), 1 << 30, 1 << 20, 5) == (64 << 20) - (1 << 20)
        assert (shm / "part").read_bytes()[5:(2 << 20) + 5] == data[1 << 20:]
    finally:
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()


def test_copy_sparse_keeps_holes_and_bytes(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", {0: b"head", 64 << 20: b"middle"}, 200 << 20)  # ends in a hole
    copy_sparse(src, tmp_path / "dest")
    dest = tmp_path / "dest"
    assert dest.stat().st_size == src.stat().st_size
    assert dest.stat().st_blocks * 512 < 1 << 20  # two small extents, not 200 MiB
    with open(dest, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(64 << 20)
        assert f.read(6) == b"middle"
    with pytest.raises(FileExistsError):
        copy_sparse(src, dest)  # never over an existing file


def test_materialize_writes_modes_links_and_owners(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hi\n")
    os.chmod(src / "etc" / "motd", 0o600)
    os.symlink("motd", src / "etc" / "link")
    os.link(src / "etc" / "motd", src / "etc" / "hard")
    tree = store.read_tree(store.add_dir(src, all_root=True))
    out = tmp_path / "out"
    materialize(tree, out, store.blob_path)
    motd = out / "etc" / "motd"
    assert motd.read_text() == "hi\n" and stat.S_IMODE(motd.stat().st_mode) == 0o600
    assert os.readlink(out / "etc" / "link") == "motd"
    assert (out / "etc" / "hard").stat().st_ino == motd.stat().st_ino
    if os.geteuid() == 0:
        assert motd.stat().st_uid == 0
    with pytest.raises(FileExistsError):
        materialize(tree, out, store.blob_path)
    store.close()


def test_atomic_write_replaces_whole_and_reports_errors(tmp_path: Path) -> None:
    dest = tmp_path / "d" / "file"
    atomic_write(dest, b"one")
    atomic_write(dest, b"two", mode=0o444, fsync=False)
    assert dest.read_bytes() == b"two" and stat.S_IMODE(dest.stat().st_mode) == 0o444
    assert [p.name for p in dest.parent.iterdir()] == ["file"]  # no temporary left behind
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() != 0:
        with pytest.raises(CastoreError, match="cannot write"):
            atomic_write(tmp_path / "ro" / "x", b"x")


def test_writeback_and_syncfs_keep_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        start_writeback(fd)  # advisory: starts the disk writes, changes nothing visible
    finally:
        os.close(fd)
    syncfs(tmp_path)
    assert path.read_bytes() == data
    with pytest.raises(FileNotFoundError):
        syncfs(tmp_path / "missing")


def test_atomic_write_remakes_its_staging_and_crosses_filesystems(tmp_path: Path) -> None:
    """A staging directory removed under a writer is made again; one on another filesystem than
    the destination (a chunks/ mounted elsewhere) is passed over for the destination's own."""
    staging = tmp_path / "staging"
    atomic_write(tmp_path / "a" / "x", b"one", staging=staging)
    assert (tmp_path / "a" / "x").read_bytes() == b"one" and list(staging.iterdir()) == []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        atomic_write(tmp_path / "b" / "y", b"two", staging=Path(shm))
        assert (tmp_path / "b" / "y").read_bytes() == b"two" and os.listdir(shm) == []
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["y"]


def test_read_regular_reads_files_and_refuses_the_rest_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    assert read_regular(tmp_path / "f", 5) == b"12345"
    assert read_regular(tmp_path / "none", 5) is None and read_regular(tmp_path / "f" / "x", 5) is None
    with pytest.raises(OSError, match="more than such a file ever holds") as err:
        read_regular(tmp_path / "f", 4)
    assert err.value.errno == errno.EFBIG
    assert read_regular(tmp_path / "f", 3, whole=False) == b"123"  # its start
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: a plain open would wait for ever
    for odd in (tmp_path / "fifo", tmp_path):
        with pytest.raises(OSError, match="not a regular file") as err:
            read_regular(odd, 5)
        assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("direct", [True, False])
def test_direct_writer_writes_what_was_committed(tmp_path: Path, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not direct:  # a filesystem that refuses O_DIRECT: the same writes, through the page cache
        monkeypatch.setattr(fsutil, "_set_direct", lambda fd, on=True: False)
    data = os.urandom(5 * 8192 + 123)  # pieces of 8 KiB, and a last block that is not whole
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with DirectWriter(fd, piece=8192) as w:
            assert w.direct is direct
            w.write(data[:10000])  # across a piece's end
            space = w.space()
            space[:100] = data[10000:10100]
            w.commit(100)
            w.write(data[10100:])
            assert w.finish() == len(data)
            with pytest.raises(ValueError, match="after the end"):
                w.write(b"more")  # the last block went out padded: nothing may follow it
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data


def test_direct_writer_checkpoints_what_it_holds_through_the_plain_descriptor(tmp_path: Path) -> None:
    """A caller that waits (a pull on a stalled link) and is killed loses nothing it committed."""
    f = tmp_path / "partial"
    f.write_bytes(bytes(20000))
    fd, plain = os.open(f, os.O_WRONLY), os.open(f, os.O_WRONLY)
    try:
        with DirectWriter(fd, piece=8192, plain=plain, every=0.05) as w:
            w.write(b"a" * 10000)  # one piece sent, 1808 bytes held
            deadline = time.monotonic() + 5
            while f.read_bytes()[:10000] != b"a" * 10000 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert f.read_bytes() == b"a" * 10000 + bytes(10000)  # before finish(): the checkpoint
            w.write(b"b" * 100)
            assert w.finish() == 10100
    finally:
        os.close(fd)
        os.close(plain)
    assert f.read_bytes() == b"a" * 10000 + b"b" * 100


def test_direct_writer_raises_what_its_thread_met(tmp_path: Path) -> None:
    (tmp_path / "ro").write_bytes(b"")
    fd = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        with DirectWriter(fd, piece=4096) as w, pytest.raises(OSError) as err:
            w.write(bytes(3 * 4096))  # the first piece fails in the thread: the next write says so
            w.finish()
        assert err.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_direct_writer_drains_what_it_holds_and_leaves_the_rest(tmp_path: Path) -> None:
    """A pull that stops keeps what it verified: committed bytes go out exactly, nothing past them
    is touched (chunks that came before their turn wait there)."""
    f = tmp_path / "partial"
    f.write_bytes(b"\xff" * 20000)
    fd = os.open(f, os.O_WRONLY)
    try:
        with DirectWriter(fd, piece=8192) as w:
            w.write(b"a" * 10000)  # one piece sent, 1808 bytes held
            w.drain()
    finally:
        os.close(fd)
    assert f.read_bytes() == b"a" * 10000 + b"\xff" * 10000


def test_direct_writer_drains_what_it_holds_after_its_thread_failed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk failed one piece: the next commit says so, and what was committed after that
    piece is still written out by drain()."""
    f = tmp_path / "partial"
    f.write_bytes(b"\xff" * 40000)
    real, calls, fail = os.pwrite, [], threading.Event()

    def pwrite(fd: int, view: memoryview, at: int) -> int:
        calls.append(at)
        if len(calls) == 1:
            fail.wait(5)  # once the test has committed past the piece
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, view, at)

    monkeypatch.setattr(fsutil.os, "pwrite", pwrite)
    fd = os.open(f, os.O_WRONLY)
    try:
        with DirectWriter(fd, piece=8192) as w:
            w.write(b"a" * 9000)  # the first piece goes to the thread, which fails
            fail.set()
            with pytest.raises(OSError, match="Input/output"):
                while True:  # a commit raises it once the thread has met it
                    w.write(b"c")
            w.drain()
    finally:
        os.close(fd)
    got = f.read_bytes()
    assert got[:8192] == b"\xff" * 8192 and got[8192:9000] == b"a" * 808


def test_direct_writer_falls_back_when_o_direct_writes_are_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that takes O_DIRECT but wants other alignment (EINVAL): the piece is written
    again through the page cache, and so is every one after it."""
    real, calls = os.pwrite, []

    def pwrite(fd: int, view: memoryview, at: int) -> int:
        calls.append(at)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, at)

    monkeypatch.setattr(fsutil.os, "pwrite", pwrite)
    data = os.urandom(3 * 8192 + 5)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with DirectWriter(fd, piece=8192) as w:
            w.write(data)
            assert w.finish() == len(data) and not w.direct
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data


def test_syncer_raises_the_error_its_background_syncfs_met(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a writeback error once per descriptor: the background syncfs that
    heard it hands it to the batch's sync(), which must not pass."""
    real, calls = fsutil._syncfs, []

    def once_failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(fsutil, "_syncfs", once_failing)
    syncer = fsutil.Syncer(tmp_path)
    try:
        (tmp_path / "f").write_bytes(b"dirty")
        syncer.start()
        with pytest.raises(OSError, match="Input/output"):
            syncer.sync()
        with pytest.raises(OSError, match="Input/output"):  # the failed pages count as clean now
            syncer.sync()
        assert len(calls) == 1
    finally:
        syncer.close()
    syncer = fsutil.Syncer(tmp_path)
    try:
        syncer.start()
        syncer.sync()
        assert len(calls) == 3 and len(set(calls[1:])) == 1  # one descriptor, opened before the writes
    finally:
        syncer.close()
    assert not [t for t in threading.enumerate() if t.name == "castore-syncfs"]
