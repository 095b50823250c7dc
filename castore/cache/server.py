"""`castore serve`: the cache layout over HTTP, with authenticated, verified uploads.

A plain ASGI application (run by uvicorn):

* ``GET``/``HEAD /<cache path>``: the files, with immutable caching headers for
  chunks and objects (their names are their content), ``no-cache`` for the
  rest; for anyone, or (``public_read=False``, ``castore serve --private``) for
  tokens with read or write scope. The same directory served read-only by nginx
  works for pulls.
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

Nothing slow runs on the event loop, which answers every client: listing what is missing,
checking an object record (it reads and hashes every chunk it names), syncfs, fsync and reads
of files over 1 MiB run in threads. Ordering survives that: a record is written only after a
syncfs that began once its chunks were written (chunk writes are synchronous, so every chunk
counted as written is on disk when the syncfs starts), and realisations are merged one at a
time. A chunk already here is never replaced: its name is its content, checked when it came.

Limits, for a server on a lab network (anything wider belongs behind nginx, see
docs/cache.md): bodies up to 64 MiB (a larger Content-Length is refused before any of it is
read), POST /missing lists up to 100,000 paths, at most 4,096 connections (one more is closed as
soon as it is accepted, so descriptors never run out), and a request head must arrive within
10 s of the connection opening or of its first byte (uvicorn itself waits for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import zstandard

from castore.cache.layout import (
    CONFIG,
    LIST_BYTES,
    CacheConfig,
    ObjectRecord,
    RealisationRecord,
    check_chunk,
    chunk_path,
    frame_limit,
    kind_check,
    list_entries,
    merged_realisation,
    object_path,
    unframe,
)
from castore.cache.transport import cache_staging, check_path
from castore.errors import CastoreError, EncodingError, NotFound
from castore.fsutil import atomic_write, more_descriptors, read_regular, read_upto, syncfs
from castore.hashing import Hasher, hash_bytes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_BODY = 64 << 20  # records and chunks are small; a chunk is at most MAX_CHUNK (16 MiB) by the layout
MAX_MISSING = 100_000  # paths in one POST /missing: 3 GB of chunks at the default 32 KiB average
INLINE_READ = 1 << 20  # larger files are read in a thread (a chunk at the default chunking is at most 128 KiB)
MAX_CONNECTIONS = 4096
HEADER_TIMEOUT = 10.0  # seconds for a request head, as nginx's client_header_timeout (60 s by default)
BODY_TIMEOUT = 30.0  # seconds between two reads of a request body, as nginx's client_body_timeout (60 s)
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open (uvicorn's default, written down)
BACKLOG = 1024  # connections the kernel queues before accept; they hold none of our descriptors
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
    except (ValueError, RecursionError) as exc:
        raise CastoreError(f"{path} is not JSON: {exc}", _TOKENS_HINT) from exc
    if not isinstance(known, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("scopes"), list)
            and all(isinstance(s, str) for s in v["scopes"]) for v in known.values()):
        raise CastoreError(f"{path} is not a map of token hashes to {{name, scopes}}", _TOKENS_HINT)
    return known


def add_token(root: Path, scopes: list[str], name: str) -> str:
    """Make a token with the given scopes ("read", "write"); only its hash is stored."""
    token = secrets.token_urlsafe(32)

    def add(known: dict[str, dict[str, Any]]) -> None:
        known[hash_bytes(token.encode())] = {"name": name, "scopes": sorted(scopes)}

    _edit_tokens(root, add, create=True)
    return token


def remove_tokens(root: Path, which: str) -> list[str]:
    """Revoke the tokens named `which`, or the one whose hash starts with it (8 hex digits or
    more); returns the hashes removed. A running server stops taking them at its next request."""
    gone: list[str] = []

    def remove(known: dict[str, dict[str, Any]]) -> None:
        for h, entry in list(known.items()):
            if entry.get("name") == which or (len(which) >= 8 and h.startswith(which.lower())):
                del known[h]
                gone.append(h)

    _edit_tokens(root, remove)
    return gone


def cache_dir(root: Path) -> Path:
    """root, when it is a directory: token commands other than add name an existing cache."""
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory", "name the cache directory that `castore serve` serves")
    return root


def _edit_tokens(root: Path, edit: Callable[[dict[str, dict[str, Any]]], None], create: bool = False) -> None:
    """Change the token file under ``tokens.lock`` (flock) beside it; the new file (mode 0600, in a
    0700 directory) is renamed into place whole: edits made at the same time are all kept, and a
    server reading the file sees the old one or the new one."""
    import fcntl  # here, not at the top: only this function takes the lock

    if not create:
        cache_dir(root)
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
        edit(known)
        atomic_write(path, (json.dumps(known, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    finally:
        os.close(fd)  # and with it the lock


class CacheApp:
    def __init__(self, root: str | os.PathLike[str], *, public_read: bool = True) -> None:
        self.root = Path(root).absolute()
        self.public_read = public_read
        self._chunks_written = 1  # chunk files written without an fsync, counted once on disk; 1: what
        # a server before this one wrote may not be durable yet, so the first record waits for a syncfs
        self._chunks_synced = 0  # how many of those a finished syncfs has made durable
        self._sync_lock = asyncio.Lock()  # one syncfs at a time; records waiting on it may find theirs done
        self._realisation_lock = asyncio.Lock()  # read, merge, write: signatures pushed at once are all kept
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CastoreError(f"cannot make the cache directory {self.root}: {exc.strerror}") from exc
        if not (self.root / CONFIG).exists():
            from castore.chunking import ChunkParams

            atomic_write(self.root / CONFIG, CacheConfig(ChunkParams()).encode())
        self.config = CacheConfig.decode((self.root / CONFIG).read_bytes())
        self.max_chunk = self.config.chunking.max
        self._homes = tuple({os.path.realpath(self.root / d) + os.sep
                             for d in ("", "chunks", "objects", "realisations")})
        self._chunk_lock = threading.Lock()  # a damaged chunk is not removed while a good one is renamed in
        load_tokens(self.root)  # a broken token file stops the server here, not on each upload
        self.staging = cache_staging(self.root)  # a killed server's are removed when the next starts

    # -- ASGI ----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    shutil.rmtree(self.staging, ignore_errors=True)
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
                body = await _body(scope, receive)
                await _send(send, 200, await asyncio.to_thread(self._missing, body), "application/json")
            elif method == "PUT":
                self._need(scope, "write")
                await self._put(path, await _body(scope, receive))
                await _send(send, 201, b"", "text/plain")
            else:
                raise HttpError(405, "method-not-allowed", f"{method} is not served here")
        except HttpError as exc:
            await _send(send, exc.status, json.dumps(
                {"code": exc.status, "error": exc.error, "message": exc.message}).encode(), "application/json")
        except ClientGone:
            pass  # its upload was cut short: nothing of it is kept, and no one is left to answer

    # -- handlers --------------------------------------------------------------

    def _need(self, scope: Scope, what: str) -> None:
        if what == "read" and self.public_read:
            return
        token = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization" and value[:7].lower() == b"bearer ":  # the scheme is case-insensitive
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
        if entry is None:
            raise HttpError(401, "unauthorized", "this token is not known here: revoked, mistyped, or made "
                            "for another cache directory")
        granted = set(entry["scopes"])
        if "write" in granted:  # a push reads the config and asks what is missing
            granted.add("read")
        if what not in granted:
            raise HttpError(403, "forbidden", f"this token may not {what}")

    async def _get(self, send: Send, path: str, head: bool) -> None:
        absent = HttpError(404, "not-found", f"{path} is not in this cache")
        try:
            # O_NONBLOCK: a FIFO put there does not hang the server (regular files ignore it)
            fd = os.open(self.root / _checked(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise absent from None
        except OSError as exc:  # a socket put there (ENXIO), a loop, permissions: not a cache file
            _log(f"cannot open {path}: {exc.strerror}")
            raise absent from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise absent
            # Files are renamed into place whole and never written again: one read takes all of it.
            # From the page cache a small one takes microseconds, less than the trip to a thread.
            if head:
                data = b""
            elif st.st_size <= INLINE_READ:
                data = os.read(fd, st.st_size)
            else:
                data = await asyncio.to_thread(read_upto, fd, st.st_size)
        finally:
            os.close(fd)
        immutable = path.startswith(("chunks/", "objects/"))
        await _send(send, 200, data, "application/octet-stream", length=st.st_size if head else len(data),
                    cache=IMMUTABLE if immutable else "no-cache")

    def _missing(self, body: bytes) -> bytes:
        """POST /missing, in a thread: the answer for a JSON list of cache paths."""
        if body.count(b",") >= MAX_MISSING:  # before parsing it; a cache path has no comma
            raise HttpError(413, "too-large", f"POST /missing takes at most {MAX_MISSING:,} paths; "
                            "send them in batches")
        try:
            wanted = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: lists nested thousands deep
            wanted = None
        if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
            raise HttpError(400, "bad-request", "POST /missing takes a JSON list of cache paths")
        for p in wanted:
            try:
                check_path(p)
            except CastoreError:
                raise HttpError(400, "bad-request", f"the list sent to POST /missing is invalid: {p[:100]!r} "
                                "is not a cache path") from None
        return json.dumps([p for p in wanted if not (self.root / p).exists()]).encode()

    async def _put(self, path: str, body: bytes) -> None:
        path = _checked(path, status=400)
        kind, name = path.split("/")[0], path.split("/")[-1]
        try:
            if kind == "chunks":
                if len(body) > INLINE_READ:
                    await asyncio.to_thread(self._check_chunk, name, body)
                else:  # at most 128 KiB at the default chunking: tens of microseconds
                    self._check_chunk(name, body)
                if (self.root / path).exists():  # named by its content, checked when it came: it stays,
                    self._chunks_written += 1  # but it may not be on disk yet (a server killed a moment ago
                    return  # wrote it): the record that names it waits for a syncfs all the same
                self._write_chunk(path, body)
            elif kind == "objects":
                if await asyncio.to_thread(self._check_object, name, body):
                    await self._publish(path, body)
            elif kind == "realisations":
                async with self._realisation_lock:
                    await self._publish(path, await asyncio.to_thread(self._merge_realisation, path, body))
            elif kind == CONFIG and CacheConfig.decode(body) != CacheConfig.decode((self.root / CONFIG).read_bytes()):
                raise HttpError(409, "config", "this cache's chunking parameters are fixed")
        except CastoreError as exc:
            raise HttpError(400, "invalid", exc.message) from None

    def _check_chunk(self, cid: str, body: bytes) -> None:
        """One zstd frame and nothing after it, of bytes that hash to cid: a second frame or padding
        would pass a plain decompress (it stops at the first frame) and make every pull refuse the file."""
        try:
            most = max(self.max_chunk, LIST_BYTES)  # list chunks may be longer than a small maximum
            data = unframe(body, most, whole=True, most=f"the {most} bytes a chunk may hold here (this cache's "
                           f"chunking maximum is {self.max_chunk}; a list chunk may hold {LIST_BYTES})")
        except EncodingError as exc:
            raise HttpError(400, "bad-chunk", f"chunk {cid}: {exc.message}") from None
        check_chunk(cid, data)
        if len(data) > self.max_chunk:  # only a list chunk may be longer than the chunking maximum
            try:
                list_entries(cid, data)
            except EncodingError:
                raise HttpError(400, "bad-chunk", f"chunk {cid} holds {len(data)} bytes, more than this cache's "
                                f"chunking maximum of {self.max_chunk}, and is not a list chunk") from None

    def _check_object(self, oid: str, body: bytes) -> bool:
        """In a thread: whether the record must be written (False: it is here already)."""
        rec = ObjectRecord.decode(oid, body)
        if (self.root / object_path(oid)).exists():
            return False  # named by its content: what is there is already right
        absent = [lid for lid, _, _ in rec.lists if not (self.root / chunk_path(lid)).exists()]
        if absent:
            raise HttpError(409, "incomplete", f"object {oid} names list chunk {absent[0]}, which is not here yet")
        if rec.lists and not self.config.listed:
            raise HttpError(400, "invalid", f"this cache is format {self.config.format}, which older castore "
                            "reads: it takes records that list their chunks, not format 3 records")
        rec = rec.resolve(self._list_chunk, self.config.chunking)
        rec.check_chunks(self.config.chunking)  # a CastoreError: 400
        absent = [c for c, _ in rec.chunks if not (self.root / chunk_path(c)).exists()]
        absent += [r for r in rec.refs if not (self.root / object_path(r)).exists()]
        if absent:
            raise HttpError(409, "incomplete", f"object {oid} names {absent[0]}, which is not here yet")
        self._check_reassembly(rec)
        return True

    def _list_chunk(self, lid: str) -> bytes:
        """A list chunk here, decompressed and checked against its id."""
        return self._chunk_here(lid, LIST_BYTES)

    def _chunk_here(self, cid: str, most: int, dctx: zstandard.ZstdDecompressor | None = None, *,
                    verify: bool = True) -> bytes:
        """A chunk this cache holds, decompressed (and checked against its id, with verify). Each
        was checked when it came; one that no longer checks (a disk's fault, a hand's, or something
        not a file at all put there) is removed, and the upload that needs it is told to send it
        again. The server's own trouble reading it (no descriptors left, EIO) removes nothing."""
        path = self._inside(chunk_path(cid))
        try:
            frame = read_regular(path, frame_limit(most))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EFBIG):  # read_regular's: no file, or too large
                _log(f"cannot read chunk {cid}: {exc.strerror}")
                raise HttpError(500, "server-error", f"the server could not read chunk {cid} (its log says "
                                "why)") from None
            self._damaged(cid, path, most, exc.strerror or str(exc))
        if frame is None:  # gone since it was asked for
            raise HttpError(409, "incomplete", f"chunk {cid} is not here")
        try:
            data = unframe(frame, most, dctx)
        except EncodingError as exc:
            self._damaged(cid, path, most, exc.message)
        if verify and hash_bytes(data) != cid:
            self._damaged(cid, path, most, "its bytes hash to another id")
        return data

    def _damaged(self, cid: str, path: Path, most: int, why: str) -> NoReturn:
        """Remove a damaged chunk file, unless what is there now checks: an upload may have renamed
        a good one in since it was read (_write_chunk renames under the same lock)."""
        with self._chunk_lock, contextlib.suppress(OSError):
            try:
                frame = read_regular(path, frame_limit(most))
                good = frame is not None and hash_bytes(unframe(frame, most)) == cid
            except (OSError, EncodingError):
                good = False
            if not good:
                _log(f"chunk {cid} is damaged ({why}): removed")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        raise HttpError(409, "damaged", f"chunk {cid} was damaged in this cache and is removed; "
                        "push again to upload it")

    def _merge_realisation(self, path: str, body: bytes) -> bytes:
        """In a thread, under the realisation lock: the record to write, with the signatures of both."""
        rrec = RealisationRecord.decode(path.split("/")[-1], body)
        if not (self.root / object_path(rrec.object)).exists():
            raise HttpError(409, "incomplete", f"realisation names object {rrec.object}, which is not here")
        try:
            here = read_regular(self.root / path, MAX_BODY)
        except OSError as exc:
            _log(f"cannot read {path}: {exc.strerror}")
            raise HttpError(500, "server-error", f"{path} in this cache is damaged (its log says how)") from None
        return merged_realisation(rrec.plan, here, body)

    def _check_reassembly(self, rec: ObjectRecord) -> None:
        """The chunks a record lists must make up the object it is named after, and a tree or an
        image must be one (layout.kind_check), so that no record lies about what its object is."""
        h = Hasher()
        dctx = zstandard.ZstdDecompressor()
        manifest = bytearray()
        most = max(self.max_chunk, LIST_BYTES)
        for cid, length in rec.chunks:
            data = self._chunk_here(cid, most, dctx, verify=False)  # the whole hash checks them all
            if len(data) != length:
                self._chunk_here(cid, most, dctx)  # damaged here, or the record is wrong
                raise HttpError(400, "invalid", f"chunk {cid} is {len(data)} bytes, the record says {length}")
            h.update(data)
            if rec.kind != "blob":
                manifest += data
        if h.hexdigest() != rec.id:
            for cid, _ in rec.chunks:  # a chunk damaged here is not the upload's fault
                self._chunk_here(cid, most, dctx)
            raise HttpError(400, "invalid", f"the chunks of object {rec.id} hash to {h.hexdigest()}")
        if rec.kind != "blob":
            try:
                kind_check(rec, bytes(manifest), self._known)
            except EncodingError as exc:
                raise HttpError(400, "invalid", exc.message) from None

    def _known(self, oids: list[str]) -> dict[str, tuple[str, int]]:
        """(kind, size) of the objects this cache has, from their records."""
        known = {}
        for oid in oids:
            try:
                data = read_regular(self.root / object_path(oid), MAX_BODY)
                if data is None:
                    continue
                ref = ObjectRecord.decode(oid, data)
            except (OSError, EncodingError):
                continue
            known[oid] = (ref.kind, ref.size)
        return known

    def _write_chunk(self, path: str, data: bytes) -> None:
        """On the event loop, without an fsync: a syncfs precedes the next record, which may name it.
        Synchronous on purpose: a chunk counted as written is on disk before any syncfs can start."""
        try:
            with self._chunk_lock:
                atomic_write(self._inside(path), data, fsync=False, staging=self.staging)
        except CastoreError as exc:
            raise _store_failed(path, exc) from None
        self._chunks_written += 1

    def _inside(self, path: str) -> Path:
        """Where to write (or remove) path: below this cache's directory, or below where its chunks/,
        objects/ or realisations/ lead (one may be a link to a bigger disk), not through a link
        out of them."""
        target = self.root / path
        parent = os.path.realpath(target.parent)
        if not (parent + os.sep).startswith(self._homes):
            _log(f"refusing to write {path}: {target.parent} leads out of the cache, to {parent}")
            raise HttpError(500, "server-error", f"the server could not store {path} (its log says why); "
                            "nothing was written")
        return target

    async def _publish(self, path: str, data: bytes) -> None:
        """Write a record, in a thread, once every chunk written so far is durable (its own are among
        them: it was checked after they were written). A write that fails leaves nothing (atomic_write
        removes its temporary file) and answers 507 when the disk is full, 500 otherwise."""
        written = self._chunks_written
        if self._chunks_synced < written:
            async with self._sync_lock:
                if self._chunks_synced < written:  # else a syncfs that began after ours were written ended
                    began = self._chunks_written
                    try:
                        await asyncio.to_thread(syncfs, self.root)
                    except OSError as exc:
                        raise _store_failed(path, exc) from None
                    self._chunks_synced = max(self._chunks_synced, began)
        try:
            await asyncio.to_thread(functools.partial(atomic_write, self._inside(path), data, staging=self.staging))
        except CastoreError as exc:
            raise _store_failed(path, exc) from None


