"""Trees and images as data, and their canonical byte forms.

A *tree* is a directory snapshot: entries sorted by path components, each with
its type, mode, owner and content (a blob id, a link target or device
numbers). Ownership and modes live here, never on the host, so an unprivileged
user can describe a root-owned root filesystem.

Invariants, checked by :meth:`Tree.validate` on construction and on decode:

* paths are relative (``bin/sh``), normalized, with no ``.``/``..`` or empty
  components; the root directory itself is implicit (0755, root:root);
* every parent of an entry is a ``dir`` entry of the same tree, so no entry
  is reached through a symlink;
* a ``hardlink`` names a ``file`` entry of the same tree;
* modes carry permission bits only (``0o7777``); the type is in ``type``.

Grammar of a tree record (canonical msgpack, see :mod:`castore.canonical`)::

    {"format": 1, "kind": "tree", "entries": [entry, ...]}
    entry := {"path": str, "type": "dir"|"file"|"symlink"|"hardlink"|"char"|"block"|"fifo",
              "mode": int, "uid": int, "gid": int,
              file:  "blob": id, "size": int
              symlink, hardlink: "target": str
              char, block: "major": int, "minor": int}

An image record names the kernel blob, the rootfs layers bottom first and the
machine defaults::

    {"format": 1, "kind": "image", "arch": "x86_64", "kernel": id,
     "layers": [{"blob": id, "format": "squashfs"}, ...],
     "cmdline": str, "overlay_size": int, "vcpus": int, "mem_mib": int}
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from castore import canonical
from castore.errors import EncodingError, UnsafeArchive
from castore.hashing import hash_bytes, is_id

FORMAT = 1
ENTRY_TYPES = ("dir", "file", "symlink", "hardlink", "char", "block", "fifo")


def normalize_path(path: str, what: str = "path") -> str:
    """``/usr//bin/`` -> ``usr/bin``; refuses anything that climbs out of the root."""
    if "\0" in path:
        raise UnsafeArchive(f"{what} {path!r} contains a NUL byte")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafeArchive(f"{what} {path!r} climbs out of the tree root with '..'")
        parts.append(part)
    return "/".join(parts)


def path_key(path: str) -> bytes:
    """Tree order: paths compared component by component, as bytes. NUL sorts below every byte
    a path component may hold, so the path with its slashes made NULs compares the same way,
    in one C-level comparison (a tuple of components cost 8 us an entry)."""
    return path.encode().replace(b"/", b"\0")


@dataclass(frozen=True)
class Entry:
    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    blob: str | None = None
    size: int | None = None
    target: str | None = None
    major: int | None = None
    minor: int | None = None

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "path": self.path,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.type == "file":
            rec["blob"] = self.blob
            rec["size"] = self.size
        elif self.type in ("symlink", "hardlink"):
            rec["target"] = self.target
        elif self.type in ("char", "block"):
            rec["major"] = self.major
            rec["minor"] = self.minor
        return rec

    @classmethod
    def from_record(cls, rec: Any) -> Entry:
        if not isinstance(rec, dict):
            raise EncodingError("tree entry is not a map")
        try:
            return cls(
                path=rec["path"],
                type=rec["type"],
                mode=rec["mode"],
                uid=rec["uid"],
                gid=rec["gid"],
                blob=rec.get("blob"),
                size=rec.get("size"),
                target=rec.get("target"),
                major=rec.get("major"),
                minor=rec.get("minor"),
            )
        except KeyError as exc:
            raise EncodingError(f"tree entry lacks field {exc}") from exc

    def check(self) -> None:
        if self.type not in ENTRY_TYPES:
            raise EncodingError(f"{self.path}: unknown entry type {self.type!r}")
        if not self.path or normalize_path(self.path) != self.path:
            raise UnsafeArchive(f"tree entry path {self.path!r} is not normalized")
        if not (0 <= self.mode <= 0o7777):
            raise EncodingError(f"{self.path}: mode {self.mode:o} has bits beyond 0o7777")
        if self.uid < 0 or self.gid < 0:
            raise EncodingError(f"{self.path}: negative owner")
        if self.type == "file" and (
            self.blob is None or not is_id(self.blob) or self.size is None or self.size < 0
        ):
            raise EncodingError(f"{self.path}: file entry needs a blob id and a size")
        if self.type in ("symlink", "hardlink") and not self.target:
            raise EncodingError(f"{self.path}: {self.type} needs a target")
        if self.type in ("char", "block") and (self.major is None or self.minor is None):
            raise EncodingError(f"{self.path}: device needs major and minor numbers")


