"""Tree operations: build a tree from ops (merge, file, text, dirs, links, devices,
remove, chmod, chown), take one file out of a tree, and bring a local file in.

All of it is manifest arithmetic: no file is copied except the bytes of
``text`` entries, which become new blobs.
"""

from __future__ import annotations

import posixpath
from dataclasses import replace
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
from castore.manifest import Entry, Tree


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _drop(entries: dict[str, Entry], path: str) -> None:
    for key in [k for k in entries if _under(k, path)]:
        del entries[key]


def _put(entries: dict[str, Entry], entry: Entry) -> None:
    old = entries.get(entry.path)
    if old is not None and old.type == "dir" and entry.type != "dir":
        _drop(entries, entry.path)
    parent = posixpath.dirname(entry.path)
    while parent:
        p = entries.get(parent)
        if p is not None and p.type != "dir":
            raise CastoreError(f"cannot add {entry.path}: {parent} is a {p.type}, not a directory")
        parent = posixpath.dirname(parent)
    entries[entry.path] = entry


def _entry(op: dict[str, Any], type_: str, **content: Any) -> Entry:
    return Entry(op["path"], type_, op["mode"], op["uid"], op["gid"], **content)


def apply_ops(ctx: BuildContext) -> TreeResult:
    entries: dict[str, Entry] = {}
    new_blobs: dict[str, Any] = {}
    for n, op in enumerate(ctx.params["ops"]):
        kind = op["op"]
        path = op.get("path", "")
        if kind == "merge":
            src = ctx.inputs[op["input"]]
            assert isinstance(src, TreeInput)
            _merge(entries, src.tree, op.get("only"), op["prefix"])
        elif kind == "file":
            value = ctx.inputs[op["input"]]
            assert isinstance(value, BlobInput)
            _put(entries, _entry(op, "file", blob=value.id, size=value.size))
        elif kind == "text":
            data = op["content"].encode()
            oid = hash_bytes(data)
            if oid not in new_blobs:
                dest = ctx.scratch / f"text{n}"
                dest.write_bytes(data)
                new_blobs[oid] = dest
            _put(entries, _entry(op, "file", blob=oid, size=len(data)))
        elif kind == "dir":
            old = entries.get(path)
            if old is not None and old.type == "dir":
                entries[path] = replace(old, mode=op["mode"], uid=op["uid"], gid=op["gid"])
            else:
                _put(entries, _entry(op, "dir"))
        elif kind == "symlink":
            _put(entries, Entry(path, "symlink", 0o777, op["uid"], op["gid"], target=op["target"]))
        elif kind == "device":
            _put(entries, _entry(op, op["type"], major=op["major"], minor=op["minor"]))
        elif kind == "fifo":
            _put(entries, _entry(op, "fifo"))
        elif kind == "remove":
            if path not in entries:
                raise CastoreError(f"remove: {path} is not in the tree")
            _drop(entries, path)
        elif kind == "chmod":
            _need(entries, path, kind)
            entries[path] = replace(entries[path], mode=op["mode"])
        elif kind == "chown":
            _need(entries, path, kind)
            for key in [k for k in entries if (_under(k, path) if op["recursive"] else k == path)]:
                entries[key] = replace(entries[key], uid=op["uid"], gid=op["gid"])
        else:
            raise CastoreError(f"unknown tree operation {kind!r}")
    _fix_hardlinks(entries)
    return TreeResult(Tree.build(entries.values()), new_blobs)


def _need(entries: dict[str, Entry], path: str, op: str) -> None:
    if path not in entries:
        raise CastoreError(f"{op}: {path} is not in the tree")


def _merge(entries: dict[str, Entry], tree: Tree, only: list[str] | None, prefix: str) -> None:
    by_path = {e.path: e for e in tree}
    wanted: list[Entry] = []
    if only is None:
        wanted = list(tree)
    else:
        for root in only:
            if root not in by_path:
                raise CastoreError(f"merge: {root} is not in the merged tree")
            parent = posixpath.dirname(root)
            while parent:  # keep the parents' modes and owners from the source tree
                wanted.append(by_path[parent])
                parent = posixpath.dirname(parent)
            wanted.extend(e for e in tree if _under(e.path, root))
    for e in wanted:
        path = posixpath.join(prefix, e.path) if prefix else e.path
        target = e.target
        if e.type == "hardlink" and prefix:
            target = posixpath.join(prefix, e.target or "")
        if e.type == "hardlink" and e.target is not None and target not in entries:
            src = by_path[e.target]
            if only is not None and not any(_under(e.target, r) for r in only):
                e = replace(src, path=e.path)  # link target left behind: keep a copy
                target = None
        old = entries.get(path)
        if e.type == "dir" and old is not None and old.type == "dir":
            entries[path] = replace(e, path=path)
            continue
        _put(entries, replace(e, path=path, target=target))


def _fix_hardlinks(entries: dict[str, Entry]) -> None:
    """A hard link whose target was removed or replaced becomes a copy of what it linked to."""
    for path, e in list(entries.items()):
        if e.type == "hardlink":
            t = entries.get(e.target or "")
            if t is None or t.type != "file":
                raise CastoreError(f"hard link {path} -> {e.target}: target is gone")


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
