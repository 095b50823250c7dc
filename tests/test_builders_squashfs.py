from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest

from castore.builders import TreeInput
from castore.builders.squashfs import BUILD, MAX_MAJOR, MAX_MINOR, pack_listing, quote
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.manifest import Entry, Tree
from tests.conftest import REPO, castore, castore_json
from tests.helpers import context, tarball


def test_listing_quotes_odd_names_but_never_link_targets() -> None:
    assert quote("/bin/sh") == "/bin/sh"
    assert quote('/opt/my app/"x"') == '"/opt/my app/\\"x\\""'
    t = Tree.build([Entry("a b", "file", 0o600, 1, 2, blob="ab" * 32, size=1),
                    Entry("l", "hardlink", 0, target="a b"),
                    Entry("s", "symlink", 0o777, target='a "b"')])
    listing = pack_listing(t, Path("/blobs"))
    assert f'file "/a b" 0600 1 2 ab/{"ab" * 32}' in listing
    assert "link /l 0777 0 0 /a b\n" in listing and 'slink /s 0777 0 0 a "b"\n' in listing


def test_listing_of_plain_names_is_pinned() -> None:
    """The pack file of a tree whose names need no quoting, byte for byte: the image is a function of
    it (and of the gensquashfs version), so changing it changes the ids of images already built."""
    t = Tree.build([Entry("bin/busybox", "file", 0o755, blob="cd" * 32, size=9),
                    Entry("bin/sh", "symlink", 0o777, target="busybox"),
                    Entry("bin/ash", "hardlink", 0, target="bin/busybox"),
                    Entry("etc/motd", "file", 0o640, 0, 42, blob="ab" * 32, size=1),
                    Entry("dev/console", "char", 0o600, major=5, minor=1),
                    Entry("dev/vda", "block", 0o660, 0, 6, major=254, minor=0),
                    Entry("lib", "symlink", 0o777, 7, 8, target="usr/lib/x86_64-linux-gnu"),
                    Entry("root", "dir", 0o700),
                    Entry("run/initctl", "fifo", 0o600)])
    assert pack_listing(t, Path("/blobs")) == (
        "dir / 0755 0 0\n"
        "dir /bin 0755 0 0\n"
        "file /bin/ash 0755 0 0 cd/" + "cd" * 32 + "\n"
        "link /bin/busybox 0777 0 0 /bin/ash\n"
        "slink /bin/sh 0777 0 0 busybox\n"
        "dir /dev 0755 0 0\n"
        "nod /dev/console 0600 0 0 c 5 1\n"
        "nod /dev/vda 0660 0 6 b 254 0\n"
        "dir /etc 0755 0 0\n"
        "file /etc/motd 0640 0 42 ab/" + "ab" * 32 + "\n"
        "slink /lib 0777 7 8 usr/lib/x86_64-linux-gnu\n"
        "dir /root 0700 0 0\n"
        "dir /run 0755 0 0\n"
        "pipe /run/initctl 0600 0 0\n"
    )


def build(tmp_path: Path, entries: list[Entry], files: dict[str, bytes] | None = None) -> Path:
    """The squashfs builder run on a tree of entries plus files (path -> content); the image."""
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    entries = list(entries)
    for path, data in (files or {}).items():
        oid = hash_bytes(data)
        (blobs / oid[:2]).mkdir(exist_ok=True)
        (blobs / oid[:2] / oid).write_bytes(data)
        entries.append(Entry(path, "file", 0o644, blob=oid, size=len(data)))
    tree = Tree.build(entries)
    ctx = context(tmp_path, {"compression": "gzip", "block_size": 131072}, {"tree": TreeInput(tree.id, tree)},
                  blobs=blobs)
    BUILD["squashfs"](ctx)
    return ctx.out


def rdsquashfs_stat(image: Path, path: str) -> dict[str, str]:
    out = subprocess.run(["rdsquashfs", "-s", path, str(image)], capture_output=True, check=True).stdout
    return dict(line.split(": ", 1) for line in out.decode().split("\n") if ": " in line)


def read_links(image: Path, dest: Path) -> dict[str, str]:
    """name -> symlink target of the image's top-level symlinks, exactly: extracted by unsquashfs."""
    subprocess.run(["unsquashfs", "-no-xattrs", "-quiet", "-no-progress", "-d", str(dest), str(image)],
                   check=True, capture_output=True)
    return {p.name: os.readlink(p) for p in dest.iterdir() if p.is_symlink()}


# what the pack file used to quote: blanks, quotes, backslashes, non-ASCII, shell characters
ODD_TARGETS = ["with space/f", "日本", 'a"b', '"quoted"', "'single'", "back\\slash", "a\\\"b", "#hash", "!bang",
               "(paren) [b] {c}", "$HOME *?", "trailing  ", "tab\tinside\t", "mid\rcr", "\u00a0nbsp first",
               "../up/../and down", "-dash", "x" * 1000]


