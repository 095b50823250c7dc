"""Recipes: ``@recipe`` functions, recipe files, and the DSL that returns plans.

Evaluation is pure: it reads the local files a recipe names (to hash them),
runs no process, opens no socket and writes nothing. Every DSL call records
where in the recipe file it was made, so an error names the file and line, and
checks the types and ranges of what it is passed there and then: nothing a
recipe passes may fail later as a traceback at build time. A recipe (or recipe
file) that calls ``sys.exit`` is an error at its line, not the end of castore.
Local paths are resolved relative to the file of the calling recipe.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from castore.errors import CastoreError, RecipeError
from castore.hashing import hash_file
from castore.manifest import MAX_ID32, MAX_SIZE, brief, normalize_path, path_key
from castore.plan import Plan, Source

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off nomodule overlay_root=vdb"


# -- where am I called from ------------------------------------------------


def _caller() -> FrameType | None:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(os.path.join(_PACKAGE_DIR, "")):
        frame = frame.f_back  # type: ignore[assignment]
    return frame


def _origin() -> tuple[str, Path]:
    frame = _caller()
    if frame is None:
        return "<unknown>", Path.cwd()
    filename = frame.f_code.co_filename
    return f"{_display(filename)}:{frame.f_lineno}", Path(filename).resolve().parent


def _display(path: str) -> str:
    """A recipe file as messages name it: relative to the working directory when it is below it,
    else absolute (../../var/tmp/x.py helps no one)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _fail(message: str, hint: str | None = None) -> RecipeError:
    origin, _ = _origin()
    return RecipeError(f"{origin}: {message}", hint)


def _source(path: str | os.PathLike[str], what: str) -> Source:
    if not isinstance(path, str | os.PathLike):
        raise _fail(f"{what} must be a path (a str), got {type(path).__name__} {brief(path)}")
    if "\0" in os.fspath(path):
        raise _fail(f"{what} {brief(os.fspath(path))} holds a NUL character, which no file name can")
    _, base = _origin()
    full = (base / path).resolve()
    try:
        st = full.stat()
    except FileNotFoundError:
        raise _fail(
            f"{what} {os.fspath(path)!r} not found (looked for {full})",
            "paths are relative to the recipe file's folder",
        ) from None
    except OSError as exc:
        raise _fail(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}") from exc
    if not full.is_file():
        raise _fail(f"{what} {os.fspath(path)!r} is not a regular file")
    return Source(str(full), hash_file(full), st.st_size)


def _plan(builder: str, output: str, name: str, **kw: Any) -> Plan:
    _str(name, "name")
    origin, _ = _origin()
    try:
        return Plan(builder, output, name=name, origin=origin, **kw)
    except CastoreError as exc:
        raise RecipeError(f"{origin}: {exc.message}", exc.hint) from exc


def _need_plan(value: Any, what: str, kinds: Sequence[str]) -> Plan:
    if isinstance(value, TreeExpr):
        value = value.plan()
    if isinstance(value, Recipe):
        value = value.evaluate()
    if not isinstance(value, Plan):
        raise _fail(f"{what} must be a plan (from a builder or a recipe), got {value!r}")
    if value.output not in kinds:
        raise _fail(f"{what} must produce a {' or '.join(kinds)}, but {value!r} makes a {value.output}")
    return value


_SIZE_RE = re.compile(r"(\d+)\s*(|B|K|KiB|M|MiB|G|GiB|T|TiB)")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20,
          "G": 1 << 30, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40}




def parse_size(value: int | str) -> int:
    nbytes: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        nbytes = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            nbytes = int(m.group(1)) * _UNITS[m.group(2)]
    if nbytes is None:
        raise _fail(f"size {brief(value)} is not understood", "write bytes as an int, or like '512MiB', '1GiB'")
    if nbytes > MAX_SIZE:
        raise _fail(f"size {brief(value)} is too large: at most {MAX_SIZE} bytes (8 EiB)")
    return nbytes


# -- checking what a recipe passes, where it passes it ---------------------
# Every check raises through _fail, so the error names the recipe line of the call.


