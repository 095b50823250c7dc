"""`castore serve`: the cache layout over HTTP, with authenticated, verified uploads.

A plain ASGI application (run by uvicorn):

* ``GET``/``HEAD /<cache path>``: the files, with immutable caching headers for
  chunks and objects (their names are their content), ``no-cache`` for the
  rest. The same directory served read-only by nginx works for pulls.
* ``POST /missing``: a JSON list of cache paths in, the ones absent out: one
  request instead of one HEAD per chunk.
* ``PUT /<cache path>`` with ``Authorization: Bearer TOKEN`` (write scope):
  the body is verified against its name before it becomes visible, and a
  record is accepted only once what it names is there (chunks before their
  object, referenced objects before a referrer, the object before its
  realisation).

Tokens are random; the server keeps only their BLAKE3, with their scopes, in
``DIR/.castore/tokens.json``. Errors are JSON ``{code, error, message}``, with
no path of the server in them: 400 for an upload that does not verify, 507
when the disk is full (nothing partial stays: files are renamed into place
whole), 500 when the server itself is at fault; those last two also go to
stderr as one line, for its operator.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zstandard

from castore.cache.layout import (
    CONFIG,
    MAX_CHUNK,
    CacheConfig,
    ObjectRecord,
    RealisationRecord,
    check_chunk,
    chunk_path,
    merged_realisation,
    object_path,
)
from castore.cache.transport import check_path
from castore.errors import CastoreError
from castore.fsutil import atomic_write, syncfs
from castore.hashing import Hasher, hash_bytes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_BODY = 64 << 20  # records and chunks are small; a chunk is at most MAX_CHUNK (16 MiB) by the layout
IMMUTABLE = "public, max-age=31536000, immutable"


def tokens_file(root: Path) -> Path:
    return root / ".castore" / "tokens.json"


_TOKENS_HINT = "fix it, or move it away and make the tokens again with `castore token add`"


def load_tokens(root: Path) -> dict[str, dict[str, Any]]:
    """{BLAKE3 of a token: {"name": str, "scopes": [str, ...]}}; none when the file is absent."""
    path = tokens_file(root)
    try:
        known = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CastoreError(f"cannot read {path}: {exc.strerror}",
                           "castore serve and castore token need to read the cache's token file") from exc
    except ValueError as exc:
        raise CastoreError(f"{path} is not JSON: {exc}", _TOKENS_HINT) from exc
    if not isinstance(known, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("scopes"), list)
            and all(isinstance(s, str) for s in v["scopes"]) for v in known.values()):
        raise CastoreError(f"{path} is not a map of token hashes to {{name, scopes}}", _TOKENS_HINT)
    return known


def add_token(root: Path, scopes: list[str], name: str) -> str:
    """Make a token with the given scopes ("read", "write"); only its hash is stored.

    The read-modify-write of the token file holds ``tokens.lock`` (flock) beside it, and the new
    file (mode 0600, in a 0700 directory) is renamed into place whole: tokens added at the same
    time are all kept, and a server reading the file sees the old one or the new one."""
    import fcntl  # here, not at the top: only this function takes the lock

    token = secrets.token_urlsafe(32)
    path = tokens_file(root)
    lock = path.with_name("tokens.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CastoreError(f"cannot write {lock}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        known = load_tokens(root)
        known[hash_bytes(token.encode())] = {"name": name, "scopes": sorted(scopes)}
        atomic_write(path, (json.dumps(known, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    finally:
        os.close(fd)  # and with it the lock
    return token


class CacheApp:
    def __init__(self, root: str | os.PathLike[str], *, public_read: bool = True) -> None:
        self.root = Path(root).absolute()
        self.public_read = public_read
        self._dirty = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CastoreError(f"cannot make the cache directory {self.root}: {exc.strerror}") from exc
        if not (self.root / CONFIG).exists():
            from castore.chunking import ChunkParams

            atomic_write(self.root / CONFIG, CacheConfig(ChunkParams()).encode())
        self.max_chunk = CacheConfig.decode((self.root / CONFIG).read_bytes()).chunking.max
        load_tokens(self.root)  # a broken token file stops the server here, not on each upload

    # -- ASGI ----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].lstrip("/")
        try:
            if method in ("GET", "HEAD"):
                self._need(scope, "read")
                await self._get(send, path, head=method == "HEAD")
            elif method == "POST" and path == "missing":
                self._need(scope, "read")
                body = await _body(receive)
                try:
                    wanted = json.loads(body)
                    assert isinstance(wanted, list) and all(isinstance(p, str) for p in wanted)
                except (ValueError, AssertionError):
                    raise HttpError(400, "bad-request", "POST /missing takes a JSON list of cache paths") from None
                missing = [p for p in wanted if not (self.root / _checked(p)).exists()]
                await _send(send, 200, json.dumps(missing).encode(), "application/json")
            elif method == "PUT":
                self._need(scope, "write")
                await self._put(path, await _body(receive))
                await _send(send, 201, b"", "text/plain")
            else:
                raise HttpError(405, "method-not-allowed", f"{method} is not served here")
        except HttpError as exc:
            await _send(send, exc.status, json.dumps(
                {"code": exc.status, "error": exc.error, "message": exc.message}).encode(), "application/json")

    # -- handlers --------------------------------------------------------------

    def _need(self, scope: Scope, what: str) -> None:
        if what == "read" and self.public_read:
            return
        token = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization" and value.startswith(b"Bearer "):
                token = value[7:].decode(errors="replace")
        if not token:
            raise HttpError(401, "unauthorized", f"{what} needs a token: Authorization: Bearer TOKEN")
        try:
            known = load_tokens(self.root)
        except CastoreError as exc:
            _log(f"{exc.message}; refusing requests that need a token")
            raise HttpError(500, "server-error", "the server cannot read its tokens; its operator must "
                            "fix that (its log says how)") from None
        entry = known.get(hash_bytes(token.encode()))
        if entry is None or what not in entry["scopes"]:
            raise HttpError(403, "forbidden", f"this token may not {what}")

    async def _get(self, send: Send, path: str, head: bool) -> None:
        full = self.root / _checked(path)
        try:
            data = full.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise HttpError(404, "not-found", f"{path} is not in this cache") from None
        immutable = path.startswith(("chunks/", "objects/"))
        await _send(send, 200, b"" if head else data, "application/octet-stream",
                    length=len(data), cache=IMMUTABLE if immutable else "no-cache")

    async def _put(self, path: str, body: bytes) -> None:
        path = _checked(path, status=400)
        kind = path.split("/")[0]
        try:
            if kind == "chunks":
                cid = path.split("/")[-1]
                try:
                    data = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_CHUNK)
                except zstandard.ZstdError as exc:
                    raise HttpError(400, "bad-chunk", f"chunk {cid} is not a zstd frame: {exc}") from None
                if len(data) > self.max_chunk:
                    raise HttpError(400, "bad-chunk", f"chunk {cid} is {len(data)} bytes, longer than this "
                                    f"cache's chunking maximum of {self.max_chunk}")
                check_chunk(cid, data)
            elif kind == "objects":
                oid = path.split("/")[-1]
                rec = ObjectRecord.decode(oid, body)
                rec.check_chunks(self.max_chunk)  # a CastoreError: 400 below
                if (self.root / path).exists():
                    return  # named by its content: what is there is already right
                absent = [c for c, _ in rec.chunks if not (self.root / chunk_path(c)).exists()]
                absent += [r for r in rec.refs if not (self.root / object_path(r)).exists()]
                if absent:
                    raise HttpError(409, "incomplete", f"object {oid} names {absent[0]}, which is not here yet")
                self._check_reassembly(rec)
            elif kind == "realisations":
                rrec = RealisationRecord.decode(path.split("/")[-1], body)
                if not (self.root / object_path(rrec.object)).exists():
                    raise HttpError(409, "incomplete", f"realisation names object {rrec.object}, which is not here")
                here = self.root / path  # merged with what is there: no await between read and write
                body = merged_realisation(rrec.plan, here.read_bytes() if here.exists() else None, body)
            elif kind == CONFIG:
                if CacheConfig.decode(body) != CacheConfig.decode((self.root / CONFIG).read_bytes()):
                    raise HttpError(409, "config", "this cache's chunking parameters are fixed")
                return
        except CastoreError as exc:
            raise HttpError(400, "invalid", exc.message) from None
        self._write(path, body)

    def _check_reassembly(self, rec: ObjectRecord) -> None:
        """The chunks a record lists must make up the object it is named after."""
        h = Hasher()
        dctx = zstandard.ZstdDecompressor()
        for cid, length in rec.chunks:
            data = dctx.decompress((self.root / chunk_path(cid)).read_bytes(), max_output_size=length)
            if len(data) != length:
                raise HttpError(400, "invalid", f"chunk {cid} is {len(data)} bytes, the record says {length}")
            h.update(data)
        if h.hexdigest() != rec.id:
            raise HttpError(400, "invalid", f"the chunks of object {rec.id} hash to {h.hexdigest()}")

    def _write(self, path: str, data: bytes) -> None:
        """Chunks land without an fsync each; one syncfs precedes the next record, which may name them.
        A write that fails leaves nothing (atomic_write removes its temporary file) and answers
        507 when the disk is full, 500 otherwise."""
        try:
            if path.startswith("chunks/"):
                atomic_write(self.root / path, data, fsync=False)
                self._dirty = True
                return
            if self._dirty:
                syncfs(self.root)
                self._dirty = False
            atomic_write(self.root / path, data)
        except (CastoreError, OSError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
            _log(f"cannot store {path}: {reason}")
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HttpError(507, "insufficient-storage", f"the cache's disk is full: {path} was not stored; "
                                "nothing partial was kept") from None
            raise HttpError(500, "server-error", f"the server could not store {path} (its log says why); "
                            "nothing partial was kept") from None


def _log(line: str) -> None:
    """One line on stderr for the operator (uvicorn logs only warnings, and no access log)."""
    print(f"castore serve: {line}", file=sys.stderr, flush=True)


class HttpError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _checked(path: str, status: int = 404) -> str:
    try:
        return check_path(path)
    except CastoreError:
        raise HttpError(status, "bad-path" if status == 400 else "not-found", "no such cache path") from None


async def _body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, "too-large", f"bodies are limited to {MAX_BODY >> 20} MiB")
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def _send(send: Send, status: int, body: bytes, ctype: str, *, length: int | None = None,
                cache: str = "no-cache") -> None:
    size = len(body) if length is None else length
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(size).encode()),
               (b"cache-control", cache.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(root: str, host: str, port: int) -> None:  # pragma: no cover - runs until stopped
    import uvicorn

    uvicorn.run(CacheApp(root), host=host, port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
