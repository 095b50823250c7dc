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
from typing import BinaryIO, Generic, NamedTuple, TypeVar, cast

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
from castore.fsutil import copy_range, free_bytes, pwrite_all, start_writeback
from castore.hashing import hash_file
from castore.store import LocalStore, store_os_error

_T = TypeVar("_T")
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
        chunks = cut_file(path, config.chunking)
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
    level = sorted({oid for oid in ids if not store.has(oid)})
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
        level = sorted(r for r in refs if r not in records and not store.has(r))
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
    stats = CopyStats(present=len([o for o in wanted if store.has(o)]))
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
        order = [oid for oid in order if not store.has(oid)]  # a pull we waited for may have added some
        stats.present = len([o for o in wanted if store.has(o)])
        _Assembly(store, cache, records, order, stats, progress, meter).run()
    return stats


class _Run:
    """Chunks of one object that lie end to end in one local blob: copied with one call."""

    __slots__ = ("at", "chunks", "offset", "path", "size")

    def __init__(self, path: Path, offset: int, at: int, chunks: list[tuple[str, int]]) -> None:
        self.path, self.offset, self.at = path, offset, at  # in the blob, in the object
        self.chunks = chunks
        self.size = sum(n for _, n in chunks)

    def extend(self, path: Path, offset: int, at: int, cid: str, length: int) -> bool:
        if not self.chunks or path != self.path or offset != self.offset + self.size or at != self.at + self.size:
            return False
        self.chunks.append((cid, length))
        self.size += length
        return True