def _int(value: Any, what: str, lo: int, hi: int, hint: str | None = None) -> int:
    """An int (a bool is not one) from lo to hi."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(f"{what} {brief(value)} must be an int from {lo} to {hi}", hint)
    return value


def _str(value: Any, what: str, *, nul: bool = True) -> str:
    """A str that encodes as UTF-8 (and, with nul=False, holds no NUL)."""
    if not isinstance(value, str):
        raise _fail(f"{what} must be a str, got {type(value).__name__} {brief(value)}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise _fail(
            f"{what} {brief(value)} holds {value[exc.start]!r} at position {exc.start}, "
            f"which is not valid in UTF-8 ({exc.reason})",
            "lone surrogates come from bytes decoded with errors='surrogateescape'; pass real text",
        ) from None
    if not nul and "\0" in value:
        raise _fail(f"{what} {brief(value)} contains a NUL character")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"{what} must be True or False, got {brief(value)}")
    return value


def _mode(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise _fail(f"{what} mode {brief(value)} must be an int between 0 and 0o7777", "write modes in octal: 0o644")
    return value


def _owner(uid: Any, gid: Any, what: str) -> dict[str, int]:
    hint = "owners are numeric ids, as in the image's /etc/passwd: root is 0"
    return {"uid": _int(uid, f"{what}: uid", 0, MAX_ID32, hint), "gid": _int(gid, f"{what}: gid", 0, MAX_ID32, hint)}


def _tree_path(path: Any, what: str = "path", *, root: bool = False) -> str:
    """A path inside a tree, normalized (``/usr//bin/`` -> ``usr/bin``); the root only if allowed."""
    _str(path, what)
    try:
        norm = normalize_path(path, what)
    except CastoreError as exc:
        raise _fail(exc.message) from None
    if not norm and not root:
        raise _fail(f"{what} {path!r} names the tree root")
    return norm


# -- builders' front ends --------------------------------------------------


def fetch(
    url: str, *, sha256: str | None = None, blake3: str | None = None, name: str | None = None
) -> Plan:
    """Download a file (http, https or file URL); a declared hash is required.

    The only builder with network access; its output is checked against the
    declared sha256 or blake3 before it enters the store.
    """
    _str(url, "fetch URL", nul=False)
    if not url.startswith(("http://", "https://", "file://")):
        raise _fail(f"fetch URL {url!r} must start with http://, https:// or file://")
    if url.startswith("file://"):
        from urllib.parse import unquote_to_bytes, urlsplit

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise _fail(f"fetch URL {url!r} names no absolute path", "a file URL is file:///absolute/path")
        if b"\0" in unquote_to_bytes(parts.path):
            raise _fail(f"fetch URL {url!r} holds an encoded NUL (%00), which no file name can")
    if (sha256 is None) == (blake3 is None):
        raise _fail("fetch needs exactly one of sha256= or blake3=",
                    "run it once with a dummy hash to see the real one")
    algo, digest = ("sha256", sha256) if sha256 is not None else ("blake3", blake3)
    assert digest is not None
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise _fail(f"{algo} {brief(digest)} must be 64 lowercase hex digits")
    # fixed-output: the URL is a hint, not a parameter (see castore.plan)
    return _plan("fetch", "blob", name or url.rsplit("/", 1)[-1], params={algo: digest}, hints={"url": url})


def debian_package(name: str, version: str, *, sha256: str, arch: str = "amd64") -> Plan:
    """A Debian package fetched through the machine's apt configuration (``apt-get download``)."""
    _str(name, "debian_package name", nul=False)
    _str(version, f"debian_package {name}: version", nul=False)
    _str(arch, f"debian_package {name}: arch", nul=False)
    if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise _fail(f"debian_package {name}: sha256 must be 64 lowercase hex digits")
    return _plan(
        "debian_package",
        "blob",
        f"{name}_{version}",
        params={"package": name, "version": version, "arch": arch, "sha256": sha256},
    )


def unpack(archive: Any, *, name: str | None = None) -> Plan:
    """A tar, tar.gz, tar.xz, tar.zst or .deb archive, as a tree (format found from its bytes).

    Entries that would escape the root (``..``, links climbing out, paths
    through symlinks) are refused; links are recorded, never followed.
    """
    plan = _need_plan(archive, "unpack's archive", ["blob"])
    return _plan("unpack", "tree", name or f"unpack({plan.label})", inputs={"archive": plan})


def squashfs(
    rootfs: Any, *, compression: str = "zstd", block_size: int = 131072, name: str | None = None
) -> Plan:
    """A squashfs image of a tree, built rootless with ``gensquashfs --pack-file``."""
    plan = _need_plan(rootfs, "squashfs' tree", ["tree"])
    if compression not in ("gzip", "xz", "zstd", "lz4", "lzo"):
        raise _fail(f"squashfs compression {compression!r} is not one of gzip, xz, zstd, lz4, lzo")
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or block_size & (block_size - 1) or not 4096 <= block_size <= 1 << 20):
        raise _fail(f"squashfs block_size {brief(block_size)} must be a power of two from 4096 to 1MiB")
    return _plan(
        "squashfs",
        "blob",
        name or f"squashfs({plan.label})",
        params={"compression": compression, "block_size": block_size},
        inputs={"tree": plan},
    )


