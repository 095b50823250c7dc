"""The one verb that moves closures: push (store -> cache) and pull (cache -> store).

Push chunks each blob (recording the chunks in the store's chunk index),
uploads only chunks the cache lacks, then publishes the object record, refs
first. Pull reads the closure's records, takes every chunk it can from local
blobs through the chunk index (the seed), fetches the rest in one pipelined
stream, verifies each chunk as it is written into the object's partial file
under ``tmp/pulls``, and adds the object once it hashes whole. A pull that is
killed leaves its partial objects; the next one keeps every chunk in them
that still verifies.

Everything a cache serves is untrusted: records must decode in full (see
:mod:`castore.cache.layout`), no chunk may be longer than the cache's chunking
maximum (so a record cannot make a pull allocate what it never verifies), and
a tree's file sizes must be those of its blobs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from castore.cache.layout import (
    CONFIG,
    CORRUPT,
    LIST_BYTES,
    CacheConfig,
    ObjectRecord,
    RealisationRecord,
    check_chunk,
    chunk_path,
    frame_limit,
    kind_check,
    merged_realisation,
    object_path,
    realisation_path,
    unframe,
)
from castore.cache.transport import Transport
from castore.cache.trust import Trust, signed
from castore.chunking import Chunk, ChunkParams, cut_file
from castore.errors import CastoreError, EncodingError, HashMismatch, NotFound, StoreError
from castore.fsutil import DirectWriter, free_bytes, pwrite_all
from castore.hashing import Hasher
from castore.store import DAMAGED, LocalStore, store_os_error

Progress = Callable[[str], None]
Meter = Callable[[int, int], None]  # (bytes of chunk data fetched so far, bytes to fetch in all)


@dataclass
class CopyStats:
    objects: int = 0  # objects copied
    present: int = 0  # objects the destination already had
    chunks_sent: int = 0
    chunks_fetched: int = 0
    chunks_seeded: int = 0  # taken from local blobs or the resume cache
    lists: int = 0  # list chunks (the chunk lists of large objects, see layout.ChunkList) sent or fetched
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
    try:
        return CacheConfig.decode(data)
    except EncodingError as exc:
        raise CastoreError(f"{cache.url}/{exc.message}", exc.hint or "is this the URL or directory of a castore "
                           "cache? a static server must serve the cache directory itself") from exc


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
         secrets: list[str] | None = None, trust: Trust | None = None) -> CopyStats:
    """Upload closures, then realisations: those of what the store built, signed with the secret
    keys; those it substituted, with the signatures of keys trust still believes (none: not
    passed on)."""
    with store.lock("gc", shared=True):  # what is being pushed must not be collected halfway
        return _push(store, cache, ids, progress, secrets, trust or Trust())


def _push(store: LocalStore, cache: Transport, ids: Iterable[str], progress: Progress,
          secrets: list[str] | None, trust: Trust) -> CopyStats:
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
        try:
            chunks = cut_file(path, config.chunking, expect=oid)
        except FileNotFoundError:
            raise StoreError(f"object {oid} has lost its file in the store at {store.root}", DAMAGED) from None
        except HashMismatch as exc:  # sent, it would reach every puller as the cache's corruption
            raise StoreError(f"object {oid} is damaged in the store at {store.root}: its file hashes to "
                             f"{exc.actual}; nothing of it was pushed", DAMAGED) from None
        record = ObjectRecord(oid, info.kind, info.size, info.refs, tuple((c.id, c.length) for c in chunks))
        lists = {chunk_path(c.id): c for c in record.chunk_lists(config.listed)}
        store.record_chunks(oid, [(c.id, c.offset, c.length) for c in chunks], [(c.id, c.data) for c in lists.values()])
        wanted = {chunk_path(c.id): c for c in chunks}
        todo = cache.missing(wanted)
        with open(path, "rb") as f:
            cache.put_many(_frames(f, [wanted[cpath] for cpath in sorted(todo)], cctx, stats))
        progress(f"pushed {info.kind} {oid[:12]} ({len(todo)} of {len(chunks)} chunks new)")
        if lists:  # published before the record that names them
            frames = {p: cctx.compress(lists[p].data) for p in sorted(cache.missing(lists))}
            cache.put_many(frames.items())
            stats.lists += len(frames)
            stats.bytes_on_wire += sum(map(len, frames.values()))
        data = record.encode(config.listed)
        cache.put(object_path(oid), data)
        stats.bytes_on_wire += len(data)
        stats.objects += 1
    for oid in stats.ids:  # published last: they name objects already there
        for plan_hash, plan_record in store.realisations_of(oid):
            came = _substituted(store, plan_hash, oid, plan_record)
            if came is not None:  # this store did not build it, so it does not sign it (as Nix signs
                vouching = trust.vouching(came) if came.signatures else ()  # only what it builds)
                if not vouching:
                    progress(f"realisation of plan {plan_hash[:12]} not pushed: it was substituted, and no "
                             "key this machine trusts vouches for it (now)")
                    continue
                new = RealisationRecord(plan_hash, oid, plan_record, vouching).encode()
            elif secrets:
                new = signed(RealisationRecord(plan_hash, oid, plan_record), secrets).encode()
            else:
                continue
            old = cache.get(realisation_path(plan_hash))
            data = merged_realisation(plan_hash, old, new)  # keeps the signatures of others for the same object
            if data != old:
                cache.put(realisation_path(plan_hash), data)
                stats.realisations += 1
    return stats


def _substituted(store: LocalStore, plan_hash: str, oid: str, plan_record: bytes) -> RealisationRecord | None:
    """The realisation the store kept for a plan it substituted, when it agrees with what the
    store holds (else the store built the plan since: None); without signatures when it was
    substituted before castore kept them (store schema 3)."""
    came = store.substitution(plan_hash)
    if came is None:
        return None
    if not came[1]:
        return RealisationRecord(plan_hash, oid, plan_record)
    try:
        rec = RealisationRecord.decode(plan_hash, came[1])
    except EncodingError:
        return RealisationRecord(plan_hash, oid, plan_record)
    return rec if rec.object == oid and rec.record == plan_record else None


def _frames(f: BinaryIO, chunks: list[Chunk], cctx: zstandard.ZstdCompressor,
            stats: CopyStats) -> Iterator[tuple[str, bytes]]:
    """(cache path, zstd frame) of each chunk, read and compressed as the upload asks for it."""
    for c in chunks:
        frame = cctx.compress(os.pread(f.fileno(), c.length, c.offset))
        stats.chunks_sent += 1
        stats.bytes_on_wire += len(frame)
        yield chunk_path(c.id), frame


def fetch_records(store: LocalStore, cache: Transport, ids: Iterable[str], stats: CopyStats,
                  chunking: ChunkParams) -> dict[str, ObjectRecord]:
    """The records of every object of the closures that the store lacks, with their chunk
    lists (their bytes on the wire, and the list chunks fetched, are added to stats).

    The objects must fit in the space the store has left before their chunk lists are read, dry
    run or not: a record's size is the cache's word, and a small record naming one list chunk
    again and again would otherwise take gigabytes of memory to plan, and write until the disk
    was full.

    One batch of requests per level of references: a tree's thousands of blobs in one pipeline,
    then one for the list chunks of the level's large objects. A record at odds with the cache's
    chunking (ObjectRecord.check_chunks) is corrupt.
    """
    records: dict[str, ObjectRecord] = {}
    # what the store has, down to the last blob of its closure, is fetched only where damaged
    level = sorted(store.absent(store.closure(ids)))
    room = _Room(free_bytes(store.tmp), store.tmp / "pulls")
    while level:
        refs: set[str] = set()
        listed: list[ObjectRecord] = []
        for path, data in cache.get_many([object_path(oid) for oid in level]):
            oid = path.rpartition("/")[2]
            if data is None:
                raise NotFound(f"{cache.url} has no object {oid}")
            rec = records[oid] = ObjectRecord.decode(oid, data)
            stats.bytes_on_wire += len(data)
            room.need(rec)
            refs.update(rec.refs)
            if not rec.complete:
                listed.append(rec)
        if listed:  # the pieces of chunk lists local blobs share are not fetched
            for rec in _resolved(cache, listed, chunking, stats, store.find_lists):
                records[rec.id] = rec
        for oid in level:
            records[oid].check_chunks(chunking)
        level = sorted(store.absent(r for r in refs if r not in records))
    return records


class _Room:
    """What the objects of a pull need against what the store's filesystem has left, counting the
    partial objects of an earlier pull as room: they are overwritten in place."""

    def __init__(self, free: int, pulls: Path) -> None:
        self.free, self.pulls, self.needed = free, pulls, 0

    def need(self, rec: ObjectRecord) -> None:
        self.needed += rec.size
        with contextlib.suppress(OSError):
            self.free += (self.pulls / rec.id).stat().st_blocks * 512
        if self.needed > self.free:
            raise CastoreError(  # not the store's failure: another cache may record a size that fits
                f"the objects of this pull take at least {self.needed / 2**20:,.1f} MiB and the store's "
                f"filesystem has {self.free / 2**20:,.1f} MiB free ({rec.kind} {rec.id} alone: "
                f"{rec.size / 2**20:,.1f} MiB, as the cache records it)",
                "free space (castore gc) or pull into a store on a larger filesystem; nothing was added")


def record_of(cache: Transport, oid: str) -> ObjectRecord:
    """One object's record with its chunks, as a cache has it."""
    data = cache.get(object_path(oid))
    if data is None:
        raise NotFound(f"{cache.url} has no object {oid}")
    rec = ObjectRecord.decode(oid, data)
    return _resolved(cache, [rec], cache_config(cache, create=False).chunking, CopyStats(), lambda ids: {})[0]


