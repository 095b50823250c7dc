"""The demo end to end: realize recipes/app.py (kernel included), realize it again, rebuild it
in a second store under a different umask, time zone, working directory and clock, and boot it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from castore.fsutil import copy_sparse
from tests.conftest import CASTORE, REPO, castore, castore_json
from tests.test_builders_squashfs import unsquashfs_lls


def test_demo_builds_an_image(demo: dict[str, Any]) -> None:
    assert demo["kind"] == "image"
    assert {"vmlinux", "rootfs", "default"} <= set(demo["built"])
    kernel = Path(demo["kernel"])
    assert kernel.read_bytes()[:4] == b"\x7fELF" and kernel.stat().st_size > 1 << 20
    assert "overlay_root=vdb" in demo["cmdline"]
    shown = castore_json("show", demo["id"], store=demo["store"])
    assert shown["image"]["kernel"] == kernel.name and shown["image"]["vcpus"] == 1


def test_second_realize_is_instant_and_builds_nothing(demo: dict[str, Any]) -> None:
    again = castore_json("realize", "recipes/app.py", store=demo["store"])
    assert again["id"] == demo["id"] and again["built"] == []
    plain = castore("realize", "recipes/app.py", store=demo["store"])
    assert plain.stdout.strip() == demo["id"] and "nothing built" in plain.stderr
    assert castore("verify", store=demo["store"]).returncode == 0


def test_demo_rootfs_reads_back(demo: dict[str, Any]) -> None:
    rows = unsquashfs_lls(Path(demo["layers"][0]))
    assert rows["/sbin/init"][:2] == ["-rwxr-xr-x", "root/root"]
    assert rows["/bin/busybox"][:2] == ["-rwxr-xr-x", "root/root"]
    assert rows["/dev/console"][0] == "crw-------" and rows["/dev/console"][2:4] == ["5,", "1"]
    assert rows["/root"][0] == "drwx------"
    for d in ("/overlay", "/mnt", "/rom", "/proc", "/sys"):
        assert rows[d][0] == "drwxr-xr-x"


def test_same_ids_in_another_store_with_other_umask_tz_cwd_and_clock(demo: dict[str, Any], tmp_path: Path) -> None:
    store_b = tmp_path / "store-b"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    shutil.copytree(REPO / "recipes", cwd / "recipes-copy")
    env = {**os.environ, "TZ": "Pacific/Kiritimati", "FAKETIME": "+400d",
           "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"}
    proc = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$@"', "sh", CASTORE, "--store", str(store_b), "realize",
         "recipes-copy/app.py", "--json"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    b = json.loads(proc.stdout)
    assert "vmlinux" in b["built"]  # really rebuilt, kernel included
    assert b["id"] == demo["id"]
    assert Path(b["kernel"]).name == Path(demo["kernel"]).name
    assert [Path(p).name for p in b["layers"]] == [Path(p).name for p in demo["layers"]]


def test_boots_in_qemu_microvm_with_a_fresh_overlay(demo: dict[str, Any], tmp_path: Path) -> None:
    overlay_tpl = castore_json("realize", "tests/recipes/small.py:overlay", store=demo["store"])["path"]
    overlay = tmp_path / "overlay.ext4"
    copy_sparse(overlay_tpl, overlay)
    cmdline = demo["cmdline"] + " root=/dev/vda ro reboot=t"
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-nodefaults", "-no-user-config", "-accel", "tcg",
        "-cpu", "max", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", demo["kernel"], "-append", cmdline,
        "-drive", f"id=lower,file={demo['layers'][0]},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=lower",
        "-drive", f"id=upper,file={overlay},format=raw,if=none", "-device", "virtio-blk-device,drive=upper",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    console = proc.stdout
    assert "castore-demo: hello from" in console, console[-3000:]
    assert "castore-demo: done" in console
    # the read-only lower stayed untouched: its id is still its name
    assert castore("verify", store=demo["store"]).returncode == 0
    check = tmp_path / "check.ext4"
    copy_sparse(overlay, check)
    fsck = subprocess.run(["e2fsck", "-fy", str(check)], capture_output=True, text=True)
    assert fsck.returncode <= 1, fsck.stdout
    # overlayfs keeps the app's /root/hello.txt in the upper dir, /root on the disk
    cat = subprocess.run(["debugfs", "-R", "cat /root/root/hello.txt", str(check)], capture_output=True, text=True)
    assert "castore-demo: written by the app at boot" in cat.stdout, cat.stderr


def test_another_store_substitutes_the_demo_and_builds_nothing(demo: dict[str, Any], tmp_path: Path) -> None:
    """Lab A pushes with its key; machine B, trusting that key, realizes recipes/app.py from the cache."""
    secret = tmp_path / "lab-1.secret"
    public = castore("key", "generate", "lab-1", "--out", str(secret)).stdout.strip()
    cache = tmp_path / "cache"
    none = os.devnull
    castore("push", demo["id"], "--to", str(cache), store=demo["store"],
            env={"CASTORE_SECRET_KEY_FILES": str(secret), "CASTORE_CONFIG": none})
    env = {"CASTORE_SUBSTITUTERS": f"file://{cache}", "CASTORE_TRUSTED_PUBLIC_KEYS": public, "CASTORE_CONFIG": none}
    b = castore_json("realize", "recipes/app.py", store=tmp_path / "b", env=env)
    assert b["id"] == demo["id"] and b["built"] == [] and b["substituted"] == ["default"]
    assert Path(b["kernel"]).read_bytes() == Path(demo["kernel"]).read_bytes()
    assert castore_json("verify", store=tmp_path / "b")["ok"]


def test_64_concurrent_pulls_of_the_demo_image_from_castore_serve(demo: dict[str, Any], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from castore.cache.copy import pull
    from castore.cache.transport import DirTransport, HttpTransport
    from castore.store import LocalStore
    from tests.helpers import free_port, wait_port

    served = tmp_path / "served"
    store = LocalStore(demo["store"])
    from castore.cache.copy import push

    push(store, DirTransport(served, create=True), [demo["id"]])
    store.close()
    port = free_port()
    server = subprocess.Popen([CASTORE, "serve", str(served), "--bind", f"127.0.0.1:{port}"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)

        def one(i: int) -> str:
            s = LocalStore(tmp_path / f"client-{i}")
            try:
                with HttpTransport(f"http://127.0.0.1:{port}") as http:
                    pull(s, http, [demo["id"]])
                assert s.verify(contents=False)[0] == []
                return s.read_image(demo["id"]).kernel
            finally:
                s.close()

        with ThreadPoolExecutor(max_workers=64) as pool:
            kernels = list(pool.map(one, range(64)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert kernels == [Path(demo["kernel"]).name] * 64