def ext4(size: int | str, *, label: str = "", name: str | None = None) -> Plan:
    """An empty sparse ext4 filesystem with UUID, hash seed and times fixed by the plan."""
    nbytes = parse_size(size)
    if nbytes < 1 << 20 or nbytes % 4096:
        raise _fail(f"ext4 size {size!r} must be at least 1MiB and a multiple of 4KiB")
    _str(label, "ext4 label", nul=False)
    if len(label.encode()) > 16:
        raise _fail(f"ext4 label {label!r} is longer than 16 bytes")
    if not label.isprintable():
        raise _fail(f"ext4 label {label!r} holds a control character")
    return _plan("ext4", "blob", name or f"ext4({size})", params={"size": nbytes, "label": label})


_TOOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def kernel(
    *, source: Any, config: str | os.PathLike[str], base: str = "tinyconfig",
    arch: str = "x86_64", tools: Sequence[str] = (), name: str | None = None,
) -> Plan:
    """``make vmlinux`` of a Linux source tarball with a config fragment on top of ``base``.

    Every option the fragment sets must survive ``olddefconfig``; the build
    runs sandboxed with KBUILD_BUILD_TIMESTAMP, USER, HOST and VERSION fixed,
    and sees only the tools the builder declares plus ``tools`` (for options
    that need more: ``gzip`` for IKCONFIG, ``cpio`` for IKHEADERS), whose
    versions enter the plan hash like the others'.
    """
    src = _need_plan(source, "kernel source", ["blob"])
    if base not in ("tinyconfig", "allnoconfig", "defconfig"):
        raise _fail(f"kernel base {base!r} must be tinyconfig, allnoconfig or defconfig")
    _str(arch, "kernel arch", nul=False)
    if isinstance(tools, str) or not all(isinstance(t, str) and _TOOL_NAME.fullmatch(t) for t in tools):
        raise _fail(f"kernel tools {tools!r} must be a list of program names, like [\"gzip\", \"cpio\"]")
    params: dict[str, Any] = {"base": base, "arch": arch}
    if tools:  # absent, not empty, when there are none: the plans of recipes without it stay as they were
        params["tools"] = sorted(set(tools))
    return _plan(
        "kernel",
        "blob",
        name or "vmlinux",
        params=params,
        inputs={"source": src, "config": _source(config, "kernel config")},
    )


def image(
    *, kernel: Any, rootfs: Any, cmdline: str = DEFAULT_CMDLINE, overlay_size: int | str = "1GiB",
    vcpus: int = 1, mem_mib: int = 128, name: str | None = None,
) -> Plan:
    """The bootable bundle: a kernel, rootfs layers (bottom first) and machine defaults."""
    k = _need_plan(kernel, "image's kernel", ["blob"])
    layers = rootfs if isinstance(rootfs, list | tuple) else [rootfs]
    if not layers:
        raise _fail("image needs at least one rootfs layer")
    inputs: dict[str, Plan | Source] = {"kernel": k}
    for i, layer in enumerate(layers):
        inputs[f"layer{i}"] = _need_plan(layer, f"image's rootfs layer {i}", ["blob"])
    _int(vcpus, "vcpus", 1, 32)
    _int(mem_mib, "mem_mib", 16, MAX_ID32)
    _str(cmdline, "image cmdline", nul=False)
    overlay = parse_size(overlay_size)
    if overlay < 1 << 20:
        raise _fail(f"overlay_size {overlay_size!r} must be at least 1MiB", "the overlay is an ext4 filesystem")
    return _plan(
        "image",
        "image",
        name or "image",
        params={
            "cmdline": cmdline,
            "layers": len(layers),
            "overlay_size": overlay,
            "vcpus": vcpus,
            "mem_mib": mem_mib,
        },
        inputs=inputs,
    )