def _resolved(cache: Transport, listed: list[ObjectRecord], chunking: ChunkParams, stats: CopyStats,
              local: Callable[[set[str]], dict[str, bytes]]) -> list[ObjectRecord]:
    """Format 3 records with their chunks: their counts checked before anything is fetched,
    then each list chunk once, from local (the store's) or else the cache."""
    for rec in listed:
        rec.check_count(sum(count for _, count, _ in rec.lists), chunking)
    ids = {lid for rec in listed for lid, _, _ in rec.lists}
    found = local(ids)
    fetched, n = _chunk_lists(cache, sorted(ids - set(found)))
    found |= fetched
    stats.bytes_on_wire += n
    stats.lists += len(fetched)
    return [rec.resolve(found.get, chunking) for rec in listed]


def _chunk_lists(cache: Transport, ids: list[str]) -> tuple[dict[str, bytes], int]:
    """The list chunks a cache has of these (decompressed; each is checked against its id as it
    is used), and their bytes on the wire."""
    found: dict[str, bytes] = {}
    wire = 0
    dctx = zstandard.ZstdDecompressor()
    for path, frame in cache.get_many([chunk_path(lid) for lid in ids], frame_limit(LIST_BYTES)):
        if frame is None:
            continue
        lid = path.rpartition("/")[2]
        try:
            found[lid] = unframe(frame, LIST_BYTES, dctx, most=f"a list chunk may hold ({LIST_BYTES} bytes)")
        except EncodingError as exc:
            raise CastoreError(f"list chunk {lid} from {cache.url}: {exc.message}", CORRUPT) from exc
        wire += len(frame)
    return found, wire


