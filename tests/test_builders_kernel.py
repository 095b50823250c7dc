from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from castore.builders.kernel import missing_options, parse_fragment
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
