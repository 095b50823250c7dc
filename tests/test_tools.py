from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from castore import tools
from castore.errors import ToolError, ToolMissing
from castore.hashing import hash_file
from castore.tools import base_env, library_version, run, tool_version


def test_run_fixed_environment_and_log() -> None:
    log = io.BytesIO()
    res = run(["sh", "-c", "echo $LC_ALL $TZ $SOURCE_DATE_EPOCH; echo err >&2"], log_file=log,
              env={"EXTRA": "1"})
    text = log.getvalue().decode()
    assert text.startswith("+ sh -c") and "C UTC 946684800" in text and "err" in text
    assert res.returncode == 0
    assert "HOME" in base_env() and "LD_PRELOAD" not in base_env()


def test_failure_has_exit_code_and_tail() -> None:
    with pytest.raises(ToolError) as err:
        run(["sh", "-c", "echo first; echo last-words; exit 3"])
    assert err.value.returncode == 3 and "last-words" in err.value.message


def test_missing_tool_names_the_package() -> None:
    with pytest.raises(ToolMissing):
        run(["castore-no-such-tool"])
    from castore import tools

    tools.TOOLS["castore-no-such-tool"] = tools.ToolInfo("castore-pkg")
    try:
        with pytest.raises(ToolMissing) as err:
            tool_version("castore-no-such-tool")
        assert err.value.hint == "install it: apt-get install castore-pkg"
    finally:
        del tools.TOOLS["castore-no-such-tool"]


def test_tool_version_cached() -> None:
    cache: dict[str, str] = {}
    v = tool_version("gensquashfs", cache)
    assert "1." in v and [x for k, x in cache.items() if not k.startswith("libs:")] == [v]
    assert tool_version("gensquashfs", cache) == v
    assert tool_version("mke2fs").startswith("mke2fs 1.")
    assert tool_version("sed").startswith("sed (GNU sed)")  # not the path it ran by


def test_a_tool_that_prints_no_version_is_known_by_its_bytes() -> None:
    """dash answers --version with "Illegal option", the same line for every release."""
    dash = os.path.realpath(tools.which("sh"))
    assert tool_version("sh").startswith(f"{os.path.basename(dash)} blake3:{hash_file(dash)}")


def test_every_tool_a_builder_declares_has_a_version() -> None:
    from castore.builders import SPECS

    for spec in SPECS.values():
        for tool in spec.tools:
            version = tool_version(tool)
            assert version and "illegal option" not in version.lower() and "usage" not in version.lower(), tool
        for lib in spec.libraries:
            assert re.fullmatch(r"lib[\w+-]+[-.]\d+(\.\d+)*\.so(\.[\d.]+)?", library_version(lib)), lib


def test_gcc_s_version_names_the_libraries_its_compiler_proper_loads() -> None:
    """cc1, not gcc, loads isl, mpc, mpfr and gmp, upgraded apart from gcc."""
    version = tool_version("gcc")
    assert re.search(r"\[cc1 collect2 .*libisl\.so\.\d+.*libmpfr\.so\.\d+", version), version


def test_a_library_is_known_by_the_file_its_soname_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.realpath(tools._find_library("libelf.so.1"))
    cache: dict[str, str] = {}
    assert library_version("libelf.so.1", cache) == os.path.basename(real)
    asked: list[str] = []
    monkeypatch.setattr(tools, "_find_library", lambda soname: asked.append(soname) or real)
    assert library_version("libelf.so.1", cache) == os.path.basename(real) and asked == []  # cached
    monkeypatch.undo()
    monkeypatch.setitem(tools.LIBRARIES, "libcastore-none.so.9", "castore-dev")
    with pytest.raises(ToolMissing) as err:
        library_version("libcastore-none.so.9")
    assert "libcastore-none.so.9 is not installed" in err.value.message
    assert err.value.hint == "install it: apt-get install castore-dev"


def test_versions_of_what_changed_or_of_an_older_format_are_pruned(tmp_path: Path) -> None:
    cache: dict[str, str] = {}
    tool_version("gcc", cache)
    library_version("libelf.so.1", cache)
    current = dict(cache)
    tool = tmp_path / "tool"
    tool.write_bytes(b"1")
    identity = tools._identity(str(tool))
    stale = {f"{tools._LINE_FORMAT} {identity}": "tool 1", f"libs:{identity}": "",
             f"{identity}": "tool 1 (an older castore's key)", "lib:libelf.so.1:/etc/ld.so.cache:1:2:3:4:5": "/x",
             f"{tools._LINE_FORMAT} /no/such/tool:1:2:3:4:5": "gone 1"}
    cache.update(stale)
    tool.write_bytes(b"22")  # upgraded in place
    assert sorted(tools.prune_versions(cache)) == sorted(stale) and cache == current
    assert tools.prune_versions(cache) == []  # what holds stays


def test_tools_run_with_umask_022_whatever_the_caller_s() -> None:
    old = os.umask(0o077)
    try:
        assert run(["sh", "-c", "umask"]).output.strip() == b"0022"
    finally:
        os.umask(old)


def test_a_tool_s_version_names_its_libraries_and_follows_their_upgrades(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = tool_version("gensquashfs")
    assert re.search(r"\[.*libzstd\.so\.1\.\d+\.\d+.*\]$", version), version  # the compressors it loads
    # a library upgraded under its soname: stand one in for what the loader finds
    (tmp_path / "libfake.so.1.0").write_bytes(b"old")
    (tmp_path / "libfake.so.1").symlink_to("libfake.so.1.0")
    asked: list[str] = []
    monkeypatch.setattr(tools, "_libraries", lambda path: asked.append(path) or [str(tmp_path / "libfake.so.1")])
    cache: dict[str, str] = {}
    assert tool_version("gensquashfs", cache).endswith("[libfake.so.1.0]")
    assert tool_version("gensquashfs", cache).endswith("[libfake.so.1.0]") and len(asked) == 1  # cached
    (tmp_path / "libfake.so.1.1").write_bytes(b"new")
    (tmp_path / "libfake.so.1").unlink()
    (tmp_path / "libfake.so.1").symlink_to("libfake.so.1.1")
    assert tool_version("gensquashfs", cache).endswith("[libfake.so.1.1]") and len(asked) == 2
