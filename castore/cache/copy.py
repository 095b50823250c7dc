"""The one verb that moves closures: push (store -> cache) and pull (cache -> store).

Push chunks each blob (recording the chunks in the store's chunk index),
uploads only chunks the cache lacks, then publishes the object record, refs
first. Pull reads the closure's records, takes every chunk it can from local
blobs through the chunk index (the seed), fetches the rest, verifies each
chunk and then the whole object, and only then adds it to the store. Fetched
chunks are kept, verified, under ``tmp/chunk-cache`` until their object is
in, so a pull that is killed resumes without fetching them again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from castore.cache.layout import (
    CONFIG,
    CacheConfig,
    ObjectRecord,
    RealisationRecord,
    check_chunk,
    chunk_path,
    object_path,
    realisation_path,
)
from castore.cache.transport import Transport
from castore.cache.trust import Trust, signed
from castore.chunking import ChunkParams, cut_file
from castore.errors import CastoreError, EncodingError, HashMismatch, NotFound
from castore.manifest import Image, Tree
from castore.store import LocalStore

Progress = Callable[[str], None]
Meter = Callable[[int, int], None]  # (bytes of chunk data fetched so far, bytes to fetch in all)


@dataclass
class CopyStats:
    objects: int = 0  # objects copied
    present: int = 0  # objects the destination already had
    chunks_sent: int = 0
    chunks_fetched: int = 0
    chunks_seeded: int = 0  # taken from local blobs or the resume cache
    bytes_on_wire: int = 0
    realisations: int = 0  # signed realisations published
    ids: list[str] = field(default_factory=list)


def cache_config(cache: Transport, *, create: bool) -> CacheConfig:
    data = cache.get(CONFIG)
    if data is None:
        if not create:
            raise NotFound(f"{cache.url} has no {CONFIG}: not a castore cache")
        config = CacheConfig(ChunkParams())
        cache.put(CONFIG, config.encode())
        return config
    return CacheConfig.decode(data)


def _refs_first(ids: Iterable[str], refs: Callable[[str], Iterable[str]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    stack = [(oid, False) for oid in ids]
    while stack:
        oid, expanded = stack.pop()
        if expanded:
            order.append(oid)
            continue
        if oid in seen:
            continue
        seen.add(oid)
        stack.append((oid, True))
        stack.extend((r, False) for r in refs(oid) if r not in seen)
    return order


def push(store: LocalStore, cache: Transport, ids: Iterable[str], progress: Progress = lambda s: None,
         secrets: list[str] | None = None) -> CopyStats:
    """Upload closures; with secret keys, also the signed realisations of every object pushed."""
    config = cache_config(cache, create=True)
    stats = CopyStats()
    cctx = zstandard.ZstdCompressor(level=3)
    for oid in _refs_first(ids, lambda o: store.info(o).refs):
        stats.ids.append(oid)
        if cache.exists(object_path(oid)):
            stats.present += 1
            continue
        info = store.info(oid)
        path = store.blob_path(oid)
        chunks = cut_file(path, config.chunking)
        store.record_chunks(oid, [(c.id, c.offset, c.length) for c in chunks])
        wanted = {chunk_path(c.id): c for c in chunks}
        todo = cache.missing(wanted)
        with open(path, "rb") as f:
            for cpath in sorted(todo):
                c = wanted[cpath]
                f.seek(c.offset)
                frame = cctx.compress(f.read(c.length))
                cache.put(cpath, frame)
                stats.chunks_sent += 1
                stats.bytes_on_wire += len(frame)
        progress(f"pushed {info.kind} {oid[:12]} ({len(todo)} of {len(chunks)} chunks new)")
        record = ObjectRecord(oid, info.kind, info.size, info.refs, tuple((c.id, c.length) for c in chunks))
        data = record.encode()
        cache.put(object_path(oid), data)
        stats.bytes_on_wire += len(data)
        stats.objects += 1
    for oid in stats.ids if secrets else ():  # published last: they name objects already there
        for plan_hash, plan_record in store.realisations_of(oid):
            rec = RealisationRecord(plan_hash, oid, plan_record)
            old = cache.get(realisation_path(plan_hash))
            if old is not None:
                try:
                    prev = RealisationRecord.decode(plan_hash, old)
                    if prev.object == oid:
                        rec = prev  # keep the signatures it has, add ours
                except EncodingError:
                    pass
            new = signed(rec, secrets or [])
            if old is None or new.encode() != old:
                cache.put(realisation_path(plan_hash), new.encode())
                stats.realisations += 1
    return stats


def fetch_records(store: LocalStore, cache: Transport, ids: Iterable[str]) -> tuple[dict[str, ObjectRecord], int]:
    """The records of every object of the closures that the store lacks, and their bytes on the wire."""
    records: dict[str, ObjectRecord] = {}
    wire = 0
    todo = [oid for oid in ids if not store.has(oid)]
    while todo:
        oid = todo.pop()
        if oid in records or store.has(oid):
            continue
        data = cache.get(object_path(oid))
        if data is None:
            raise NotFound(f"{cache.url} has no object {oid}")
        records[oid] = ObjectRecord.decode(oid, data)
        wire += len(data)
        todo.extend(records[oid].refs)
    return records, wire


def pull(store: LocalStore, cache: Transport, ids: Iterable[str], *, dry_run: bool = False,
         progress: Progress = lambda s: None, meter: Meter | None = None) -> CopyStats:
    with store.lock("gc", shared=True):  # gc must not sweep the resume cache under a running pull
        return _pull(store, cache, list(ids), dry_run, progress, meter)


def _pull(store: LocalStore, cache: Transport, wanted: list[str], dry_run: bool, progress: Progress,
          meter: Meter | None) -> CopyStats:
    config = cache_config(cache, create=False)
    del config  # chunks are addressed by id: a pull works whatever the cache's parameters
    records, record_bytes = fetch_records(store, cache, wanted)
    stats = CopyStats(present=len([o for o in wanted if store.has(o)]), bytes_on_wire=record_bytes)
    order = _refs_first(records, lambda o: [r for r in records[o].refs if r in records])
    resume = store.tmp / "chunk-cache"
    resume.mkdir(exist_ok=True)
    lengths = {cid: n for oid in order for cid, n in records[oid].chunks}
    need = [cid for cid in lengths if store.find_chunk(cid) is None and not (resume / cid).exists()]
    if dry_run:
        stats.ids = order
        stats.chunks_fetched = len(need)
        stats.bytes_on_wire = sum(lengths[c] for c in need)  # uncompressed: an upper bound
        return stats
    kept_before = {cid for cid in lengths if (resume / cid).exists()}  # from a pull that was cut short
    _prefetch(cache, need, lengths, resume, stats, progress, meter)
    dctx = zstandard.ZstdDecompressor()
    for oid in order:
        rec = records[oid]
        stats.ids.append(oid)
        staged = store.staging_dir("pull") / "object"
        try:
            with open(staged, "wb") as out:
                for cid, length in rec.chunks:
                    out.write(_chunk(store, cache, dctx, resume, cid, length, stats, kept_before))
            kind_check(rec, staged)
            store.add_file(staged, move=True, expect=oid, kind=rec.kind, refs=rec.refs)
        except HashMismatch as exc:
            raise CastoreError(f"object {oid} from {cache.url} reassembles to {exc.actual}",
                               "the cache is corrupt; nothing was added") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            with contextlib.suppress(OSError):
                staged.parent.rmdir()
        offset = 0
        index = []
        for cid, length in rec.chunks:
            index.append((cid, offset, length))
            offset += length
        store.record_chunks(oid, index)
        for cid, _ in rec.chunks:
            with contextlib.suppress(FileNotFoundError):
                (resume / cid).unlink()
        stats.objects += 1
        progress(f"pulled {rec.kind} {oid[:12]}")
    return stats


def _prefetch(cache: Transport, need: list[str], lengths: dict[str, int], resume: Path, stats: CopyStats,
              progress: Progress, meter: Meter | None = None, workers: int = 8) -> None:
    """Fetch and verify chunks in parallel into the resume cache; memory: one chunk per worker."""
    if not need:
        return
    from concurrent.futures import ThreadPoolExecutor

    total = sum(lengths[c] for c in need)
    done = 0
    started = time.monotonic()

    def one(cid: str) -> int:
        dctx = zstandard.ZstdDecompressor()
        return _fetch_chunk(cache, dctx, resume, cid, lengths[cid])

    fetched = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for cid, wire in zip(need, pool.map(one, need), strict=True):
            stats.chunks_fetched += 1
            stats.bytes_on_wire += wire
            done += 1
            fetched += lengths[cid]
            if meter is not None:
                meter(fetched, total)
            elif done % 64 == 0 or done == len(need):
                rate = stats.bytes_on_wire / max(time.monotonic() - started, 1e-6)
                progress(f"fetched {done}/{len(need)} chunks, {stats.bytes_on_wire >> 20} MiB "
                         f"of ~{total >> 20} MiB, {rate / 2**20:.1f} MiB/s")


def _fetch_chunk(cache: Transport, dctx: zstandard.ZstdDecompressor, resume: Path, cid: str, length: int) -> int:
    """Fetch, decompress and verify one chunk into the resume cache; returns the bytes moved."""
    frame = cache.get(chunk_path(cid))
    if frame is None:
        raise NotFound(f"{cache.url} lacks chunk {cid}", "the cache is incomplete; nothing was added")
    try:
        data = dctx.decompress(frame, max_output_size=length)
    except zstandard.ZstdError as exc:
        raise CastoreError(f"chunk {cid} from {cache.url} is not a valid zstd frame: {exc}",
                           "the cache is corrupt; nothing was added") from exc
    if len(data) != length:
        raise CastoreError(f"chunk {cid} from {cache.url} is {len(data)} bytes, its record says {length}",
                           "the cache is corrupt; nothing was added")
    try:
        check_chunk(cid, data)
    except EncodingError as exc:
        raise CastoreError(f"{exc.message} (from {cache.url})", "the cache is corrupt; nothing was added") from exc
    tmp = resume / f".{cid}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_bytes(data)
    os.replace(tmp, resume / cid)
    return len(frame)


def _chunk(store: LocalStore, cache: Transport, dctx: zstandard.ZstdDecompressor, resume: Path,
           cid: str, length: int, stats: CopyStats, kept_before: set[str]) -> bytes:
    local = store.find_chunk(cid)
    if local is not None:
        path, offset, n = local
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(n)
        if n == length and _ok(cid, data):
            stats.chunks_seeded += 1
            return data
    kept = resume / cid
    if kept.exists():
        data = kept.read_bytes()
        if len(data) == length and _ok(cid, data):
            stats.chunks_seeded += cid in kept_before
            return data
    wire = _fetch_chunk(cache, dctx, resume, cid, length)
    stats.chunks_fetched += 1
    stats.bytes_on_wire += wire
    return kept.read_bytes()


def _ok(cid: str, data: bytes) -> bool:
    try:
        check_chunk(cid, data)
    except EncodingError:
        return False
    return True


def kind_check(rec: ObjectRecord, path: Path) -> None:
    """Trees and images must decode before they enter the store."""
    if rec.kind == "tree":
        refs = Tree.decode(path.read_bytes()).refs()
    elif rec.kind == "image":
        refs = Image.decode(path.read_bytes()).refs()
    else:
        return
    if sorted(refs) != sorted(rec.refs):
        raise CastoreError(f"{rec.kind} {rec.id}: its record's references do not match its manifest")


def substitute(store: LocalStore, caches: list[Transport], plan_hash: str, trust: Trust,
               note: Progress = lambda s: None) -> tuple[str, bytes] | None:
    """Find a trusted realisation of plan_hash in the caches (in order) and pull its object.

    Returns (object id, plan record), or None when no cache has a usable one:
    unsigned, untrusted, revoked or mis-addressed realisations are skipped with a note.
    """
    for cache in caches:
        try:
            data = cache.get(realisation_path(plan_hash))
            if data is None:
                continue
            rec = RealisationRecord.decode(plan_hash, data)
            signer = trust.signer(rec)
            if signer is None:
                note(f"{cache.url}: realisation of plan {plan_hash[:12]} has no signature from a trusted key; "
                     "not used")
                continue
            pull(store, cache, [rec.object])
            return rec.object, rec.record
        except CastoreError as exc:
            note(f"{cache.url}: cannot substitute plan {plan_hash[:12]}: {exc.message}")
    return None
