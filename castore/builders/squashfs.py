"""squashfs: a tree as a squashfs image, rootless, with squashfs-tools-ng ``gensquashfs``.

The tree becomes a ``--pack-file`` listing whose modes and owners come from
the manifest and whose file contents are read straight from the store's
blobs, so no directory is materialized and no root privilege is needed.

Invariant: the image holds exactly what the manifest says, or the build fails
naming the entry. What squashfs or the pack file cannot carry (a link target
with a line break, device numbers beyond squashfs's 32-bit encoding) is
refused, never altered.
"""

from __future__ import annotations

import re
from pathlib import Path

from castore.builders import BlobResult, BuildContext, Result
from castore.errors import CastoreError
from castore.manifest import Entry, Tree
from castore.tools import SOURCE_DATE_EPOCH, run

_PLAIN = re.compile(r"[A-Za-z0-9._+@%=,:/~-]+")
_BLANKS = " \t\n\v\f\r"  # what C's isspace() matches in the C locale
# squashfs keeps a device number in 32 bits, the kernel's new_encode_dev() layout: 12 bits of major, 20 of minor
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1
_MAX_SHOWN = 10  # entries an error lists


def quote(text: str) -> str:
    """A pack-file path: bare when plain, else in double quotes with \\ and " escaped."""
    if "\n" in text or "\r" in text:
        raise CastoreError(f"name {text!r} contains a line break, which gensquashfs cannot take")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def raw_target(e: Entry, target: str) -> str:
    """A link target as the last field of a pack-file line, where it must stand unquoted.

    gensquashfs 1.2 takes a ``slink`` or ``link`` target as the rest of the line, byte for byte, after
    the blanks that follow the gid: quotes and backslashes are kept as they are, so quote() would put
    them into the image. The line ends at "\\n", with a "\\r" before it dropped. So a target cannot
    start with a blank, end with "\\r", or hold "\\n" or NUL; anything else goes through unchanged.
    """
    problem = None
    if not target:
        problem = "is empty"
    elif "\n" in target:
        problem = "contains a line break"
    elif "\0" in target:
        problem = "contains a NUL byte"
    elif target[0] in _BLANKS:
        problem = "starts with whitespace"
    elif target.endswith("\r"):
        problem = "ends with a carriage return"
    if problem is not None:
        raise CastoreError(f"{e.type} /{e.path}: its target {target!r} {problem}, "
                           "which gensquashfs's pack file cannot carry")
    return target


def _device(e: Entry) -> str:
    assert e.major is not None and e.minor is not None
    if e.major > MAX_MAJOR or e.minor > MAX_MINOR:
        raise CastoreError(f"{e.type} device /{e.path}: ({e.major}, {e.minor}) is out of range: squashfs "
                           f"stores majors 0 to {MAX_MAJOR} and minors 0 to {MAX_MINOR}")
    return f"{'c' if e.type == 'char' else 'b'} {e.major} {e.minor}"


def _line(e: Entry) -> str:
    p = quote("/" + e.path)
    attrs = f"{e.mode:04o} {e.uid} {e.gid}"
    if e.type == "dir":
        return f"dir {p} {attrs}"
    if e.type == "file":
        assert e.blob is not None
        return f"file {p} {attrs} {e.blob[:2]}/{e.blob}"
    if e.type == "symlink":
        return f"slink {p} 0777 {e.uid} {e.gid} {raw_target(e, e.target or '')}"
    if e.type == "hardlink":
        return f"link {p} 0777 0 0 {raw_target(e, '/' + (e.target or ''))}"
    if e.type in ("char", "block"):
        return f"nod {p} {attrs} {_device(e)}"
    assert e.type == "fifo", e.type
    return f"pipe {p} {attrs}"


def pack_listing(tree: Tree, blobs_dir: Path) -> str:
    """The gensquashfs pack file for a tree; file sources are relative to blobs_dir.

    Entries the image could not hold as the manifest has them are refused, all in one error.
    """
    lines = ["dir / 0755 0 0"]
    problems: list[str] = []
    for e in tree:
        try:
            lines.append(_line(e))
        except CastoreError as exc:
            problems.append(exc.message)
    if problems:
        shown = problems[:_MAX_SHOWN]
        if len(problems) > _MAX_SHOWN:
            shown.append(f"and {len(problems) - _MAX_SHOWN} more")
        raise CastoreError(
            "squashfs: " + (shown[0] if len(shown) == 1 else "\n  ".join(["cannot pack these entries:", *shown])),
            "castore refuses an entry rather than alter it: change it in the tree",
        )
    return "\n".join(lines) + "\n"


def _squashfs(ctx: BuildContext) -> Result:
    tree = ctx.tree("tree").tree
    blobs_dir = ctx.blob_path("0" * 64).parent.parent
    listing = ctx.scratch / "pack.list"
    listing.write_text(pack_listing(tree, blobs_dir), encoding="utf-8")
    ctx.status(f"gensquashfs: {len(tree)} {'entry' if len(tree) == 1 else 'entries'}, {tree.size() / 2**20:.1f} MiB")
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
