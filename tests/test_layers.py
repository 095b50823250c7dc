"""The layers of DESIGN.md hold: a module imports only modules below it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "castore"

# rank: a module may import modules of lower or equal rank only; siblings on one rank must not mix
RANK = {
    "errors": 0, "hashing": 0, "canonical": 0, "tools": 0, "config": 0, "chunking": 0, "signing": 0,
    "manifest": 1, "plan": 1, "fsutil": 1,
    "recipes": 2,
    "builders": 3, "store": 3,
    "cache": 4,
    "realize": 5,
    "progress": 7, "cli": 7, "__init__": 8, "__main__": 9,  # `python -m castore` runs the cli
}
SIBLINGS_APART = {("store", "builders"), ("builders", "store")}
PURE = {"hashing", "canonical", "manifest", "plan", "recipes"}
IMPURE_MODULES = {"subprocess", "socket", "httpx", "sqlite3"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_upward_imports() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        me = module_name(path)
        for imp in imports(path):
            if not imp.startswith("castore."):
                continue
            other = imp.split(".")[1]
            if other not in RANK or other == me:
                continue
            if RANK[other] > RANK[me] or (me, other) in SIBLINGS_APART:
                bad.append(f"{path.relative_to(PKG)} imports {imp}")
    assert bad == []


def test_pure_core_runs_nothing() -> None:
    for name in PURE:
        used = {i.split(".")[0] for i in imports(PKG / f"{name}.py")}
        assert not used & IMPURE_MODULES, f"{name} imports {used & IMPURE_MODULES}"


def test_third_party_libraries_have_one_home() -> None:
    homes = {"blake3": {"hashing"}, "msgpack": {"canonical"}, "typer": {"cli"}, "pyfastcdc": {"chunking"},
             "zstandard": {"cache", "builders"}, "cryptography": {"signing"}, "httpx": {"cache", "builders"}}
    for path in PKG.rglob("*.py"):
        for imp in imports(path):
            lib = imp.split(".")[0]
            if lib in homes:
                assert module_name(path) in homes[lib], f"{path.name} imports {lib}"