def _store_failed(path: str, exc: CastoreError | OSError) -> HttpError:
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
    _log(f"cannot store {path}: {reason}")
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return HttpError(507, "insufficient-storage", f"the cache's disk is full: {path} was not stored; "
                         "nothing partial was kept")
    return HttpError(500, "server-error", f"the server could not store {path} (its log says why); "
                     "nothing partial was kept")


def _log(line: str) -> None:
    """One line on stderr for the operator (uvicorn logs only warnings, and no access log)."""
    print(f"castore serve: {line}", file=sys.stderr, flush=True)


class HttpError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class ClientGone(Exception):
    """The client closed its connection before its body was whole."""


def _checked(path: str, status: int = 404) -> str:
    try:
        return check_path(path)
    except CastoreError:
        raise HttpError(status, "bad-path" if status == 400 else "not-found", "no such cache path") from None


async def _body(scope: Scope, receive: Receive, limit: int = MAX_BODY) -> bytes:
    too_large = HttpError(413, "too-large", f"bodies are limited to {limit >> 20} MiB")
    for key, value in scope.get("headers", []):
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large  # at once: uvicorn then reads the body it announced and drops it
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def _send(send: Send, status: int, body: bytes, ctype: str, *, length: int | None = None,
                cache: str = "no-cache") -> None:
    size = len(body) if length is None else length
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(size).encode()),
               (b"cache-control", cache.encode())]
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except (OSError, RuntimeError):
        # The reader left while its answer was being written: uvicorn does not see it when the
        # request was pipelined behind another, and uvloop raises RuntimeError on the closed transport.
        pass


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to HOST:PORT (each address it names) and listening, before anything else happens:
    a port in use is one error line, and no cache directory is made."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CastoreError(f"cannot listen on {where}: {(exc.strerror or str(exc)).lower()}",
                           "--bind takes an address of this machine, e.g. 127.0.0.1:8080 or 0.0.0.0:8080") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in socks:
            sock.close()
        hint = {errno.EADDRINUSE: "pick another port with --bind",
                errno.EACCES: "ports below 1024 need root: pick another with --bind",
                errno.EADDRNOTAVAIL: "--bind takes an address of this machine, e.g. 127.0.0.1:8080 or 0.0.0.0:8080"}
        reason = (exc.strerror or str(exc)).lower()
        raise CastoreError(f"cannot listen on {where}: {reason}", hint.get(exc.errno or 0)) from None
    return socks


