"""How castore reaches a cache: get, put and exists on relative paths.

Every transport refuses paths that are not plain relative paths inside the
cache; ``put`` is atomic (a reader sees the whole file or none).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from castore.errors import CastoreError, NotFound

_SAFE = re.compile(r"(castore-cache\.json|objects/[0-9a-f]{64}|chunks/[0-9a-f]{2}/[0-9a-f]{64})")


def check_path(path: str) -> str:
    parts = path.split("/")
    if not _SAFE.fullmatch(path) or (parts[0] == "chunks" and parts[1] != parts[2][:2]):
        raise CastoreError(f"refusing cache path {path!r}: not a castore cache file")
    return path


class Transport(Protocol):
    url: str

    def get(self, path: str) -> bytes | None: ...
    def put(self, path: str, data: bytes) -> None: ...
    def exists(self, path: str) -> bool: ...
    def missing(self, paths: Iterable[str]) -> set[str]: ...


class DirTransport:
    """A cache in a local directory (``file://`` URLs): what nginx or any static host serves."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise NotFound(f"no cache at {self.root}", "push to it first, or check the path")

    def get(self, path: str) -> bytes | None:
        try:
            return (self.root / check_path(path)).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return (self.root / check_path(path)).exists()

    def missing(self, paths: Iterable[str]) -> set[str]:
        return {p for p in paths if not self.exists(p)}

    def put(self, path: str, data: bytes) -> None:
        dest = self.root / check_path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise CastoreError(f"cannot write {dest}: {exc.strerror}") from exc


def open_cache(url: str, *, create: bool = False) -> Transport:
    """A transport for a cache URL or path; http(s) caches come with `castore serve`."""
    if url.startswith(("http://", "https://")):
        raise CastoreError(f"{url}: HTTP caches are not supported yet", "use a directory (file:// or a path)")
    path = url.removeprefix("file://")
    return DirTransport(path, create=create)
