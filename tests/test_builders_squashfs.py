from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest

from castore.builders.squashfs import pack_listing, quote
from castore.manifest import Entry, Tree
from tests.conftest import REPO, castore, castore_json


def test_listing_quotes_odd_names() -> None:
    assert quote("/bin/sh") == "/bin/sh"
    assert quote('/opt/my app/"x"') == '"/opt/my app/\\"x\\""'
    t = Tree.build([Entry("a b", "file", 0o600, 1, 2, blob="ab" * 32, size=1),
                    Entry("l", "hardlink", 0, target="a b")])
    listing = pack_listing(t, Path("/blobs"))
    assert f'file "/a b" 0600 1 2 ab/{"ab" * 32}' in listing and 'link /l 0777 0 0 "/a b"' in listing


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