@dataclass(frozen=True)
class Tree:
    entries: tuple[Entry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> Tree:
        """Sort, create missing parents (0755 root:root), and point hard links forward.

        A hard link must follow its target in path order; when it would not,
        the two swap roles (they are one inode, so nothing else changes).
        """
        by_path: dict[str, Entry] = {}
        for e in entries:
            by_path[e.path] = e
        groups: dict[str, list[str]] = {}
        for e in by_path.values():
            if e.type == "hardlink" and e.target in by_path:
                target = e.target
                while by_path[target].type == "hardlink" and by_path[target].target in by_path:
                    target = by_path[target].target or ""
                groups.setdefault(target, []).append(e.path)
        for target, links in groups.items():
            t = by_path[target]
            if t.type != "file":
                continue  # validate() reports it
            first = min([target, *links], key=path_key)
            by_path[first] = replace(t, path=first)
            for p in [target, *links]:
                if p != first:
                    by_path[p] = Entry(p, "hardlink", 0, t.uid, t.gid, target=first)
        for path in list(by_path):
            parent = posixpath.dirname(path)
            while parent and parent not in by_path:
                by_path[parent] = Entry(parent, "dir", 0o755)
                parent = posixpath.dirname(parent)
        return cls(tuple(sorted(by_path.values(), key=lambda e: path_key(e.path))))

    def validate(self) -> None:
        seen: dict[str, Entry] = {}
        previous: bytes | None = None
        for e in self.entries:
            e.check()
            key = path_key(e.path)
            if previous is not None and key <= previous:
                raise EncodingError(f"tree entries not sorted or duplicated at {e.path!r}")
            previous = key
            parent = posixpath.dirname(e.path)
            if parent:
                p = seen.get(parent)
                if p is None:
                    raise EncodingError(f"{e.path}: parent directory {parent!r} missing")
                if p.type != "dir":
                    raise UnsafeArchive(f"{e.path}: parent {parent!r} is a {p.type}, not a dir")
            if e.type == "hardlink":
                t = seen.get(e.target or "")
                if t is None or t.type != "file":
                    raise UnsafeArchive(
                        f"{e.path}: hard link target {e.target!r} is not an earlier file"
                    )
            seen[e.path] = e

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, path: str) -> Entry | None:
        path = normalize_path(path)
        for e in self.entries:
            if e.path == path:
                return e
        return None

    def refs(self) -> list[str]:
        return sorted({e.blob for e in self.entries if e.blob is not None})

    def size(self) -> int:
        return sum(e.size or 0 for e in self.entries)

    def encode(self) -> bytes:
        return canonical.encode(
            {"format": FORMAT, "kind": "tree", "entries": [e.to_record() for e in self.entries]}
        )

    @property
    def id(self) -> str:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Tree:
        rec = canonical.decode(data, "tree manifest")
        if not isinstance(rec, dict) or rec.get("kind") != "tree":
            raise EncodingError("not a tree manifest")
        if rec.get("format") != FORMAT:
            raise EncodingError(f"tree manifest format {rec.get('format')!r} is not supported")
        return cls(tuple(Entry.from_record(r) for r in rec["entries"]))


@dataclass(frozen=True)
class Layer:
    blob: str
    format: str = "squashfs"


@dataclass(frozen=True)
class Image:
    kernel: str
    layers: tuple[Layer, ...]
    cmdline: str
    overlay_size: int
    vcpus: int
    mem_mib: int
    arch: str = "x86_64"

    def __post_init__(self) -> None:
        if not is_id(self.kernel) or not all(is_id(layer.blob) for layer in self.layers):
            raise EncodingError("image references must be full ids")
        if not self.layers:
            raise EncodingError("an image needs at least one rootfs layer")

    def refs(self) -> list[str]:
        return sorted({self.kernel, *(layer.blob for layer in self.layers)})

    def to_record(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "image",
            "arch": self.arch,
            "kernel": self.kernel,
            "layers": [{"blob": la.blob, "format": la.format} for la in self.layers],
            "cmdline": self.cmdline,
            "overlay_size": self.overlay_size,
            "vcpus": self.vcpus,
            "mem_mib": self.mem_mib,
        }

    def encode(self) -> bytes:
        return canonical.encode(self.to_record())

    @property
    def id(self) -> str:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Image:
        rec = canonical.decode(data, "image manifest")
        if not isinstance(rec, dict) or rec.get("kind") != "image":
            raise EncodingError("not an image manifest")
        if rec.get("format") != FORMAT:
            raise EncodingError(f"image manifest format {rec.get('format')!r} is not supported")
        try:
            return cls(
                kernel=rec["kernel"],
                layers=tuple(Layer(la["blob"], la["format"]) for la in rec["layers"]),
                cmdline=rec["cmdline"],
                overlay_size=rec["overlay_size"],
                vcpus=rec["vcpus"],
                mem_mib=rec["mem_mib"],
                arch=rec["arch"],
            )
        except (KeyError, TypeError) as exc:
            raise EncodingError(f"image manifest is malformed: {exc}") from exc


def with_path(entry: Entry, path: str) -> Entry:
    return replace(entry, path=path)


def object_record(kind: str, size: int, refs: list[str]) -> bytes:
    """The record a store or cache keeps per object: kind, size and references."""
    return canonical.encode({"format": FORMAT, "kind": kind, "size": size, "refs": sorted(refs)})
