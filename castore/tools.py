"""The one way castore starts external programs.

:func:`run` takes an argv list (never a shell string), runs it with a fixed,
minimal environment, logs ``+ argv`` at debug level, streams output into a
build log, and turns failures into :class:`ToolError` with the exit code and
the tail of the output. A missing program raises :class:`ToolMissing` naming
the Debian package to install. Children die with castore (PR_SET_PDEATHSIG),
so a killed realize leaves no orphan writing into the store.

:func:`tool_version` is how plans learn the version of each tool they run.
"""

from __future__ import annotations

import collections
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from castore.errors import ToolError, ToolMissing
from castore.hashing import hash_file

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# 2000-01-01T00:00:00Z: every timestamp a builder writes, unless a plan says otherwise.
SOURCE_DATE_EPOCH = 946684800


@dataclass(frozen=True)
class ToolInfo:
    package: str
    version_args: tuple[str, ...] = ("--version",)  # (): it prints none; its bytes' hash stands in
    helpers: tuple[str, ...] = ()  # programs it runs from its own directories (gcc: cc1)


_BINUTILS, _COREUTILS = ToolInfo("binutils"), ToolInfo("coreutils")


TOOLS: dict[str, ToolInfo] = {
    "gensquashfs": ToolInfo("squashfs-tools-ng"),
    "sqfs2tar": ToolInfo("squashfs-tools-ng"),
    "unsquashfs": ToolInfo("squashfs-tools", ("-version",)),
    "mksquashfs": ToolInfo("squashfs-tools", ("-version",)),
    "mke2fs": ToolInfo("e2fsprogs", ("-V",)),
    "debugfs": ToolInfo("e2fsprogs", ("-V",)),
    "e2fsck": ToolInfo("e2fsprogs", ("-V",)),
    "make": ToolInfo("make"),
    "gcc": ToolInfo("gcc", helpers=("cc1", "collect2")),  # cc1 loads libisl, libmpc, libmpfr, libgmp
    "ld": ToolInfo("binutils"),
    "flex": ToolInfo("flex"),
    "bison": ToolInfo("bison"),
    "bc": ToolInfo("bc"),
    "perl": ToolInfo("perl"),
    "awk": ToolInfo("mawk", ("-W", "version")),  # Debian's awk; gawk takes -W version too
    "sed": ToolInfo("sed"),
    "tar": ToolInfo("tar"),
    "xz": ToolInfo("xz-utils"),
    "bwrap": ToolInfo("bubblewrap"),
    "apt-get": ToolInfo("apt"),
    # what a kernel build runs besides its compilers (traced with strace -f -e execve)
    "sh": ToolInfo("dash", ()),  # dash has no version option
    **dict.fromkeys(("as", "ar", "nm", "objcopy", "objdump"), _BINUTILS),
    "m4": ToolInfo("m4"),
    "grep": ToolInfo("grep"),
    "find": ToolInfo("findutils"),
    "xargs": ToolInfo("findutils"),
    "diff": ToolInfo("diffutils"),
    "cmp": ToolInfo("diffutils"),
    "getconf": ToolInfo("libc-bin"),
    **dict.fromkeys(("basename", "cat", "cp", "cut", "dirname", "env", "expr", "head", "mkdir", "mktemp", "mv",
                     "rm", "sha1sum", "sort", "tail", "touch", "tr", "uname", "uniq", "wc"), _COREUTILS),
    "qemu-system-x86_64": ToolInfo("qemu-system-x86"),
    "nginx": ToolInfo("nginx", ("-v",)),
}


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": SYSTEM_PATH,
        "LC_ALL": "C",  # messages and sort order independent of the user's locale
        "TZ": "UTC",  # timestamps rendered the same everywhere
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),  # tools that honour it stamp this time
        "HOME": "/nonexistent",  # no per-user dotfiles leak into a build
    }
    if extra:
        env.update(extra)
    return env


