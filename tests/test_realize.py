from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from castore.realize import Realizer
from castore.recipes import load_file
from castore.store import LocalStore
from tests.conftest import CASTORE, RECIPES, REPO, castore, castore_json, snapshot
from tests.helpers import NOT_ROOT, http_server, tiny_tmpfs


def test_second_realize_builds_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    assert first["built"] == ["layer", "rootfs"]
    second = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    assert second["id"] == first["id"] and second["built"] == []
    dry = castore("realize", "tests/recipes/small.py:rootfs", "--dry-run", store=store)
    assert "nothing to do" in dry.stdout
    dry_json = castore_json("realize", "tests/recipes/small.py:rootfs", "--dry-run", "--json", store=store)
    assert dry_json["id"] == first["id"] and dry_json["dry_run"] is True


def test_dry_run_lists_what_would_run_and_builds_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = castore_json("realize", "tests/recipes/small.py:rootfs", "--dry-run", store=store)
    assert [p["action"] for p in out["plans"]] == ["build", "build"]
    assert snapshot(store)[1] == []


def test_realizer_in_process_and_concurrent_builds_once(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store")
    plan = load_file(RECIPES / "small.py")["rootfs"].evaluate()
    out = Realizer(s).realize(plan)
    assert [st.how for st in out.steps] == ["built", "built"]
    again = Realizer(s).realize(plan)
    assert again.root.how == "present" and again.built == [] and again.root.oid == out.root.oid
    assert again.steps[0].how == ""  # the input of a present plan is not even looked at
    s.close()
    # two processes racing on a fresh store: one builds, the other waits on the plan lock and reuses
    store2 = tmp_path / "store2"
    procs = [subprocess.Popen([CASTORE, "--store", str(store2), "realize", "tests/recipes/small.py:rootfs",
                               "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import json

    built = [json.loads(o[0])["built"] for o in outs]
    assert sum(map(len, built)) == 2  # each step built by exactly one of them


def test_kill_9_during_a_build_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    sha = hashlib.sha256(data).hexdigest()
    store = tmp_path / "store"
    castore("realize", "tests/recipes/small.py:hello", store=store)
    before = snapshot(store)
    with http_server({"/big": data}, delay=0.05) as (url, _):
        env = {**os.environ, "CASTORE_TEST_URL": f"{url}/big", "CASTORE_TEST_SHA256": sha}
        proc = subprocess.Popen([CASTORE, "--store", str(store), "realize", "tests/recipes/fetching.py:download"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline and partial is None:
            for out in (store / "tmp").glob("*/out"):
                if out.stat().st_size > 256 * 1024:
                    partial = out
            time.sleep(0.05)
        assert partial is not None, "the download never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert snapshot(store) == before  # no partial object, no record
        verify = castore("verify", "--json", store=store)
        assert '"ok": true' in verify.stdout and "staging left by a stopped process" in verify.stdout
        _.delay = 0.0
        res = castore_json("realize", "tests/recipes/fetching.py:download", store=store, env=env)
    assert Path(res["path"]).read_bytes() == data
    assert list((store / "tmp").iterdir()) == []  # the stale staging was cleaned
    assert castore("verify", store=store).stdout.endswith("0 problems\n")


def test_failed_build_keeps_log_and_nothing_else(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    f.write_text("from castore import recipe, tree\n\n@recipe\ndef default():\n"
                 "    return tree().dirs('/a').remove('/b')\n")
    store = tmp_path / "store"
    proc = castore("realize", str(f), store=store, check=False)
    assert proc.returncode == 1 and "r.py:5" in proc.stderr and "r.py:5: remove: /b is not in the tree" in proc.stderr
    assert snapshot(store) == (set(), [])
    logs = list((store / "logs").iterdir())
    assert len(logs) == 1 and "is not in the tree" in logs[0].read_text()
    tail = proc.stderr.partition("last lines of")[2].splitlines()[1:]  # what the log holds, shown at once
    assert any(line.startswith("    error: ") and "is not in the tree" in line for line in tail)
    for given in (logs[0].stem, logs[0].stem[:12], logs[0].stem[:12].upper()):  # by plan hash or prefix
        assert castore("log", given, store=store).stdout == logs[0].read_text()


def test_keep_failed_keeps_the_build_directory_until_gc(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    f.write_text("from castore import recipe, tree\n\n@recipe\ndef default():\n"
                 "    return tree().dirs('/a').remove('/b')\n")
    store = tmp_path / "store"
    proc = castore("realize", str(f), "--keep-failed", store=store, check=False)
    assert proc.returncode == 1, proc.stderr
    kept = [p for p in (store / "tmp").iterdir() if p.name.startswith("failed-tree-")]
    assert len(kept) == 1 and kept[0].is_dir() and f"kept at {kept[0]}" in proc.stderr
    ok = tmp_path / "ok.py"
    ok.write_text("from castore import recipe, tree\n\n@recipe\ndef default():\n    return tree().dirs('/b')\n")
    castore("realize", str(ok), store=store)  # another realize cleans stale staging: not this
    assert kept[0].is_dir()
    logs = {p.name for p in (store / "logs").iterdir()}
    locks = {p.name for p in (store / "locks").iterdir()}
    assert len(logs) == 2 and len([n for n in locks if len(n) == 64 + 5]) == 2  # one per plan built
    castore("gc", store=store)  # no root: the built object goes, and its log with it
    assert not kept[0].exists()
    left = list((store / "logs").iterdir())  # the failed build's log stays: how to see what went wrong
    assert len(left) == 1 and left[0].name in logs and "\nerror: " in left[0].read_text()
    assert {p.name for p in (store / "locks").iterdir()} == {n for n in locks if len(n) < 64}
    assert castore("verify", store=store).returncode == 0


def test_bad_recipes_leave_the_store_as_it_was(tmp_path: Path) -> None:
    store = tmp_path / "store"
    castore("realize", "tests/recipes/small.py:hello", store=store)
    before = snapshot(store)
    for bad, where in (("bad_raise.py", "bad_raise.py:5"), ("bad_missing.py", "bad_missing.py:6"),
                       ("bad_syntax.py", "bad_syntax.py:5"), ("bad_return.py", "bad_return.py:4")):
        proc = castore("realize", f"tests/recipes/{bad}", store=store, check=False)
        assert proc.returncode == 1 and where in proc.stderr and proc.stderr.startswith("error: ")
        assert snapshot(store) == before
        verify = castore_json("verify", store=store)
        assert verify["ok"] and verify["notes"] == []


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_build_on_a_full_disk_says_so_and_adds_nothing(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small") as mnt:
        castore("add", "/etc/hostname", store=mnt / "s")  # the store exists, with its database
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "fill").write_bytes(bytes(free - (80 << 10)))  # room to open the store, not to build
        proc = castore("realize", "tests/recipes/small.py:rootfs", store=mnt / "s", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "error: no space left on the device holding" in proc.stderr
        (mnt / "fill").unlink()
        assert castore_json("verify", store=mnt / "s")["ok"]  # steps that finished stay; the failed one left nothing
        plans = castore_json("realize", "--dry-run", "tests/recipes/small.py:rootfs", store=mnt / "s")["plans"]
        assert plans[-1]["action"] == "build"


def test_an_output_whose_file_went_missing_is_built_again(tmp_path: Path) -> None:
    """realize must not hand out the path of a file that is not there: an object whose file is
    gone (or changed size) is taken as absent, and the new file takes its place."""
    store = tmp_path / "store"
    first = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    path = store / "blobs" / first["id"][:2] / first["id"]
    path.unlink()
    again = castore_json("realize", "tests/recipes/small.py:rootfs", store=store)
    assert again["id"] == first["id"] and again["built"] == ["rootfs"] and path.is_file()
    assert castore_json("verify", store=store)["ok"]
