"""ext4: an empty, sparse, reproducible ext4 filesystem (the per-machine overlay template).

Everything mke2fs would pick at random or from the host is fixed: the UUID
and directory hash seed are derived from the plan hash, every timestamp is
SOURCE_DATE_EPOCH, and mke2fs reads our own pinned mke2fs.conf instead of
the host's /etc/mke2fs.conf.
"""

from __future__ import annotations

import os

from castore.builders import BlobResult, BuildContext, Result
from castore.hashing import derive_uuid
from castore.tools import SOURCE_DATE_EPOCH, run

MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""


def mkfs_ext4(ctx: BuildContext, size: int, label: str) -> None:
    conf = ctx.scratch / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    with open(ctx.out, "xb") as f:
        os.truncate(f.fileno(), size)  # sparse: only what mke2fs writes takes space
    extended = ",".join([
        f"hash_seed={derive_uuid(ctx.plan_hash, 'ext4-hash-seed')}",  # htree hashes, else random
        "root_owner=0:0",  # not the building user's uid
        "nodiscard",  # never punch the output file
        "lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1",  # keep it sparse
    ])
    run(
        [
            "mke2fs", "-F", "-q", "-t", "ext4",
            "-U", derive_uuid(ctx.plan_hash, "ext4-uuid"),  # else random per run
            "-E", extended,
            "-L", label,
            ctx.out,
        ],
        env={
            "MKE2FS_CONFIG": str(conf),  # host /etc/mke2fs.conf must not change the result
            "E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH),  # superblock and inode times
        },
        log_file=ctx.log,
    )


def _ext4(ctx: BuildContext) -> Result:
    mkfs_ext4(ctx, ctx.params["size"], ctx.params["label"])
    return BlobResult()


BUILD = {"ext4": _ext4}
