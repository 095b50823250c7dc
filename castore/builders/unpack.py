"""unpack: a tar (plain, gz, xz, zst) or .deb archive into a tree, refusing hostile entries.

Nothing is extracted onto the host: entries become manifest entries and file
contents become blobs, so links are recorded and never followed. Refused:
absolute paths, ``..`` components, relative symlinks that climb above the
root, entries reached through a symlink, hard links to anything but an
earlier regular file (a link to itself included), names and link targets that
are not valid UTF-8 (a tree's paths are text). Ownership and modes are kept
from the archive. A later entry replaces an earlier one of the same name as
``tar -x`` does: hard links to a replaced file keep its old content.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from pathlib import Path
from typing import IO, Any

from castore.builders import BuildContext, Result, TreeResult
from castore.builders.treeops import Entries
from castore.errors import DISK_ERRNOS, CastoreError, UnsafeArchive
from castore.fsutil import free_bytes
from castore.hashing import Hasher
from castore.manifest import Entry, Tree, normalize_path

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_AR_MAGIC = b"!<arch>\n"
# Names decode as UTF-8 whatever the host's locale; bytes that are not UTF-8 survive as lone
# surrogates, so _check_names can refuse them showing the bytes.
_NAMES: dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape"}


def shown_name(name: str) -> str:
    """A member name quoted as Python would, with the bytes that are not UTF-8 as ``\\xNN``."""
    shown = (f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else repr(ch)[1:-1] for ch in name)
    return "'" + "".join(shown) + "'"


def _check_names(m: tarfile.TarInfo, what: str) -> None:
    for field, value in (("name", m.name), ("link target", m.linkname)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeArchive(
                f"{what}: archive entry {shown_name(m.name)} has a {field} "
                f"{shown_name(value) + ' ' if field != 'name' else ''}that is not valid UTF-8",
                "castore keeps paths as UTF-8 text; rename the entry when making the archive",
            ) from None


def safe_path(name: str) -> str:
    if name.startswith("/"):
        raise UnsafeArchive(f"archive entry {name!r} has an absolute path")
    path = normalize_path(name, "archive entry")
    return path


def check_symlink(path: str, target: str) -> None:
    if target.startswith("/"):
        return  # absolute targets resolve inside the image's own root at run time
    depth = len(path.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeArchive(f"symlink {path} -> {target} points outside the tree root")
        elif part not in ("", "."):
            depth += 1


def _open_tar(f: IO[bytes], what: str) -> tarfile.TarFile:
    head = f.read(8)
    f.seek(0)
    if head.startswith(_ZSTD_MAGIC):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|", **_NAMES)  # streamed: never all of it in memory
    try:
        return tarfile.open(fileobj=f, mode="r|*", **_NAMES)
    except tarfile.TarError as exc:
        if str(exc) == "empty file" and f.seek(0, io.SEEK_END) > 0:  # a compressed stream cut short
            raise CastoreError(f"{what}: corrupt archive: it ends before its first entry") from exc
        raise CastoreError(f"{what} is not a tar archive (plain, gz, bz2, xz or zst): {exc}") from exc
    except TypeError as exc:  # tarfile's gzip header reader does ord(b"") on a header cut short
        raise CastoreError(f"{what}: corrupt archive: the gzip header is cut short") from exc


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _deb_data(f: IO[bytes], what: str) -> IO[bytes]:
    """The data.tar.* member of a .deb (an ar archive), as a file object."""
    f.seek(len(_AR_MAGIC))
    while True:
        header = f.read(60)
        if len(header) < 60:
            raise CastoreError(f"{what}: .deb has no data.tar member")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise CastoreError(f"{what}: corrupt .deb member header") from exc
        if size < 0:  # would seek back onto this header, for ever
            raise CastoreError(f"{what}: corrupt .deb member header (size {size})")
        if name.startswith("data.tar"):
            return io.BytesIO(f.read(size))
        f.seek(size + (size & 1), io.SEEK_CUR)


def unpack_archive(archive: Path, scratch: Path, what: str = "") -> TreeResult:
    """what: the archive's name in messages (its file name if not given)."""
    with open(archive, "rb") as raw:
        what = what or archive.name
        f: IO[bytes] = raw
        if raw.read(8) == _AR_MAGIC:
            f = _deb_data(raw, what)
        raw.seek(0)
        entries = Entries()
        new_blobs: dict[str, Path] = {}
        try:
            with _open_tar(f, what) as tar:
                for n, member in enumerate(tar):
                    _check_names(member, what)
                    _member(tar, member, n, entries, new_blobs, scratch)
        except (tarfile.TarError, EOFError, OSError, ValueError, _zstd_error()) as exc:
            # ValueError: tarfile's int() of a malformed GNU sparse header
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise  # writing the members out: the disk's fault, not the archive's
            raise CastoreError(f"{what}: corrupt archive: {exc}") from exc
    return TreeResult(Tree.build(entries.values()), new_blobs)


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo, n: int, entries: Entries,
            new_blobs: dict[str, Path], scratch: Path) -> None:
    path = safe_path(m.name)
    if not path:
        return  # "./" itself: the root is implicit
    mode = m.mode & 0o7777
    owner: dict[str, Any] = {"uid": m.uid, "gid": m.gid}
    # A parent that is a symlink would let later entries write through it.
    parent = posixpath.dirname(path)
    while parent:
        e = entries.get(parent)
        if e is not None and e.type != "dir":
            raise UnsafeArchive(f"archive entry {m.name!r} lies beneath {parent!r}, which is a {e.type}")
        parent = posixpath.dirname(parent)
    old = entries.get(path)
    if old is not None and old.type == "dir" and not m.isdir():
        entries.drop(path)
    if m.isdir():
        entries.set(Entry(path, "dir", mode, **owner))
    elif m.isreg():
        # an entry's size is the archive's word, and a sparse entry costs it nothing to say
        if m.size > 64 << 20 and m.size > (free := free_bytes(scratch)):
            raise CastoreError(f"archive entry {m.name!r} is {m.size:,} bytes, more than the {free:,} free "
                               "where it would be unpacked")
        src = tar.extractfile(m)
        assert src is not None
        dest = scratch / f"f{n}"
        hasher = Hasher()
        with open(dest, "wb") as out:  # piece by piece: a member's size is the archive's say, not memory's
            while piece := src.read(1 << 20):
                hasher.update(piece)
                out.write(piece)
        oid = hasher.hexdigest()
        if oid in new_blobs:
            dest.unlink()
        else:
            new_blobs[oid] = dest
        entries.set(Entry(path, "file", mode, blob=oid, size=hasher.size, **owner))
    elif m.issym():
        check_symlink(path, m.linkname)
        entries.set(Entry(path, "symlink", 0o777, target=m.linkname, **owner))
    elif m.islnk():
        if m.linkname.startswith("/"):
            raise UnsafeArchive(f"hard link {m.name!r} has an absolute target {m.linkname!r}")
        target = normalize_path(m.linkname, "hard link target")
        t = entries.get(target)
        if target == path:
            if t is not None and t.type == "file":
                return  # GNU tar's way to store a file named twice on its command line: nothing new
            raise UnsafeArchive(f"hard link {m.name!r} -> {m.linkname!r} names itself")
        if t is None or t.type != "file":
            raise UnsafeArchive(f"hard link {m.name!r} -> {m.linkname!r} does not name an earlier file")
        entries.set(Entry(path, "hardlink", 0, target=target, **owner))
    elif m.ischr() or m.isblk():
        kind = "char" if m.ischr() else "block"
        entries.set(Entry(path, kind, mode, major=m.devmajor, minor=m.devminor, **owner))
    elif m.isfifo():
        entries.set(Entry(path, "fifo", mode, **owner))
    else:
        raise UnsafeArchive(f"archive entry {m.name!r} has an unsupported type {m.type!r}")


def _unpack(ctx: BuildContext) -> Result:
    archive = ctx.blob("archive")
    return unpack_archive(archive.path, ctx.scratch, f"{archive.label} ({archive.id[:12]})" if archive.label else "")


BUILD = {"unpack": _unpack}