def which(tool: str) -> str:
    found = shutil.which(tool, path=SYSTEM_PATH)
    if found is None:
        info = TOOLS.get(tool)
        hint = f"install it: apt-get install {info.package}" if info else None
        raise ToolMissing(f"{tool} is not installed", hint)
    return found


@functools.cache
def _die_with_parent() -> Callable[[], None]:
    """The function the child runs between fork and exec; it must not import anything there."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Result:
    argv: list[str]
    returncode: int
    output: bytes


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    log_file: BinaryIO | None = None,
    on_line: Callable[[str], None] | None = None,
    stdin: bytes | None = None,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    timeout: float | None = None,
) -> Result:
    """Run argv; output (stdout and stderr merged) goes to log_file and is returned."""
    args = [os.fspath(a) for a in argv]
    exe = args[0] if "/" in args[0] else which(args[0])
    if "logging" in sys.modules:  # imported by --debug; without it nothing would show the line
        sys.modules["logging"].getLogger("castore.tools").debug("+ %s", shlex.join(args))
    if log_file is not None:
        log_file.write(f"+ {shlex.join(args)}\n".encode())
        log_file.flush()
    tail: collections.deque[bytes] = collections.deque(maxlen=40)
    chunks: list[bytes] = []
    try:
        proc = subprocess.Popen(
            args,
            executable=exe,  # argv[0] as given
            cwd=cwd,
            env=base_env(env),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),
            umask=0o022,  # as DESIGN.md says builds run: a tool that writes modes as the umask leaves them
        )
    except FileNotFoundError as exc:
        raise ToolMissing(f"{args[0]} could not be started: {exc.strerror}") from exc
    try:
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if log_file is not None:
                log_file.write(line)
            else:
                chunks.append(line)
            if on_line is not None:
                on_line(line.decode(errors="replace").rstrip("\n"))
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.wait()
        raise ToolError(f"{args[0]} timed out after {timeout} s") from exc
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if log_file is not None:
        log_file.flush()
    if check and code not in ok_codes:
        text = b"".join(tail).decode(errors="replace").rstrip()
        raise ToolError(
            f"{args[0]} failed with exit code {code}:\n{text}" if text else f"{args[0]} failed with exit code {code}",
            returncode=code,
            stderr=text,
        )
    return Result(args, code, b"".join(chunks) if log_file is None else b"".join(tail))


def tool_version(tool: str, cache: MutableMapping[str, str] | None = None) -> str:
    """The first line a tool prints about its version, then the file names of the shared libraries
    it loads, which carry their versions for most (``libzstd.so.1.5.4``; not glibc's ``libc.so.6``):
    gensquashfs compresses with libzstd, liblzma and zlib, upgraded apart from it, and they can
    change its output.

    Cached by the identity of the binary and of each library (inode, size, times): when any of
    them changed, even in place, the loader and the tool are asked again."""
    found = which(tool)
    path = os.path.realpath(found)
    libs_key = f"libs:{_identity(path)}"
    known = cache.get(libs_key) if cache is not None else None
    if known is not None and cache is not None:
        loaded = known.split("\n") if known else []
        if all(map(os.path.exists, loaded)) and (key := _key(path, loaded)) in cache:
            return cache[key]
    loaded = _libraries(path)  # a library's own dependencies may have changed too
    for helper in TOOLS.get(tool, ToolInfo(tool)).helpers:
        found_helper = run([tool, f"-print-prog-name={helper}"]).output.decode().strip()
        if found_helper.startswith("/"):  # else the tool does not have it
            loaded += [os.path.realpath(found_helper), *_libraries(found_helper)]
    loaded = sorted(set(loaded))
    key = _key(path, loaded)
    if cache is not None:
        cache[libs_key] = "\n".join(loaded)
        if key in cache:
            return cache[key]
    version = _version_line(tool, path)
    if loaded:
        version += f" [{' '.join(sorted({os.path.basename(os.path.realpath(lib)) for lib in loaded}))}]"
    if cache is not None:
        cache[key] = version
    return version


def prune_versions(cache: MutableMapping[str, str]) -> list[str]:
    """Drop the entries of tool_version's and library_version's cache that no longer describe this
    machine: of an older format, or of a binary, library or loader cache changed since. Without
    this every upgrade would leave its entries behind for good. Returns the keys dropped."""
    ld_cache, dropped = _ld_cache_identity(), []
    for key in list(cache):
        if key.startswith("libs:"):
            keep = _holds(key.removeprefix("libs:"))
        elif key.startswith("lib:"):
            keep = key.partition(":")[2].partition(":")[2] == ld_cache
        else:
            fmt, *identities = key.split(" ")
            keep = fmt == _LINE_FORMAT and all(map(_holds, identities))
        if not keep:
            del cache[key]
            dropped.append(key)
    return dropped


def _holds(identity: str) -> bool:
    path = identity.rsplit(":", 5)[0]
    try:
        return _identity(path) == identity
    except OSError:
        return False


def _ld_cache_identity() -> str:
    return _identity("/etc/ld.so.cache") if os.path.exists("/etc/ld.so.cache") else ""


LIBRARIES = {"libelf.so.1": "libelf-dev"}  # soname -> the Debian package that builds against it


def library_version(soname: str, cache: MutableMapping[str, str] | None = None) -> str:
    """The file a shared library's soname resolves to, which names its version (libelf.so.1 ->
    libelf-0.188.so): for a library that programs a build compiles and runs will load (the
    kernel's objtool rewrites every object file through libelf). Cached until ldconfig runs."""
    key = f"lib:{soname}:{_ld_cache_identity()}"
    path = cache.get(key) if cache is not None else None
    if path is None or not os.path.exists(path):
        path = _find_library(soname)
        if cache is not None:
            cache[key] = path
    return os.path.basename(os.path.realpath(path))


def _find_library(soname: str) -> str:
    """Where the dynamic loader finds soname for this machine's own architecture."""
    word = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(os.uname().machine, "")  # not i386's copy
    for line in run(["ldconfig", "-p"]).output.decode(errors="replace").splitlines():
        name, _, rest = line.strip().partition(" (")
        flags, arrow, where = rest.partition(") => ")
        if name == soname and arrow and word in flags:
            return where.strip()
    hint = f"install it: apt-get install {LIBRARIES[soname]}" if soname in LIBRARIES else None
    raise ToolMissing(f"the shared library {soname} is not installed", hint)


def _version_line(tool: str, path: str) -> str:
    info = TOOLS.get(tool, ToolInfo(tool))
    if not info.version_args:
        return f"{os.path.basename(path)} blake3:{hash_file(path)}"
    res = run([tool, *info.version_args], check=False)  # by name: sed prints the path it was run by
    lines = [ln.strip() for ln in res.output.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise ToolError(f"{tool} printed no version")
    return lines[0]


_LINE_FORMAT = "2"  # 2: run by name (sed printed its path), a hash for tools without a version


def _key(path: str, libraries: list[str]) -> str:
    return " ".join([_LINE_FORMAT, _identity(path), *map(_identity, libraries)])


def _identity(path: str) -> str:
    st = os.stat(path)  # the file a library's soname link points at now
    return f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _libraries(path: str) -> list[str]:
    """The shared libraries the dynamic loader finds for a binary, as it names them (soname links);
    none for a script or a static binary."""
    try:
        res = run(["ldd", path], check=False)
    except ToolMissing:  # libc-bin is essential on Debian; elsewhere, versions without libraries
        return []
    found = []
    for line in res.output.decode(errors="replace").splitlines():
        _, arrow, rest = line.strip().partition(" => ")
        lib = rest.split(" (", 1)[0] if arrow else ""
        if lib.startswith("/"):
            found.append(lib)
    return sorted(found)
