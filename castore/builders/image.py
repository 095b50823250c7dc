"""image: bundle a kernel blob, rootfs layers and machine defaults into an image manifest.

Inputs are checked by their first bytes, so a blob passed in the wrong place fails the build,
naming the input and what it holds, instead of a machine failing to boot later: the kernel
must be an ELF vmlinux (``\\x7fELF`` at offset 0) or a bzImage (``HdrS`` at 0x202), and every
layer a squashfs image (``hsqs`` at offset 0).
"""

from __future__ import annotations

from castore.builders import BlobInput, BuildContext, ImageResult, Result
from castore.errors import CastoreError
from castore.manifest import Image, Layer

ELF_MAGIC = b"\x7fELF"
BZIMAGE_MAGIC, BZIMAGE_AT = b"HdrS", 0x202  # the x86 boot protocol's setup header
ARM64_MAGIC, ARM64_AT = b"ARM\x64", 0x38  # an arm64 Image, what Firecracker boots on aarch64
SQUASHFS_MAGIC = b"hsqs"  # squashfs 4 superblock, little-endian
_HEAD = 0x440  # enough for every signature _what() knows; ext4's magic is at 0x438


def _head(blob: BlobInput) -> bytes:
    with open(blob.path, "rb") as f:
        return f.read(_HEAD)


def is_kernel(head: bytes) -> bool:
    return (head.startswith(ELF_MAGIC) or head[BZIMAGE_AT:BZIMAGE_AT + 4] == BZIMAGE_MAGIC
            or head[ARM64_AT:ARM64_AT + 4] == ARM64_MAGIC)


def is_squashfs(head: bytes) -> bool:
    return head.startswith(SQUASHFS_MAGIC)


def _what(head: bytes) -> str:
    """What a blob looks like, for an error message."""
    if not head:
        return "an empty file"
    signatures = (
        (0, SQUASHFS_MAGIC, "a squashfs image"),
        (0, ELF_MAGIC, "an ELF file"),
        (BZIMAGE_AT, BZIMAGE_MAGIC, "a bzImage kernel"),
        (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
        (0, b"\x1f\x8b", "gzip data"),
        (0, b"\xfd7zXZ\x00", "xz data"),
        (0, b"\x28\xb5\x2f\xfd", "zstd data"),
        (0, b"!<arch>\n", "an ar archive (a .deb?)"),
        (257, b"ustar", "a tar archive"),
    )
    for offset, magic, name in signatures:
        if head[offset:offset + len(magic)] == magic:
            return name
    sample = head[:24]
    text = sample.decode("utf-8", "ignore")  # a character cut at the end is dropped
    if text.strip() and all(c.isprintable() or c in "\t\n\r" for c in text):
        return f"text starting {text!r}"
    return f"data starting {sample!r}"


def _image(ctx: BuildContext) -> Result:
    p = ctx.params
    kernel = ctx.blob("kernel")
    layer_blobs = [ctx.blob(f"layer{i}") for i in range(p["layers"])]
    problems = []
    head = _head(kernel)
    if not is_kernel(head):
        problems.append(f"the kernel (blob {kernel.id[:12]}) is not a Linux kernel: it is {_what(head)}; "
                        "expected an ELF vmlinux or a bzImage")
    for i, blob in enumerate(layer_blobs):
        head = _head(blob)
        if not is_squashfs(head):
            problems.append(f"rootfs layer {i} (blob {blob.id[:12]}) is not a squashfs image: it is {_what(head)}")
    if problems:
        what = problems[0] if len(problems) == 1 else "\n  ".join(["wrong inputs:", *problems])
        raise CastoreError(f"image: {what}",
                           "pass kernel(...) or a vmlinux/bzImage as kernel=, and squashfs(...) plans as rootfs=")
    return ImageResult(
        Image(
            kernel=kernel.id,
            layers=tuple(Layer(blob.id, "squashfs") for blob in layer_blobs),
            cmdline=p["cmdline"],
            overlay_size=p["overlay_size"],
            vcpus=p["vcpus"],
            mem_mib=p["mem_mib"],
        )
    )


BUILD = {"image": _image}
