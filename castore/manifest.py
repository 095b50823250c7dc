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
* modes carry permission bits only (``0o7777``); the type is in ``type``;
* every field has its type and range: ``uid``, ``gid``, ``major`` and ``minor``
  from 0 to 2**32-1, ``size`` from 0 to 2**63-1, text is str (never a bool for an
  int). Decoding refuses missing fields and fields the entry type does not have,
  so a manifest from a cache is as well-formed as one built here.

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

with layer formats from :data:`LAYER_FORMATS`, ``overlay_size`` from 0 to 2**63-1,
``vcpus`` from 1 to 4096 and ``mem_mib`` from 1 to 2**32-1.
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
LAYER_FORMATS = ("squashfs",)
KINDS = ("blob", "tree", "image")  # what the store holds
MAX_ID32 = (1 << 32) - 1  # uid, gid, device major and minor
MAX_SIZE = (1 << 63) - 1  # what a file offset (off_t) holds

_COMMON = ("path", "type", "mode", "uid", "gid")
_ENTRY_KEYS = {
    t: frozenset((*_COMMON, *extra))
    for t, extra in (("dir", ()), ("file", ("blob", "size")), ("symlink", ("target",)), ("hardlink", ("target",)),
                     ("char", ("major", "minor")), ("block", ("major", "minor")), ("fifo", ()))
}
_TREE_KEYS = frozenset(("format", "kind", "entries"))
_IMAGE_KEYS = frozenset(("format", "kind", "arch", "kernel", "layers", "cmdline", "overlay_size", "vcpus", "mem_mib"))
_LAYER_KEYS = frozenset(("blob", "format"))


def _int_in(value: object, low: int, high: int) -> bool:
    """An int (a bool is not one) from low to high."""
    return type(value) is int and low <= value <= high


def brief(value: object) -> str:
    """repr(value), cut short: error messages quote what a hostile record holds, however big."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:72]}...{text[-5:]}"


def _is_id(value: object) -> bool:
    return isinstance(value, str) and is_id(value)


def _fields(rec: dict[str, Any], keys: frozenset[str], what: str) -> None:
    """rec has exactly keys: a record with a field missing or one it should not have is malformed."""
    if rec.keys() != keys:
        missing = sorted(keys - rec.keys())
        if missing:
            raise EncodingError(f"{what} lacks field {missing[0]!r}")
        raise EncodingError(f"{what} has an unexpected field {brief(sorted(rec.keys() - keys)[0])}")


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
        kind = rec.get("type")
        keys = _ENTRY_KEYS.get(kind) if isinstance(kind, str) else None
        if keys is None:
            raise EncodingError(f"tree entry {brief(rec.get('path'))}: unknown entry type {brief(kind)}")
        if rec.keys() != keys:
            _fields(rec, keys, f"tree entry {brief(rec.get('path'))}")
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

    def check(self) -> None:
        path = self.path
        if not isinstance(path, str):
            raise EncodingError(f"tree entry path {brief(path)} is not a string")
        if self.type not in ENTRY_TYPES:
            raise EncodingError(f"{brief(path)}: unknown entry type {brief(self.type)}")
        if not path or normalize_path(path) != path:
            raise UnsafeArchive(f"tree entry path {brief(path)} is not normalized")
        if not _int_in(self.mode, 0, 0o7777):
            raise EncodingError(f"{brief(path)}: mode {brief(self.mode)} is not an int of permission bits "
                                "(0 to 0o7777)")
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if not _int_in(value, 0, MAX_ID32):
                raise EncodingError(f"{brief(path)}: {name} {brief(value)} is not an int from 0 to 2**32-1")
        if self.type == "file":
            if not _is_id(self.blob):
                raise EncodingError(f"{brief(path)}: file entry needs a blob id, not {brief(self.blob)}")
            if not _int_in(self.size, 0, MAX_SIZE):
                raise EncodingError(f"{brief(path)}: file size {brief(self.size)} is not an int from 0 to 2**63-1")
        elif self.type in ("symlink", "hardlink"):
            if not isinstance(self.target, str) or not self.target or "\0" in self.target:
                raise EncodingError(f"{brief(path)}: {self.type} needs a target (a string without NUL), "
                                    f"not {brief(self.target)}")
        elif self.type in ("char", "block"):
            for name, number in (("major", self.major), ("minor", self.minor)):
                if not _int_in(number, 0, MAX_ID32):
                    raise EncodingError(f"{brief(path)}: device {name} {brief(number)} is not an int from 0 to 2**32-1")


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
                chain = {e.path}
                while by_path[target].type == "hardlink" and by_path[target].target in by_path:
                    if target in chain:
                        raise UnsafeArchive(f"hard link {e.path!r} -> {e.target!r} leads back to {target!r}: "
                                            "a hard link cycle names no file")
                    chain.add(target)
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
        if type(rec.get("format")) is not int or rec.get("format") != FORMAT:
            raise EncodingError(f"tree manifest format {brief(rec.get('format'))} is not supported")
        _fields(rec, _TREE_KEYS, "tree manifest")
        if not isinstance(rec["entries"], list):
            raise EncodingError(f"tree manifest entries are {brief(rec['entries'])}, not a list")
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
        if not _is_id(self.kernel) or not all(_is_id(layer.blob) for layer in self.layers):
            raise EncodingError("image references must be full ids")
        if not self.layers:
            raise EncodingError("an image needs at least one rootfs layer")
        for layer in self.layers:
            if not isinstance(layer.format, str) or layer.format not in LAYER_FORMATS:
                raise EncodingError(f"image layer {layer.blob} has format {brief(layer.format)}, "
                                    f"not one of {', '.join(LAYER_FORMATS)}")
        if not isinstance(self.arch, str) or not self.arch:
            raise EncodingError(f"image arch {brief(self.arch)} is not a name")
        if not isinstance(self.cmdline, str) or "\0" in self.cmdline:
            raise EncodingError(f"image cmdline {brief(self.cmdline)} is not a string without NUL")
        for name, value, low, high in (("overlay_size", self.overlay_size, 0, MAX_SIZE),
                                       ("vcpus", self.vcpus, 1, 4096), ("mem_mib", self.mem_mib, 1, MAX_ID32)):
            if not _int_in(value, low, high):
                raise EncodingError(f"image {name} {brief(value)} is not an int from {low} to {high}")

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
        if type(rec.get("format")) is not int or rec.get("format") != FORMAT:
            raise EncodingError(f"image manifest format {brief(rec.get('format'))} is not supported")
        _fields(rec, _IMAGE_KEYS, "image manifest")
        layers = rec["layers"]
        if not isinstance(layers, list) or not all(isinstance(la, dict) for la in layers):
            raise EncodingError(f"image manifest layers are {brief(layers)}, not a list of maps")
        for la in layers:
            _fields(la, _LAYER_KEYS, "image layer")
        return cls(
            kernel=rec["kernel"],
            layers=tuple(Layer(la["blob"], la["format"]) for la in layers),
            cmdline=rec["cmdline"],
            overlay_size=rec["overlay_size"],
            vcpus=rec["vcpus"],
            mem_mib=rec["mem_mib"],
            arch=rec["arch"],
        )


def with_path(entry: Entry, path: str) -> Entry:
    return replace(entry, path=path)


def object_record(kind: str, size: int, refs: list[str]) -> bytes:
    """The record a store or cache keeps per object: kind, size and references."""
    return canonical.encode({"format": FORMAT, "kind": kind, "size": size, "refs": sorted(refs)})