def test_odd_symlink_targets_reach_the_image_exactly(tmp_path: Path) -> None:
    entries = [Entry(f"l{i}", "symlink", 0o777, target=t) for i, t in enumerate(ODD_TARGETS)]
    image = build(tmp_path, entries)
    assert read_links(image, tmp_path / "x") == {f"l{i}": t for i, t in enumerate(ODD_TARGETS)}
    rows = unsquashfs_lls(image)
    assert rows["/l0"][-3:] == ["->", "with", "space/f"] and rows["/l2"][-1] == 'a"b'
    assert rdsquashfs_stat(image, "/l1")["Link target"] == "日本"


def test_odd_symlink_targets_through_realize(tmp_path: Path) -> None:
    """The QA report's recipe: a space, non-ASCII and a quote in symlink targets made by tree()."""
    recipe = tmp_path / "links.py"
    recipe.write_text("from castore import recipe, tree, squashfs\n@recipe\ndef default():\n"
                      "    return squashfs(tree().text('/with space/f', 'x\\n').symlink('/ls', 'with space/f')\n"
                      "                    .symlink('/lu', '日本').symlink('/lq', 'a\"b'))\n")
    res = castore_json("realize", str(recipe), store=tmp_path / "store")
    links = read_links(Path(res["path"]), tmp_path / "x")
    assert links == {"ls": "with space/f", "lu": "日本", "lq": 'a"b'}
    assert (tmp_path / "x" / "ls").read_text() == "x\n"  # and it resolves


@pytest.mark.parametrize("target, problem", [
    ("a\nb", "contains a line break"),
    ("end\n", "contains a line break"),
    (" lead", "starts with whitespace"),
    ("\tlead", "starts with whitespace"),
    ("\x0blead", "starts with whitespace"),
    ("end\r", "ends with a carriage return"),
])
def test_targets_the_pack_file_cannot_carry_are_refused(tmp_path: Path, target: str, problem: str) -> None:
    with pytest.raises(CastoreError) as err:
        build(tmp_path, [Entry("ok", "symlink", 0o777, target="fine"),
                         Entry("dir/bad link", "symlink", 0o777, target=target)])
    assert err.value.message == f"squashfs: symlink /dir/bad link: its target {target!r} {problem}, " \
                                "which gensquashfs's pack file cannot carry"
    assert err.value.hint and "rather than alter" in err.value.hint
    assert not (tmp_path / "scratch" / "out").exists()


def test_every_refused_entry_is_named_in_one_error(tmp_path: Path) -> None:
    entries = [Entry(f"l{i:02}", "symlink", 0o777, target=" x") for i in range(12)]
    with pytest.raises(CastoreError) as err:
        build(tmp_path, [*entries, Entry("dev/big", "char", 0o600, major=MAX_MAJOR + 1, minor=0)])
    lines = err.value.message.split("\n")
    assert lines[0] == "squashfs: cannot pack these entries:"
    assert [ln.split(":")[0] for ln in lines[1:]] == [  # in tree order, ten of them
        "  char device /dev/big", *(f"  symlink /l{i:02}" for i in range(9)), "  and 3 more"]


ODD_NAMES = ["f ile", "日本", 'q"uote', "back\\slash", "it's", "#hash", "trail "]


def test_hard_links_to_names_that_need_quoting(tmp_path: Path) -> None:
    files = {f"d/{name}": f"content of {name}\n".encode() for name in ODD_NAMES}
    links = [Entry(f"h{i}", "hardlink", 0, target=f"d/{name}") for i, name in enumerate(ODD_NAMES)]
    image = build(tmp_path, links, files)
    for i, name in enumerate(ODD_NAMES):
        linked, original = rdsquashfs_stat(image, f"/h{i}"), rdsquashfs_stat(image, f"/d/{name}")
        assert linked["Inode number"] == original["Inode number"] and linked["Hard link count"] == "2"
        out = subprocess.run(["rdsquashfs", "-c", f"/h{i}", str(image)], capture_output=True, check=True).stdout
        assert out == files[f"d/{name}"]


def test_hard_link_to_a_name_with_a_space_through_unpack(tmp_path: Path) -> None:
    """The QA report's tarball: 'h link' is a hard link to 'f ile'."""
    (tmp_path / "t.tar").write_bytes(tarball([("f ile", "file", b"hi\n"), ("h link", "hard", "f ile")], "w"))
    recipe = tmp_path / "hl.py"
    recipe.write_text("from castore import recipe, unpack, local_file, squashfs\n@recipe\ndef default():\n"
                      "    return squashfs(unpack(local_file('t.tar')))\n")
    image = Path(castore_json("realize", str(recipe), store=tmp_path / "store")["path"])
    a, b = rdsquashfs_stat(image, "/f ile"), rdsquashfs_stat(image, "/h link")
    assert a["Inode number"] == b["Inode number"] and a["Hard link count"] == "2"
    assert subprocess.run(["rdsquashfs", "-c", "/h link", str(image)], capture_output=True).stdout == b"hi\n"


