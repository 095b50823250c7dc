"""kernel: ``make vmlinux`` from a Linux source tarball and a config fragment.

The fragment is applied on top of a base config (``tinyconfig`` by default),
``olddefconfig`` fills in the rest, and every option the fragment sets must
survive it: a dropped option fails the build with the list of what went
missing. The build runs under bubblewrap with the sources bound at a fixed path
(same paths on every machine) at /tmp/build, no network, and the KBUILD_BUILD_* variables
fixed, which makes vmlinux bit-for-bit reproducible.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from castore.builders import SPECS, BlobResult, BuildContext, Result
from castore.errors import BuildError, ToolError
from castore.tools import run, which

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
# what make or sh say of a program that is not on PATH
_NOT_FOUND = re.compile(r"(?:^|[\s:])([A-Za-z0-9][A-Za-z0-9._+-]*): (?:command )?not found", re.M)
# Fixed identity for /proc/version and `uname -v`; the values are arbitrary but constant.
KBUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "Sat Jan  1 00:00:00 UTC 2000",
    "KBUILD_BUILD_USER": "castore",
    "KBUILD_BUILD_HOST": "castore",
    "KBUILD_BUILD_VERSION": "1",
}


def parse_fragment(text: str) -> dict[str, str]:
    """CONFIG_ name -> value ('n' for '# ... is not set'); comments and blanks skipped."""
    wanted: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _OPTION.match(line):
            wanted[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            wanted[m.group(1)] = "n"
    return wanted


def missing_options(wanted: dict[str, str], config_text: str) -> list[str]:
    have = parse_fragment(config_text)
    return [f"{k}={v} (got {have.get(k, 'n')})" for k, v in wanted.items() if have.get(k, "n") != v]


BUILD_DIR = "/tmp/build"  # on the sandbox's own tmpfs, so it exists whatever the host has
TOOLS_DIR = "/tmp/tools"  # the sandbox's PATH: the declared tools, and nothing else


def _sandboxed(work: Path, argv: list[str], params: dict[str, Any]) -> list[str]:
    """bwrap argv for a step of the build. Only the tools in the builder's Spec and the plan's
    own, whose versions are in the plan hash, are on PATH: a host that also has pahole, python3 or
    git builds what a host without them builds (the kernel's scripts probe for them), and a tool
    the build starts to need fails it by name instead of changing it unseen."""
    tools = [arg for tool in dict.fromkeys(SPECS["kernel"].tools_of(params))
             for arg in ("--symlink", which(tool), f"{TOOLS_DIR}/{tool}")]
    return [
        "bwrap",
        "--ro-bind", "/", "/",  # the host's toolchain, read-only
        "--tmpfs", "/tmp",
        "--bind", str(work), BUILD_DIR,  # same source path on every machine
        "--dir", TOOLS_DIR,
        *tools,
        "--setenv", "PATH", TOOLS_DIR,
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-all",  # no network, own pid/ipc/uts namespaces
        "--hostname", "castore",
        "--die-with-parent",
        "--chdir", BUILD_DIR,
        "--",
        *argv,
    ]


def _kernel(ctx: BuildContext) -> Result:
    arch = ctx.params["arch"]
    work = ctx.scratch / "linux"
    work.mkdir()
    ctx.status("unpacking the kernel sources")
    run(["tar", "-xf", ctx.blob("source").path, "-C", work, "--strip-components=1",
         "--no-same-owner"], log_file=ctx.log)
    make = ["make", f"ARCH={arch}"]
    ctx.status(f"make {ctx.params['base']}")
    run(_sandboxed(work, [*make, ctx.params["base"]], ctx.params), log_file=ctx.log)
    fragment = ctx.blob("config").path.read_text()
    wanted = parse_fragment(fragment)
    with open(work / ".config", "a") as f:
        f.write("\n# castore: config fragment\n" + fragment)
    run(_sandboxed(work, [*make, "olddefconfig"], ctx.params), log_file=ctx.log)
    dropped = missing_options(wanted, (work / ".config").read_text())
    if dropped:
        raise BuildError(
            "the kernel config lost options the fragment asked for:\n  " + "\n  ".join(dropped),
            "enable what they depend on (see `make menuconfig`, or the Kconfig 'depends on' lines)",
        )
    count = 0

    def progress(line: str) -> None:
        nonlocal count
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("CC", "AS", "LD", "AR"):
            count += 1
            if count % 10 == 0 or parts[0] == "LD":
                ctx.status(f"make vmlinux: {count} steps, {parts[0]} {parts[1]}")

    try:
        run(_sandboxed(work, [*make, f"-j{ctx.jobs}", "vmlinux"], ctx.params), env=KBUILD_ENV,
            log_file=ctx.log, on_line=progress)
    except ToolError as exc:
        if m := _NOT_FOUND.search(exc.message):
            raise BuildError(exc.message, f"the build sees only the tools it declares: if it needs "
                             f"{m.group(1)}, name it in the recipe, kernel(..., tools=[\"{m.group(1)}\"])") from exc
        raise
    (work / "vmlinux").rename(ctx.out)
    return BlobResult()


BUILD = {"kernel": _kernel}
