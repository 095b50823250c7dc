"""Tree operations: build a tree from ops (merge, file, text, dirs, links, devices,
remove, chmod, chown), take one file out of a tree, and bring a local file in.

All of it is manifest arithmetic: no file is copied except the bytes of
``text`` entries, which become new blobs.

Ops act as on a real filesystem, in order, later ones winning. Putting an
entry makes its missing parents at once (0755 root:root), so later ops see
them. A hard link and its file are one inode (see :class:`Entries`).

A tree plan's ops may carry, outside what the plan hashes, the recipe line
that made each one (``where``) and its paths as the recipe wrote them
(``written``); an op that fails says both.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from castore.builders import (
    BlobInput,
    BuildContext,
    ExistingResult,
    Result,
    TreeInput,
    TreeResult,
)
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.manifest import Entry, Tree, path_key


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


class Entries:
    """The entries of a tree being put together, by path, kept as a filesystem keeps them.

    A hard link and the file it names are one inode. A mode or owner set through
    either name is the file's; replacing or removing the file's name leaves its
    links the content they had (the first of them in tree order takes the file's
    place, the others name it), as ``rm``, ``mv`` over it or ``tar -x`` do. So a
    hard link here always names a file entry.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, Entry] = {}
        self._links: dict[str, set[str]] = {}  # a file's path -> the paths of the hard links naming it

    def get(self, path: str) -> Entry | None:
        return self._by_path.get(path)

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def values(self) -> list[Entry]:
        return list(self._by_path.values())

    def set(self, entry: Entry) -> None:
        """entry in place of what its path held; what lies under that path stays."""
        self.unlink(entry.path)
        if entry.type == "hardlink":
            target = entry.target or ""
            t = self._by_path.get(target)
            if t is None or t.type != "file":
                raise CastoreError(f"hard link /{entry.path} -> /{target}: /{target} is not a file")
            self._links.setdefault(target, set()).add(entry.path)
        self._by_path[entry.path] = entry

    def update(self, path: str, **fields: Any) -> None:
        """Change the mode or owner of the entry at path."""
        self._by_path[path] = replace(self._by_path[path], **fields)

    def inode(self, path: str) -> str:
        """The path of the entry that holds what path names: a hard link's file, else path itself."""
        e = self._by_path[path]
        return e.target or "" if e.type == "hardlink" else path

    def unlink(self, path: str) -> None:
        """Take away the entry at path alone; a file's hard links keep its content."""
        old = self._by_path.pop(path, None)
        if old is None:
            return
        if old.type == "hardlink":
            links = self._links.get(old.target or "")
            if links is not None:
                links.discard(path)
                if not links:
                    del self._links[old.target or ""]
        elif old.type == "file" and path in self._links:
            heir, *rest = sorted(self._links.pop(path), key=path_key)
            self._by_path[heir] = replace(old, path=heir)
            for p in rest:
                self._by_path[p] = replace(self._by_path[p], target=heir)
            if rest:
                self._links[heir] = set(rest)

    def drop(self, path: str) -> None:
        """Take away path and everything under it."""
        doomed = [k for k in self._by_path if _under(k, path)]
        # links first, so a file's content passes only to links outside path
        doomed.sort(key=lambda k: self._by_path[k].type != "hardlink")
        for key in doomed:
            self.unlink(key)


def _put(entries: Entries, entry: Entry, shown: str = "") -> None:
    """entry in place of what its path held (and of all under it), its missing parents made 0755 root:root."""
    missing = []
    parent = posixpath.dirname(entry.path)
    while parent:
        p = entries.get(parent)
        if p is None:
            missing.append(parent)
        elif p.type != "dir":
            raise CastoreError(f"cannot add {shown or '/' + entry.path}: /{parent} is a {p.type}, "
                               "not a directory")
        parent = posixpath.dirname(parent)
    for parent in reversed(missing):
        entries.set(Entry(parent, "dir", 0o755))
    old = entries.get(entry.path)
    if old is not None and old.type == "dir" and entry.type != "dir":
        entries.drop(entry.path)
    entries.set(entry)


def _entry(op: dict[str, Any], type_: str, **content: Any) -> Entry:
    return Entry(op["path"], type_, op["mode"], op["uid"], op["gid"], **content)


def _shown(op: dict[str, Any], path: str) -> str:
    """path as the recipe wrote it in op, when the op says so."""
    written: dict[str, str] = getattr(op, "written", {})
    return written.get(path) or "/" + path


def apply_ops(ctx: BuildContext) -> TreeResult:
    entries = Entries()
    new_blobs: dict[str, Path] = {}
    for n, op in enumerate(ctx.params["ops"]):
        try:
            _apply(ctx, entries, new_blobs, n, op)
        except CastoreError as exc:
            where: str = getattr(op, "where", "")
            if not where:
                raise
            raise CastoreError(f"{where}: {exc.message}", exc.hint) from exc
    return TreeResult(Tree.build(entries.values()), new_blobs)