def pull(store: LocalStore, cache: Transport, ids: Iterable[str], *, dry_run: bool = False,
         progress: Progress = lambda s: None, meter: Meter | None = None,
         kinds: dict[str, str] | None = None) -> CopyStats:
    """kinds: what the caller knows some ids to be (a realisation of a plan that makes an image);
    a cache whose record says otherwise is refused before anything is fetched."""
    with store.lock("gc", shared=True):  # gc must not sweep the partial objects of a running pull
        return _pull(store, cache, list(ids), dry_run, progress, meter, kinds or {})


def _pull(store: LocalStore, cache: Transport, wanted: list[str], dry_run: bool, progress: Progress,
          meter: Meter | None, kinds: dict[str, str]) -> CopyStats:
    config = cache_config(cache, create=False)
    stats = CopyStats(present=len(set(wanted) - store.absent(wanted)))
    records = fetch_records(store, cache, wanted, stats, config.chunking)
    for oid, kind in kinds.items():  # a record's kind is the cache's word: its content may say otherwise
        said = records[oid].kind if oid in records else store.kinds_and_sizes([oid]).get(oid, (kind, 0))[0]
        if said != kind:
            where = f"{cache.url} records" if oid in records else "the store holds"
            raise CastoreError(f"{where} object {oid} as a {said}, but it was asked for as a {kind}",
                               CORRUPT if oid in records else "run `castore verify`")
    order = _refs_first(records, lambda o: [r for r in records[o].refs if r in records])
    if dry_run:
        lengths = {cid: n for oid in order for cid, n in records[oid].chunks}
        local = store.find_chunks(lengths)
        need = [cid for cid in lengths if cid not in local]
        stats.ids = order
        stats.chunks_fetched = len(need)
        stats.chunks_seeded = len(lengths) - len(need)
        stats.bytes_on_wire = sum(lengths[c] for c in need)  # uncompressed chunk data; records left out
        return stats
    with store.lock("pull"):  # one pull at a time writes the partial objects
        absent = store.absent(order)
        order = [oid for oid in order if oid in absent]  # a pull we waited for may have added some
        stats.present = len(set(wanted) - store.absent(wanted))
        _Assembly(store, cache, records, order, stats, progress, meter).run()
    return stats


