from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from castore.builders import BlobInput, ImageResult
from castore.builders.image import BUILD, _what, is_kernel, is_squashfs
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from tests.conftest import castore, castore_json
from tests.helpers import context

PARAMS = {"layers": 1, "cmdline": "console=ttyS0", "overlay_size": 1 << 30, "vcpus": 1, "mem_mib": 128}


def bzimage() -> bytes:
    """The start of an x86 bzImage: the setup header's "HdrS" at 0x202."""
    data = bytearray(0x1000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


def squashfs_image(tmp_path: Path) -> Path:
    """A real one, from gensquashfs: one directory."""
    listing = tmp_path / "pack.list"
    listing.write_text("dir /etc 0755 0 0\n")
    out = tmp_path / "layer.sqfs"
    subprocess.run(["gensquashfs", "-F", str(listing), "-D", str(tmp_path), "-q", str(out)], check=True)
    return out


def blob(path: Path) -> BlobInput:
    return BlobInput(hash_bytes(path.read_bytes()), path, path.stat().st_size)


def test_signatures() -> None:
    elf = Path("/bin/true").read_bytes()[:0x440]
    assert is_kernel(elf) and is_kernel(bzimage()) and not is_kernel(b"hsqs" + bytes(0x440))
    assert not is_kernel(b"") and not is_kernel(b"HdrS" * 200)  # HdrS, but not at 0x202
    arm64 = bytes(0x38) + b"ARM\x64" + bytes(0x400)  # the arm64 Image header's magic
    assert is_kernel(arm64) and not is_kernel(bytes(0x3c) + b"ARM\x64")
    assert is_squashfs(b"hsqs\0\0") and not is_squashfs(b"sqsh") and not is_squashfs(elf)
    ext4 = bytearray(0x440)
    ext4[0x438:0x43A] = b"\x53\xef"
    assert _what(bytes(ext4)) == "an ext2/3/4 filesystem"
    assert _what(b"") == "an empty file"
    assert _what(b"not a kernel\n") == "text starting 'not a kernel\\n'"
    assert _what(b"\x1f\x8b\x08\x00") == "gzip data"
    assert _what(bytes(range(40))) == "data starting " + repr(bytes(range(24)))


@pytest.mark.parametrize("kind", ["elf", "bzimage"])
def test_a_kernel_and_a_squashfs_layer_make_an_image(tmp_path: Path, kind: str) -> None:
    kernel = tmp_path / "kernel"
    if kind == "elf":
        shutil.copy("/bin/true", kernel)  # any ELF passes the check, as a vmlinux does
    else:
        kernel.write_bytes(bzimage())
    layer = squashfs_image(tmp_path)
    ctx = context(tmp_path, PARAMS, {"kernel": blob(kernel), "layer0": blob(layer)})
    res = BUILD["image"](ctx)
    assert isinstance(res, ImageResult)
    assert res.image.kernel == blob(kernel).id and [x.blob for x in res.image.layers] == [blob(layer).id]


def test_wrong_inputs_are_named(tmp_path: Path) -> None:
    text = tmp_path / "k.txt"
    text.write_text("not a kernel\n")
    layer = squashfs_image(tmp_path)
    ctx = context(tmp_path, {**PARAMS, "layers": 2}, {"kernel": blob(layer), "layer0": blob(layer),
                                                      "layer1": blob(text)})
    with pytest.raises(CastoreError) as err:
        BUILD["image"](ctx)
    k, t = blob(layer).id[:12], blob(text).id[:12]
    assert err.value.message == (
        "image: wrong inputs:\n"
        f"  the kernel (blob {k}) is not a Linux kernel: it is a squashfs image; expected an ELF vmlinux or a bzImage\n"
        f"  rootfs layer 1 (blob {t}) is not a squashfs image: it is text starting 'not a kernel\\n'")
    ctx = context(tmp_path, PARAMS, {"kernel": blob(Path("/bin/true")), "layer0": blob(Path("/bin/true"))})
    with pytest.raises(CastoreError, match=r"^image: rootfs layer 0 \(blob \w+\) is not a squashfs image: "
                                           "it is an ELF file$"):
        BUILD["image"](ctx)


def test_wrong_inputs_fail_the_realize_at_the_recipe_line(tmp_path: Path) -> None:
    """The QA report's recipe: a text file as kernel and as a layer, an ext4 image as a layer."""
    (tmp_path / "k.txt").write_text("not a kernel\n")
    recipe = tmp_path / "img.py"
    recipe.write_text("from castore import recipe, image, local_file, ext4\n@recipe\ndef default():\n"
                      "    return image(kernel=local_file('k.txt'), rootfs=[ext4('1MiB'), local_file('k.txt')])\n")
    proc = castore("realize", str(recipe), store=tmp_path / "store", check=False)
    assert proc.returncode == 1
    assert "img.py:4: building default (image) failed:\nimage: wrong inputs:\n  the kernel (blob " in proc.stderr
    assert "is not a Linux kernel: it is text starting 'not a kernel\\n'" in proc.stderr
    assert "is not a squashfs image: it is an ext2/3/4 filesystem" in proc.stderr
    assert "rootfs layer 0 (blob " in proc.stderr and "rootfs layer 1 (blob " in proc.stderr
    assert "hint: pass kernel(...) or a vmlinux/bzImage" in proc.stderr


def test_an_elf_kernel_and_a_squashfs_realize(tmp_path: Path) -> None:
    shutil.copy("/bin/true", tmp_path / "vmlinux")
    recipe = tmp_path / "img.py"
    recipe.write_text("from castore import recipe, image, local_file, squashfs, tree\n@recipe\ndef default():\n"
                      "    return image(kernel=local_file('vmlinux'), rootfs=squashfs(tree().dirs('/etc')))\n")
    res = castore_json("realize", str(recipe), store=tmp_path / "store")
    assert res["kind"] == "image" and Path(res["kernel"]).read_bytes() == Path("/bin/true").read_bytes()
    assert Path(res["layers"][0]).read_bytes()[:4] == b"hsqs"
