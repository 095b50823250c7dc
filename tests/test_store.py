from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore.errors import AmbiguousId, HashMismatch, NotFound, StoreError
from castore.hashing import hash_bytes
from castore.manifest import Entry, Image, Layer, Tree
from castore.store import LocalStore, _walk
from tests.conftest import CASTORE, REPO, castore
from tests.helpers import NOT_ROOT, returns_within, tiny_tmpfs


def test_add_bytes_file_and_lookups(store: LocalStore, tmp_path: Path) -> None:
    oid = store.add_bytes(b"hello")
    assert oid == hash_bytes(b"hello")
    assert store.blob_path(oid).read_bytes() == b"hello"
    assert store.blob_path(oid).stat().st_mode & 0o777 == 0o444
    f = tmp_path / "k"
    f.write_bytes(os.urandom(9 << 20))
    fid = store.add_file(f)
    assert store.info(fid).size == 9 << 20 and f.exists()
    assert store.add_file(f) == fid  # dedup
    assert store.resolve(fid[:8]) == fid
    with pytest.raises(NotFound):
        store.resolve("0123456789")
    with pytest.raises(NotFound):
        store.resolve("xyz")


def test_key_values_under_a_prefix(store: LocalStore) -> None:
    store.kv_put("t:", {"a": "1", "b": "2"})
    store.kv_put("u:", {"a": "other"})
    store.kv_put("t:", {"c": "3"}, drop=["a", "missing"])
    assert store.kv_get("t:") == {"b": "2", "c": "3"} and store.kv_get("u:") == {"a": "other"}


def test_ambiguous_prefix(store: LocalStore) -> None:
    a, b = "abcdef01" + "0" * 56, "abcdef01" + "1" * 56
    store._insert({a: ("blob", 0, ()), b: ("blob", 0, ())})
    with pytest.raises(AmbiguousId):
        store.resolve("abcdef01")
    assert store.resolve("abcdef010") == a


def test_expect_mismatch_adds_nothing(store: LocalStore, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"data")
    with pytest.raises(HashMismatch):
        store.add_file(f, expect="0" * 64)
    assert store.objects() == [] and os.listdir(store.tmp) == []


def test_tree_and_image_need_their_references(store: LocalStore) -> None:
    t = Tree.build([Entry("a", "file", 0o644, blob="1" * 64, size=1)])
    with pytest.raises(StoreError, match="not in the store"):
        store.add_tree(t)
    assert store.objects() == []
    b = store.add_bytes(b"x")
    tid = store.add_tree(Tree.build([Entry("a", "file", 0o644, blob=b, size=1)]))
    assert store.info(tid).refs == (b,) and store.read_tree(tid).get("a") is not None
    img = Image(kernel=b, layers=(Layer(b),), cmdline="", overlay_size=1, vcpus=1, mem_mib=64)
    iid = store.add_image(img)
    assert store.read_image(iid) == img and store.closure([iid]) == {iid, b}