class _Assembly:
    """Objects put together in ``tmp/pulls/<id>``: every chunk is verified before it is written,
    every object is verified whole before it enters the store.

    A partial object stays when a pull fails or is killed; the next pull keeps each of its
    chunks that still hashes right and fetches only the rest. Chunks come from, in order:
    that partial object, the local blobs holding them (the chunk index), the cache.

    The trees and images of the pull are fetched first and checked (whole hash, then
    :func:`kind_check`) before any object enters the store, so a hostile manifest adds
    nothing, not even the blobs it names.
    """

    def __init__(self, store: LocalStore, cache: Transport, records: dict[str, ObjectRecord], order: list[str],
                 stats: CopyStats, progress: Progress, meter: Meter | None) -> None:
        self.store, self.cache, self.records, self.order = store, cache, records, order
        self.stats, self.progress, self.meter = stats, progress, meter
        self.dir = store.tmp / "pulls"
        self.dir.mkdir(exist_ok=True)
        self.left: dict[str, int] = {}  # object -> chunks still to write
        self.dests: dict[str, list[tuple[str, int]]] = {}  # chunk to fetch -> (object, offset) to write it at
        self.lengths: dict[str, int] = {}
        self.fds: dict[str, int] = {}
        self.done = 0  # objects of self.order added to the store
        self.local = store.find_chunks(cid for oid in order for cid, _ in records[oid].chunks)
        self.runs: list[tuple[str, _Run]] = []  # (object, run of chunks to copy from a local blob)
        self.stopping = False  # set when the fetch failed: _copy_runs, in its thread, stops
        self.seeded: set[str] = set()  # objects with chunks copied from local blobs
        self.manifests = {oid for oid in order if records[oid].kind != "blob"}  # not yet checked

    def run(self) -> None:
        try:
            for oid in self.order:
                self._plan(oid)
            if self.dests and self.runs:
                # the kernel copies the seeded runs on the other core while this one fetches
                copier = _Background(self._copy_runs)
                try:
                    self._fetch()
                except BaseException:
                    self.stopping = True  # the copier stops at its next piece
                    copier.wait()  # its own error, if any, matters less than this one
                    raise
                missed = copier.result()
            else:
                missed = self._copy_runs()
            self._copied(missed)
            self._fetch()  # all of it, or what a local blob shorter than the index said did not give
            self._finish_ready()
        except OSError as exc:
            raise store_os_error(exc, self.store.root, retry="nothing unverified was added; free space "
                                 "(castore gc also removes partial pulls) and pull again: what was verified "
                                 "is kept") from exc
        finally:
            for fd in self.fds.values():
                os.close(fd)

    def _fd(self, oid: str) -> int:
        fd = self.fds.get(oid)
        if fd is None:
            if len(self.fds) >= 64:
                os.close(self.fds.pop(next(iter(self.fds))))
            fd = self.fds[oid] = os.open(self.dir / oid, os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _plan(self, oid: str) -> None:
        rec = self.records[oid]
        fd = self._fd(oid)
        size = os.fstat(fd).st_size
        resumed = size == rec.size > 0
        if size != rec.size:
            if size:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, rec.size)  # sparse until written
        self.left[oid] = 0
        run = _Run(Path(), 0, 0, [])
        offset = 0
        for cid, length in rec.chunks:
            if resumed and _ok(cid, os.pread(fd, length, offset)):
                self.stats.chunks_seeded += 1
            elif (local := self.local.get(cid)) is not None and local[2] == length:
                self.left[oid] += 1  # until copied
                if not run.extend(local[0], local[1], offset, cid, length):
                    if run.chunks:
                        self.runs.append((oid, run))
                    run = _Run(local[0], local[1], offset, [(cid, length)])
            else:
                self._need(oid, cid, length, offset)
            offset += length
        if run.chunks:
            self.runs.append((oid, run))

    def _need(self, oid: str, cid: str, length: int, offset: int) -> None:
        self.dests.setdefault(cid, []).append((oid, offset))
        self.lengths[cid] = length
        self.left[oid] += 1

    def _copy_runs(self) -> list[tuple[str, list[tuple[str, int, int]]]]:
        """Copy each run of chunks that lie end to end in one local blob, in the kernel, with one
        call for the lot; return, per run, the chunks not copied (the blob is shorter than the
        index says: they are fetched instead). Store blobs were verified when they came in, so the
        chunks are not hashed again here: the whole object is, before it is added.
        Runs in a thread of its own beside _fetch: it opens its own descriptors."""
        missed: list[tuple[str, list[tuple[str, int, int]]]] = []
        sources: dict[Path, int] = {}
        dest: tuple[str, int] | None = None  # the runs of an object come one after another
        try:
            for oid, run in self.runs:
                src = sources.get(run.path)
                if src is None:
                    if len(sources) >= 64:
                        os.close(sources.pop(next(iter(sources))))
                    src = sources[run.path] = os.open(run.path, os.O_RDONLY)
                if dest is not None and dest[0] != oid:
                    fd, dest = dest[1], None
                    _written(fd)
                if dest is None:
                    dest = (oid, os.open(self.dir / oid, os.O_WRONLY))
                done = 0
                while done < run.size and not self.stopping:  # in pieces, to stop soon when told
                    want = min(run.size - done, _COPY_PIECE)
                    got = copy_range(src, dest[1], want, run.offset + done, run.at + done)
                    done += got
                    if got < want:
                        break  # the blob is shorter than the index says
                if self.stopping:
                    break  # the pull failed: what this returns is not used
                at, lost = run.at, []
                for cid, length in run.chunks:
                    if at + length > run.at + done:
                        lost.append((cid, length, at))
                    at += length
                missed.append((oid, lost))
        finally:
            for fd in sources.values():
                os.close(fd)
            if dest is not None:
                _written(dest[1])
        return missed

    def _copied(self, missed: list[tuple[str, list[tuple[str, int, int]]]]) -> None:
        for (oid, run), (_, lost) in zip(self.runs, missed, strict=True):
            self.left[oid] -= len(run.chunks)
            self.stats.chunks_seeded += len(run.chunks) - len(lost)
            if len(lost) < len(run.chunks):
                self.seeded.add(oid)
            for cid, length, at in lost:
                self._need(oid, cid, length, at)
        self.runs.clear()

    def _fetch(self) -> None:
        # manifests first: nothing is added before they are checked, so blobs would wait for them
        first = [cid for cid, at in self.dests.items() if any(oid in self.manifests for oid, _ in at)]
        later = set(self.dests).difference(first)
        need = first + [cid for cid in self.dests if cid in later]
        if not need:
            return
        dests, self.dests = self.dests, {}
        total = sum(self.lengths[c] for c in need)
        fetched = 0  # of this call: a second one fetches what a short local blob lacked
        started = time.monotonic()
        dctx = zstandard.ZstdDecompressor()
        stats = self.stats
        limit = frame_limit(max(self.lengths.values()))
        for count, (path, frame) in enumerate(self.cache.get_many([chunk_path(c) for c in need], limit), 1):
            cid = path.rpartition("/")[2]
            data = _verified(self.cache, dctx, cid, self.lengths[cid], frame)
            for oid, offset in dests[cid]:
                fd = self._fd(oid)
                pwrite_all(fd, data, offset)
                self.left[oid] -= 1
            if fetched // _WRITEBACK != (fetched + len(data)) // _WRITEBACK:
                start_writeback(fd)  # the disk keeps up with the network; the final fsync waits for less
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

    def _finish_ready(self) -> None:
        """Add, refs first, every object whose chunks are all written, once every manifest is checked."""
        if self.manifests:
            for oid in [o for o in self.manifests if self.left[o] == 0]:
                self._check(oid)
            if self.manifests:
                return
        while self.done < len(self.order) and self.left[self.order[self.done]] == 0:
            oid = self.order[self.done]
            self._add(oid)
            self.done += 1

    def _known(self, oids: list[str]) -> dict[str, tuple[str, int]]:
        """(kind, size) of objects: from this pull's records, else from the store (one query per 500)."""
        known = {o: (self.records[o].kind, self.records[o].size) for o in oids if o in self.records}
        return known | self.store.kinds_and_sizes(o for o in oids if o not in known)

    def _check(self, oid: str) -> None:
        """A tree or image put together: it must hash to its id and pass kind_check."""
        self._close(oid)
        staged = self.dir / oid
        try:
            actual = hash_file(staged)
            if actual != oid:
                raise HashMismatch(str(staged), oid, actual)
            kind_check(self.records[oid], staged.read_bytes(), self._known)
        except HashMismatch as exc:
            staged.unlink(missing_ok=True)
            raise self._reassembly_error(oid, exc) from exc
        except EncodingError:
            staged.unlink(missing_ok=True)
            raise
        self.manifests.discard(oid)

    def _reassembly_error(self, oid: str, exc: HashMismatch) -> CastoreError:
        if oid in self.seeded:
            return CastoreError(f"object {oid} reassembles to {exc.actual}: a local blob it took chunks "
                                "from is corrupt, or the cache's record lies",
                                "run `castore verify`; nothing was added")
        return CastoreError(f"object {oid} from {self.cache.url} reassembles to {exc.actual}",
                            CORRUPT)  # every chunk hashed right

    def _close(self, oid: str) -> None:
        fd = self.fds.pop(oid, None)
        if fd is not None:
            os.close(fd)

    def _add(self, oid: str) -> None:
        rec = self.records[oid]
        self._close(oid)
        staged = self.dir / oid
        try:
            self.store.add_file(staged, move=True, expect=oid, kind=rec.kind, refs=rec.refs)
        except HashMismatch as exc:
            staged.unlink(missing_ok=True)
            raise self._reassembly_error(oid, exc) from exc
        index = []
        offset = 0
        for cid, length in rec.chunks:
            index.append((cid, offset, length))
            offset += length
        self.store.record_chunks(oid, index, [(c.id, c.data) for c in rec.chunk_lists()])
        self.stats.objects += 1
        self.stats.ids.append(oid)
        self.progress(f"pulled {rec.kind} {oid[:12]}")


_WRITEBACK = 8 << 20
_COPY_PIECE = 64 << 20


def _written(fd: int) -> None:
    try:
        start_writeback(fd)  # the copied bytes go to disk while the rest is fetched
    finally:
        os.close(fd)


class _Background(Generic[_T]):
    """fn called in a thread of its own; result() waits for it and returns what it returned or
    raises what it raised."""

    def __init__(self, fn: Callable[[], _T]) -> None:
        import threading

        self._value: _T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._call, args=(fn,), daemon=True)
        self._thread.start()

    def _call(self, fn: Callable[[], _T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> _T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(_T, self._value)


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
                    note(f"{cache.url}: {exc.message}; not asked again in this run")
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
