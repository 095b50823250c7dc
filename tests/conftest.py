"""Shared fixtures: temporary stores, the castore CLI as a subprocess, the demo image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from castore.store import LocalStore

REPO = Path(__file__).resolve().parent.parent
RECIPES = Path(__file__).resolve().parent / "recipes"
GOLDEN = Path(__file__).resolve().parent / "golden"
CASTORE = str(Path(sys.executable).parent / "castore")


def castore(*args: str, store: Path | None = None, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    argv = [CASTORE]
    if store is not None:
        argv += ["--store", str(store)]
    argv += list(args)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def castore_json(*args: str, **kw: Any) -> Any:
    return json.loads(castore(*args, "--json", **kw).stdout)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def golden(name: str, data: bytes) -> None:
    """Compare with tests/golden/NAME; CASTORE_ACCEPT=1 rewrites it on purpose."""
    path = GOLDEN / name
    if os.environ.get("CASTORE_ACCEPT") == "1" or not path.exists():
        if not path.exists() and os.environ.get("CI"):
            raise AssertionError(f"golden file {name} missing")
        path.write_bytes(data)
    assert data == path.read_bytes(), f"canonical bytes of {name} changed; a format change needs a new format number"


def snapshot(store_dir: Path) -> tuple[set[str], list[str]]:
    """(object files under blobs/, ids in the database) of a store."""
    files = {p.name for p in (store_dir / "blobs").glob("*/*")}
    s = LocalStore(store_dir)
    try:
        ids = sorted(o.id for o in s.objects())
    finally:
        s.close()
    return files, ids


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """recipes/app.py realized once into a store of its own (builds the kernel)."""
    store_dir = tmp_path_factory.mktemp("demo") / "store"
    proc = castore("realize", "recipes/app.py", "--json", store=store_dir)
    result = json.loads(proc.stdout)
    result["store"] = store_dir
    result["stderr"] = proc.stderr
    return result