def local_file(path: str | os.PathLike[str], *, name: str | None = None) -> Plan:
    """A file next to the recipe, as a blob (its content is hashed into the plan)."""
    src = _source(path, "file")
    # a file name need not be UTF-8; the display name derived from it must be
    shown = os.path.basename(src.path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _plan("source", "blob", name or shown, inputs={"file": src})


def get(tree_plan: Any, path: str) -> Plan:
    """One file of a tree, as a blob."""
    plan = _need_plan(tree_plan, "get's tree", ["tree"])
    norm = _tree_path(path, "get's path")
    return _plan("tree_get", "blob", f"{plan.label}:{norm}", params={"path": norm}, inputs={"tree": plan})


# `plan.get(path)` reads well in recipes; Plan lives in the pure plan layer, which knows nothing of
# recipe files and call sites, so the method is attached here where get() can record its origin.
Plan.get = lambda self, path: get(self, path)  # type: ignore[attr-defined]


class _Op(dict[str, Any]):
    """One tree operation: its parameters, which the plan hashes, plus what the hash leaves out,
    as it leaves out a plan's origin: where the recipe made the call, and the paths as the recipe
    wrote them (normalized path -> as written), for the builder's error messages."""

    __slots__ = ("where", "written")

    def __init__(self, params: dict[str, Any], where: str, written: dict[str, str]) -> None:
        super().__init__(params)
        self.where = where
        self.written = written


class TreeExpr:
    """A tree being described: each method appends one operation and returns self.

    Operations apply in order when the tree is realized, as on a real
    filesystem. Parent directories are created 0755 root:root as needed, and
    are entries from then on; later operations win. Each operation records its
    recipe line, which its build-time errors name.
    """

    def __init__(self) -> None:
        self._ops: list[dict[str, Any]] = []
        self._inputs: dict[str, Plan | Source] = {}
        self._origin, _ = _origin()
        self._plan: Plan | None = None

    def _add(self, op: dict[str, Any], written: dict[str, str] | None = None) -> TreeExpr:
        if self._plan is not None:
            raise _fail("this tree was already used as a plan; start a new tree()")
        where, _ = _origin()
        self._ops.append(_Op(op, where, written or {}))
        return self

    def _input(self, value: Plan | Source) -> str:
        key = f"in{len(self._inputs)}"
        self._inputs[key] = value
        return key

    @staticmethod
    def _path(path: str) -> str:
        return _tree_path(path)

    def merge(self, layer: Any, *, only: Iterable[str] | None = None, prefix: str = "/") -> TreeExpr:
        """Copy entries of another tree (all, or those under the paths in ``only``)."""
        plan = _need_plan(layer, "merge's layer", ["tree"])
        op: dict[str, Any] = {"op": "merge", "prefix": _tree_path(prefix, "merge's prefix", root=True)}
        written: dict[str, str] = {}
        if only is not None:
            if isinstance(only, str | bytes) or not isinstance(only, Iterable):
                raise _fail(f"merge's only= must be a list of paths, got {brief(only)}",
                            f"write only=[{only!r}]" if isinstance(only, str) else None)
            for p in only:
                written.setdefault(self._path(p), p)
            # sorted: the result does not depend on the order, so neither may the plan hash (a set's
            # order changes from one run to the next)
            op["only"] = sorted(written, key=path_key)
        op["input"] = self._input(plan)
        return self._add(op, written)

    def file(self, path: str, *, source: str | os.PathLike[str] | Plan, mode: int = 0o644,
             uid: int = 0, gid: int = 0) -> TreeExpr:
        """A file whose bytes come from a file beside the recipe, or from a blob plan."""
        norm = self._path(path)
        mode, owner = _mode(mode, path), _owner(uid, gid, path)
        value = (_need_plan(source, "file source", ["blob"]) if isinstance(source, Plan | Recipe | TreeExpr)
                 else _source(source, "file"))
        return self._add({"op": "file", "path": norm, "input": self._input(value), "mode": mode, **owner},
                         {norm: path})

    def text(self, path: str, content: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> TreeExpr:
        """A file with the given text (UTF-8)."""
        norm = self._path(path)
        _str(content, f"text for {path}")
        return self._add({"op": "text", "path": norm, "content": content,
                          "mode": _mode(mode, path), **_owner(uid, gid, path)}, {norm: path})

    def dirs(self, *paths: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> TreeExpr:
        for path in paths:
            norm = self._path(path)
            self._add({"op": "dir", "path": norm, "mode": _mode(mode, path), **_owner(uid, gid, path)},
                      {norm: path})
        return self

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> TreeExpr:
        norm = self._path(path)
        _str(target, f"symlink {path}: target")
        if not target or "\0" in target:
            raise _fail(f"symlink {path}: target {target!r} is empty or has a NUL")
        return self._add({"op": "symlink", "path": norm, "target": target, **_owner(uid, gid, path)},
                         {norm: path})

    def device(self, path: str, kind: str, major: int, minor: int, *, mode: int = 0o600,
               uid: int = 0, gid: int = 0) -> TreeExpr:
        """A character (``"c"``) or block (``"b"``) device node."""
        norm = self._path(path)
        if kind not in ("c", "b"):
            raise _fail(f"device {path}: kind must be 'c' or 'b', got {brief(kind)}")
        return self._add({"op": "device", "path": norm, "type": "char" if kind == "c" else "block",
                          "major": _int(major, f"device {path}: major", 0, MAX_ID32),
                          "minor": _int(minor, f"device {path}: minor", 0, MAX_ID32),
                          "mode": _mode(mode, path), **_owner(uid, gid, path)}, {norm: path})

    def fifo(self, path: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> TreeExpr:
        norm = self._path(path)
        return self._add({"op": "fifo", "path": norm, "mode": _mode(mode, path), **_owner(uid, gid, path)},
                         {norm: path})

    def remove(self, *paths: str) -> TreeExpr:
        """Remove entries and everything under them; a missing path is an error at build time."""
        for path in paths:
            norm = self._path(path)
            self._add({"op": "remove", "path": norm}, {norm: path})
        return self

    def chmod(self, path: str, mode: int) -> TreeExpr:
        norm = self._path(path)
        return self._add({"op": "chmod", "path": norm, "mode": _mode(mode, path)}, {norm: path})

    def chown(self, path: str, uid: int, gid: int, *, recursive: bool = False) -> TreeExpr:
        norm = self._path(path)
        return self._add({"op": "chown", "path": norm, **_owner(uid, gid, path),
                          "recursive": _bool(recursive, "chown's recursive=")}, {norm: path})

    def plan(self) -> Plan:
        if self._plan is None:
            try:
                self._plan = Plan("tree", "tree", params={"ops": self._ops}, inputs=self._inputs,
                                  name="tree", origin=self._origin)
            except CastoreError as exc:
                raise RecipeError(f"{self._origin}: {exc.message}", exc.hint) from exc
        return self._plan

    def get(self, path: str) -> Plan:
        return get(self.plan(), path)


def tree() -> TreeExpr:
    """Start an empty tree; chain operations on it."""
    return TreeExpr()


# -- @recipe and recipe files ---------------------------------------------


class Recipe:
    """A function that returns a plan; other recipes come in as default arguments."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = fn.__name__
        code = fn.__code__
        self.file = code.co_filename
        self.line = code.co_firstlineno
        self._plan: Plan | None = None

    def __repr__(self) -> str:
        return f"<recipe {self.name} at {_display(self.file)}:{self.line}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Plan:
        if args or kwargs:
            return self._run(args, kwargs)
        return self.evaluate()

    def evaluate(self) -> Plan:
        if self._plan is None:
            self._plan = self._run((), {})
        return self._plan

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        sig = inspect.signature(self.fn)
        bound = sig.bind_partial(*args, **kwargs)
        for pname, param in sig.parameters.items():
            if pname not in bound.arguments and isinstance(param.default, Recipe):
                bound.arguments[pname] = param.default.evaluate()
        try:
            result = self.fn(*bound.args, **bound.kwargs)
        except CastoreError:
            raise
        except RecursionError:
            raise RecipeError(f"{_display(self.file)}:{self.line}: recipe {self.name} recurses without end") from None
        except SystemExit as exc:  # not an Exception, but no recipe may end the program
            raise RecipeError(f"{_where(exc, self)}: recipe {self.name} called sys.exit({exc.code!r})",
                              _EXIT_HINT) from exc
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise RecipeError(f"{_where(exc, self)}: recipe {self.name} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, TreeExpr):
            result = result.plan()
        if not isinstance(result, Plan):
            raise RecipeError(
                f"{_display(self.file)}:{self.line}: recipe {self.name} returned {result!r}, not a plan",
                "return the result of a builder such as squashfs(...) or image(...)",
            )
        result.name = self.name
        return result


_EXIT_HINT = "a recipe returns a plan; to stop with an error, raise an exception"


def _where(exc: BaseException, recipe: Recipe) -> str:
    """file:line of the innermost frame of the traceback in the user's code (a recipe file or a
    module beside it): not castore's, Python's own library's or an installed package's."""
    import sysconfig

    library = tuple({os.path.join(os.path.realpath(sysconfig.get_path(k)), "")
                     for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    best = f"{_display(recipe.file)}:{recipe.line}"
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith(("<", os.path.join(_PACKAGE_DIR, ""))):  # "<frozen posixpath>", castore
            continue
        if not os.path.realpath(filename).startswith(library):
            best = f"{_display(filename)}:{lineno}"
    return best


def recipe(fn: Callable[..., Any]) -> Recipe:
    """Mark a function as a recipe."""
    return Recipe(fn)


def _at(shown: str, line: int | None) -> str:
    """``file:line``, or just ``file`` when the line is not known."""
    return f"{shown}:{line}" if line else shown


def load_file(path: str | os.PathLike[str]) -> dict[str, Recipe]:
    """Execute a recipe file and return its recipes by name, in file order."""
    p = Path(path)
    shown = _display(str(p))
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {p} not found", f"the working directory is {os.getcwd()}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {shown}: {exc.strerror}") from exc
    filename = str(p.resolve())
    nul = text.find(b"\0")
    if nul >= 0:  # compile() refuses it without saying where
        where = _at(shown, text.count(b"\n", 0, nul) + 1)
        raise RecipeError(f"{where}: the recipe file contains a NUL byte",
                          "a recipe file is Python source in UTF-8; is this a binary or UTF-16 file?")
    try:
        code = compile(text, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise RecipeError(f"{_at(shown, exc.lineno)}: syntax error: {exc.msg}") from None
    # a module of its own in sys.modules, as an imported file has: dataclasses, enum and pickle look
    # the module of a class up there
    module = types.ModuleType(f"castore_recipe_{abs(hash(filename))}")
    module.__file__ = filename
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    try:
        with _importable(p):
            exec(code, namespace)
    except (CastoreError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # SystemExit, GeneratorExit too: nothing a recipe file does ends castore
        where = _at(shown, next((ln for fr, ln in traceback.walk_tb(exc.__traceback__)
                                 if fr.f_code.co_filename == filename), None))
        if isinstance(exc, SystemExit):
            raise RecipeError(f"{where}: the recipe file called sys.exit({exc.code!r}) while loading",
                              _EXIT_HINT) from exc
        raise RecipeError(f"{where}: loading the recipe file raised {type(exc).__name__}: {exc}") from exc
    return {k: v for k, v in namespace.items() if isinstance(v, Recipe) and v.file == filename}


@contextlib.contextmanager
def _importable(recipe_file: Path) -> Iterator[None]:
    """The recipe file's directory first on sys.path, so that it can import its neighbours; from
    their source, always: a __pycache__ beside them is trusted by size and mtime in whole seconds,
    so a helper rewritten within the second at the same size would evaluate as its old self (and
    evaluating writes nothing into the recipe folder)."""
    directory = str(recipe_file.resolve().parent)
    saved = sys.path[:], sys.dont_write_bytecode, sys.pycache_prefix
    sys.path.insert(0, directory)
    sys.dont_write_bytecode = True
    sys.pycache_prefix = f"{os.devnull}/pycache"  # beneath a device: every .pyc lookup fails, as not found
    try:
        yield
    finally:
        sys.path[:], sys.dont_write_bytecode, sys.pycache_prefix = saved


def select(recipes: dict[str, Recipe], name: str | None, shown: str) -> Recipe:
    if name is not None:
        if name not in recipes:
            raise RecipeError(f"{shown} has no recipe {name!r}", f"its recipes: {', '.join(recipes) or 'none'}")
        return recipes[name]
    if "default" in recipes:
        return recipes["default"]
    if len(recipes) == 1:
        return next(iter(recipes.values()))
    if not recipes:
        raise RecipeError(f"{shown} defines no @recipe functions")
    raise RecipeError(f"{shown} has several recipes and none is called 'default'",
                      f"name one: {shown}:{next(iter(recipes))} (choices: {', '.join(recipes)})")


def evaluate_target(target: str) -> tuple[Recipe, Plan]:
    """``FILE[:NAME]`` -> the selected recipe and its plan. A FILE may hold ':' (names cannot).
    Recipes run with the file's directory on sys.path, as it was while the file loaded."""
    if os.path.isfile(target) or ":" not in target:
        file, name = target, ""
    else:
        file, _, name = target.rpartition(":")
    with _importable(Path(file)):
        r = select(load_file(file), name or None, _display(file))
        return r, r.evaluate()
