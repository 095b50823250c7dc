"""squashfs: a tree as a squashfs image, rootless, with squashfs-tools-ng ``gensquashfs``.

The tree becomes a ``--pack-file`` listing whose modes and owners come from
the manifest and whose file contents are read straight from the store's
blobs, so no directory is materialized and no root privilege is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from castore.builders import BlobResult, BuildContext, Result
from castore.errors import CastoreError
from castore.manifest import Tree
from castore.tools import SOURCE_DATE_EPOCH, run

_PLAIN = re.compile(r"[A-Za-z0-9._+@%=,:/~-]+")


def quote(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise CastoreError(f"squashfs: name {text!r} contains a line break, which gensquashfs cannot take")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pack_listing(tree: Tree, blobs_dir: Path) -> str:
    """The gensquashfs pack file for a tree; file sources are relative to blobs_dir."""
    lines = ["dir / 0755 0 0"]
    for e in tree:
        p = quote("/" + e.path)
        attrs = f"{e.mode:04o} {e.uid} {e.gid}"
        if e.type == "dir":
            lines.append(f"dir {p} {attrs}")
        elif e.type == "file":
            assert e.blob is not None
            lines.append(f"file {p} {attrs} {e.blob[:2]}/{e.blob}")
        elif e.type == "symlink":
            lines.append(f"slink {p} 0777 {e.uid} {e.gid} {quote(e.target or '')}")
        elif e.type == "hardlink":
            lines.append(f"link {p} 0777 0 0 {quote('/' + (e.target or ''))}")
        elif e.type in ("char", "block"):
            lines.append(f"nod {p} {attrs} {'c' if e.type == 'char' else 'b'} {e.major} {e.minor}")
        elif e.type == "fifo":
            lines.append(f"pipe {p} {attrs}")
    return "\n".join(lines) + "\n"


def _squashfs(ctx: BuildContext) -> Result:
    tree = ctx.tree("tree").tree
    blobs_dir = ctx.blob_path("0" * 64).parent.parent
    listing = ctx.scratch / "pack.list"
    listing.write_text(pack_listing(tree, blobs_dir))
    ctx.status(f"gensquashfs: {len(tree)} entries, {tree.size() >> 20} MiB")
    run(
        [
            "gensquashfs",
            "--pack-file", listing,
            "--pack-dir", blobs_dir,
            "--compressor", ctx.params["compression"],
            "--block-size", str(ctx.params["block_size"]),
            # implicit directories and every inode: one fixed time, root-owned
            "--defaults", f"mtime={SOURCE_DATE_EPOCH},uid=0,gid=0,mode=0755",
            "--num-jobs", str(ctx.jobs),  # output is the same for any job count
            "--quiet",
            ctx.out,
        ],
        log_file=ctx.log,
    )
    return BlobResult()


BUILD = {"squashfs": _squashfs}
