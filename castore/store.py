"""LocalStore: content-addressed blobs, trees and images with SQLite metadata.

Layout under the store root::

    blobs/ab/abcdef...   object bytes, read-only (0444); trees and images are
                         stored as their canonical manifests
    db.sqlite            objects, references, realisations, roots
    tmp/                 staging on the same filesystem
    locks/               one lock file per plan being built, plus the gc lock
    logs/                build logs by plan hash

Invariants:

* an ``objects`` row exists only for a file that is in place, whole and synced,
  and only once every object it references has a row (closures are complete):
  the row is what makes an object exist, and nothing reads a file no row names;
* bytes are staged in ``tmp/`` and renamed into place, except the small files of
  a directory import, whose ids are known before they are written: those are
  written in place, listed first in ``tmp/``, and become objects with their rows;
* nothing in ``blobs/`` that a row names is modified.

A crash leaves at worst stray files (no row; a killed import's may be torn) and
staging leftovers, which ``gc`` (and the next add or realize) removes and
``verify`` reports without calling them corrupt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import operator
import os
import queue
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castore import canonical
from castore.errors import AmbiguousId, CastoreError, HashMismatch, NotFound, StoreError
from castore.fsutil import DirectWriter, Syncer, more_descriptors, read_regular, stale_entries, start_writeback
from castore.hashing import Hasher, hash_bytes, hash_fileobj, is_id, is_prefix
from castore.manifest import Entry, Image, Tree

_SCHEMA_VERSION = 3  # PRAGMA user_version once the schema below is in place (2: chunk_lists, 3: substitutions)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, added INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS refs (
    referrer TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (referrer, ref)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_ref ON refs (ref);
CREATE TABLE IF NOT EXISTS realisations (
    plan TEXT PRIMARY KEY, object TEXT NOT NULL, record BLOB NOT NULL,
    name TEXT NOT NULL, created INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS realisations_object ON realisations (object);
CREATE TABLE IF NOT EXISTS substitutions (
    plan TEXT PRIMARY KEY, origin TEXT NOT NULL, realisation BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS roots (name TEXT PRIMARY KEY, object TEXT NOT NULL, link INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    chunk TEXT NOT NULL, blob TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (chunk, blob, offset)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_blob ON chunks (blob);
CREATE TABLE IF NOT EXISTS chunk_lists (
    list TEXT NOT NULL, blob TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (list, blob)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunk_lists_blob ON chunk_lists (blob);
"""
_SMALL = 8 << 20
DAMAGED = ("run `castore verify --repair`, then realize or pull the object again: the good copy "
           "replaces the damaged one")
_NAME = operator.attrgetter("name")
_LISTED = 20  # stray files named one by one in verify's notes


@dataclass(frozen=True)
class ObjectInfo:
    id: str
    kind: str
    size: int
    refs: tuple[str, ...]