def serve(app: CacheApp, sockets: list[socket.socket], *, max_connections: int = MAX_CONNECTIONS,
          header_timeout: float = HEADER_TIMEOUT,
          body_timeout: float = BODY_TIMEOUT) -> None:  # pragma: no cover - runs until stopped
    import uvicorn

    max_connections = _descriptors_for(max_connections)
    logging.getLogger("uvicorn.error").addFilter(_quiet_when_the_reader_left)
    config = uvicorn.Config(app, log_level="warning", access_log=False, loop="uvloop", ws="none",
                            http=_protocol(max_connections, header_timeout, body_timeout),
                            # uvicorn answers 503 once this many connections or running handlers are
                            # counted; connections are capped at accept, so this caps the handlers (one
                            # whose client left runs to its end)
                            limit_concurrency=max_connections + 1,
                            backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has stopped; nothing to say
        uvicorn.Server(config).run(sockets=sockets)


def _descriptors_for(connections: int) -> int:
    """The connections the descriptor limit fits, raised as far as it goes; 256 spare: files,
    threads, listeners."""
    soft = more_descriptors(connections + 256)
    return connections if soft is None else max(1, min(connections, soft - 256))


def _quiet_when_the_reader_left(record: logging.LogRecord) -> bool:
    """uvicorn's error line after _send found the reader gone, which is no fault of the server."""
    return record.getMessage() != "ASGI callable returned without completing response."


def _protocol(max_connections: int, header_timeout: float, body_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with what nginx does about slow or too many clients: a connection
    is closed when its request head is not whole header_timeout seconds after the connection
    opened or the head began, when body_timeout seconds pass between two reads of a request body
    (an upload that stalls holds a handler and what it sent so far), and when it is past
    max_connections once accepted.

    One sweep a second finds the late ones: a timer per request would cost every request more."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Protocol(HttpToolsProtocol):
        head_since: float | None = None  # loop time the connection opened or its current request head began
        body_since: float | None = None  # loop time a request body still coming last gave bytes
        sweeping: ClassVar[bool] = False
        warned: ClassVar[float] = 0.0  # when the log last said connections were refused

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()
                if time.monotonic() - Protocol.warned > 60:
                    Protocol.warned = time.monotonic()
                    _log(f"{max_connections} connections are open; closing new ones until some end "
                         "(this line comes at most once a minute)")
                return
            self.head_since = self.loop.time()
            if not Protocol.sweeping:
                Protocol.sweeping = True
                self.loop.call_later(1.0, self._sweep)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.head_since is None:
                self.head_since = self.loop.time()

        def on_headers_complete(self) -> None:
            self.head_since = None
            self.body_since = self.loop.time()  # until on_message_complete: a GET's comes at once
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self.body_since = self.loop.time()
            super().on_body(body)

        def on_message_complete(self) -> None:
            self.body_since = None
            super().on_message_complete()

        def _sweep(self) -> None:
            now = self.loop.time()
            for conn in list(self.connections):
                if not isinstance(conn, Protocol) or conn.transport.is_closing():
                    continue
                if conn.head_since is not None and now - conn.head_since >= header_timeout:
                    if (conn.cycle is not None and not conn.cycle.response_complete) or conn.pipeline:
                        conn.head_since = now  # the server is busy with it and does not read the rest yet
                    else:
                        conn.transport.close()
                elif conn.body_since is not None and now - conn.body_since >= body_timeout:
                    if conn.flow.read_paused:
                        conn.body_since = now  # the server stopped reading: the wait is not the client's
                    else:
                        conn.transport.close()
            self.loop.call_later(min(1.0, header_timeout / 4, body_timeout / 4), self._sweep)

    return Protocol
