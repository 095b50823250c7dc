"""Tree operations as a recipe writes them: in order, later ones winning, as on a real filesystem."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.manifest import Tree
from castore.plan import hash_graph
from castore.realize import Realizer
from castore.recipes import load_file
from castore.store import LocalStore

_HEAD = "from castore import local_file, recipe, tree, unpack\n\n@recipe\ndef default():\n"  # 4 lines


def _recipe(tmp_path: Path, *body: str) -> Path:
    """A recipe file whose default recipe is body; body line i is line 4 + i of the file."""
    f = tmp_path / "r.py"
    f.write_text(_HEAD + "".join(f"    {line}\n" for line in body))
    return f


def _build(tmp_path: Path, store: LocalStore, *body: str) -> Tree:
    plan = load_file(_recipe(tmp_path, *body))["default"].evaluate()
    oid = Realizer(store).realize(plan).root.oid
    assert oid is not None
    return store.read_tree(oid)


def _rows(t: Tree) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, blob or link target)."""
    return {e.path: (e.type, oct(e.mode), e.uid, e.gid, e.blob or e.target) for e in t}


def _tar(tmp_path: Path, members: list[tuple[str, str | bytes]], name: str = "h.tar") -> None:
    """members: (name, bytes of a file, or the str target of a hard link), in archive order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, value in members:
            info = tarfile.TarInfo(member)
            info.mode = 0o640
            if isinstance(value, str):
                info.type, info.linkname = tarfile.LNKTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    (tmp_path / name).write_bytes(buf.getvalue())


OLD, NEW = hash_bytes(b"old\n"), hash_bytes(b"new\n")
LINKED: list[tuple[str, str | bytes]] = [("a", b"old\n"), ("b", "a"), ("c", "a")]  # one inode, three names


# -- D4: a hard link and its file are one inode ---------------------------


@pytest.mark.parametrize("op", [
    '.text("/a", "new\\n")',
    '.file("/a", source="new.txt")',
    '.merge(tree().text("/a", "new\\n"))',
    '.merge(unpack(local_file("new.tar")))',
])
def test_replacing_a_linked_file_leaves_its_links_the_old_content(tmp_path: Path, store: LocalStore,
                                                                  op: str) -> None:
    _tar(tmp_path, LINKED)
    _tar(tmp_path, [("a", b"new\n")], "new.tar")
    (tmp_path / "new.txt").write_text("new\n")
    t = _build(tmp_path, store, f'return tree().merge(unpack(local_file("h.tar"))){op}')
    rows = _rows(t)
    assert rows["a"][0::4] == ("file", NEW)
    assert rows["b"] == ("file", "0o640", 0, 0, OLD)  # the first remaining name holds the old inode
    assert rows["c"] == ("hardlink", "0o0", 0, 0, "b")


def test_removing_a_linked_file_leaves_its_links_the_old_content(tmp_path: Path, store: LocalStore) -> None:
    _tar(tmp_path, [("d/a", b"old\n"), ("d/b", "d/a"), ("e", "d/a"), ("f", b"f")])
    t = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar"))).remove("/d/a")')
    assert _rows(t)["d/b"] == ("file", "0o640", 0, 0, OLD) and _rows(t)["e"][0::4] == ("hardlink", "d/b")
    # the whole directory goes: the link outside it keeps the content
    t = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar"))).remove("/d")')
    assert sorted(_rows(t)) == ["e", "f"] and _rows(t)["e"] == ("file", "0o640", 0, 0, OLD)


def test_chmod_and_chown_through_a_hard_link_change_its_file(tmp_path: Path, store: LocalStore) -> None:
    _tar(tmp_path, [("a", b"old\n"), ("d/b", "a")])
    t = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar"))).chmod("/d/b", 0o755)'
               '.chown("/d/b", 7, 8)')
    assert _rows(t)["a"] == ("file", "0o755", 7, 8, OLD) and _rows(t)["d/b"] == ("hardlink", "0o0", 7, 8, "a")
    t = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar"))).chown("/d", 5, 6, recursive=True)')
    assert _rows(t)["a"] == ("file", "0o640", 5, 6, OLD)  # chown -R reaches the inode, wherever its file is


def test_a_link_whose_file_is_not_merged_is_a_copy_even_over_an_earlier_file(tmp_path: Path,
                                                                            store: LocalStore) -> None:
    _tar(tmp_path, [("a", b"old\n"), ("d/b", "a")])
    t = _build(tmp_path, store, 'return tree().text("/a", "new\\n").merge(unpack(local_file("h.tar")), only=["d"])')
    assert _rows(t)["a"][0::4] == ("file", NEW) and _rows(t)["d/b"] == ("file", "0o640", 0, 0, OLD)


def test_merging_linked_files_twice_and_under_a_prefix(tmp_path: Path, store: LocalStore) -> None:
    _tar(tmp_path, LINKED)
    once = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar")))')
    twice = _build(tmp_path, store, 'b = unpack(local_file("h.tar"))', "return tree().merge(b).merge(b)")
    assert twice.id == once.id
    t = _build(tmp_path, store, 'return tree().merge(unpack(local_file("h.tar")), prefix="/p").text("/p/a", "new\\n")')
    assert _rows(t)["p/b"][0::4] == ("file", OLD) and _rows(t)["p/c"][0::4] == ("hardlink", "p/b")


# -- D5: parents made for a child are entries at once ---------------------


@pytest.mark.parametrize("ops, expected", [
    ('.text("/a/b", "x").text("/a", "now a file")', {"a": ("file", "0o644", 0, 0, hash_bytes(b"now a file"))}),
    ('.text("/etc/x", "x").remove("/etc")', {}),
    ('.text("/etc/x", "x").remove("/etc/x")', {"etc": ("dir", "0o755", 0, 0, None)}),
    ('.text("/etc/x", "x").chmod("/etc", 0o700)',
     {"etc": ("dir", "0o700", 0, 0, None), "etc/x": ("file", "0o644", 0, 0, hash_bytes(b"x"))}),
    ('.text("/home/u/x", "x").chown("/home/u", 1000, 1000, recursive=True)',
     {"home": ("dir", "0o755", 0, 0, None), "home/u": ("dir", "0o755", 1000, 1000, None),
      "home/u/x": ("file", "0o644", 1000, 1000, hash_bytes(b"x"))}),
    ('.text("/lib/x", "x").symlink("/lib", "usr/lib")', {"lib": ("symlink", "0o777", 0, 0, "usr/lib")}),
    ('.dirs("/a/sub").text("/a/sub/f", "f").merge(tree().text("/a", "a"))',
     {"a": ("file", "0o644", 0, 0, hash_bytes(b"a"))}),
    ('.dirs("/a/b/c").dirs("/a", mode=0o700)',
     {"a": ("dir", "0o700", 0, 0, None), "a/b": ("dir", "0o755", 0, 0, None), "a/b/c": ("dir", "0o755", 0, 0, None)}),
])
def test_implicit_parents_are_entries_that_later_ops_see(tmp_path: Path, store: LocalStore, ops: str,
                                                         expected: dict[str, tuple[object, ...]]) -> None:
    assert _rows(_build(tmp_path, store, f"return tree(){ops}")) == expected


# -- D12: a failing op names its own line and its path as written ---------


@pytest.mark.parametrize("op, message", [
    ('.remove("/missing")', "remove: /missing is not in the tree"),
    ('.remove("etc//gone/")', "remove: etc//gone/ is not in the tree"),
    ('.chmod("/nope", 0o700)', "chmod: /nope is not in the tree"),
    ('.symlink("/l", "a").chmod("/l", 0o600)', "chmod: /l is a symlink, whose mode is always 0777"),
    ('.chown("/nope", 1, 1, recursive=True)', "chown: /nope is not in the tree"),
    ('.merge(tree().text("/x", "x"), only=["/y"])', "merge: /y is not in the merged tree"),
    ('.merge(tree().text("/b", "x"), prefix="/a")', "cannot add /a/b: /a is a file, not a directory"),
    ('.text("/a/c/d", "x")', "cannot add /a/c/d: /a is a file, not a directory"),
])
def test_a_failing_op_names_its_own_line(tmp_path: Path, store: LocalStore, monkeypatch: pytest.MonkeyPatch,
                                         op: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)  # recipe files are shown relative to the working directory
    f = _recipe(tmp_path, "return (tree()", '        .text("/a", "a")', '        .dirs("/d")',
                f"        {op}", '        .text("/z", "z"))')
    plan = load_file(f)["default"].evaluate()
    with pytest.raises(CastoreError) as err:
        Realizer(store).realize(plan)
    assert err.value.message.endswith(f"\nr.py:8: {message}"), err.value.message
    assert err.value.message.startswith("r.py:5: building default (tree) failed:")


def test_op_lines_and_paths_as_written_stay_out_of_the_plan_hash(tmp_path: Path) -> None:
    def plan_hash(*body: str) -> str:
        plan = load_file(_recipe(tmp_path, *body))["default"].evaluate()
        order, hashes = hash_graph(plan, lambda p: (1, {}))
        return hashes[id(order[-1])][0]

    one = plan_hash('return tree().text("/a/b", "x").remove("/a").merge(tree().dirs("/c"), only=["/c"])')
    other = plan_hash("", "t = tree()", 't.text("a//b/", "x")', "", 't.remove("a")',
                      't.merge(tree().dirs("/c"), only=["c/"])', "return t")
    assert one == other
