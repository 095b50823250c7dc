from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from castore.builders import SPECS
from castore.builders.kernel import _NOT_FOUND, TOOLS_DIR, _sandboxed, missing_options, parse_fragment
from castore.tools import SYSTEM_PATH, run
from tests.conftest import REPO, castore


def test_fragment_parsing_and_dropped_options() -> None:
    wanted = parse_fragment("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n\n")
    assert wanted == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    final = "CONFIG_A=y\nCONFIG_C=\"y\"\n# CONFIG_D is not set\n"
    assert missing_options(wanted, final) == ['CONFIG_C="x" (got "y")']
    assert missing_options({"CONFIG_Z": "y"}, final) == ["CONFIG_Z=y (got n)"]


def test_demo_fragment_asks_for_what_boot_needs() -> None:
    wanted = parse_fragment((REPO / "recipes" / "files" / "microvm.config").read_text())
    for option in ("PVH", "VIRTIO_MMIO", "VIRTIO_BLK", "SQUASHFS", "SQUASHFS_ZSTD", "EXT4_FS", "OVERLAY_FS",
                   "SERIAL_8250_CONSOLE", "DEVTMPFS"):
        assert wanted[f"CONFIG_{option}"] == "y"


def test_the_build_sees_only_the_tools_whose_versions_are_in_its_plan(tmp_path: Path) -> None:
    """The kernel's scripts probe for python3, git and pahole, and must find what a machine without
    them finds (this one has python3, maybe git). The declared tools run from TOOLS_DIR."""
    assert shutil.which("python3", path=SYSTEM_PATH)
    probe = "for t in gcc sort python3 git pahole; do command -v $t || echo no $t; done; echo $PATH"
    out = run(_sandboxed(tmp_path, ["sh", "-c", probe], {})).output.decode().split("\n")
    assert out[:6] == [f"{TOOLS_DIR}/gcc", f"{TOOLS_DIR}/sort", "no python3", "no git", "no pahole", TOOLS_DIR]
    assert "gcc" in SPECS["kernel"].tools and "python3" not in SPECS["kernel"].tools
    # what a kernel build runs through PATH works there: the compiler finds its assembler
    (tmp_path / "t.c").write_text("int f(void) { return 1; }\n")
    run(_sandboxed(tmp_path, ["gcc", "-c", "t.c", "-o", "t.o"], {}))
    assert (tmp_path / "t.o").read_bytes()[:4] == b"\x7fELF"
    # a plan's own tools join them, and its hash: kernel(..., tools=["python3"])
    params = {"tools": ["python3"]}
    assert run(_sandboxed(tmp_path, ["sh", "-c", "command -v python3"], params)).output.strip() == \
        f"{TOOLS_DIR}/python3".encode()
    assert SPECS["kernel"].tools_of(params)[-1] == "python3" and SPECS["squashfs"].tools_of(params) == ("gensquashfs",)


def test_a_tool_the_build_lacks_is_named_with_the_way_to_add_it() -> None:
    said = "make[2]: *** [kernel/Makefile:160: kernel/config_data.gz] Error 127\n/bin/sh: 1: gzip: not found\n"
    m = _NOT_FOUND.search(said)
    assert m and m.group(1) == "gzip"
    assert not _NOT_FOUND.search("fatal error: linux/foo.h: No such file or directory")


def test_an_option_olddefconfig_drops_fails_the_build(demo: dict[str, Any], tmp_path: Path) -> None:
    """EXT4_FS without the block layer cannot survive olddefconfig: the build stops and names it."""
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO / "recipes", recipes)
    cfg = recipes / "files" / "microvm.config"
    text = cfg.read_text()
    assert "CONFIG_BLOCK=y\n" in text
    cfg.write_text(text.replace("CONFIG_BLOCK=y\n", "# CONFIG_BLOCK is not set\n"))
    proc = castore("realize", f"{recipes}/app.py:vmlinux", store=demo["store"], check=False)
    assert proc.returncode == 1
    assert "lost options the fragment asked for" in proc.stderr and "CONFIG_EXT4_FS=y (got n)" in proc.stderr
    assert castore("verify", "--no-contents", store=demo["store"]).returncode == 0