def _apply(ctx: BuildContext, entries: Entries, new_blobs: dict[str, Path], n: int, op: dict[str, Any]) -> None:
    kind = op["op"]
    path = op.get("path", "")
    shown = _shown(op, path) if path else ""
    if kind == "merge":
        src = ctx.inputs[op["input"]]
        assert isinstance(src, TreeInput)
        _merge(entries, src.tree, op)
    elif kind == "file":
        value = ctx.inputs[op["input"]]
        assert isinstance(value, BlobInput)
        _put(entries, _entry(op, "file", blob=value.id, size=value.size), shown)
    elif kind == "text":
        data = op["content"].encode()
        oid = hash_bytes(data)
        if oid not in new_blobs:
            dest = ctx.scratch / f"text{n}"
            dest.write_bytes(data)
            new_blobs[oid] = dest
        _put(entries, _entry(op, "file", blob=oid, size=len(data)), shown)
    elif kind == "dir":
        old = entries.get(path)
        if old is not None and old.type == "dir":
            entries.update(path, mode=op["mode"], uid=op["uid"], gid=op["gid"])
        else:
            _put(entries, _entry(op, "dir"), shown)
    elif kind == "symlink":
        _put(entries, Entry(path, "symlink", 0o777, op["uid"], op["gid"], target=op["target"]), shown)
    elif kind == "device":
        _put(entries, _entry(op, op["type"], major=op["major"], minor=op["minor"]), shown)
    elif kind == "fifo":
        _put(entries, _entry(op, "fifo"), shown)
    elif kind == "remove":
        _need(entries, path, kind, shown)
        entries.drop(path)
    elif kind == "chmod":
        _need(entries, path, kind, shown)
        if (e := entries.get(path)) is not None and e.type == "symlink":  # a link's mode is 0777 on Linux
            raise CastoreError(f"chmod: {shown} is a symlink, whose mode is always 0777")
        entries.update(entries.inode(path), mode=op["mode"])  # through a hard link: its file's mode
    elif kind == "chown":
        _need(entries, path, kind, shown)
        for key in [k for k in entries if _under(k, path)] if op["recursive"] else [path]:
            entries.update(entries.inode(key), uid=op["uid"], gid=op["gid"])
    else:
        raise CastoreError(f"unknown tree operation {kind!r}")


def _need(entries: Entries, path: str, op: str, shown: str) -> None:
    if path not in entries:
        raise CastoreError(f"{op}: {shown} is not in the tree")


def _merge(entries: Entries, tree: Tree, op: dict[str, Any]) -> None:
    only: list[str] | None = op.get("only")
    prefix: str = op["prefix"]
    by_path = {e.path: e for e in tree}
    if only is None:
        wanted = list(tree)
    else:
        picked: dict[str, Entry] = {}
        for root in only:
            if root not in by_path:
                raise CastoreError(f"merge: {_shown(op, root)} is not in the merged tree")
            parents = []
            parent = posixpath.dirname(root)
            while parent:  # keep the parents' modes and owners from the source tree
                parents.append(by_path[parent])
                parent = posixpath.dirname(parent)
            for e in [*reversed(parents), *(e for e in tree if _under(e.path, root))]:
                picked.setdefault(e.path, e)
        wanted = list(picked.values())
    links = []  # put last, when every file they may name is in
    for e in wanted:
        path = posixpath.join(prefix, e.path) if prefix else e.path
        if e.type == "hardlink":
            target = e.target or ""
            if only is None or any(_under(target, r) for r in only):
                links.append(replace(e, path=path, target=posixpath.join(prefix, target) if prefix else target))
                continue
            e = by_path[target]  # its file is left behind: the link becomes a copy of it
        old = entries.get(path)
        if e.type == "dir" and old is not None and old.type == "dir":
            entries.update(path, mode=e.mode, uid=e.uid, gid=e.gid)
            continue
        _put(entries, replace(e, path=path))
    for link in links:
        _put(entries, link)


def _tree(ctx: BuildContext) -> Result:
    return apply_ops(ctx)


def _tree_get(ctx: BuildContext) -> Result:
    path = ctx.params["path"]
    tree = ctx.tree("tree").tree
    e = tree.get(path)
    if e is not None and e.type == "hardlink":
        e = tree.get(e.target or "")
    if e is None:
        raise CastoreError(f"{path} is not in the tree",
                           "list the tree with `castore show --entries` to see what it holds")
    if e.type != "file" or e.blob is None:
        raise CastoreError(f"{path} is a {e.type}, not a file")
    return ExistingResult(e.blob)


def _source(ctx: BuildContext) -> Result:
    return ExistingResult(ctx.blob("file").id)


BUILD = {"tree": _tree, "tree_get": _tree_get, "source": _source}
