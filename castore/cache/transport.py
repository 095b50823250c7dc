"""How castore reaches a cache: get, put and exists on relative paths.

Every transport refuses paths that are not plain relative paths inside the
cache; ``put`` is atomic (a reader sees the whole file or none).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from castore.cache.pipeline import UNTRUSTED, Broken, Pipeline, Unsupported
from castore.errors import CastoreError, NotFound
from castore.fsutil import atomic_write, syncfs

if TYPE_CHECKING:
    import httpx

MAX_BODY = 1 << 30  # no cache file is bigger: the largest is the record of a blob of ~700 GiB
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_TRANSIENT = frozenset((408, 429, 500, 502, 503, 504))  # as curl --retry and nix: worth asking again
_NO_UPLOADS = ("the server does not accept uploads: push to the cache's directory, or to a `castore serve` "
               "of it (with a write token)")
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
    def get_many(self, paths: Sequence[str], limit: int = ...) -> Iterator[tuple[str, bytes | None]]: ...
    def put(self, path: str, data: bytes) -> None: ...
    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None: ...
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

    def get_many(self, paths: Sequence[str], limit: int = MAX_BODY) -> Iterator[tuple[str, bytes | None]]:
        for path in paths:
            yield path, self.get(path)

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
        if not path.startswith("realisations/"):
            atomic_write(dest, data)
            return
        # pushes signed by other labs' keys may publish the same realisation at once: merge, locked
        import fcntl

        from castore.cache.layout import merged_realisation

        (self.root / ".castore").mkdir(exist_ok=True)
        fd = os.open(self.root / ".castore" / "realisations.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            atomic_write(dest, merged_realisation(path.rpartition("/")[2], self.get(path), data))
        finally:
            os.close(fd)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for path, data in items:
            self.put(path, data)


class HttpTransport:
    """A cache over HTTP(S): any static server (nginx, a CDN) serving a cache directory for
    pulls, and `castore serve` for pushes too. Many GETs or PUTs go pipelined on one
    connection (:mod:`castore.cache.pipeline`); single requests and fallbacks go through httpx.

    Transient failures (connection errors, truncated bodies, 408, 429, 500, 502-504) are
    retried with back-off; a 404 means absent; any other status is an error at once,
    said in words that fit it (507: the server's disk is full; 404/405/501 to an
    upload: a static server). Bytes are never trusted: callers verify them.
    """

    def __init__(self, url: str, *, attempts: int = 4, timeout: float = 30.0, token: str | None = None) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parsed on access: a bad port raises here, not mid-pull
        except ValueError as exc:
            raise CastoreError(f"{url!r} is not a valid URL: {exc}", "for example http://cache.lab:8080 "
                               "or http://[::1]:8080") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CastoreError(f"{url!r} is not a valid URL: it names no host", "for example http://cache.lab:8080")
        self.url = url.rstrip("/")
        self.attempts = attempts
        self.token = token
        self.timeout = timeout
        self._batch = True  # until the server shows it has no POST /missing
        self._pipe: Pipeline | None = None  # made on first use
        self._pipe_ok = True  # until the server answers in a way the pipeline cannot read
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        """Made on first use: importing httpx takes 140 ms, and a pull that pipelines never needs it."""
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.timeout, follow_redirects=True,
                                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        return self._client

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        import httpx
        url = f"{self.url}/{path if path == 'missing' else check_path(path)}"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        delay = 0.1
        for attempt in range(self.attempts):
            try:
                resp = self.client.request(method, url, content=body, headers=headers)
                if resp.status_code not in _TRANSIENT:
                    return resp.status_code, resp.content
                problem = f"HTTP {resp.status_code}"
            except httpx.InvalidURL as exc:
                raise CastoreError(f"{url} is not a valid URL: {exc}") from exc
            except httpx.HTTPError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # not transient: no retry
                    raise CastoreError(f"{url}: {exc}", UNTRUSTED) from exc
                problem = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay *= 4
        raise CastoreError(f"{url}: {problem} (after {self.attempts} attempts)",
                           "is the cache server up? nothing unverified was added")

    def get(self, path: str) -> bytes | None:
        if self._pipeline() is not None:
            return next(self.get_many([path]))[1]
        return self._get(path)

    def _get(self, path: str) -> bytes | None:
        status, body = self._request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise self._failed("GET", path, status, body)
        return body

    def get_many(self, paths: Sequence[str], limit: int = MAX_BODY) -> Iterator[tuple[str, bytes | None]]:
        """Each path's body (None when absent), in order, pipelined on one connection.

        What the pipeline cannot read (redirects, 5xx, chunked bodies, proxies) goes through
        httpx one path at a time, with its retries; a connection that breaks is reopened and
        the pipeline resumes at the first path without a whole answer, backing off only while
        no answer gets through.
        """
        todo = [check_path(p) for p in paths]
        for k, status, body in self._exchange(b"GET", todo, None, limit):
            path = todo[k]
            yield path, body if status == 200 else None if status == 404 else self._get(path)

    def _exchange(self, method: bytes, paths: list[str], bodies: list[bytes] | None,
                  limit: int) -> Iterator[tuple[int, int | None, bytes]]:
        """(index, status, body) of each request, pipelined; status None for the requests the
        pipeline cannot carry, which the caller sends alone. A broken connection is reopened and
        the pipeline resumes at the first request without a whole answer, backing off only while
        no answer gets through."""
        i, stalls, delay = 0, 0, 0.1
        while i < len(paths):
            pipe = self._pipeline()
            if pipe is None:
                for k in range(i, len(paths)):
                    yield k, None, b""
                return
            try:
                for status, body in pipe.exchange(method, paths[i:], None if bodies is None else bodies[i:], limit):
                    i += 1
                    stalls, delay = 0, 0.1
                    yield i - 1, status, body
            except Unsupported:
                self._pipe_ok = False
            except Broken as exc:
                stalls += 1
                if stalls >= self.attempts:
                    raise CastoreError(f"{self.url}/{paths[i]}: {exc} (after {self.attempts} attempts)",
                                       "is the cache server up? nothing unverified was added") from exc
                time.sleep(delay)
                delay *= 4

    def _pipeline(self) -> Pipeline | None:
        if self._pipe is None and self._pipe_ok:
            try:
                if any(os.environ.get(v) for v in _PROXY_VARS):
                    raise Unsupported("a proxy is set")  # httpx goes through it; the pipeline would not
                self._pipe = Pipeline(self.url, token=self.token, timeout=self.timeout)
            except Unsupported:
                self._pipe_ok = False
        return self._pipe if self._pipe_ok else None

    def exists(self, path: str) -> bool:
        status, body = self._request("HEAD", path)
        if status >= 500:
            raise self._failed("HEAD", path, status, body)
        return status == 200

    def missing(self, paths: Iterable[str]) -> set[str]:
        """One POST /missing to `castore serve`; one HEAD per path to a plain static server."""
        wanted = [check_path(p) for p in paths]
        if self._batch and wanted:
            status, body = self._request("POST", "missing", json.dumps(wanted).encode())
            if status == 200:
                return set(json.loads(body)) & set(wanted)
            self._batch = False  # nginx and friends: 404/405
        return {p for p in wanted if not self.exists(p)}

    def put(self, path: str, data: bytes) -> None:
        status, body = self._request("PUT", path, data)
        if status not in (200, 201, 204):
            raise self._failed("PUT", path, status, body)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """PUT each (path, bytes), pipelined 64 at a time (one batch in memory); transient answers
        and whatever the pipeline cannot read go through :meth:`put`, with its retries."""
        batch: list[tuple[str, bytes]] = []
        for item in items:
            batch.append(item)
            if len(batch) == 64:
                self._put_batch(batch)
                batch = []
        self._put_batch(batch)

    def _put_batch(self, batch: list[tuple[str, bytes]]) -> None:
        paths = [check_path(p) for p, _ in batch]
        bodies = [data for _, data in batch]
        for k, status, body in self._exchange(b"PUT", paths, bodies, 1 << 20):
            if status is None or status in _TRANSIENT:
                self.put(paths[k], bodies[k])
            elif status not in (200, 201, 204):
                raise self._failed("PUT", paths[k], status, body)

    def _failed(self, method: str, path: str, status: int, body: bytes) -> CastoreError:
        """The error for an answer that is neither what was asked for nor worth asking again."""
        message = _server_message(body)
        upload = method in ("PUT", "POST")
        if status in (401, 403):
            return CastoreError(f"{self.url} refused {'the upload of ' if upload else ''}{path}: HTTP {status}",
                                f"set a token with {'write' if upload else 'read'} scope: CASTORE_TOKEN or "
                                "`tokens` in castore.toml")
        if upload and status in (404, 405, 501):  # nginx: 404 for a new path (try_files), 405 for an old one
            return CastoreError(f"{self.url} takes no uploads (HTTP {status}: a static server?)", _NO_UPLOADS)
        if status == 507:
            return CastoreError(f"{self.url}: the cache server's disk is full; it did not store {path}",
                                "free space on the server, then push again: what it stored before is whole "
                                "and is not sent twice")
        if status >= 500:
            return CastoreError(f"{self.url}/{path}: HTTP {status}{message}",
                                "the server failed: its log says why"
                                + ("" if upload else "; nothing unverified was added"))
        return CastoreError(f"{self.url} refused {path}: HTTP {status}{message}")


def _server_message(body: bytes) -> str:
    """': message' from a `castore serve` error body ({code, error, message}), or its first bytes."""
    try:
        rec = json.loads(body)
        text = str(rec["message"]) if isinstance(rec, dict) else body[:200].decode(errors="replace")
    except (ValueError, KeyError):
        text = body[:200].decode(errors="replace")
    text = " ".join(text.split())
    return f": {text}" if text else ""


def open_cache(url: str, *, create: bool = False, token: str | None = None) -> Transport:
    """A transport for a cache URL (http, https, file) or a directory path."""
    if url.startswith(("http://", "https://")):
        return HttpTransport(url, token=token)
    path = url.removeprefix("file://")
    return DirTransport(path, create=create)
