"""How castore reaches a cache: get, put and exists on relative paths.

Every transport refuses paths that are not plain relative paths inside the
cache; ``put`` is atomic (a reader sees the whole file or none).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from castore.errors import CastoreError, NotFound
from castore.fsutil import atomic_write, syncfs

_SAFE = re.compile(
    r"(castore-cache\.json|objects/[0-9a-f]{64}|chunks/[0-9a-f]{2}/[0-9a-f]{64}|realisations/[0-9a-f]{64})")


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
    def close(self) -> None: ...
    def __enter__(self) -> Transport: ...
    def __exit__(self, *exc: object) -> None: ...


class DirTransport:
    """A cache in a local directory (``file://`` URLs): what nginx or any static host serves."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self._dirty = False
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

    def close(self) -> None:
        pass

    def __enter__(self) -> DirTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, path: str, data: bytes) -> None:
        """Chunks are written without an fsync each; before the first record that could name
        them is published, one syncfs makes them all durable."""
        dest = self.root / check_path(path)
        if path.startswith("chunks/"):
            atomic_write(dest, data, fsync=False)
            self._dirty = True
            return
        if self._dirty:
            try:
                syncfs(self.root)
            except OSError as exc:
                raise CastoreError(f"cannot sync {self.root}: {exc.strerror}") from exc
            self._dirty = False
        atomic_write(dest, data)


class HttpTransport:
    """A cache over HTTP(S), read-only: any static server (nginx, a CDN) serving a cache directory.

    Transient failures (connection errors, truncated bodies, 5xx, 429) are retried
    with back-off; a 404 means absent. Bytes are never trusted: callers verify them.
    """

    def __init__(self, url: str, *, attempts: int = 4, timeout: float = 30.0, token: str | None = None) -> None:
        import httpx  # here, not at import time: 140 ms that local commands should not pay

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.attempts = attempts
        self.token = token
        self._batch = True  # until the server shows it has no POST /missing
        self.client = httpx.Client(timeout=timeout, follow_redirects=True,
                                   limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        httpx = self._httpx
        url = f"{self.url}/{path if path == 'missing' else check_path(path)}"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        delay = 0.1
        for attempt in range(self.attempts):
            try:
                resp = self.client.request(method, url, content=body, headers=headers)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp.status_code, resp.content
                problem = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay *= 4
        raise CastoreError(f"{url}: {problem} (after {self.attempts} attempts)",
                           "is the cache server up? nothing unverified was added")

    def get(self, path: str) -> bytes | None:
        status, body = self._request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise CastoreError(f"{self.url}/{path}: HTTP {status}")
        return body

    def exists(self, path: str) -> bool:
        status, _ = self._request("HEAD", path)
        return status == 200

    def missing(self, paths: Iterable[str]) -> set[str]:
        """One POST /missing to `castore serve`; one HEAD per path to a plain static server."""
        import json

        wanted = [check_path(p) for p in paths]
        if self._batch and wanted:
            status, body = self._request("POST", "missing", json.dumps(wanted).encode())
            if status == 200:
                return set(json.loads(body)) & set(wanted)
            self._batch = False  # nginx and friends: 404/405
        return {p for p in wanted if not self.exists(p)}

    def put(self, path: str, data: bytes) -> None:
        status, body = self._request("PUT", path, data)
        if status in (200, 201, 204):
            return
        if status in (401, 403):
            raise CastoreError(f"{self.url} refused the upload of {path}: HTTP {status}",
                               "set a token with write scope: CASTORE_TOKEN or `tokens` in castore.toml")
        if status == 405:
            raise CastoreError(f"{self.url} takes no uploads (a static server?)",
                               "push to the cache's directory, or run `castore serve` there")
        raise CastoreError(f"{self.url} refused {path}: HTTP {status}: {body[:200].decode(errors='replace')}")


def open_cache(url: str, *, create: bool = False, token: str | None = None) -> Transport:
    """A transport for a cache URL (http, https, file) or a directory path."""
    if url.startswith(("http://", "https://")):
        return HttpTransport(url, token=token)
    path = url.removeprefix("file://")
    return DirTransport(path, create=create)
