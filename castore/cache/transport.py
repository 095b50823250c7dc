"""How castore reaches a cache: get, put and exists on relative paths.

Every transport refuses paths that are not plain relative paths inside the
cache; ``put`` is atomic (a reader sees the whole file or none).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import zstandard

from castore.cache.pipeline import UNTRUSTED, Broken, Deadline, Malformed, Pipeline, Unsupported
from castore.errors import CastoreError, NotFound
from castore.fsutil import atomic_write, host_id, read_regular, stale_entries, syncfs

if TYPE_CHECKING:
    import httpx

UNREADABLE = "the cache directory is damaged or unreadable; nothing was added"
MAX_BODY = 1 << 30  # no cache file is bigger: the largest is the record of a blob of ~700 GiB
_ANSWER = 1 << 20  # to an upload: a status, at most an error message
_ERROR_PAGE = 64 << 10  # of an error page, its start says enough
_MISSING_BATCH = 50_000  # paths per POST /missing: castore serve takes up to 100,000 (a 3 GB blob's chunks)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_TRANSIENT = frozenset((408, 429, 500, 502, 503, 504))  # as curl --retry and nix: worth asking again
_RETRY_HINT = "is the cache server up? nothing unverified was added"
_MALFORMED = ("the cache, or a proxy in front of it, answers in a way castore cannot use: check the URL and "
              "what serves it; nothing unverified was added")
# what castore accepts from httpx (it asks for no others): none expands more than ~1000-fold, so a
# 64 KiB read decodes to at most ~64 MiB before the limit is checked; zstd could give gigabytes
_ENCODINGS = frozenset(("identity", "gzip", "x-gzip", "deflate"))
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


def cache_staging(root: Path) -> Path:
    """This process's directory for the temporary files of its writes to a cache,
    ``.castore/tmp/PID-HOST-...`` (never served), made after removing those of this host's
    processes that no longer run: a writer killed halfway leaves nothing in chunks/."""
    base = root / ".castore" / "tmp"
    host = host_id()
    for stale in stale_entries(base, host):
        shutil.rmtree(stale, ignore_errors=True)
    path = base / f"{os.getpid()}-{host}-{os.urandom(4).hex()}"
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise CastoreError(f"cannot make {path}: {exc.strerror}",
                           "a cache directory must be writable to push to it or to serve uploads") from exc
    return path


class DirTransport:
    """A cache in a local directory (``file://`` URLs): what nginx or any static host serves."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self._dirty = False
        self._staging: Path | None = None  # made on the first write: reading a cache writes nothing
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise NotFound(f"no cache at {self.root}", "push to it first, or check the path")

    def get(self, path: str) -> bytes | None:
        """A cache file's bytes, or None where there is none. What is there but no regular file
        (a FIFO would block for ever), too large or unreadable is the cache's fault, not the store's:
        a pull then tries the next substituter, and realize builds."""
        where = self.root / check_path(path)
        try:
            return read_regular(where, MAX_BODY)
        except OSError as exc:
            raise CastoreError(f"cannot read {where} of the cache: {exc.strerror}", UNREADABLE) from exc

    def get_many(self, paths: Sequence[str], limit: int = MAX_BODY) -> Iterator[tuple[str, bytes | None]]:
        for path in paths:
            yield path, self.get(path)

    def exists(self, path: str) -> bool:
        return (self.root / check_path(path)).exists()

    def missing(self, paths: Iterable[str]) -> set[str]:
        """What is not there to build on: a chunk file must at least begin as a zstd frame of some
        bytes, or a push writes it again (an empty or garbage one, a disk's or a hand's doing, made
        every pull fail, and pushing again did not mend it). Cheap: a few bytes of each."""
        return {p for p in paths if not (self._frame_starts(p) if p.startswith("chunks/") else self.exists(p))}

    def _frame_starts(self, path: str) -> bool:
        try:
            head = read_regular(self.root / check_path(path), 18, whole=False)  # a frame header's most
            return head is not None and zstandard.get_frame_parameters(head).content_size > 0
        except (OSError, zstandard.ZstdError):
            return False

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> DirTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, path: str, data: bytes) -> None:
        """Chunks are written without an fsync each; before the first record that could name
        them is published, one syncfs makes them all durable."""
        dest = self.root / check_path(path)
        if self._staging is None:
            self._staging = cache_staging(self.root)
        if path.startswith("chunks/"):
            atomic_write(dest, data, fsync=False, staging=self._staging)
            self._dirty = True
            return
        if self._dirty:
            try:
                syncfs(self.root)
            except OSError as exc:
                raise CastoreError(f"cannot sync {self.root}: {exc.strerror}") from exc
            self._dirty = False
        if not path.startswith("realisations/"):
            atomic_write(dest, data, staging=self._staging)
            return
        # pushes signed by other labs' keys may publish the same realisation at once: merge, locked
        import fcntl

        from castore.cache.layout import merged_realisation

        (self.root / ".castore").mkdir(exist_ok=True)
        fd = os.open(self.root / ".castore" / "realisations.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            atomic_write(dest, merged_realisation(path.rpartition("/")[2], self.get(path), data),
                         staging=self._staging)
        finally:
            os.close(fd)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for path, data in items:
            self.put(path, data)


