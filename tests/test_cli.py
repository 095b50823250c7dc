from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CASTORE, REPO, castore, castore_json
from tests.helpers import NOT_ROOT, tiny_tmpfs


def test_help_teaches() -> None:
    out = castore("--help").stdout
    for cmd in ("realize", "add", "export", "show", "path", "ls", "verify", "gc", "log"):
        assert cmd in out
    assert "castore realize recipes/app.py" in castore("realize", "--help").stdout


def test_only_the_named_command_is_built_and_the_rest_still_answer(tmp_path: Path) -> None:
    # main() builds only the command argv names; a store path that is also a command name is not one
    add = castore("--store", "ls", "add", "--help", cwd=tmp_path).stdout
    assert add.startswith("Usage: castore add [OPTIONS] {PATH}")
    assert "Usage: castore key generate" in castore("--debug", "key", "generate", "--help").stdout
    typo = castore("ad", check=False)
    assert typo.returncode == 2 and "Did you mean 'add'?" in typo.stderr
    for listing in (castore("--store", "ls", "--help", cwd=tmp_path).stdout, castore("--help", "add").stdout):
        assert all(f"  {cmd} " in listing for cmd in ("realize", "pull", "serve", "token", "key"))


def test_version_and_python_m() -> None:
    from castore import __version__

    assert castore("--version").stdout == f"castore {__version__}\n"
    module = subprocess.run([sys.executable, "-m", "castore", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout == f"castore {__version__}\n"


def test_add_show_path_export_roundtrip(tmp_path: Path) -> None:
    store = tmp_path / "store"
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(os.urandom(1 << 20))
    added = castore_json("add", str(kernel), store=store)
    assert added["kind"] == "blob" and Path(added["path"]).read_bytes() == kernel.read_bytes()
    assert castore("path", added["id"][:10], store=store).stdout.strip() == added["path"]
    d = tmp_path / "tree"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "x").write_text("x")
    os.symlink("etc/x", d / "link")
    tree = castore_json("add", "--all-root", str(d), store=store)
    assert tree["kind"] == "tree"
    shown = castore_json("show", tree["id"], store=store)
    assert {e["path"] for e in shown["entries"]} == {"etc", "etc/x", "link"} and shown["plans"] == []
    castore("export", tree["id"], str(tmp_path / "out"), store=store)
    assert (tmp_path / "out" / "etc" / "x").read_text() == "x" and os.readlink(tmp_path / "out" / "link") == "etc/x"
    castore("export", added["id"], str(tmp_path / "k2"), store=store)
    assert (tmp_path / "k2").read_bytes() == kernel.read_bytes()
    assert list(tmp_path.glob(".*.part")) == []
    again = castore("export", added["id"], str(tmp_path / "k2"), store=store, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    under = castore("export", added["id"], str(tmp_path / "k2" / "sub" / "k3"), store=store, check=False)
    assert under.returncode == 1
    assert under.stderr.startswith(f"error: cannot make the directory {tmp_path}/k2/sub: Not a directory"), under.stderr
    listing = castore_json("ls", store=store)
    assert {o["id"] for o in listing} >= {added["id"], tree["id"]}


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_export_to_another_filesystem_and_to_a_full_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    blob = tmp_path / "rootfs.img"
    blob.write_bytes(os.urandom(4 << 20))
    oid = castore_json("add", str(blob), store=store)["id"]
    with tiny_tmpfs(tmp_path / "small") as small:
        proc = castore("export", oid, str(small / "out.img"), store=store, check=False)
        assert proc.returncode == 1 and "No space left" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(small) == []  # no partial file
        (small / "a").write_bytes(b"x")
        castore("export", oid, str(small / "sub" / "k"), store=store, check=False)
        assert os.listdir(small) == ["a"]  # not even the directory made for it
        (small / "a").unlink()
        data = os.urandom(1 << 20)
        blob.write_bytes(data)
        small_id = castore_json("add", str(blob), store=store)["id"]
        castore("export", small_id, str(small / "fits.img"), store=store)  # tmpfs: not the store's filesystem
        assert (small / "fits.img").read_bytes() == data


def test_show_names_the_plan_and_log(tmp_path: Path) -> None:
    store = tmp_path / "store"
    res = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    shown = castore_json("show", res["id"], store=store)
    record = shown["plans"][0]["record"]
    assert record["builder"] == "squashfs" and "gensquashfs" in record["tools"]
    assert record["params"] == {"block_size": 131072, "compression": "gzip"}
    text = castore("show", res["id"], store=store).stdout
    assert "made by plan" in text and "tool    gensquashfs" in text
    assert "gensquashfs" in castore("log", res["id"], store=store).stdout


def test_a_named_root_is_removed_by_name_and_a_reused_name_says_what_it_left(tmp_path: Path) -> None:
    store = tmp_path / "s"
    (tmp_path / "a").write_bytes(b"first")
    (tmp_path / "b").write_bytes(b"second")
    a = castore("add", str(tmp_path / "a"), "--root", "keep", store=store).stdout.strip()
    proc = castore("add", str(tmp_path / "b"), "--root", "keep", store=store)
    b = proc.stdout.strip()
    assert f"note: root keep now keeps {b[:12]}, no longer {a[:12]}" in proc.stderr
    assert "removed root keep" in castore("roots", "--remove", "keep", store=store).stderr
    assert castore_json("roots", store=store) == []
    proc = castore("roots", "--remove", "keep", store=store, check=False)
    assert proc.returncode == 1 and "there is no root 'keep'" in proc.stderr
    assert sorted(castore_json("gc", store=store)["deleted"]) == sorted([a, b])


def test_out_link_is_a_gc_root(tmp_path: Path) -> None:
    store = tmp_path / "store"
    link = tmp_path / "result"
    res = castore_json("realize", "tests/recipes/small.py:rootfs", "-o", str(link), store=store)
    assert os.readlink(link) == res["path"]
    garbage = castore_json("add", str(Path(__file__)), store=store)["id"]
    gc = castore_json("gc", store=store)
    # build inputs (the tree, its blobs) are not referenced by a squashfs blob: they go too
    assert garbage in gc["deleted"] and res["id"] not in gc["deleted"]
    assert castore_json("verify", store=store)["ok"]
    assert Path(res["path"]).exists()
    link.unlink()
    assert castore_json("gc", store=store)["deleted"] == [res["id"]]


def test_an_out_link_names_its_object_and_global_options_may_follow_the_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    link = tmp_path / "result"
    res = castore_json("realize", "tests/recipes/small.py:rootfs", "-o", str(link), store=store)
    assert castore_json("show", str(link), store=store)["id"] == res["id"]
    assert castore_json("path", res["path"], store=store) == {"id": res["id"], "path": res["path"]}
    out = castore("path", "result", "--store", str(store), "--debug", cwd=tmp_path).stdout  # after the command
    assert out.strip() == res["path"]
    assert castore("show", str(link), f"--store={store}", "--json", cwd=tmp_path).returncode == 0
    other = castore("show", str(Path(__file__)), store=store, check=False)
    assert other.returncode == 1 and "is not an object of the store" in other.stderr
    # -- ends the options: what follows is an argument, even --store
    assert "no such option" not in castore("show", "--", "--store", store=store, check=False).stderr.lower()


@pytest.mark.parametrize("argv, expected", [
    ("export ID DEST --store S", "--store S export ID DEST"),
    ("export ID DEST --store=S --debug", "--store=S --debug export ID DEST"),
    ("--store S realize r.py --json", "--store S realize r.py --json"),
    ("token add DIR --name --store --scope write", "token add DIR --name --store --scope write"),
    ("token add DIR --scope write --store S", "--store S token add DIR --scope write"),
    ("show abc --store", "show abc --store"),  # no value: left for click to say so
    ("show -- --store S", "show -- --store S"),
    ("realize r.py -o --debug", "realize r.py -o --debug"),  # the out-link is named --debug
])
def test_global_options_may_follow_the_command(argv: str, expected: str) -> None:
    from castore.cli import _globals_first

    assert _globals_first(argv.split()) == expected.split()


def test_every_command_that_prints_data_takes_json(tmp_path: Path) -> None:
    key = castore_json("key", "generate", "lab-1", "--out", str(tmp_path / "new" / "dir" / "lab-1.secret"))
    secret = tmp_path / "new" / "dir" / "lab-1.secret"
    assert key["public_key"].startswith("lab-1:") and secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new" / "dir").stat().st_mode & 0o005  # others read castore.toml kept beside it
    assert castore_json("key", "public", key["secret_key_file"]) == {"public_key": key["public_key"]}
    token = castore_json("token", "add", str(tmp_path / "cache"), "--scope", "write", "--name", "ci")
    assert token["scopes"] == ["write"] and len(token["token"]) > 20
    store = tmp_path / "store"
    oid = castore_json("add", str(Path(__file__)), store=store)["id"]
    exported = castore_json("export", oid, str(tmp_path / "out.py"), store=store)
    assert exported == {"id": oid, "kind": "blob", "dest": str(tmp_path / "out.py")}


def test_messages_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """Errors and notes quote what caches and servers send: no escape sequence reaches the terminal."""
    from castore.cli import _err

    _err("error: lab-\x1b]0;pwned\x07 said \x1b[2J\rdone\nhint: \ttab kept")
    assert capsys.readouterr().err == "error: lab-\\x1b]0;pwned\\x07 said \\x1b[2J\\rdone\nhint: \ttab kept\n"


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = castore("show", "deadbeefdeadbeef", store=tmp_path / "nostore", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no castore store")
    assert "Traceback" not in proc.stderr
    proc = castore("realize", "tests/recipes/bad_raise.py", store=tmp_path / "s", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "bad_raise.py:5" in proc.stderr
    proc = castore("--debug", "realize", "tests/recipes/bad_raise.py", store=tmp_path / "s", check=False)
    assert "Traceback" in proc.stderr


def test_json_of_realize_names_the_paths(tmp_path: Path) -> None:
    res = castore_json("realize", "tests/recipes/small.py:overlay", store=tmp_path / "s")
    assert res["kind"] == "blob" and len(res["id"]) == 64 and res["built"] == ["overlay"]
    fsck = subprocess.run(["e2fsck", "-fn", res["path"]], capture_output=True)
    assert fsck.returncode == 0
    assert json.loads(castore("ls", "--json", store=tmp_path / "s").stdout)[0]["name"] == "overlay"
    debug = castore("--debug", "realize", "tests/recipes/small.py:overlay", store=tmp_path / "d")
    assert "+ mke2fs " in debug.stderr  # --debug shows every command run


def test_add_move_only_when_safe(tmp_path: Path) -> None:
    store = tmp_path / "store"
    img = tmp_path / "rootfs.img"
    img.write_bytes(os.urandom(1 << 16))
    data = img.read_bytes()
    os.link(img, tmp_path / "other-name")  # a second name could still change it: copy instead
    proc = castore("add", "--move", str(img), store=store)
    assert "note: copying" in proc.stderr and img.exists()
    (tmp_path / "other-name").unlink()
    res = castore_json("add", "--move", str(img), store=store)
    assert not img.exists() and Path(res["path"]).read_bytes() == data


def test_add_takes_files_and_dirs_only_and_moves_no_symlink(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = castore("add", str(fifo), store=store, check=False, timeout=30)  # it used to block, reading
    assert proc.returncode == 1 and "not a regular file or a directory" in proc.stderr
    target = tmp_path / "kernel"
    target.write_bytes(b"v1")
    target.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = castore("add", "--move", str(link), store=store)
    assert "note: copying" in proc.stderr and link.is_symlink() and target.stat().st_mode & 0o777 == 0o644
    blob = Path(castore("path", proc.stdout.strip(), store=store).stdout.strip())
    assert not blob.is_symlink() and blob.read_bytes() == b"v1"
    again = castore("add", "--move", str(blob), store=store)  # a store file is copied, never moved
    assert "note: copying" in again.stderr and blob.exists()
    assert castore_json("verify", store=store)["ok"]
    empty_root = castore("add", "--root", "", str(target), store=store, check=False)
    assert empty_root.returncode == 1 and "needs a name" in empty_root.stderr


def test_out_link_replaces_only_an_earlier_out_link(tmp_path: Path) -> None:
    store = tmp_path / "store"
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    (tmp_path / "adir").mkdir()
    for name, why in ((mine, "exists and is not a symlink"), (tmp_path / "adir", "exists and is not a symlink"),
                      (tmp_path / "nodir" / "link", "is not a directory")):
        proc = castore("realize", "tests/recipes/small.py:overlay", "-o", str(name), store=store, check=False)
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
    assert mine.read_text() == "mine" and os.listdir(tmp_path / "adir") == []
    res = tmp_path / "result"
    for _ in range(2):  # the second replaces the first
        castore("realize", "tests/recipes/small.py:overlay", "-o", str(res), store=store)
    assert res.is_symlink() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".result")] == []


def test_out_link_replaces_no_symlink_of_the_user(tmp_path: Path) -> None:
    store = tmp_path / "s"
    mine = tmp_path / "mine"
    os.symlink("/etc/hostname", mine)
    proc = castore("realize", "tests/recipes/small.py:hello", "-o", str(mine), store=store, check=False)
    assert proc.returncode == 1 and "is a symlink that is not an out-link of this store" in proc.stderr
    assert os.readlink(mine) == "/etc/hostname"
    link = tmp_path / "result"
    castore("realize", "tests/recipes/small.py:hello", "-o", str(link), store=store)
    castore("realize", "tests/recipes/small.py:layer", "-o", str(link), store=store)  # an out-link: replaced
    castore("gc", store=store)
    os.unlink(link)
    os.symlink(tmp_path / "gone", link)  # dangling, but recorded as this out-link's root until a gc
    castore("realize", "tests/recipes/small.py:hello", "-o", str(link), store=store)
    assert Path(os.readlink(link)).parent.parent == store / "blobs"


def test_arguments_are_checked(tmp_path: Path) -> None:
    store = tmp_path / "store"
    castore("add", str(Path(__file__)), store=store)
    (tmp_path / "secret.log").write_text("not a build log")
    for args, why in ((["log", "../../secret"], "not an object id"),
                      (["ls", "--kind", "bogus"], "--kind 'bogus'"),
                      (["serve", str(tmp_path), "--bind", "127.0.0.1:99999"], "a port from 1 to 65535")):
        proc = castore(*args, store=store, check=False, timeout=30)
        assert proc.returncode == 1 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_says_what_it_left(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = {**os.environ, "CASTORE_CONFIG": os.devnull, "CASTORE_TEST_SHA256": "1" * 64,
               "CASTORE_TEST_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/x",
               "PYTHONFAULTHANDLER": "1"}  # SIGABRT below prints where every thread is
        argv = [CASTORE, "--store", str(tmp_path / "s"), "realize", "tests/recipes/fetching.py:download"]
        # as a terminal's foreground job has it: a run in the background (`make test &`) inherits
        # SIGINT ignored, and then castore, like any program, rightly ignores it
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(1.5)  # fetching, waiting for an answer
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"castore ignored Ctrl-C for 30 s; where it was:\n{err}")
    assert proc.returncode == 130
    assert err.rstrip().endswith("interrupted; the store is unchanged by the step that was running"), err
    assert castore("verify", store=tmp_path / "s").returncode == 0


def test_ls_roots_remove_and_export_as_a_new_user_meets_them(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = castore_json("realize", "tests/recipes/small.py:layer", "-o", str(tmp_path / "r2"), store=store)
    line = next(ln for ln in castore("ls", store=store).stdout.splitlines() if ln.startswith(out["id"]))
    assert line.split()[0] == out["id"] and "root" in line.split()  # the id copies without a mark
    castore_json("show", line.split()[0], store=store)
    removed = castore("roots", "--remove", "r2", store=store, cwd=tmp_path)  # as typed, relative
    assert "removed root r2; the out-link stays" in removed.stderr
    motd = castore_json("add", str(REPO / "tests" / "recipes" / "files" / "hello.txt"), store=store)["id"]
    (store / "blobs" / motd[:2] / motd).unlink()
    refused = castore("export", motd, str(tmp_path / "x"), store=store, check=False)
    assert refused.returncode == 1 and "has lost its file" in refused.stderr and "verify --repair" in refused.stderr
    assert not (tmp_path / "x").exists()