def test_device_numbers_at_the_squashfs_limits_are_kept(tmp_path: Path) -> None:
    image = build(tmp_path, [Entry("dev/max", "char", 0o600, major=MAX_MAJOR, minor=MAX_MINOR),
                             Entry("dev/zero", "block", 0o600, major=0, minor=0),
                             Entry("dev/mixed", "block", 0o600, major=259, minor=65536)])
    assert (MAX_MAJOR, MAX_MINOR) == (4095, 1048575)
    assert rdsquashfs_stat(image, "/dev/max")["Device number"].split()[0] == "4095:1048575"
    assert rdsquashfs_stat(image, "/dev/zero")["Device number"].split()[0] == "0:0"
    assert rdsquashfs_stat(image, "/dev/mixed")["Device number"].split()[0] == "259:65536"


def test_device_numbers_squashfs_cannot_store_are_refused(tmp_path: Path) -> None:
    """They used to wrap silently: (4096, 1) became 0:1, (1, 1048576) became 1:0."""
    recipe = tmp_path / "devs.py"
    recipe.write_text("from castore import recipe, tree, squashfs\n@recipe\ndef default():\n"
                      "    return squashfs(tree().device('/dev/a', 'c', 4096, 1).device('/dev/b', 'b', 1, 1048576)\n"
                      "                          .device('/dev/m', 'c', 4294967295, 4294967295)\n"
                      "                          .device('/dev/ok', 'c', 5, 1))\n")
    proc = castore("realize", str(recipe), store=tmp_path / "store", check=False)
    assert proc.returncode == 1
    assert ("devs.py:4: building default (squashfs) failed:\nsquashfs: cannot pack these entries:\n"
            "  char device /dev/a: (4096, 1) is out of range: squashfs stores majors 0 to 4095 and minors 0 to "
            "1048575\n  block device /dev/b: (1, 1048576) is out of range") in proc.stderr
    assert "char device /dev/m: (4294967295, 4294967295) is out of range" in proc.stderr
    assert "/dev/ok" not in proc.stderr


def unsquashfs_lls(image: Path, numeric: bool = False) -> dict[str, list[str]]:
    argv = ["unsquashfs", "-lln" if numeric else "-lls", "-d", "", str(image)]
    out = subprocess.run(argv, capture_output=True, text=True,
                         check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0] in "-dlcbp":
            when = next(i for i, p in enumerate(parts) if re.fullmatch(r"\d\d:\d\d", p))
            rows[parts[when + 1] if len(parts) > when + 1 else "/"] = parts
    return rows


def test_small_rootfs_reads_back_root_owned(tmp_path: Path) -> None:
    store = tmp_path / "store"
    res = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    rows = unsquashfs_lls(Path(res["path"]))
    assert unsquashfs_lls(Path(res["path"]), numeric=True)["/etc/hello.txt"][:2] == ["-rw-r-----", "0/42"]
    assert rows["/root"][:2] == ["drwx------", "root/root"]
    assert rows["/dev/console"][0] == "crw-------" and rows["/dev/console"][2:4] == ["5,", "1"]
    assert rows["/"][:2] == ["drwxr-xr-x", "root/root"]
    assert rows["/dev/vda"][0] == "brw-rw----" and rows["/dev/vda"][1].startswith("root/")
    assert rows["/run/initctl"][0] == "prw-------"
    assert rows["/bin/sh"][0].startswith("l") and rows["/bin/sh"][-1] == "busybox"
    assert all("2000-01-01" in r and "00:00" in r for r in rows.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root; "
                    "when not root the whole suite already runs unprivileged")
def test_built_by_an_unprivileged_user(tmp_path: Path) -> None:
    """The squashfs step runs with no root privileges and still yields root-owned entries."""
    nobody = pwd.getpwnam("nobody")
    store = tmp_path / "store"
    store.mkdir()
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    os.chmod(tmp_path, 0o755)
    for parent in tmp_path.parents:  # let nobody reach the store
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    root_store = tmp_path / "root-store"
    expected = castore_json("realize", "tests/recipes/small.py:rootfs", store=root_store)["id"]
    proc = subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         str(Path(REPO, ".venv/bin/castore") if (REPO / ".venv").exists() else "castore"),
         "--store", str(store), "realize", "tests/recipes/small.py:rootfs", "--json"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    import json

    res = json.loads(proc.stdout)
    assert res["id"] == expected
    assert os.stat(res["path"]).st_uid == nobody.pw_uid  # really written by nobody
    rows = unsquashfs_lls(Path(res["path"]), numeric=True)
    assert rows["/etc/hello.txt"][1] == "0/42" and rows["/dev/console"][0] == "crw-------"
    assert castore("verify", store=store).returncode == 0