class _Expired(Exception):
    """An answer through httpx went past its deadline."""


class _TooLarge(Exception):
    """An answer through httpx brought more bytes than its request allows."""


class HttpTransport:
    """A cache over HTTP(S): any static server (nginx, a CDN) serving a cache directory for
    pulls, and `castore serve` for pushes too. Many GETs or PUTs go pipelined on one
    connection (:mod:`castore.cache.pipeline`); single requests and fallbacks go through httpx.

    Transient failures (connection errors, truncated or too slow answers, 408, 429, 500,
    502-504) are retried with back-off; a 404 means absent; any other status is an error
    at once, said in words that fit it (507: the server's disk is full; 404/405/501 to an
    upload: a static server), and so is an answer that is not HTTP or brings more than
    asked for. Every answer keeps to the pipeline's deadline (:data:`MIN_RATE`). Bytes
    are never trusted: callers verify them.
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
        self._deadline = Deadline()  # of the answer httpx is reading
        self._budget = 0  # the bytes it may still bring

    @property
    def client(self) -> httpx.Client:
        """Made on first use: importing httpx takes 140 ms, and a pull that pipelines never needs it."""
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.timeout, follow_redirects=True,
                                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
                                        headers={"Accept-Encoding": "gzip, deflate"},  # see _ENCODINGS
                                        event_hooks={"request": [self._scoped]})
        return self._client

    def _scoped(self, request: Any) -> None:
        """Called for each request, redirects included: the token goes only where it may, at or
        below the cache's URL (httpx keeps it for any path of the same host and port). Both URLs
        as httpx writes them: percent-encoded paths, IDNA hosts."""
        import httpx

        from castore.config import within

        if "authorization" in request.headers and not within(str(request.url), str(httpx.URL(self.url))):
            del request.headers["authorization"]

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 limit: int = MAX_BODY) -> tuple[int, bytes]:
        import httpx
        url = f"{self.url}/{path if path == 'missing' else check_path(path)}"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        delay = 0.1
        for attempt in range(self.attempts):
            self._deadline.start(self.timeout, len(body or b""))
            self._budget = limit + (1 << 20)  # room for headers and redirects
            try:
                with self.client.stream(method, url, content=body, headers=headers,
                                        extensions={"trace": self._trace}) as resp:
                    status = resp.status_code
                    if status not in _TRANSIENT:
                        if method == "HEAD":
                            return status, b""
                        if 200 <= status < 300:
                            return status, _read_body(resp, url, limit)
                        return status, _read_body(resp, url, _ERROR_PAGE, cut=True)
                    problem = f"HTTP {status}"
            except (_Expired, httpx.ReadTimeout):
                problem = f"timed out: no whole answer after {self._deadline.elapsed():.1f} s"
            except _TooLarge:
                raise CastoreError(f"{url}: a body of more than the {limit} bytes expected", _MALFORMED) from None
            except httpx.InvalidURL as exc:
                raise CastoreError(f"{url} is not a valid URL: {exc}") from exc
            except httpx.TooManyRedirects as exc:  # not transient: no retry
                raise CastoreError(f"{url}: {exc}", "the server redirects in a loop: its setup is wrong") from exc
            except httpx.UnsupportedProtocol as exc:  # a redirect to file:// or ftp://: not transient either
                raise CastoreError(f"{url}: the server redirects to a URL castore does not fetch ({exc})",
                                   "a cache server may redirect to http:// or https:// URLs only") from exc
            except httpx.HTTPError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # not transient: no retry
                    raise CastoreError(f"{url}: {exc}", UNTRUSTED) from exc
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                self._deadline.stop()
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay *= 4
        raise CastoreError(f"{url}: {problem} (after {self.attempts} attempts)", _RETRY_HINT)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook, told of each connection httpx opens: its reads are made to keep to
        the answer's deadline and byte budget. httpx's own timeouts bound each read, not the answer
        (encode/httpx#1450), and it reads the bodies of redirects whole."""
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info["return_value"]
            stream.read = functools.partial(self._read, stream.read)

    def _read(self, read: Callable[[int, float | None], bytes], max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            left = self._deadline.left()
        except TimeoutError:
            raise _Expired from None  # not an OSError: httpcore would call it a dropped connection
        data = read(max_bytes, left if timeout is None else min(timeout, left))
        self._deadline.got(len(data))
        self._budget -= len(data)
        if self._budget < 0:
            raise _TooLarge
        return data

    def get(self, path: str) -> bytes | None:
        if self._pipeline() is not None:
            return next(self.get_many([path]))[1]
        return self._get(path)

    def _get(self, path: str, limit: int = MAX_BODY) -> bytes | None:
        status, body = self._request("GET", path, limit=limit)
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
            yield path, body if status == 200 else None if status == 404 else self._get(path, limit)

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
            except Malformed as exc:
                raise CastoreError(f"{self.url}/{paths[i]}: {exc}", _MALFORMED) from exc
            except Broken as exc:
                stalls += 1
                if stalls >= self.attempts:
                    raise CastoreError(f"{self.url}/{paths[i]}: {exc} (after {self.attempts} attempts)",
                                       _RETRY_HINT) from exc
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
        """One POST /missing to `castore serve`; one HEAD per path to a plain static server, or to
        one whose answer to the POST is not a list of the paths asked (a login page, a proxy's)."""
        wanted = [check_path(p) for p in paths]
        found: set[str] = set()
        for start in range(0, len(wanted), _MISSING_BATCH):
            if not self._batch:
                break
            part = wanted[start:start + _MISSING_BATCH]
            ask = json.dumps(part).encode()
            # a subset of the question in any JSON layout (twice its size), or an error page
            status, body = self._request("POST", "missing", ask, limit=2 * len(ask) + _ANSWER)
            answer = _subset(body, part) if status == 200 else None
            if answer is None:
                self._batch = False  # nginx and friends: 404/405
                break
            found |= answer
        else:
            return found
        return found | {p for p in wanted[start:] if not self.exists(p)}  # found: the batches answered

    def put(self, path: str, data: bytes) -> None:
        status, body = self._request("PUT", path, data, limit=_ANSWER)
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
        for k, status, body in self._exchange(b"PUT", paths, bodies, _ANSWER):
            if status is None or status in _TRANSIENT:
                self.put(paths[k], bodies[k])
            elif status not in (200, 201, 204):
                raise self._failed("PUT", paths[k], status, body)

    def _failed(self, method: str, path: str, status: int, body: bytes) -> CastoreError:
        """The error for an answer that is neither what was asked for nor worth asking again."""
        message = _server_message(body)
        upload = method in ("PUT", "POST")
        if status in (401, 403):
            where = ("under [tokens] for this URL in castore.toml, or in CASTORE_TOKEN for a cache named by "
                     "--to or --from")
            if status == 401 and self.token:
                hint = ("the server does not know the token sent (revoked, mistyped, or made by `castore token "
                        f"add` for another directory): ask its operator for one, and put it {where}")
            else:
                hint = (f"{'a token was sent, but' if self.token else 'no token was sent:'} this needs one "
                        f"with {'write' if upload else 'read'} scope, {where}")
            return CastoreError(f"{self.url} refused {'the upload of ' if upload else ''}{path}: HTTP {status}"
                                f"{message}", hint)
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


def _read_body(resp: httpx.Response, url: str, limit: int, *, cut: bool = False) -> bytes:
    """The body, decoded, up to limit bytes; more is an error that asking again would not mend, or
    with cut, is left unread."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in _ENCODINGS:  # httpx would decode it, but not within a bound we know
        raise CastoreError(f"{url}: a body in Content-Encoding {encoding[:40]!r}, which castore did not ask for",
                           _MALFORMED)
    length = resp.headers.get("content-length", "")
    if encoding == "identity" and length.isdigit() and int(length) > limit and not cut:
        raise CastoreError(f"{url}: a {length}-byte body, more than the {limit} expected", _MALFORMED)
    pieces, size = [], 0
    for piece in resp.iter_bytes():
        size += len(piece)
        if size > limit:
            if cut:
                pieces.append(piece[:limit - size])
                break
            raise CastoreError(f"{url}: a body of more than the {limit} bytes expected", _MALFORMED)
        pieces.append(piece)
    return b"".join(pieces)


def _subset(body: bytes, wanted: list[str]) -> set[str] | None:
    """The paths a POST /missing answer names, if it is a JSON list of paths that were asked; else None."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(answer, list) or not all(isinstance(p, str) for p in answer):
        return None
    found = set(answer)
    return found if found <= set(wanted) else None


def _server_message(body: bytes) -> str:
    """': message' from a `castore serve` error body ({code, error, message}), or its first bytes."""
    try:
        rec = json.loads(body)
        text = str(rec["message"]) if isinstance(rec, dict) else body[:200].decode(errors="replace")
    except (ValueError, KeyError, RecursionError):  # RecursionError: JSON nested thousands deep
        text = body[:200].decode(errors="replace")
    text = " ".join(text.split())[:300]
    return f": {text}" if text else ""


def open_cache(url: str, *, create: bool = False, token: str | None = None) -> Transport:
    """A transport for a cache URL (http, https, file) or a directory path."""
    if url.startswith(("http://", "https://")):
        return HttpTransport(url, token=token)
    path = url.removeprefix("file://")
    return DirTransport(path, create=create)
