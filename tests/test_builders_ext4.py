from __future__ import annotations

import subprocess
from pathlib import Path

from castore.builders.ext4 import mkfs_ext4
from tests.conftest import castore, castore_json
from tests.helpers import context


def test_reproducible_sparse_and_clean(tmp_path: Path) -> None:
    ids = []
    for i in range(2):
        d = tmp_path / str(i)
        d.mkdir()
        ctx = context(d, {"size": 256 << 20, "label": "overlay"}, plan_hash="a" * 64)
        mkfs_ext4(ctx, 256 << 20, "overlay")
        ids.append(subprocess.run(["b3sum", "--no-names", str(ctx.out)], capture_output=True, text=True).stdout)
        st = ctx.out.stat()
        assert st.st_size == 256 << 20 and st.st_blocks * 512 < 4 << 20  # sparse
    assert ids[0] == ids[1]
    out = tmp_path / "0" / "scratch" / "out"
    assert subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True).returncode == 0
    info = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   overlay" in info
    assert "Filesystem created:       Sat Jan  1 00:00:00 2000" in info
    other = tmp_path / "2"
    other.mkdir()
    ctx = context(other, {}, plan_hash="b" * 64)
    mkfs_ext4(ctx, 256 << 20, "overlay")
    assert "Filesystem UUID" in info and info.split("Filesystem UUID:")[1].split()[0] not in \
        subprocess.run(["dumpe2fs", "-h", str(ctx.out)], capture_output=True, text=True).stdout


def test_overlay_recipe_root_dir_is_root_owned(tmp_path: Path) -> None:
    res = castore_json("realize", "tests/recipes/small.py:overlay", store=tmp_path / "s")
    out = subprocess.run(["debugfs", "-R", "stat /", res["path"]], capture_output=True, text=True).stdout
    assert "User:     0   Group:     0" in out


def test_a_size_the_filesystem_cannot_hold_fails_at_the_recipe_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.py"
    recipe.write_text("from castore import ext4, recipe\n\n\n@recipe\ndef default():\n    return ext4('64TiB')\n")
    store = tmp_path / "store"
    proc = castore("realize", str(recipe), store=store, check=False)
    assert proc.returncode == 1
    assert f"{recipe}:6: building default (ext4) failed:" in proc.stderr, proc.stderr
    assert "File too large" in proc.stderr and "dmesg" not in proc.stderr
    log = next((store / "logs").iterdir()).read_text()
    assert "\nerror: File too large" in log
    assert castore("verify", store=store).returncode == 0


def test_a_label_with_a_control_character_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.py"
    recipe.write_text("from castore import ext4, recipe\n\n\n@recipe\ndef default():\n"
                      "    return ext4('8MiB', label='a\\nb')\n")
    proc = castore("realize", str(recipe), store=tmp_path / "store", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {recipe}:6: ext4 label 'a\\nb' holds a control character"), proc.stderr