@dataclass
class _Pending:
    """Files waiting for one syncfs and their rows: staged ones also for their rename into blobs/."""

    syncer: Syncer
    files: dict[str, str] = field(default_factory=dict)  # id -> staged path
    kept: set[str] = field(default_factory=set)  # ids whose files are the caller's (add_written) on failure
    rows: dict[str, tuple[str, int, tuple[str, ...]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    placed: dict[str, str] = field(default_factory=dict)  # id -> its file, written in blobs/ directly
    placing: int = -1  # the list of ids this batch writes in blobs/ directly, appended to before each
    placing_path: str = ""
    dirs: set[str] = field(default_factory=set)  # blobs/ subdirectories known to exist
    umask: int = field(default_factory=lambda: _umask())


class LocalStore:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.logs = self.root / "logs"
        if not (self.root / "db.sqlite").exists():
            if held := _blob_files(self.blobs):  # before an empty database is made in its place
                raise _lost_database(self.root, held, "is missing")
            if not create:
                raise StoreError(f"no castore store at {self.root}", "pass --store or set CASTORE_STORE")
        try:
            for d in (self.root, self.blobs, self.tmp, self.locks, self.logs):
                _mkdir(d)
            self.db = sqlite3.connect(self.root / "db.sqlite", timeout=60, isolation_level=None,
                                      check_same_thread=False)
            if self.db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                try:
                    self._init_db()
                except StoreError:
                    self.db.close()
                    raise
            self.db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            if _full(self.root):
                raise no_space(self.root, "free space on that device: even reading the store needs a little, "
                               "for SQLite's shared-memory file") from exc
            if _read_only(self.root):
                raise StoreError(f"the store at {self.root} is on a read-only filesystem",
                                 "castore writes even to read a store (SQLite's shared-memory file): "
                                 "remount it read-write, or use --store DIR elsewhere") from exc
            raise StoreError(f"cannot open the store database in {self.root}: {exc}") from exc
        except PermissionError as exc:
            raise StoreError(f"cannot write to the store at {self.root}: {exc.strerror}",
                             "use --store DIR for a store of your own") from exc
        self._pending: _Pending | None = None
        self._db_lock = threading.RLock()
        self._counter = itertools.count()
        self._tmp = str(self.tmp)
        self._blobs = str(self.blobs)
        self._nonce = os.urandom(4).hex()

    def _init_db(self) -> None:
        """Once per store, under a lock: processes opening a new store at once must not race
        to switch its journal mode (SQLite answers "database is locked" without waiting)."""
        fd = os.open(self.locks / "init.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'objects'").fetchone()
            # Stores made before user_version was set have their tables: those are adopted below.
            if version == 0 and tables is None and (held := _blob_files(self.blobs)):
                raise _lost_database(self.root, held, "holds nothing")
            if version > _SCHEMA_VERSION:  # what a newer castore added would be lost, or misread
                raise StoreError(f"the store at {self.root} has schema version {version}; this castore "
                                 f"knows versions up to {_SCHEMA_VERSION}",
                                 "use the castore that made the store, or a newer one")
            if version != _SCHEMA_VERSION:
                self.db.execute("PRAGMA journal_mode=WAL")  # kept in the file: set once
                # one transaction: each statement on its own would be a commit and an fdatasync
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    if tables is not None and version < 3:
                        self._unknown_origins()
                    self.db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
        finally:
            os.close(fd)

    def _unknown_origins(self) -> None:
        """A store from before substitutions were recorded: a realisation without the log of a
        build that succeeded was substituted (every build writes a log, and a failed one ends it
        with "error: ..."), from a cache and with signatures no longer known. Recorded as such, so
        that a push neither signs it as its own nor passes it on. In doubt (a tool's own "error:"
        near the end of a log), the realisation is taken as substituted: that push is the safe one."""
        for (plan,) in self.db.execute("SELECT plan FROM realisations").fetchall():
            try:
                with open(self.logs / f"{plan}.log", "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                    built = b"\nerror: " not in f.read()
            except OSError:
                built = False
            if not built:
                self.db.execute("INSERT OR IGNORE INTO substitutions VALUES (?, '', x'')", (plan,))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- database helpers ------------------------------------------------

    def _q(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._db_lock:
            try:
                return self.db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc

    def _db_error(self, exc: sqlite3.Error) -> StoreError:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            return no_space(self.root, "nothing was added; free space on that device and retry")
        return StoreError(f"store database error: {exc}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc

    def kv_get(self, prefix: str) -> dict[str, str]:
        return {k[len(prefix):]: v for k, v in self._q(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff"))}

    def kv_put(self, prefix: str, values: dict[str, str], *, drop: Sequence[str] = ()) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                           [(prefix + k, v) for k, v in values.items()])
            db.executemany("DELETE FROM kv WHERE key = ?", [(prefix + k,) for k in drop])

    # -- lookups ----------------------------------------------------------

    def blob_path(self, oid: str) -> Path:
        return self.blobs / oid[:2] / oid

    def has(self, oid: str) -> bool:
        return bool(self._q("SELECT 1 FROM objects WHERE id = ?", (oid,)))

    def absent(self, oids: Iterable[str]) -> set[str]:
        """Those of these objects that realize, pull and add must make or fetch: the store lacks
        them, or has them with a file missing or of the wrong size (a stat, not a hash), and then
        the new file replaces the damaged one. One query per 500 ids and a stat each."""
        ids = set(oids)
        sizes = self.sizes(ids)
        return (ids - sizes.keys()) | {oid for oid, size in sizes.items() if not self._file_ok(oid, size)}

    def intact(self, oid: str) -> bool:
        return not self.absent([oid])

    def _file_ok(self, oid: str, size: int) -> bool:
        try:
            return os.stat(self.blob_path(oid)).st_size == size
        except OSError:
            return False

    def info(self, oid: str) -> ObjectInfo:
        rows = self._q("SELECT kind, size FROM objects WHERE id = ?", (oid,))
        if not rows:
            raise NotFound(f"object {oid} is not in the store at {self.root}")
        refs = tuple(r[0] for r in self._q("SELECT ref FROM refs WHERE referrer = ? ORDER BY ref", (oid,)))
        return ObjectInfo(oid, rows[0][0], rows[0][1], refs)

    def resolve(self, text: str) -> str:
        """A full id, a unique prefix of at least 8 hex digits, or a path that leads to an object
        of this store (an out-link such as `result`, a store path) -> the full id."""
        if not is_prefix(text.strip().lower()) and os.path.lexists(text):
            target = Path(os.path.realpath(text))
            if target.parent.parent != self.blobs.resolve() or not is_id(target.name):
                raise NotFound(f"{text} is not an object of the store at {self.root}",
                               "give an id, or an out-link or path into this store")
            text = target.name
        text = text.strip().lower()
        if not is_prefix(text):
            raise NotFound(f"{text!r} is not an object id",
                           "ids are hex; give at least 8 digits (or an out-link, such as result)")
        if is_id(text):
            if not self.has(text):
                raise NotFound(f"object {text} is not in the store at {self.root}")
            return text
        rows = self._q("SELECT id FROM objects WHERE id >= ? AND id < ? LIMIT 2", (text, text + "g"))
        if not rows:
            raise NotFound(f"no object in the store starts with {text}")
        if len(rows) > 1:
            raise AmbiguousId(f"{text} matches several objects", "give more digits")
        return str(rows[0][0])

    def objects(self, kind: str | None = None) -> list[ObjectInfo]:
        sql = "SELECT id, kind, size FROM objects"
        if kind:
            rows = self._q(sql + " WHERE kind = ? ORDER BY added, id", (kind,))
        else:
            rows = self._q(sql + " ORDER BY added, id")
        return [ObjectInfo(r[0], r[1], r[2], ()) for r in rows]

    def read_bytes(self, oid: str) -> bytes:
        try:
            return self.blob_path(oid).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"object {oid} has a row but no file", "run castore verify") from exc

    def read_tree(self, oid: str) -> Tree:
        return Tree.decode(self.read_bytes(oid))

    def read_image(self, oid: str) -> Image:
        return Image.decode(self.read_bytes(oid))

    # -- staging ------------------------------------------------------------

    def staging_dir(self, label: str = "build") -> Path:
        """A fresh scratch directory on the store's filesystem; the caller removes it."""
        self.clean_stale_staging()
        path = self.tmp / f"{os.getpid()}-{label}-{os.urandom(4).hex()}"
        path.mkdir(mode=0o755)
        return path

    def keep_failed(self, scratch: Path, name: str) -> Path:
        """Move a failed build's scratch directory where only gc removes it (not named by a pid)."""
        kept = self.tmp / f"failed-{name}-{os.urandom(3).hex()}"
        os.rename(scratch, kept)
        return kept

    def clean_stale_staging(self, *, gc_held: bool = False) -> int:
        """Remove staging left by processes that no longer run, and the files in blobs/ that a
        killed import listed and that got no row. Those only under the gc lock, held by no batch
        (gc_held: the caller holds it): a batch renames its own copy of such a file over it,
        and inserts its row after."""
        stale = stale_entries(self.tmp)
        lists = [p for p in stale if p.name.split("-")[1:2] == ["placing"]]
        for path in stale:
            if path not in lists:
                _remove(path)
        if lists:
            if gc_held:
                self._unplace_stale(lists)
            else:
                with contextlib.suppress(BlockingIOError), self.lock("gc", wait=False):
                    self._unplace_stale(lists)
        return len(stale)

    def _unplace_stale(self, lists: list[Path]) -> None:
        """Under the gc lock held exclusively: remove the files these lists name that have no row,
        then the lists."""
        for path in lists:
            try:
                text = read_regular(path, 1 << 32)
            except OSError:  # a directory, a FIFO: not a list castore wrote
                _remove(path)
                continue
            if text is None:  # another process removed it first, or a dangling link
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            ids = {line for line in text.decode("ascii", "replace").split() if is_id(line)}
            for oid in ids - self._present(ids):
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(oid).unlink()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _stage_path(self) -> Path:
        return self.tmp / f"{os.getpid()}-obj-{next(self._counter)}-{self._nonce}"

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group many adds: one syncfs and one transaction instead of one fsync per file."""
        if self._pending is not None:
            yield
            return
        try:
            syncer = Syncer(self.tmp)
        except OSError as exc:
            raise store_os_error(exc, self.root) from exc
        self._pending = pending = _Pending(syncer)
        try:
            with self.lock("gc", shared=True):  # gc would take renamed files without rows for strays
                yield
                self._flush()
        finally:
            self._pending = None
            syncer.close()
            self._unplace(pending)
            for oid, p in pending.files.items():
                if oid not in pending.kept:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)

    def flush(self) -> None:
        """Publish what the current batch holds now; the batch goes on (a pull's objects go in
        as it finishes them: a large one at once, small ones every second)."""
        if self._pending is not None:
            self._flush()

    def _flush(self) -> None:
        pending = self._pending
        assert pending is not None
        renamed: list[tuple[str, str, str, int]] = []  # (id, staged, in blobs/, inode)
        try:
            pending.syncer.sync()  # staged bytes durable before any rename publishes them
            dirs = set()
            blobs = str(self.blobs)
            for oid, staged in list(pending.files.items()):
                if oid[:2] not in dirs:
                    _mkdir(self.blobs / oid[:2])
                    dirs.add(oid[:2])
                dest = f"{blobs}/{oid[:2]}/{oid}"
                inode = os.stat(staged).st_ino
                os.rename(staged, dest)
                renamed.append((oid, staged, dest, inode))
                del pending.files[oid]
            pending.syncer.sync()  # renames durable before the rows that announce them
            self._insert(pending.rows)
            pending.placed.clear()
        except BaseException as exc:
            self._unrename(pending, renamed)
            if isinstance(exc, OSError):
                raise store_os_error(exc, self.root) from exc
            raise
        pending.rows.clear()

    def _unrename(self, pending: _Pending, renamed: list[tuple[str, str, str, int]]) -> None:
        """A flush that failed (a full disk): the files it renamed into blobs/ go back where they
        were, not left as strays: the batch's end removes them, or leaves those that are the
        caller's (add_written) for it to find again. One a row already names (another process
        added the same object meanwhile) stays, and so does another process's copy renamed over
        this batch's, its row still to come."""
        for oid, staged, dest, inode in renamed:
            try:
                if self.has(oid) or os.stat(dest).st_ino != inode:
                    continue
                os.rename(dest, staged)
            except (CastoreError, OSError, sqlite3.Error):
                continue  # unsure: a stray gc removes is better than a row without its file
            pending.files[oid] = staged

    def _unplace(self, pending: _Pending) -> None:
        """At a batch's end, its shared gc lock released: its list of files written in blobs/ goes,
        and, when the batch failed, the files that got no row. Those only under the gc lock taken
        exclusively, or another process's copy, renamed over one of them with its row still to
        come, would go; when another holds the lock, files and list stay for gc, or for the first
        clean_stale_staging after this process ends."""
        if pending.placing < 0:
            return
        os.close(pending.placing)
        pending.placing = -1
        if not pending.placed:
            with contextlib.suppress(OSError):
                os.unlink(pending.placing_path)
            return
        with contextlib.suppress(BlockingIOError, CastoreError, OSError, sqlite3.Error), \
                self.lock("gc", wait=False):
            self._unplace_stale([Path(pending.placing_path)])

    def _insert(self, rows: dict[str, tuple[str, int, tuple[str, ...]]]) -> None:
        if not rows:
            return
        now = int(time.time())
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?)",
                           [(oid, k, s, now) for oid, (k, s, _) in rows.items()])
            db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                           [(oid, r) for oid, (_, _, refs) in rows.items() for r in refs])

    def _publish(self, oid: str, staged: Path, kind: str, size: int, refs: tuple[str, ...]) -> str:
        """Move a staged, hashed file into blobs/ (or drop it if present) and record it."""
        unsure = {r for r in refs if not (self._pending and r in self._pending.rows)}
        missing = sorted(unsure - self._present(unsure)) if unsure else []
        if missing:
            staged.unlink(missing_ok=True)
            raise StoreError(f"{kind} {oid} references {missing[0]}, which is not in the store")
        if os.stat(staged).st_mode & 0o777 != 0o444:
            os.chmod(staged, 0o444)
        if self._pending is not None:
            with self._pending.lock:
                if oid in self._pending.rows or (self.has(oid) and self._file_ok(oid, size)):
                    staged.unlink()
                else:  # new, or replacing a damaged file (the row stays: rows are inserted OR IGNORE)
                    self._pending.files[oid] = str(staged)
                    self._pending.rows[oid] = (kind, size, refs)
            return oid
        if self.has(oid) and self._file_ok(oid, size):
            staged.unlink()
            return oid
        dest = self.blob_path(oid)
        with self.lock("gc", shared=True):  # gc would take a renamed file without its row for a stray
            try:
                fd = os.open(staged, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _mkdir(dest.parent)
                os.rename(staged, dest)
                dfd = os.open(dest.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise store_os_error(exc, self.root) from exc  # the caller removes or restores staged
            try:
                self._insert({oid: (kind, size, refs)})
            except BaseException:
                if not self._has_safely(oid):
                    os.rename(dest, staged)  # back to the caller, who removes it or gives it back
                raise
        return oid

    def _has_safely(self, oid: str) -> bool:
        """has(), for error paths: when the database cannot answer, the object is not there."""
        try:
            return self.has(oid)
        except (CastoreError, sqlite3.Error):
            return False

    # -- adding -------------------------------------------------------------

    def add_bytes(self, data: bytes, kind: str = "blob", refs: Iterable[str] = ()) -> str:
        oid = hash_bytes(data)
        if self.has(oid):
            return oid
        staged = self._stage_path()
        try:
            with open(staged, "xb") as f:
                f.write(data)
            return self._publish(oid, staged, kind, len(data), tuple(sorted(set(refs))))
        except BaseException as exc:
            staged.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise store_os_error(exc, self.root) from exc
            raise

    def add_file(self, path: str | os.PathLike[str], *, move: bool = False, expect: str | None = None,
                 kind: str = "blob", refs: Iterable[str] = ()) -> str:
        """Copy a file in as a blob, or move it in (a rename: same filesystem only).

        A moved file that cannot be added is moved back, so a failure loses nothing.
        """
        src = Path(path)
        staged = self._stage_path()
        moved = False
        try:
            if move:
                mode = os.stat(src).st_mode
                os.rename(src, staged)
                moved = True
                with open(staged, "rb") as f:
                    start_writeback(f.fileno())  # dirty pages go to disk while we hash
                    size = os.fstat(f.fileno()).st_size
                    oid = hash_fileobj(f, size)
            else:
                oid, size = _copy_hashing(src, staged)
            if expect is not None and oid != expect:
                raise HashMismatch(str(src), expect, oid)
            return self._publish(oid, staged, kind, size, tuple(sorted(set(refs))))
        except BaseException as exc:
            if moved and staged.exists():
                os.rename(staged, src)
                os.chmod(src, mode)
            else:
                staged.unlink(missing_ok=True)
            if isinstance(exc, FileNotFoundError) and not moved:
                raise NotFound(f"{src} does not exist") from exc
            if isinstance(exc, OSError):
                raise store_os_error(exc, self.root, src) from exc
            raise

    def add_written(self, path: Path, oid: str, kind: str = "blob", refs: Iterable[str] = ()) -> str:
        """Publish a file the caller wrote under tmp/ and hashed as it wrote it (a pull's partial
        file): not read again, and not moved until it goes into blobs/, so a kill before that
        leaves it where the caller finds it again (in a batch: until the batch's flush)."""
        try:
            self._publish(oid, path, kind, os.stat(path).st_size, tuple(sorted(set(refs))))
        except OSError as exc:
            raise store_os_error(exc, self.root, path) from exc
        if self._pending is not None:
            self._pending.kept.add(oid)
        return oid

    def add_tree(self, tree: Tree) -> str:
        return self.add_bytes(tree.encode(), "tree", tree.refs())

    def add_image(self, image: Image) -> str:
        return self.add_bytes(image.encode(), "image", image.refs())

    def add_dir(self, root: str | os.PathLike[str], *, all_root: bool = False) -> str:
        """Import a directory as a tree: every file becomes a blob, metadata goes in the manifest.

        Files are hashed before they are written, so content already in the
        store costs a read and a hash, not a copy.
        """
        base = os.fspath(root)
        if not os.path.isdir(base):
            raise NotFound(f"{base} is not a directory")
        self.clean_stale_staging()  # what a killed add left
        entries: list[Entry] = []
        # Small files are read and hashed in groups, then one query tells which the store lacks,
        # and a second thread writes those while this one reads the next group: both are mostly
        # system calls, which let the other thread run (a pool of threads per file measured slower
        # on two cores: GIL hand-offs). Large files are copied in the kernel as they come.
        with self.batch(), contextlib.closing(_walk(base, all_root, entries)) as walk, \
                _Writer(self._stage_group, entries) as writer:
            group: list[tuple[int, str, bytes]] = []
            held = 0
            for index, dir_fd, name, shown in walk:
                writer.check()
                oid, data, size = self._read_or_stage(dir_fd, name, shown)
                if data is None:
                    self._set_blob(entries, index, oid, size)
                    continue
                group.append((index, oid, data))
                held += len(data)
                if len(group) >= 500 or held >= 16 << 20:
                    writer.put(group)
                    group, held = [], 0
            writer.put(group)
            writer.finish()
            # build() sorts, and makes the first name in path order the file of each hard-linked set:
            # the walk may meet a later name first (a/x linked from b, in another directory)
            tid = self.add_tree(Tree.build(entries))
        return tid

    @staticmethod
    def _set_blob(entries: list[Entry], index: int, oid: str, size: int) -> None:
        e = entries[index]
        entries[index] = Entry(e.path, "file", e.mode, e.uid, e.gid, blob=oid, size=size)

    def _read_or_stage(self, dir_fd: int, name: str, shown: str) -> tuple[str, bytes | None, int]:
        """A small file's (id, bytes, size); a large one is copied in the kernel, hashed from
        the copy and staged for the batch right away: (id, None, size). The file is opened in
        its directory (dir_fd) and never through a symlink, nor blocking on a FIFO: a name
        swapped since the walk saw a regular file there must not bring in what it points at."""
        try:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError as exc:
                raise _source_error(exc, shown) from exc
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _changed(shown, "it is no longer a regular file")
                if st.st_size <= _SMALL:
                    data = _read_all(fd, st.st_size)
                    return hash_bytes(data), data, len(data)
                big = self._stage_path()
                try:
                    oid, size = _copy_hashing_fd(fd, st.st_size, big)
                    self._publish(oid, big, "blob", size, ())
                except BaseException:
                    big.unlink(missing_ok=True)
                    raise
                return oid, None, size
            finally:
                os.close(fd)
        except OSError as exc:
            raise store_os_error(exc, self.root, Path(shown)) from exc

    def _stage_group(self, group: list[tuple[int, str, bytes]], entries: list[Entry]) -> None:
        """Write, for the batch, the files of a group that neither the store nor the batch has.

        Their ids are known before they are written, so each goes straight to its place in
        blobs/, where it is a stray until the batch's syncfs and row: no staging file, no rename.
        The batch's list of such files is written first, so a killed import leaves none that
        clean_stale_staging cannot find. Where a file of that name is already there (another
        process is writing it, or a killed one left it), this one is staged and renamed over it.
        """
        pending = self._pending
        assert pending is not None
        ids = {oid for _, oid, _ in group}
        present = ids - self.absent(ids)  # a damaged one is written again
        new: dict[str, bytes] = {}
        for index, oid, data in group:
            self._set_blob(entries, index, oid, len(data))
            if oid not in present and oid not in pending.rows:
                new[oid] = data
        if not new:
            return
        try:
            self._list_placing(pending, new)
            for oid, data in new.items():
                self._place(pending, oid, data)
        except OSError as exc:
            raise store_os_error(exc, self.root, self.blobs) from exc
        pending.syncer.start()  # what this group wrote goes to disk while the next is read

    def _list_placing(self, pending: _Pending, ids: Iterable[str]) -> None:
        if pending.placing < 0:
            pending.placing_path = f"{self._tmp}/{os.getpid()}-placing-{next(self._counter)}-{self._nonce}"
            pending.placing = os.open(pending.placing_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                                      0o644)
        data = memoryview("".join(f"{oid}\n" for oid in ids).encode())
        while data:
            data = data[os.write(pending.placing, data):]

    def _place(self, pending: _Pending, oid: str, data: bytes) -> None:
        """Write one file of a group in blobs/ (or, where its name is taken, staged) and give it to
        the batch with its row; on failure, nothing of it stays."""
        if oid[:2] not in pending.dirs:
            _mkdir(self.blobs / oid[:2])
            pending.dirs.add(oid[:2])
        path = f"{self._blobs}/{oid[:2]}/{oid}"
        written = pending.placed
        try:
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            path = f"{self._tmp}/{os.getpid()}-obj-{next(self._counter)}-{self._nonce}"
            written = pending.files
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            try:
                if pending.umask & 0o444:
                    os.fchmod(out, 0o444)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            finally:
                os.close(out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        written[oid] = path
        pending.rows[oid] = ("blob", len(data), ())

    def _present(self, oids: set[str]) -> set[str]:
        """Which of these ids the store has: one query per 500."""
        return set(self.sizes(oids))

    def sizes(self, oids: Iterable[str]) -> dict[str, int]:
        """The size of each of these objects the store has: one query per 500 ids."""
        return {oid: size for oid, (_, size) in self.kinds_and_sizes(oids).items()}

    def kinds_and_sizes(self, oids: Iterable[str]) -> dict[str, tuple[str, int]]:
        """(kind, size) of each of these objects the store has: one query per 500 ids."""
        found: dict[str, tuple[str, int]] = {}
        ids = sorted(set(oids))
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            rows = self._q(f"SELECT id, kind, size FROM objects WHERE id IN ({','.join('?' * len(part))})", part)
            found.update((oid, (kind, size)) for oid, kind, size in rows)
        return found

    # -- realisations and roots ----------------------------------------------

    def realisation(self, plan_hash: str) -> str | None:
        """The object a plan made, when it is intact, and for an image its kernel and layers too
        (what the image hands Firecracker); else None, and the plan is realized again."""
        rows = self._q("SELECT object FROM realisations WHERE plan = ?", (plan_hash,))
        if not rows or not self.intact(rows[0][0]):
            return None
        info = self.info(str(rows[0][0]))
        return None if info.kind == "image" and self.absent(info.refs) else info.id

    def record_realisation(self, plan_hash: str, oid: str, record: bytes, name: str,
                           substituted: tuple[str, bytes] | None = None) -> None:
        """substituted: (the cache it came from, the signed realisation record that vouched for
        it), kept so that a push passes on those signatures instead of vouching with its own;
        None: built here."""
        if not self.has(oid):
            raise StoreError(f"cannot record a realisation of {oid}: not in the store")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO realisations (plan, object, record, name, created) "
                       "VALUES (?, ?, ?, ?, ?)", (plan_hash, oid, record, name, int(time.time())))
            if substituted is None:
                db.execute("DELETE FROM substitutions WHERE plan = ?", (plan_hash,))
            else:
                db.execute("INSERT OR REPLACE INTO substitutions VALUES (?, ?, ?)", (plan_hash, *substituted))

    def substitution(self, plan_hash: str) -> tuple[str, bytes] | None:
        """(cache, signed realisation record) when the plan's realisation was substituted, else None."""
        rows = self._q("SELECT origin, realisation FROM substitutions WHERE plan = ?", (plan_hash,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def plans_for(self, oid: str) -> list[tuple[str, str, Any]]:
        """(plan hash, name, decoded plan record) of every realisation that produced oid."""
        rows = self._q("SELECT plan, name, record FROM realisations WHERE object = ? ORDER BY created", (oid,))
        return [(p, n, canonical.decode(r, "plan record")) for p, n, r in rows]

    def realisations_of(self, oid: str) -> list[tuple[str, bytes]]:
        """(plan hash, canonical plan record) of every realisation that produced oid."""
        return [(p, bytes(r)) for p, r in self._q("SELECT plan, record FROM realisations WHERE object = ?", (oid,))]

    def plan_record(self, plan_hash: str) -> tuple[str, Any] | None:
        rows = self._q("SELECT object, record FROM realisations WHERE plan = ?", (plan_hash,))
        if not rows:
            return None
        return rows[0][0], canonical.decode(rows[0][1], "plan record")

    def add_root(self, name: str, oid: str, *, link: bool = False) -> None:
        if not name.strip():
            raise StoreError("a gc root needs a name", "e.g. --root demo-kernel")
        if not self.has(oid):
            raise NotFound(f"object {oid} is not in the store")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO roots VALUES (?, ?, ?)", (name, oid, int(link)))

    def remove_root(self, name: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM roots WHERE name = ?", (name,)).rowcount > 0

    def roots(self) -> list[tuple[str, str, bool]]:
        return [(n, o, bool(link)) for n, o, link in self._q("SELECT name, object, link FROM roots ORDER BY name")]

    def closure(self, oids: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(oids)
        while todo:
            oid = todo.pop()
            if oid in seen:
                continue
            seen.add(oid)
            todo.extend(r[0] for r in self._q("SELECT ref FROM refs WHERE referrer = ?", (oid,)))
        return seen

    # -- chunk index: where each chunk of a local blob lies, to seed pulls --------

    def record_chunks(self, blob: str, chunks: Iterable[tuple[str, int, int]],
                      lists: Iterable[tuple[str, bytes]] = ()) -> None:
        """chunks: (chunk id, offset, length) of blob, which must be in the store; lists: (id,
        bytes) of the pieces a cache cuts a long chunk list into, kept so that a pull of the next
        version of this blob fetches only the pieces that changed (the caller checks them by id)."""
        self.record_chunk_index([(blob, chunks, lists)])

    def record_chunk_index(self, blobs: Iterable[tuple[str, Iterable[tuple[str, int, int]],
                                                     Iterable[tuple[str, bytes]]]]) -> None:
        """record_chunks of many blobs, (blob, chunks, lists) each, in one transaction."""
        with self._transaction() as db:
            for blob, chunks, lists in blobs:
                db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                               [(c, blob, off, n) for c, off, n in chunks])
                db.executemany("INSERT OR IGNORE INTO chunk_lists VALUES (?, ?, ?)",
                               [(lid, blob, data) for lid, data in lists])

    def find_lists(self, ids: Iterable[str]) -> dict[str, bytes]:
        """The bytes of the chunk lists of local blobs that have these ids (see record_chunks);
        a row whose bytes do not hash to its id is left out, so the caller fetches that one."""
        found: dict[str, bytes] = {}
        wanted = list(dict.fromkeys(ids))
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            for lid, data in self._q("SELECT l.list, l.data FROM chunk_lists l JOIN objects o ON o.id = l.blob "
                                     f"WHERE l.list IN ({','.join('?' * len(part))})", part):
                if isinstance(data, bytes) and hash_bytes(data) == lid:
                    found[lid] = data
        return found

    def chunked(self, blob: str) -> bool:
        return bool(self._q("SELECT 1 FROM chunks WHERE blob = ? LIMIT 1", (blob,)))

    def find_chunks(self, chunks: Iterable[str]) -> dict[str, tuple[Path, int, int]]:
        """Local copies of the chunks the store has: chunk -> (blob path, offset, length)."""
        found: dict[str, tuple[Path, int, int]] = {}
        wanted = list(dict.fromkeys(chunks))
        if not wanted or not self._q("SELECT 1 FROM chunks LIMIT 1"):
            return found
        blobs: dict[str, Path | None] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            for chunk, blob, offset, length in self._q(
                    "SELECT c.chunk, c.blob, c.offset, c.length FROM chunks c JOIN objects o ON o.id = c.blob "
                    f"WHERE c.chunk IN ({','.join('?' * len(part))})", part):
                if blob not in blobs:
                    path = self.blob_path(blob)
                    blobs[blob] = path if path.exists() else None
                if chunk not in found and (where := blobs[blob]) is not None:
                    found[chunk] = (where, offset, length)
        return found

    # -- locks ------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False, wait: bool = True) -> Iterator[None]:
        """An flock on locks/NAME.lock; wait=False: BlockingIOError when another holds it."""
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)

    # -- gc and verify ---------------------------------------------------------

    def live_roots(self, *, prune: bool = False) -> list[str]:
        """Root objects. An out-link keeps whatever object of this store it points at when this
        runs (see root_object); one that is gone or points out of the store keeps nothing, and a real
        gc (prune) drops its root for good and records where a repointed link now points."""
        live = []
        for name, oid, link in self.roots():
            now = self.root_object(name, oid, link)
            if now is None:
                if prune:
                    self.remove_root(name)
                continue
            live.append(now)
            if prune and now != oid:
                self.add_root(name, now, link=True)
        return live

    def root_object(self, name: str, oid: str, link: bool) -> str | None:
        """The object a root keeps alive. A named root: its own. An out-link: the object of this store
        it points at now, read at each gc as Nix reads its gc roots, so that two realizes racing for
        one -o name, or one killed between making the link and recording it, never leave a link to
        a collected object; while the link cannot be read (permissions), the recorded object. None: the
        link is gone or points out of the store."""
        if not link:
            return oid
        try:
            target = os.readlink(name)
        except OSError as exc:
            return None if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL) else oid
        found = os.path.basename(target)
        if not is_id(found) or not self.has(found):
            return None
        here = os.path.realpath(os.path.join(os.path.dirname(name), target))
        return found if here == os.path.realpath(self.blob_path(found)) else None

    def gc(self, *, dry_run: bool = False) -> tuple[list[str], int]:
        """Delete every object no root reaches; returns (deleted ids, bytes freed). A dry run
        changes nothing and counts what gc would free: dead objects, strays, partial pulls.
        Scratch directories kept by realize --keep-failed are removed too (not counted)."""
        with self.lock("gc"):
            keep = self.closure(self.live_roots(prune=not dry_run))
            dead = [(oid, size) for oid, size in self._q("SELECT id, size FROM objects") if oid not in keep]
            strays = self.stray_files()
            kept = self.tmp / "pulls"  # partial objects of pulls that did not finish
            parts = list(kept.iterdir()) if kept.is_dir() else []
            gone = {oid for oid, _ in dead}
            logs = [p for plan, oid in self._q("SELECT plan, object FROM realisations") if oid in gone
                    and (p := self.logs / f"{plan}.log").exists()]  # a failed build's log stays
            litter = sum(p.stat().st_size for p in [*strays, *logs]) + sum(p.stat().st_blocks * 512 for p in parts)
            if dry_run:
                return [d for d, _ in dead], sum(s for _, s in dead) + litter
            # What has no rows goes first: on a full disk the transaction needs the room it frees.
            for p in [*strays, *parts]:
                p.unlink(missing_ok=True)
            for p in self.tmp.glob("failed-*"):  # what realize --keep-failed kept
                remove_tree(p)
            self.clean_stale_staging(gc_held=True)
            # Rows go before their files: a crash then leaves stray files, never rows without files.
            with self._transaction() as db:
                for oid, _ in dead:
                    db.execute("DELETE FROM objects WHERE id = ?", (oid,))
                    db.execute("DELETE FROM refs WHERE referrer = ?", (oid,))
                    db.execute("DELETE FROM realisations WHERE object = ?", (oid,))
                    db.execute("DELETE FROM chunks WHERE blob = ?", (oid,))
                # the chunk lists of blobs that are gone: these, and any an older castore's gc left
                db.execute("DELETE FROM chunk_lists WHERE blob NOT IN (SELECT id FROM objects)")
                db.execute("DELETE FROM substitutions WHERE plan NOT IN (SELECT plan FROM realisations)")
            freed = litter
            for oid, size in dead:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(oid).unlink()
                    freed += size
            for p in logs:
                p.unlink(missing_ok=True)
            # every plan lock is taken under a shared gc lock: none is held or about to be now
            for p in self.locks.glob("*.lock"):
                if is_id(p.stem):
                    p.unlink(missing_ok=True)
            return [d for d, _ in dead], freed

    def stray_files(self) -> list[Path]:
        known = {r[0] for r in self._q("SELECT id FROM objects")}
        return [p for d in self.blobs.iterdir() if d.is_dir() for p in d.iterdir() if p.name not in known]

    def verify(self, *, contents: bool = True, repair: bool = False) -> tuple[list[str], list[str]]:
        """Check every object; returns (problems, notes). Problems mean corruption. repair: remove
        the file of each damaged object (its row stays), so that the next realize or pull, which
        take an object whose file is missing as absent, puts a good copy in its place; and make
        writable files read-only again."""
        problems: list[str] = []
        notes: list[str] = []
        rows = self._q("SELECT id, kind, size FROM objects")
        known = {r[0] for r in rows}
        damaged: list[str] = []
        for oid, kind, size in rows:
            path = self.blob_path(oid)
            try:
                st = path.stat()
            except FileNotFoundError:
                problems.append(f"{oid} ({kind}): file missing")
                continue
            if st.st_size != size:
                problems.append(f"{oid} ({kind}): size {st.st_size}, expected {size}")
                damaged.append(oid)
                continue
            if st.st_mode & 0o222:
                problems.append(f"{oid} ({kind}): file is writable")
                if repair:
                    os.chmod(path, 0o444)
                    notes.append(f"made {oid[:12]} read-only again")
            if contents:
                with open(path, "rb") as f:
                    actual = hash_fileobj(f, st.st_size)
                if actual != oid:
                    problems.append(f"{oid} ({kind}): content hashes to {actual}")
                    damaged.append(oid)
                    continue
            if kind == "tree":
                try:
                    self.read_tree(oid)
                except CastoreError as exc:
                    problems.append(f"{oid} (tree): {exc}")
            elif kind == "image":
                try:
                    self.read_image(oid)
                except CastoreError as exc:
                    problems.append(f"{oid} (image): {exc}")
        for referrer, ref in self._q("SELECT referrer, ref FROM refs"):
            if ref not in known:
                problems.append(f"{referrer}: references {ref}, which is missing")
        for plan, oid in self._q("SELECT plan, object FROM realisations"):
            if oid not in known:
                problems.append(f"realisation of plan {plan} names missing object {oid}")
        if repair and damaged:
            with self.lock("gc", shared=True):
                for oid in damaged:
                    self.blob_path(oid).unlink(missing_ok=True)
            notes.append(f"removed the damaged files of {len(damaged)} objects: realize or pull them again, "
                         "and the good copies take their places")
        strays = self.stray_files()
        notes += [f"stray file {p.name} (no record; castore gc removes it)" for p in strays[:_LISTED]]
        if len(strays) > _LISTED:
            notes.append(f"... and {len(strays) - _LISTED} more stray files")
        kept = self.tmp / "pulls"
        if kept.is_dir() and any(kept.iterdir()):
            notes.append(f"{len(list(kept.iterdir()))} partial objects kept from an unfinished pull "
                         "(the next pull keeps what verifies in them; castore gc removes them)")
        left = stale_entries(self.tmp)
        if left:
            notes.append(f"staging left by a stopped process: {len(left)} files or build directories in tmp/ "
                         "(removed by the next add, realize or gc)")
        return problems, notes


class _Writer:
    """A thread that passes groups of files to write(group, entries), one after another, while
    the caller reads the next: at most one group waits, so at most three are held in memory.
    Its error stops the caller at its next put(), and finish() raises it. Leaving the context
    without finish() (the caller failed) lets the thread end its group and drop the rest.
    Entries are shared: the thread sets blob ids at indexes the caller has appended (an item
    assignment and an append are each atomic in CPython)."""

    def __init__(self, write: Callable[[list[tuple[int, str, bytes]], list[Entry]], None],
                 entries: list[Entry]) -> None:
        self._write = write
        self._entries = entries
        self._queue: queue.Queue[list[tuple[int, str, bytes]] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="castore-add-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while (group := self._queue.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    self._write(group, self._entries)
                except BaseException as exc:
                    self._error = exc

    def check(self) -> None:
        """Raise the thread's error: called for every file, so that a failed writer stops the
        walk before it copies in the next large file for nothing."""
        if self._error is not None:
            raise self._error

    def put(self, group: list[tuple[int, str, bytes]]) -> None:
        self.check()
        if group:
            self._queue.put(group)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop = True
            # not put(): a Ctrl-C inside the caller's last put() may have queued its group without
            # waking the thread, and a put() on the full queue would then wait for ever
            with self._queue.mutex:
                self._queue.queue.clear()
                self._queue.queue.append(None)
                self._queue.not_empty.notify_all()
            self._thread.join()


def _walk(base: str, all_root: bool, entries: list[Entry]) -> Generator[tuple[int, int, str, str], None, None]:
    """Walk a directory without following links, appending an entry per name to entries (files
    without blob ids yet), and yield each regular file to import as (entry index, descriptor of
    its directory, name, path for messages) while that directory is open.

    Each directory is opened in its parent's descriptor, never through a symlink: a directory
    swapped for a link while the walk runs stops it with an error, where a walk by path would
    read what the link points at (any file of the machine, when root adds a user's directory)."""
    inodes: dict[tuple[int, int], str] = {}
    more_descriptors(4096)  # one per level of depth: as deep as paths of PATH_MAX go
    try:
        top = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _source_error(exc, base) from exc
    stack = [(top, "", _listing(top, base))]  # _listing closes the descriptor if it fails
    prefix = base if base.endswith("/") else base + "/"
    try:
        while stack:
            dir_fd, rel, names = stack[-1]
            d = next(names, None)
            if d is None:
                stack.pop()
                os.close(dir_fd)
                continue
            path = f"{rel}/{d.name}" if rel else d.name
            shown = prefix + path  # what messages name: os.path.join cost 2 us an entry
            if not d.name.isascii():
                try:
                    d.name.encode()
                except UnicodeEncodeError:
                    raise StoreError(f"{os.fsencode(shown)!r}: the name is not UTF-8, and tree paths are",
                                     "rename it (convmv can), or leave it out") from None
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as exc:
                raise _source_error(exc, shown) from exc
            uid, gid = (0, 0) if all_root else (st.st_uid, st.st_gid)
            mode = stat.S_IMODE(st.st_mode)
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFDIR:
                entries.append(Entry(path, "dir", mode, uid, gid))
                try:
                    fd = os.open(d.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError as exc:
                    raise _source_error(exc, shown) from exc
                stack.append((fd, path, _listing(fd, shown)))
            elif fmt == stat.S_IFREG:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    entries.append(Entry(path, "hardlink", 0, uid, gid, target=inodes[key]))
                    continue
                inodes[key] = path
                entries.append(Entry(path, "file", mode, uid, gid, size=st.st_size))
                yield len(entries) - 1, dir_fd, d.name, shown
            elif fmt == stat.S_IFLNK:
                try:
                    target = os.readlink(d.name, dir_fd=dir_fd)
                except OSError as exc:
                    raise _source_error(exc, shown) from exc
                entries.append(Entry(path, "symlink", 0o777, uid, gid, target=target))
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                t = "char" if fmt == stat.S_IFCHR else "block"
                dev = st.st_rdev
                entries.append(Entry(path, t, mode, uid, gid, major=os.major(dev), minor=os.minor(dev)))
            elif fmt == stat.S_IFIFO:
                entries.append(Entry(path, "fifo", mode, uid, gid))
            # sockets are runtime state, not content: left out
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)


def _listing(dir_fd: int, shown: str) -> Iterator[os.DirEntry[str]]:
    """The entries of an open directory, by name; the directory is closed if they cannot be read."""
    try:
        with os.scandir(dir_fd) as it:
            return iter(sorted(it, key=_NAME))
    except OSError as exc:
        os.close(dir_fd)
        raise _source_error(exc, shown) from exc


def _changed(shown: str, how: str = "") -> StoreError:
    return StoreError(f"{shown} changed while it was being added{': ' + how if how else ''}",
                      "add it again when nothing is changing it")


def _source_error(exc: OSError, shown: str) -> StoreError:
    """An error opening or listing what is being added, said as such (not as the store's)."""
    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):  # gone, or swapped for a link, since the walk
        return _changed(shown)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"cannot read {shown}: {exc.strerror}",
                          "castore add reads every file of the directory: make it readable, or leave it out")
    if exc.errno == errno.EMFILE:
        return StoreError(f"cannot open {shown}: too many open files", "is the directory nested that deep?")
    return StoreError(f"cannot read {shown}: {exc.strerror}")


def _read_all(fd: int, size: int) -> bytes:
    """The file's bytes: exactly size of them in one read, else read on to its end."""
    data = os.read(fd, size + 1)
    if len(data) == size:  # a short read of a regular file: its end (one read call, not two)
        return data
    while len(data) <= size and (more := os.read(fd, size + 1 - len(data))):
        data += more
    return data


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: files get their mode set explicitly


def _mkdir(path: Path) -> None:
    """Store directories are world-readable whatever the umask: Firecracker may run as another user."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        def onerror(func: Any, p: str, exc: Any) -> None:
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o755)
                os.chmod(p, 0o755)
                func(p)
        shutil.rmtree(path, onerror=onerror)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_tree(path: Path) -> None:
    _remove(path)


def _copy_hashing(src: Path, dest: Path) -> tuple[str, int]:
    """Copy src to a new read-only file dest; return the BLAKE3 id and size of what dest holds."""
    fd = os.open(src, os.O_RDONLY)
    try:
        return _copy_hashing_fd(fd, os.fstat(fd).st_size, dest)
    finally:
        os.close(fd)


def _copy_hashing_fd(fd: int, size: int, dest: Path) -> tuple[str, int]:
    """Small files are hashed from the bytes written; large ones are copied in the
    kernel and hashed from the copy, so the id always describes the staged bytes."""
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        if size <= _SMALL:
            data = _read_all(fd, size)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            start_writeback(out)
            return hash_bytes(data), len(data)
        return _copy_pieces(fd, out, size)
    finally:
        os.close(out)


def _copy_pieces(fd: int, out: int, size: int) -> tuple[str, int]:
    """Copy size bytes (fewer if src ends sooner) piece by piece: each piece is read into a buffer,
    hashed there and sent to disk by DirectWriter while the next is read, so the id describes the
    bytes written and the fsync that follows has little left to wait for."""
    hasher = Hasher(threads=True)
    at = 0
    with DirectWriter(out, hasher=hasher) as writer:
        while at < size:
            space = writer.space()
            n = os.preadv(fd, [space[:size - at]], at)
            if n == 0:
                break
            writer.commit(n)
            at += n
        writer.finish()
    return hasher.hexdigest(), at


_SQLITE_FULL = 13


def _blob_files(blobs: Path) -> int:
    try:
        return sum(1 for d in blobs.iterdir() if d.is_dir() for _ in d.iterdir())
    except OSError:  # no blobs/ yet: a new store
        return 0


def _lost_database(root: Path, held: int, what: str) -> StoreError:
    return StoreError(f"the store database {root / 'db.sqlite'} {what}, but blobs/ holds {held} files: "
                      "the database was lost or emptied",
                      "restore db.sqlite from a backup; castore will not take this for a new store, whose gc "
                      "would delete every blob")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _full(path: Path) -> bool:
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


def no_space(root: Path, hint: str) -> StoreError:
    return StoreError(f"no space left on the device holding {root}", hint)


def store_os_error(exc: OSError, root: Path, what: Path | None = None,
                   retry: str = "nothing was added; free space (castore gc) and retry") -> CastoreError:
    """The error a user can act on for an OSError met while writing into the store at root."""
    if exc.errno == errno.ENOSPC:
        return no_space(root, retry)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"permission denied: {exc.filename or what or root}",
                          f"run as the store's owner, or use a store of your own (--store DIR); {root} is this one")
    return StoreError(f"I/O error on {exc.filename or what or root}: {exc.strerror}",
                      "the disk or filesystem failed: see dmesg; `castore verify` checks what the store holds")
