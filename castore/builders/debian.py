"""debian_package: a .deb by name, version and sha256, through the machine's apt configuration.

``apt-get download`` uses whatever mirror the machine is set up for, so no
host name is ever written into a recipe. A copy already in apt's own cache
is used when its sha256 matches.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from castore.builders import BlobResult, BuildContext, Result
from castore.builders.fetch import check_digest
from castore.errors import CastoreError, ToolError
from castore.hashing import Hasher
from castore.tools import run

APT_ARCHIVES = Path("/var/cache/apt/archives")


def deb_filename(package: str, version: str, arch: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"


def _hash(path: Path) -> Hasher:
    h = Hasher(sha256=True)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def _debian_package(ctx: BuildContext) -> Result:
    p = ctx.params
    name = deb_filename(p["package"], p["version"], p["arch"])
    cached = APT_ARCHIVES / name
    if cached.is_file() and _hash(cached).sha256() == p["sha256"]:
        shutil.copyfile(cached, ctx.out)
        return BlobResult()
    ctx.status(f"apt-get download {p['package']}={p['version']}")
    spec = f"{p['package']}:{p['arch']}={p['version']}"
    try:
        # as root, apt would hand the download to its _apt user, who cannot write to our scratch dir
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        run(["apt-get", *sandbox, "download", spec], cwd=ctx.scratch, log_file=ctx.log)
    except ToolError as exc:
        raise CastoreError(
            f"apt-get could not download {spec}: {exc.stderr.splitlines()[-1] if exc.stderr else exc}",
            "is that version in the configured apt sources? run apt-get update; "
            "`apt-cache policy " + p["package"] + "` lists the versions apt knows",
        ) from exc
    got = ctx.scratch / name
    if not got.is_file():
        debs = list(ctx.scratch.glob("*.deb"))
        if len(debs) != 1:
            raise CastoreError(f"apt-get download {spec} left no single .deb")
        got = debs[0]
    check_digest(ctx, _hash(got), name)
    got.rename(ctx.out)
    return BlobResult()


BUILD = {"debian_package": _debian_package}