def test_add_dir_keeps_metadata(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("one")
    (d / "x").write_text("two")
    os.chmod(d / "x", 0o751)
    os.link(d / "x", d / "y")
    os.symlink("../x", d / "sub" / "l")
    os.mkfifo(d / "p")
    tid = store.add_dir(d, all_root=True)
    t = store.read_tree(tid)
    assert {e.path: e.type for e in t} == {"p": "fifo", "sub": "dir", "sub/f": "file", "sub/l": "symlink",
                                           "x": "file", "y": "hardlink"}
    x = t.get("x")
    assert x is not None and x.mode == 0o751 and x.uid == 0
    assert store.blob_path(x.blob or "").read_text() == "two"
    assert store.add_dir(d, all_root=True) == tid  # same content, same id
    problems, notes = store.verify()
    assert problems == [] and notes == []


def test_gc_keeps_roots_and_removes_the_rest(store: LocalStore, tmp_path: Path) -> None:
    keep = store.add_bytes(b"keep")
    tid = store.add_tree(Tree.build([Entry("k", "file", 0o644, blob=keep, size=4)]))
    gone = store.add_bytes(b"gone")
    link = tmp_path / "result"
    os.symlink(store.blob_path(tid), link)
    store.add_root(str(link), tid, link=True)
    dead, freed = store.gc()
    assert dead == [gone] and freed == 4
    assert store.has(tid) and store.has(keep) and not store.blob_path(gone).exists()
    link.unlink()  # a deleted out-link stops being a root
    dead, _ = store.gc()
    assert sorted(dead) == sorted([tid, keep]) and store.roots() == []


def test_verify_finds_corruption(store: LocalStore) -> None:
    oid = store.add_bytes(b"precious")
    p = store.blob_path(oid)
    os.chmod(p, 0o644)
    p.write_bytes(b"precioUs")
    os.chmod(p, 0o444)
    problems, _ = store.verify()
    assert any("hashes to" in x for x in problems)
    p.unlink()
    problems, _ = store.verify()
    assert any("missing" in x for x in problems)


def test_stray_files_and_stale_staging_are_notes_then_cleaned(store: LocalStore) -> None:
    (store.blobs / "ab").mkdir()
    (store.blobs / "ab" / ("ab" * 32)).write_bytes(b"complete but unrecorded")
    dead_pid = 2**22 + 7  # above the default pid_max: never a live process
    (store.tmp / f"{dead_pid}-build-x").mkdir()
    problems, notes = store.verify()
    assert problems == [] and len(notes) == 2
    store.gc()
    assert store.verify() == ([], [])


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_full_disk_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small") as mnt:
        s = LocalStore(mnt / "store")
        small = s.add_bytes(b"fits")
        big = tmp_path / "big"
        big.write_bytes(os.urandom(4 << 20))
        with pytest.raises(StoreError, match="no space left"):
            s.add_file(big)
        with big.open("ab") as f:  # past the size read whole: copied by DirectWriter's thread
            f.write(os.urandom(6 << 20))
        with pytest.raises(StoreError, match="no space left"):
            s.add_file(big)
        with pytest.raises(StoreError, match="no space left"):
            s.add_dir(tmp_path, all_root=True)
        try:
            assert [o.id for o in s.objects()] == [small]
            assert os.listdir(s.tmp) == []
            assert s.verify() == ([], [])
        finally:
            s.close()


def test_move_in_and_failed_move_restores(store: LocalStore, tmp_path: Path) -> None:
    f = tmp_path / "rootfs.img"
    f.write_bytes(b"squashfs bytes")
    with pytest.raises(HashMismatch):
        store.add_file(f, move=True, expect="0" * 64)
    assert f.read_bytes() == b"squashfs bytes" and f.stat().st_mode & 0o777 == 0o644  # given back unchanged
    assert store.objects() == [] and os.listdir(store.tmp) == []
    oid = store.add_file(f, move=True)
    assert not f.exists() and store.blob_path(oid).read_bytes() == b"squashfs bytes"


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    import sys

    code = "import sys; from castore.store import LocalStore; LocalStore(sys.argv[1]).add_bytes(sys.argv[2].encode())"
    for trial in range(3):
        root = tmp_path / f"s{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(i)], stderr=subprocess.PIPE)
                 for i in range(8)]
        errors = [p.communicate()[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors
        with LocalStore(root) as s:
            assert len(s.objects()) == 8 and s.verify()[0] == []


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_store_on_a_read_only_filesystem_says_so(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small") as small:
        LocalStore(small / "store").close()
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        proc = castore("ls", store=small / "store", check=False)
        assert proc.returncode == 1 and "is on a read-only filesystem" in proc.stderr, proc.stderr
        assert "remount it read-write" in proc.stderr
        subprocess.run(["mount", "-o", "remount,rw", str(small)], check=True)


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_gc_frees_a_full_disk(tmp_path: Path) -> None:
    """The pull's hint on a full disk is "castore gc": gc must work there, dead objects and all."""
    with tiny_tmpfs(tmp_path / "small") as small, LocalStore(small / "store") as store:
        dead = store.add_bytes(os.urandom(1 << 20))
        (store.tmp / "pulls").mkdir()
        with open(store.tmp / "pulls" / ("a" * 64), "wb") as f, contextlib.suppress(OSError):
            while True:  # a pull that stopped when the disk was full
                f.write(os.urandom(1 << 16))
                f.flush()
        gone, freed = store.gc()
        assert gone == [dead] and freed > 1 << 20
        assert os.listdir(store.tmp / "pulls") == [] and store.objects() == []


def test_gc_waits_for_objects_being_published(tmp_path: Path) -> None:
    """Renamed into blobs/ but not yet recorded, a file looks like a stray to gc: gc must wait."""
    import sys
    import time

    root = tmp_path / "s"
    f = tmp_path / "f"
    f.write_bytes(b"published while gc runs")
    code = "import sys; from castore.store import LocalStore; print(LocalStore(sys.argv[1]).gc()[1])"
    with LocalStore(root) as s:
        with s.batch():
            oid = s.add_file(f)
            gc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            assert gc.poll() is None  # blocked on the lock the batch holds
        gc.communicate(timeout=60)
        assert gc.returncode == 0
        assert s.verify() == ([], [])  # gc came after: the object was whole, then collected whole
        assert not s.has(oid) and not s.blob_path(oid).exists()


def test_an_emptied_database_is_not_taken_for_a_new_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with LocalStore(root) as s:
        oid = s.add_bytes(b"precious")
    for p in root.glob("db.sqlite*"):
        p.unlink()
    (root / "db.sqlite").write_bytes(b"")
    with pytest.raises(StoreError, match="holds nothing, but blobs/ holds 1 files") as err:
        LocalStore(root)
    assert "backup" in (err.value.hint or "")
    assert (root / "blobs" / oid[:2] / oid).read_bytes() == b"precious"
    (root / "db.sqlite").unlink()  # deleted, not emptied: every command says the same, and makes none
    for create in (True, False):
        with pytest.raises(StoreError, match=r"db\.sqlite is missing, but blobs/ holds 1 files"):
            LocalStore(root, create=create)
    assert not (root / "db.sqlite").exists()


def test_a_name_that_is_not_utf8_is_refused(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "tree"
    d.mkdir()
    (d / "ok").write_text("x")
    open(os.path.join(os.fsencode(d), b"caf\xe9"), "wb").close()
    with pytest.raises(StoreError, match="not UTF-8"):
        store.add_dir(d)
    assert store.objects() == [] and os.listdir(store.tmp) == []


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_moved_file_comes_back_when_the_database_is_full(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small") as mnt, LocalStore(mnt / "store") as s:
        s.add_bytes(b"the database has its first pages")
        user = mnt / "userfile"
        data = os.urandom(200_000)
        user.write_bytes(data)
        (s.blobs / hash_bytes(data)[:2]).mkdir(exist_ok=True)
        # every block taken: the renames work, the WAL cannot grow
        with open(mnt / "fill", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        with pytest.raises(StoreError, match="no space left"):
            s.add_file(user, move=True)
        assert user.read_bytes() == data and oct(user.stat().st_mode & 0o777) == "0o644"
        (mnt / "fill").unlink()
        assert len(s.objects()) == 1 and s.verify()[0] == [] and os.listdir(s.tmp) == []


def test_verify_sums_up_litter_and_add_clears_a_killed_adds_staging(store: LocalStore, tmp_path: Path) -> None:
    dead_pid = 2**22 + 7  # above the default pid_max: never a live process
    for i in range(25):
        (store.blobs / "ab").mkdir(exist_ok=True)
        (store.blobs / "ab" / f"ab{i:062d}").write_bytes(b"stray")
        (store.tmp / f"{dead_pid}-obj-{i}-cafe").write_bytes(b"staged by a killed add")
    problems, notes = store.verify()
    assert problems == [] and len(notes) == 22  # 20 strays named, 1 line for the rest, 1 for the staging
    assert "and 5 more stray files" in notes[20] and "25 files or build directories" in notes[21]
    d = tmp_path / "tree"
    d.mkdir()
    (d / "f").write_text("x")
    store.add_dir(d)
    assert os.listdir(store.tmp) == []


def test_a_store_made_before_user_version_was_set_is_adopted(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "s"
    with LocalStore(root) as s:
        oid = s.add_bytes(b"from an older castore")
    db = sqlite3.connect(root / "db.sqlite")
    db.execute("PRAGMA user_version = 0")  # what stores of the first days have: tables, rows, no version
    db.commit()
    db.close()
    with LocalStore(root) as s:
        assert s.has(oid) and s.verify() == ([], [])
        assert s.db.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_a_version_1_store_gains_the_tables_of_later_versions(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "s"
    with LocalStore(root) as s:
        oid = s.add_bytes(b"x" * 100)
    db = sqlite3.connect(root / "db.sqlite")
    db.execute("DROP TABLE chunk_lists")  # what a store made before list chunks has
    db.execute("DROP TABLE substitutions")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    lid = hash_bytes(b"list bytes")
    with LocalStore(root) as s:
        s.record_chunks(oid, [("c" * 64, 0, 100)], [(lid, b"list bytes"), ("e" * 64, b"not what hashes to e...")])
        assert s.find_lists([lid, "e" * 64, "f" * 64]) == {lid: b"list bytes"}
        s.db.execute("INSERT INTO chunk_lists VALUES (?, ?, ?)", ("f" * 64, "0" * 64, b"x"))  # left by an
        s.db.commit()  # older castore's gc, which knew no chunk_lists
        s.record_realisation("p" * 64, oid, b"plan", "x", substituted=("file:///c", b"signed"))
        assert s.substitution("p" * 64) == ("file:///c", b"signed")
        s.record_realisation("p" * 64, oid, b"plan", "x")  # built here after all
        assert s.substitution("p" * 64) is None
        s.record_realisation("p" * 64, oid, b"plan", "x", substituted=("file:///c", b"signed"))
        s.gc()  # no root holds the blob: its chunk lists go with it, and the orphan row too
        assert not s.has(oid) and s.db.execute("SELECT COUNT(*) FROM chunk_lists").fetchone()[0] == 0
        assert s.substitution("p" * 64) is None


def test_hard_links_across_directories_import(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "tree"
    (d / "a").mkdir(parents=True)
    (d / "c").mkdir()
    (d / "a" / "x").write_text("one inode, three names")
    os.link(d / "a" / "x", d / "b")  # the walk may meet b or c/y before a/x
    os.link(d / "a" / "x", d / "c" / "y")
    tree = store.read_tree(store.add_dir(d, all_root=True))
    kinds = {e.path: (e.type, e.target) for e in tree}
    assert kinds["a/x"] == ("file", None)
    assert kinds["b"] == ("hardlink", "a/x") and kinds["c/y"] == ("hardlink", "a/x")


def test_a_dry_run_keeps_roots_whose_link_is_away_and_counts_the_litter(store: LocalStore, tmp_path: Path) -> None:
    oid = store.add_bytes(b"kept by an out-link")
    link = tmp_path / "result"
    os.symlink(store.blob_path(oid), link)
    store.add_root(str(link), oid, link=True)
    (store.blobs / "ab").mkdir(exist_ok=True)
    (store.blobs / "ab" / ("ab" * 32)).write_bytes(b"12345")  # a stray
    link.rename(tmp_path / "away")  # moved for a moment
    assert store.gc(dry_run=True) == ([oid], len(b"kept by an out-link") + 5)
    assert store.root_object(str(link), oid, True) is None
    (tmp_path / "away").rename(link)  # back: the dry run and the look changed nothing
    assert store.roots() == [(str(link), oid, True)] and store.gc() == ([], 5)
    assert store.has(oid)


def test_an_out_link_keeps_what_it_points_at_when_gc_runs(store: LocalStore, tmp_path: Path) -> None:
    """Two realizes racing for one -o name, or one killed between the link and its root: the root
    row may name another object than the link; gc keeps the link's, as Nix reads its gc roots."""
    a, b = store.add_bytes(b"first build"), store.add_bytes(b"second build")
    link = tmp_path / "result"
    os.symlink(store.blob_path(b), link)
    store.add_root(str(link), a, link=True)  # the row lost the race
    assert store.gc() == ([a], len(b"first build"))
    assert store.has(b) and store.roots() == [(str(link), b, True)]  # the row follows the link
    os.unlink(link)
    os.symlink("/etc/hostname", link)  # repointed out of the store: keeps nothing
    assert store.gc() == ([b], len(b"second build")) and store.roots() == []


def test_add_dir_reads_each_file_in_the_directory_it_walked(store: LocalStore, tmp_path: Path) -> None:
    """A name swapped for a symlink (or a FIFO) after the walk saw a regular file brings in nothing
    but an error; a parent directory swapped for a link does not redirect the read."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "f").write_text("TOPSECRET")
    d = tmp_path / "d"
    (d / "a").mkdir(parents=True)
    (d / "a" / "f").write_text("mine")
    entries: list[Entry] = []
    with contextlib.closing(_walk(str(d), False, entries)) as walk:
        _, dir_fd, name, shown = next(walk)
        assert shown == f"{d}/a/f"
        (d / "a").rename(d / "a-old")
        (d / "a").symlink_to(secret)
        assert store._read_or_stage(dir_fd, name, shown)[1] == b"mine"  # from the directory walked, not secret/
        (d / "a-old" / "f").unlink()
        (d / "a-old" / "f").symlink_to(secret / "f")
        with pytest.raises(StoreError, match=r"/d/a/f changed while it was being added"):
            store._read_or_stage(dir_fd, name, shown)
        (d / "a-old" / "f").unlink()
        os.mkfifo(d / "a-old" / "f")
        with returns_within(10), pytest.raises(StoreError, match=r"/d/a/f changed .*: it is no longer a regular file"):
            store._read_or_stage(dir_fd, name, shown)
    assert store.objects() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root reads every file: the test switches to nobody")
def test_add_dir_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    for parent in [tmp_path, *tmp_path.parents]:  # let nobody reach tmp_path
        if parent != Path("/"):
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "ok").write_text("ok")
    (d / "sub" / "closed").write_text("closed")
    (d / "sub" / "closed").chmod(0)
    store = tmp_path / "store"
    store.mkdir()
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    proc = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                           CASTORE, "--store", str(store), "add", str(d)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: cannot read {d}/sub/closed: Permission denied",
        "hint: castore add reads every file of the directory: make it readable, or leave it out"]
    assert castore("verify", store=store).returncode == 0 and LocalStore(store).objects() == []


def test_a_store_of_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    LocalStore(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / "db.sqlite")
    db.execute("PRAGMA user_version = 99")  # what a later castore may write
    db.close()
    with pytest.raises(StoreError, match=r"has schema version 99; this castore knows versions up to \d+"):
        LocalStore(tmp_path / "s")
    db = sqlite3.connect(tmp_path / "s" / "db.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    db.close()


def test_add_dir_walks_deeper_than_the_soft_descriptor_limit(tmp_path: Path) -> None:
    deep = tmp_path / "d" / "/".join(["d"] * 600)  # one open directory per level while walking
    os.makedirs(deep)
    (deep / "f").write_text("at the bottom")
    code = ("import resource, sys; from castore.store import LocalStore; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "s = LocalStore(sys.argv[1]); t = s.read_tree(s.add_dir(sys.argv[2])); print(len(list(t)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), str(tmp_path / "d")], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["601"]  # 600 directories and the file


def test_a_batch_whose_rows_cannot_be_written_leaves_no_strays(store: LocalStore, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush renamed its files into blobs/, then the database was full: they go back, the
    staged one to be removed, the caller's (add_written) to where the caller finds it again."""
    kept = store.tmp / "pulls-like"
    kept.write_bytes(b"written by a pull")
    copied = tmp_path / "copied"
    copied.write_bytes(b"added by copy")

    def full(rows: object) -> None:  # what _transaction makes of SQLITE_FULL
        raise store._db_error(sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(store, "_insert", full)
    with pytest.raises(StoreError, match="full"), store.batch():
        store.add_written(kept, hash_bytes(kept.read_bytes()))
        store.add_file(copied)
    monkeypatch.undo()
    assert store.objects() == [] and store.stray_files() == []
    assert kept.read_bytes() == b"written by a pull" and sorted(os.listdir(store.tmp)) == ["pulls-like"]
    assert store.verify()[0] == []


def _small_tree(root: Path, n: int = 40) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"f{i}").write_bytes(f"file {i}\n".encode() * (i + 1))
    return root


def test_add_dir_writes_small_files_in_place_readable_by_all(store: LocalStore, tmp_path: Path) -> None:
    """No staging file, no rename: and the files are 0444 even under a umask that masks reads
    (Firecracker may run as another user)."""
    src = _small_tree(tmp_path / "src")
    old = os.umask(0o077)
    try:
        tid = store.add_dir(src, all_root=True)
    finally:
        os.umask(old)
    blobs = [e.blob for e in store.read_tree(tid).entries if e.blob]
    assert len(blobs) == 40
    assert {store.blob_path(b).stat().st_mode & 0o777 for b in blobs} == {0o444}
    assert os.listdir(store.tmp) == [] and store.verify() == ([], [])


def test_a_killed_import_leaves_strays_that_the_next_add_removes(store: LocalStore, tmp_path: Path) -> None:
    """Killed between writing its files in blobs/ and their rows: they are strays, and the list
    written before them lets the next add find and remove them (gc would too)."""
    src = _small_tree(tmp_path / "src", 1200)  # three groups: killed after the second is written
    code = ("import os, signal, sys\n"
            "from castore.store import LocalStore\n"
            "s = LocalStore(sys.argv[1])\n"
            "real, seen = LocalStore._stage_group, []\n"
            "def stage(self, group, entries):\n"
            "    real(self, group, entries)\n"
            "    seen.append(1)\n"
            "    if len(seen) == 2:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "LocalStore._stage_group = stage\n"
            "s.add_dir(sys.argv[2], all_root=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store.root), str(src)], cwd=REPO)
    assert proc.returncode == -9
    assert store.objects() == [] and len(store.stray_files()) == 1000
    lists = [n for n in os.listdir(store.tmp) if "-placing-" in n]
    assert len(lists) == 1 and len((store.tmp / lists[0]).read_text().split()) == 1000
    keep = tmp_path / "other"
    keep.mkdir()
    (keep / "f0").write_bytes(b"file 0\n")  # one the killed import wrote: now it gets its row
    tid = store.add_dir(keep)
    assert store.stray_files() == [] and os.listdir(store.tmp) == []
    assert store.verify() == ([], []) and store.read_tree(tid).entries[0].blob in {o.id for o in store.objects()}


def test_a_killed_imports_strays_stay_while_a_batch_runs(store: LocalStore, tmp_path: Path) -> None:
    """Another process's batch may be renaming its own copy over such a stray, its row still to
    come: the strays are removed only under the gc lock, and the list stays until then."""
    dead_pid = 2**22 + 7
    oid = hash_bytes(b"left by a killed import")
    (store.blobs / oid[:2]).mkdir()
    store.blob_path(oid).write_bytes(b"left by a kill")
    listed = store.tmp / f"{dead_pid}-placing-0-cafe"
    listed.write_text(f"{oid}\n")
    other = LocalStore(store.root)
    try:
        with other.lock("gc", shared=True):
            store.clean_stale_staging()
            assert listed.exists() and store.blob_path(oid).exists()
    finally:
        other.close()
    store.clean_stale_staging()
    assert not listed.exists() and not store.blob_path(oid).exists()
    assert store.verify() == ([], [])


def test_a_wrong_file_at_a_blobs_place_is_replaced(store: LocalStore, tmp_path: Path) -> None:
    """A file at the final name without a row (a crash lost the list, or another process is
    writing it): this import stages its own copy and renames it over."""
    src = _small_tree(tmp_path / "src", 3)
    oid = hash_bytes((src / "f1").read_bytes())
    (store.blobs / oid[:2]).mkdir()
    store.blob_path(oid).write_bytes(b"torn")
    store.add_dir(src)
    assert store.blob_path(oid).read_bytes() == (src / "f1").read_bytes()
    assert store.verify() == ([], [])


def test_a_failed_import_takes_back_the_files_it_wrote_in_place(store: LocalStore, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = _small_tree(tmp_path / "src")

    def full(rows: object) -> None:
        raise store._db_error(sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(store, "_insert", full)
    with pytest.raises(StoreError, match="full"):
        store.add_dir(src)
    monkeypatch.undo()
    assert store.objects() == [] and store.stray_files() == [] and os.listdir(store.tmp) == []
    store.add_dir(src)
    assert store.verify() == ([], [])


def test_gc_removes_a_killed_imports_strays_and_its_list(store: LocalStore) -> None:
    dead_pid = 2**22 + 7
    oid = hash_bytes(b"x")
    (store.blobs / oid[:2]).mkdir()
    store.blob_path(oid).write_bytes(b"x")
    (store.tmp / f"{dead_pid}-placing-0-cafe").write_text(f"{oid}\n")
    store.gc()
    assert os.listdir(store.tmp) == [] and store.stray_files() == []


def _hold_rows(store: LocalStore, renamed: Any, go: Any) -> None:
    """Make store's next batch stop between its renames and its rows: it sets `renamed` there and
    waits for `go` (threading.Event both), as a process racing another would."""
    real_insert = store._insert

    def insert(rows: dict[str, tuple[str, int, tuple[str, ...]]]) -> None:
        renamed.set()
        go.wait(10)
        real_insert(rows)

    store._insert = insert  # type: ignore[method-assign]


def test_a_failed_import_leaves_alone_a_file_another_batch_renamed_over_its_own(tmp_path: Path) -> None:
    """B found A's file at a blob's name, staged its own copy and renamed it over; A then failed,
    before B's row. A must not remove the file: B's row would name nothing."""
    import threading

    src = _small_tree(tmp_path / "src", 5)
    a, b = LocalStore(tmp_path / "s"), LocalStore(tmp_path / "s")
    a_placed, b_renamed, a_done = threading.Event(), threading.Event(), threading.Event()

    def a_flush() -> None:
        a_placed.set()
        b_renamed.wait(10)
        raise StoreError("A fails: a source file changed, Ctrl-C, a full disk")

    a._flush = a_flush  # type: ignore[method-assign]
    _hold_rows(b, b_renamed, a_done)
    failed: list[Exception] = []

    def import_a() -> None:
        try:
            a.add_dir(src)
        except StoreError as exc:
            failed.append(exc)
        a_done.set()

    thread = threading.Thread(target=import_a)
    thread.start()
    try:
        assert a_placed.wait(10)
        tid = b.add_dir(src)
    finally:
        thread.join()
    assert failed and b.read_tree(tid)
    assert b.verify()[0] == []
    a.close()
    b.close()


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_file_that_cannot_be_created_leaves_no_row_behind(tmp_path: Path) -> None:
    """No inodes left halfway through a group, inside a batch that goes on: the rows it flushes
    are those of files that exist."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(100):
        (src / f"f{i}").write_bytes(b"x%d" % i)
    with tiny_tmpfs(tmp_path / "small", "20m", inodes=60) as mnt:
        s = LocalStore(mnt / "store")
        try:
            with s.batch(), pytest.raises(StoreError, match="no space left"):
                s.add_dir(src)
            assert s.objects() and s.verify()[0] == []
        finally:
            s.close()


def test_castore_add_removes_a_killed_imports_strays(tmp_path: Path) -> None:
    """The CLI holds the gc lock shared while it adds: the strays go before it takes it."""
    root = tmp_path / "s"
    with LocalStore(root) as s:
        oid = hash_bytes(b"left by a killed import")
        (s.blobs / oid[:2]).mkdir()
        s.blob_path(oid).write_bytes(b"torn")
        (s.tmp / f"{2**22 + 7}-placing-0-cafe").write_text(f"{oid}\n")
    other = tmp_path / "other"
    other.write_bytes(b"something else")
    castore("add", str(other), store=root)
    with LocalStore(root) as s:
        assert s.stray_files() == [] and os.listdir(s.tmp) == [] and s.verify() == ([], [])


@pytest.mark.parametrize("kind", ["garbage", "dir", "dangling"])
def test_a_list_that_is_not_one_is_removed_without_failing_the_add(store: LocalStore, tmp_path: Path,
                                                                    kind: str) -> None:
    listed = store.tmp / f"{2**22 + 7}-placing-0-cafe"
    if kind == "garbage":
        listed.write_bytes(b"\xff\xfe" + b"ab" * 32 + b"\n\x00")
    elif kind == "dir":
        listed.mkdir()
    else:
        listed.symlink_to(tmp_path / "nowhere")
    store.add_dir(_small_tree(tmp_path / "src", 2))
    assert os.listdir(store.tmp) == [] and store.verify() == ([], [])
    listed.mkdir() if kind == "dir" else listed.write_bytes(b"\xff")
    store.gc()
    assert os.listdir(store.tmp) == []


def test_a_failed_flush_leaves_alone_a_copy_renamed_over_the_one_it_renamed_in(tmp_path: Path) -> None:
    """A renamed its staged file into blobs/ and failed at its rows; meanwhile B renamed its own
    copy over it, its row still to come. A takes its file back only if it is still A's."""
    import threading

    a, b = LocalStore(tmp_path / "s"), LocalStore(tmp_path / "s")
    a_renamed, b_renamed, a_done = threading.Event(), threading.Event(), threading.Event()

    def a_insert(rows: object) -> None:
        a_renamed.set()
        b_renamed.wait(10)
        raise a._db_error(sqlite3.OperationalError("database or disk is full"))

    a._insert = a_insert  # type: ignore[method-assign]
    _hold_rows(b, b_renamed, a_done)

    def add_a() -> None:
        with contextlib.suppress(StoreError), a.batch():
            a.add_bytes(b"added by both")
        a_done.set()

    thread = threading.Thread(target=add_a)
    thread.start()
    try:
        assert a_renamed.wait(10)
        oid = b.add_bytes(b"added by both")
    finally:
        thread.join()
    assert b.has(oid) and b.verify()[0] == []
    a.close()
    b.close()


def test_an_import_that_fails_while_its_writer_thread_works_leaves_nothing(store: LocalStore, tmp_path: Path) -> None:
    """Groups are written by a second thread while the walk reads on: a walk that fails at its
    end stops that thread, and the files it wrote go (no strays, no thread left behind)."""
    import threading

    src = _small_tree(tmp_path / "src", 1200)
    os.close(os.open(os.path.join(os.fsencode(src), b"zz\xff"), os.O_CREAT | os.O_WRONLY))
    with pytest.raises(StoreError, match="not UTF-8"):
        store.add_dir(src)
    assert not [t for t in threading.enumerate() if t.name == "castore-add-writer"]
    assert store.objects() == [] and store.stray_files() == [] and os.listdir(store.tmp) == []


def test_an_error_in_the_writer_thread_stops_the_walk(store: LocalStore, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = _small_tree(tmp_path / "src", 1600)  # four groups
    written: list[int] = []
    real = LocalStore._stage_group

    def failing(self: LocalStore, group: list[tuple[int, str, bytes]], entries: list[Entry]) -> None:
        written.append(len(group))
        if len(written) == 1:
            raise StoreError("I/O error on the store: Input/output error")
        real(self, group, entries)

    monkeypatch.setattr(LocalStore, "_stage_group", failing)
    with pytest.raises(StoreError, match="Input/output"):
        store.add_dir(src)
    assert len(written) == 1  # the groups after the failed one were not written
    assert store.objects() == [] and store.stray_files() == [] and os.listdir(store.tmp) == []


def test_a_writer_error_stops_the_walk_before_the_next_large_file(store: LocalStore, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = _small_tree(tmp_path / "src", 500)  # one group, written while the large files are read
    for i in range(4):
        (src / f"zz{i}").write_bytes(os.urandom(9 << 20))
    copied: list[str] = []
    real = LocalStore._publish

    def failing(self: LocalStore, group: list[tuple[int, str, bytes]], entries: list[Entry]) -> None:
        raise StoreError("I/O error on the store: Input/output error")

    def publish(self: LocalStore, oid: str, *args: Any) -> str:
        copied.append(oid)
        return real(self, oid, *args)

    monkeypatch.setattr(LocalStore, "_stage_group", failing)
    monkeypatch.setattr(LocalStore, "_publish", publish)
    with pytest.raises(StoreError, match="Input/output"):
        store.add_dir(src)
    assert len(copied) <= 1  # the one being copied when the error came
    assert store.objects() == [] and store.stray_files() == [] and os.listdir(store.tmp) == []


def test_ctrl_c_inside_the_writers_queue_does_not_hang_the_import(store: LocalStore, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C can land inside Queue.put after the group is queued and before the writer is woken:
    leaving the import must not wait on that queue."""
    import threading

    from castore import store as store_module

    src = _small_tree(tmp_path / "src", 1200)
    real_enter = store_module._Writer.__enter__

    def enter(self: Any) -> Any:
        cond = self._queue.not_empty
        real_notify = cond.notify
        done: list[int] = []

        def notify(n: int = 1) -> None:
            if threading.current_thread() is threading.main_thread() and cond._waiters and not done:
                done.append(1)
                raise KeyboardInterrupt
            real_notify(n)

        cond.notify = notify
        return real_enter(self)

    monkeypatch.setattr(store_module._Writer, "__enter__", enter)
    with returns_within(30), pytest.raises(KeyboardInterrupt):
        store.add_dir(src)
    assert not [t for t in threading.enumerate() if t.name == "castore-add-writer"]


def test_adding_a_tree_again_replaces_a_damaged_file(store: LocalStore, tmp_path: Path) -> None:
    src = _small_tree(tmp_path / "src", 3)
    store.add_dir(src)
    oid = hash_bytes((src / "f1").read_bytes())
    store.blob_path(oid).unlink()
    assert store.verify()[0]
    store.add_dir(src)
    assert store.blob_path(oid).read_bytes() == (src / "f1").read_bytes() and store.verify() == ([], [])