_RETRY = ("nothing unverified was added; free space (castore gc also removes partial pulls) and pull again: "
          "what was verified is kept")


class _Assembly:
    """Objects put together in ``tmp/pulls/<id>``: every chunk is verified before it is written,
    every object is verified whole before it enters the store.

    Bytes come from, in order of preference: the object's partial file (a pull that failed or was
    killed leaves it; each of its chunks that still hashes right is kept), the local blobs holding
    them (the chunk index), the cache. One object at a time, in the order the cache's chunks are
    fetched, is written front to back and hashed on the way, so it is not read again: a large
    one through a DirectWriter (not left in the page cache), a small one through the page cache
    chunk by chunk (_WriteThrough). Chunks that come before their turn (one that appears twice,
    one that another object needed first) wait in their object's partial file.

    The trees and images of the pull are put together first and checked (whole hash, then
    :func:`kind_check`) before any object enters the store, so a hostile manifest adds
    nothing, not even the blobs it names.
    """

    def __init__(self, store: LocalStore, cache: Transport, records: dict[str, ObjectRecord], order: list[str],
                 stats: CopyStats, progress: Progress, meter: Meter | None) -> None:
        self.store, self.cache, self.records, self.order = store, cache, records, order
        self.stats, self.progress, self.meter = stats, progress, meter
        self.dir = store.tmp / "pulls"
        self.dir.mkdir(exist_ok=True)
        self.dests: dict[str, list[tuple[str, int]]] = {}  # chunk to fetch -> (object, position) it goes to
        self.lengths: dict[str, int] = {}
        self.fds = _Descriptors(os.O_RDWR)  # partial files
        self.blobs = _Descriptors(os.O_RDONLY)  # local blobs read for their chunks
        self.done = 0  # objects of self.order added to the store
        self.local = store.find_chunks(cid for oid in order for cid, _ in records[oid].chunks)
        self.manifests = {oid for oid in order if records[oid].kind != "blob"}  # not yet checked
        self.queue = [o for o in order if o in self.manifests] + [o for o in order if o not in self.manifests]
        self.sinks = {oid: _Sink(records[oid]) for oid in order}
        self.whole: set[str] = set()  # objects written and hashed right
        self.seeded: set[str] = set()  # objects with chunks taken from local blobs
        self.current: _Writing | None = None  # the object being written
        self.next = 0  # in self.queue: the one to write after it
        self.indexed: list[tuple[str, list[tuple[str, int, int]], list[tuple[str, bytes]]]] = []
        self.flushed = time.monotonic()

    def run(self) -> None:
        """Objects enter the store in batches (one syncfs and one transaction for each, not an
        fsync and a transaction per object: a tree's thousands of blobs): small ones every second
        at most, waiting in their partial files; large ones as soon as they are whole."""
        try:
            with self.store.batch():
                try:
                    for oid in self.order:
                        self._plan(oid)
                    self._prefetch()
                    self._advance()
                    while self.dests:  # again for what a local blob shorter than the index said did not give
                        self._fetch()
                    self._finish_ready()
                except BaseException:
                    with contextlib.suppress(CastoreError, OSError):  # what failed first says more
                        self._flush()  # what was added goes in: the next pull need not fetch it
                    raise
                self._flush()
        except BaseException as exc:
            if self.current is not None:
                try:
                    self.current.writer.drain()  # the next pull keeps what this one verified
                except OSError as disk:  # the store's trouble, not the cache's: said as such
                    raise store_os_error(disk, self.store.root, retry=_RETRY) from exc
            if isinstance(exc, OSError):
                raise store_os_error(exc, self.store.root, retry=_RETRY) from exc
            raise
        finally:
            if self.current is not None:
                self._close_current()
            self.fds.close()
            self.blobs.close()

    def _fd(self, oid: str, create: bool = True) -> int:
        """The partial file's descriptor (-1: there is none, and create is False)."""
        try:
            return self.fds.get(self.dir / oid, create=create)
        except FileNotFoundError:
            if create:
                raise
            return -1

    def _flush(self) -> None:
        self.store.flush()
        self.store.record_chunk_index(self.indexed)
        self.indexed.clear()
        self.flushed = time.monotonic()

    def _plan(self, oid: str) -> None:
        rec = self.records[oid]
        sink = self.sinks[oid]
        small = rec.size < _SMALL_OBJECT  # its file is made when its first bytes come
        fd = self._fd(oid, create=not small)
        size = os.fstat(fd).st_size if fd >= 0 else 0
        if size > rec.size:  # DirectWriter was killed between its padded last block and the cut
            os.ftruncate(fd, rec.size)
            size = rec.size
        if not small and size != rec.size:
            os.ftruncate(fd, rec.size)  # sparse until written: pieces and checkpoints land at their offsets
        for index, (cid, length) in enumerate(rec.chunks):
            offset = sink.offsets[index]
            if size and _ok(cid, os.pread(fd, length, offset)):  # what an earlier pull verified
                sink.ready[index] = None
                self.stats.chunks_seeded += 1
            elif (local := self.local.get(cid)) is not None and local[2] == length:
                sink.ready[index] = (local[0], local[1])
            else:
                self._need(oid, cid, index)

    def _prefetch(self, most: int = 512 << 20) -> None:
        """Ask the kernel to read the local blobs' runs (the first `most` bytes, in the order they
        will be wanted) while the cache's chunks are fetched: a blob a pull just wrote is not in
        the page cache."""
        for oid in self.queue:
            sink = self.sinks[oid]
            run: tuple[Path, int, int] | None = None  # blob, offset, length
            for index, where in sorted((i, w) for i, w in sink.ready.items() if w is not None):
                length = sink.chunks[index][1]
                if run is not None and run[0] == where[0] and run[1] + run[2] == where[1]:
                    run = (run[0], run[1], run[2] + length)
                    continue
                if run is not None:
                    most -= self._willneed(*run)
                    if most <= 0:
                        return
                run = (where[0], where[1], length)
            if run is not None:
                most -= self._willneed(*run)
                if most <= 0:
                    return

    def _willneed(self, path: Path, offset: int, length: int) -> int:
        os.posix_fadvise(self._blob(path), offset, length, os.POSIX_FADV_WILLNEED)
        return length

    def _blob(self, path: Path) -> int:
        return self.blobs.get(path)

    def _need(self, oid: str, cid: str, index: int) -> None:
        self.dests.setdefault(cid, []).append((oid, index))
        self.lengths[cid] = self.records[oid].chunks[index][1]

    def _advance(self) -> None:
        """Write the current object on from the bytes at hand; start the next when one is whole."""
        while self.current is not None or self.next < len(self.queue):
            if self.current is None:
                oid = self.queue[self.next]
                self.next += 1
                self.current = self._writing(oid)
            oid, writer, hasher = self.current.oid, self.current.writer, self.current.hasher
            sink = self.sinks[oid]
            while sink.pos < len(sink.offsets) and sink.pos in sink.ready:
                if not self._copy_in(oid, sink, writer):
                    self._short(oid, sink)
                    return
            if sink.pos < len(sink.offsets):
                return  # its next chunk is still to come
            writer.finish()
            self._close_current()
            self._whole(oid, hasher.hexdigest())

    def _short(self, oid: str, sink: _Sink) -> None:
        """The chunk at sink.pos was not all there: fetch it, and, when it came from a local blob
        shorter than the index says, every chunk any object was to take from past the blob's end."""
        where = sink.ready.pop(sink.pos)
        self._need(oid, sink.chunks[sink.pos][0], sink.pos)
        if where is None:
            return
        end = os.fstat(self._blob(where[0])).st_size
        for other, s in self.sinks.items():
            lost = [i for i, w in s.ready.items() if i >= s.pos and w is not None and w[0] == where[0]
                    and w[1] + s.chunks[i][1] > end]  # written ones stay: the blob was whole for them
            for i in lost:
                del s.ready[i]
                self._need(other, s.chunks[i][0], i)

    def _writing(self, oid: str) -> _Writing:
        size = self.records[oid].size
        hasher = Hasher(threads=size >= 4 << 20)
        if size < _SMALL_OBJECT:
            return _Writing(oid, _WriteThrough(size, hasher, lambda: self._fd(oid)), hasher, [])
        fds = [os.open(self.dir / oid, os.O_WRONLY)]
        try:
            fds.append(os.open(self.dir / oid, os.O_WRONLY))  # for checkpoints, without O_DIRECT
            return _Writing(oid, DirectWriter(fds[0], _piece(size), hasher, plain=fds[1]), hasher, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _close_current(self) -> None:
        assert self.current is not None
        writing, self.current = self.current, None
        writing.writer.close()  # its threads must not outlive the descriptors
        for fd in writing.fds:
            os.close(fd)

    def _copy_in(self, oid: str, sink: _Sink, writer: DirectWriter | _WriteThrough, run: bool = True) -> bool:
        """The chunk at sink.pos, from where it waits, into the writer, with those after it that lie
        end to end in the same local blob (one read); False if it was not all there."""
        where = sink.ready[sink.pos]
        length = sink.chunks[sink.pos][1]
        if where is None:
            fd, offset = self._fd(oid), sink.offsets[sink.pos]
        else:
            fd, offset = self._blob(where[0]), where[1]
        space = writer.space()
        count, total = 1, length
        if where is not None and run:
            while (sink.pos + count < len(sink.chunks) and total + sink.chunks[sink.pos + count][1] <= len(space)
                   and sink.ready.get(sink.pos + count) == (where[0], offset + total)):
                total += sink.chunks[sink.pos + count][1]
                count += 1
        if len(space) >= total and os.preadv(fd, [space[:total]], offset) == total:
            writer.commit(total)  # read straight into the writer's buffer, committed once all there
        elif count == 1 and len(space) < length and len(data := os.pread(fd, length, offset)) == length:
            writer.write(data)  # across the buffer's end
        elif count > 1:  # the blob is shorter than the index says: chunk by chunk, to find where
            return self._copy_in(oid, sink, writer, run=False)
        else:
            return False
        if where is not None:
            self.stats.chunks_seeded += count
            self.seeded.add(oid)
        sink.pos += count
        return True

    def _deliver(self, cid: str, data: bytes) -> None:
        for oid, index in self.dests.pop(cid):
            sink = self.sinks[oid]
            if self.current is not None and self.current.oid == oid and sink.pos == index:
                self.current.writer.write(data)
                sink.pos += 1
            else:  # before its turn: it waits in the partial file
                pwrite_all(self._fd(oid), data, sink.offsets[index])
                sink.ready[index] = None
        self._advance()

    def _fetch(self) -> None:
        # manifests first: nothing is added before they are checked, so blobs would wait for them
        first = [cid for cid, at in self.dests.items() if any(oid in self.manifests for oid, _ in at)]
        later = set(self.dests).difference(first)
        need = first + [cid for cid in self.dests if cid in later]
        if not need:
            return
        total = sum(self.lengths[c] for c in need)
        fetched = 0  # of this call: a second one fetches what a short local blob lacked
        started = time.monotonic()
        dctx = zstandard.ZstdDecompressor()
        stats = self.stats
        limit = frame_limit(max(self.lengths[c] for c in need))
        for count, (path, frame) in enumerate(self.cache.get_many([chunk_path(c) for c in need], limit), 1):
            cid = path.rpartition("/")[2]
            data = _verified(self.cache, dctx, cid, self.lengths[cid], frame)
            self._deliver(cid, data)
            stats.chunks_fetched += 1
            stats.bytes_on_wire += len(frame or b"")
            fetched += len(data)
            if self.meter is not None:
                self.meter(fetched, total)
            elif count % 256 == 0 or count == len(need):
                rate = fetched / max(time.monotonic() - started, 1e-6)
                self.progress(f"fetched {count}/{len(need)} chunks, {fetched / 2**20:.1f} MiB "
                              f"of {total / 2**20:.1f} MiB, {rate / 2**20:.1f} MiB/s")
            self._finish_ready()

    def _whole(self, oid: str, actual: str) -> None:
        """An object written: it must hash to its id, and a tree or image pass kind_check."""
        staged = self.dir / oid
        try:
            if actual != oid:
                raise HashMismatch(str(staged), oid, actual)
            if oid in self.manifests:
                kind_check(self.records[oid], staged.read_bytes(), self._known)
        except HashMismatch as exc:
            staged.unlink(missing_ok=True)
            raise self._reassembly_error(oid, exc) from exc
        except EncodingError:
            staged.unlink(missing_ok=True)
            raise
        self.manifests.discard(oid)
        self.whole.add(oid)

    def _finish_ready(self) -> None:
        """Add, refs first, every object written whole, once every manifest is checked."""
        if self.manifests:
            return
        while self.done < len(self.order) and self.order[self.done] in self.whole:
            oid = self.order[self.done]
            self.whole.discard(oid)
            self._add(oid)
            self.done += 1

    def _known(self, oids: list[str]) -> dict[str, tuple[str, int]]:
        """(kind, size) of objects: from this pull's records, else from the store (one query per 500)."""
        known = {o: (self.records[o].kind, self.records[o].size) for o in oids if o in self.records}
        return known | self.store.kinds_and_sizes(o for o in oids if o not in known)

    def _reassembly_error(self, oid: str, exc: HashMismatch) -> CastoreError:
        if oid in self.seeded:
            return CastoreError(f"object {oid} reassembles to {exc.actual}: a local blob it took chunks "
                                "from is corrupt, or the cache's record lies",
                                "run `castore verify`; nothing was added")
        return CastoreError(f"object {oid} from {self.cache.url} reassembles to {exc.actual}",
                            CORRUPT)  # every chunk hashed right

    def _add(self, oid: str) -> None:
        rec = self.records[oid]
        staged = self.dir / oid
        self.fds.drop(staged)
        self.store.add_written(staged, oid, rec.kind, rec.refs)
        index = []
        offset = 0
        for cid, length in rec.chunks:
            index.append((cid, offset, length))
            offset += length
        self.indexed.append((oid, index, [(c.id, c.data) for c in rec.chunk_lists()]))
        self.stats.objects += 1
        self.stats.ids.append(oid)
        self.progress(f"pulled {rec.kind} {oid[:12]}")
        if rec.size >= _SMALL_OBJECT or time.monotonic() - self.flushed > 1.0:
            self._flush()  # a large object goes in at once: its syncfs costs little beside it


class _Descriptors:
    """Files kept open by path, 64 at most: the oldest is closed for a new one."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.open: dict[Path, int] = {}

    def get(self, path: Path, *, create: bool = False) -> int:
        fd = self.open.get(path)
        if fd is None:
            if len(self.open) >= 64:
                os.close(self.open.pop(next(iter(self.open))))
            fd = self.open[path] = os.open(path, self.flags | (os.O_CREAT if create else 0), 0o644)
        return fd

    def drop(self, path: Path) -> None:
        fd = self.open.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


class _WriteThrough:
    """A small object written chunk by chunk through the page cache, hashed on the way: no
    threads, no O_DIRECT, no file before its first bytes (a tree's thousands of blobs).
    DirectWriter's calls, as the pull makes them."""

    def __init__(self, size: int, hasher: Hasher, fd: Callable[[], int]) -> None:
        self.buf = bytearray(size)  # what space() offers to read into
        self.filled = 0
        self.hasher = hasher
        self.fd = fd

    def space(self) -> memoryview:
        return memoryview(self.buf)[self.filled:]

    def commit(self, n: int) -> None:
        view = memoryview(self.buf)[self.filled:self.filled + n]
        pwrite_all(self.fd(), view, self.filled)
        self.hasher.update(view)
        self.filled += n

    def write(self, data: bytes) -> None:
        self.buf[self.filled:self.filled + len(data)] = data
        self.commit(len(data))

    def finish(self) -> int:
        if not self.buf:
            self.fd()  # an empty object: an empty file
        return len(self.buf)

    def drain(self) -> None:
        pass  # all of it is written

    def close(self) -> None:
        pass


class _Writing(NamedTuple):
    oid: str
    writer: DirectWriter | _WriteThrough
    hasher: Hasher
    fds: list[int]  # closed with it


_SMALL_OBJECT = 1 << 20  # objects smaller than this are written through the page cache (_WriteThrough)


class _Sink:
    """Where one object stands: its chunks' offsets, the next one to write, and where those that
    wait are (None: in the partial file; else a local blob's path and offset)."""

    __slots__ = ("chunks", "offsets", "pos", "ready")

    def __init__(self, rec: ObjectRecord) -> None:
        self.chunks = rec.chunks
        self.offsets: list[int] = []
        at = 0
        for _, length in rec.chunks:
            self.offsets.append(at)
            at += length
        self.pos = 0
        self.ready: dict[int, tuple[Path, int] | None] = {}


def _piece(size: int) -> int:
    """DirectWriter's piece for an object: small objects need no 8 MiB of buffers."""
    return min(4 << 20, max(64 << 10, (size + 4095) & ~4095))


def _verified(cache: Transport, dctx: zstandard.ZstdDecompressor, cid: str, length: int, frame: bytes | None) -> bytes:
    if frame is None:
        raise NotFound(f"{cache.url} lacks chunk {cid}", "the cache is incomplete; nothing was added")
    try:
        data = unframe(frame, length, dctx)
    except EncodingError as exc:
        raise CastoreError(f"chunk {cid} from {cache.url}: {exc.message}", CORRUPT) from exc
    if len(data) != length:
        raise CastoreError(f"chunk {cid} from {cache.url} is {len(data)} bytes, its record says {length}",
                           CORRUPT)
    try:
        check_chunk(cid, data)
    except EncodingError as exc:
        raise CastoreError(f"{exc.message} (from {cache.url})", CORRUPT) from exc
    return data


def _ok(cid: str, data: bytes) -> bool:
    try:
        check_chunk(cid, data)
    except EncodingError:
        return False
    return True


class Substituted(NamedTuple):
    object: str
    record: bytes  # the plan record
    realisation: bytes  # the realisation record, with only the signatures this store trusts
    origin: str  # the cache's URL


def substitute(store: LocalStore, caches: list[Transport], plan_hash: str, trust: Trust,
               note: Progress = lambda s: None, down: set[str] | None = None,
               fetch: bool = True, kind: str | None = None) -> Substituted | None:
    """Find a trusted realisation of plan_hash in the caches (in order) and pull its object.

    Returns what was found, or None when no cache has a usable one:
    unsigned, untrusted, revoked or mis-addressed realisations are skipped with a note.
    A cache that cannot be asked at all (down, hung: its retries take minutes) is put in
    `down` and not asked again by the caller's later plans. Without fetch, nothing is pulled:
    the answer says what a substitution would use (a dry run). kind: what the plan makes; an
    object recorded as another kind is not used.
    """
    for cache in caches:
        if down is not None and cache.url in down:
            continue
        try:
            try:
                data = cache.get(realisation_path(plan_hash))
            except CastoreError as exc:
                if down is not None:
                    down.add(cache.url)
                    said = exc.message if cache.url in exc.message else f"{cache.url}: {exc.message}"
                    note(f"{said}; not asked again in this run" + (f" (hint: {exc.hint})" if exc.hint else ""))
                    continue
                raise
            if data is None:
                continue
            rec = RealisationRecord.decode(plan_hash, data)
            vouching = trust.vouching(rec)
            if not vouching:
                note(f"{cache.url}: realisation of plan {plan_hash[:12]} has no signature from a trusted key: "
                     f"it {trust.refusal(rec)}; not used")
                continue
            if fetch:
                pull(store, cache, [rec.object], kinds={rec.object: kind} if kind else None)
            kept = RealisationRecord(rec.plan, rec.object, rec.record, vouching)
            return Substituted(rec.object, rec.record, kept.encode(), cache.url)
        except StoreError:
            raise  # this store cannot take it (a full disk): no other cache, and no build, will do better
        except CastoreError as exc:
            note(f"{cache.url}: cannot substitute plan {plan_hash[:12]}: {exc.message}")
    return None
