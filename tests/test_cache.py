"""push and pull through a directory cache: round trip, dedup, seeding, resume, hostile caches."""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zstandard

from castore import canonical, fsutil
from castore.cache.copy import CopyStats, pull, push, record_of
from castore.cache.layout import CacheConfig, ObjectRecord, RealisationRecord, chunk_path, object_path
from castore.cache.transport import DirTransport, HttpTransport, check_path, open_cache
from castore.chunking import ChunkParams
from castore.errors import CastoreError, EncodingError, NotFound, StoreError
from castore.hashing import hash_bytes
from castore.manifest import Entry, Tree
from castore.store import LocalStore
from tests.conftest import castore, castore_json, golden, snapshot
from tests.helpers import NOT_ROOT, returns_within, tiny_tmpfs


class Counting(DirTransport):
    """A directory cache that counts what is fetched, and can fail after a number of chunk gets."""

    def __init__(self, root: Path, fail_after: int | None = None) -> None:
        super().__init__(root)
        self.gets: list[str] = []
        self.fail_after = fail_after
        self.rounds = 0  # calls of get_many: over HTTP, a pipeline each

    def get_many(self, paths: Sequence[str], limit: int = 1 << 30) -> Iterator[tuple[str, bytes | None]]:
        self.rounds += 1
        return super().get_many(paths, limit)

    def get(self, path: str) -> bytes | None:
        fetched = len([g for g in self.gets if g.startswith("chunks/")])
        if path.startswith("chunks/") and self.fail_after is not None and fetched >= self.fail_after:
            raise CastoreError("connection dropped")
        self.gets.append(path)
        return super().get(path)


def blob_file(tmp_path: Path, name: str, data: bytes) -> Path:
    f = tmp_path / name
    f.write_bytes(data)
    return f


def test_record_golden_and_config(tmp_path: Path) -> None:
    rec = ObjectRecord("a" * 64, "blob", 3, (), (("b" * 64, 3),))
    golden("cache-object-record.bin", rec.encode())
    assert ObjectRecord.decode("a" * 64, rec.encode()) == rec
    with pytest.raises(EncodingError, match="add up"):
        ObjectRecord.decode("a" * 64, ObjectRecord("a" * 64, "blob", 4, (), (("b" * 64, 3),)).encode())
    cfg = CacheConfig(ChunkParams())
    assert CacheConfig.decode(cfg.encode()) == cfg
    with pytest.raises(EncodingError, match="format"):
        CacheConfig.decode(b'{"format": 9}')


def _many_chunks(n: int) -> tuple[tuple[str, int], ...]:
    return tuple((hash_bytes(i.to_bytes(4, "big")), 1000 + i) for i in range(n))


_SMALL = ChunkParams(512, 1024, 4096)  # chunking that makes chunks of about 1000 bytes


def test_large_records_cut_their_chunk_list_into_list_chunks() -> None:
    chunks = _many_chunks(200)
    rec = ObjectRecord("a" * 64, "blob", sum(n for _, n in chunks), (), chunks)
    lists = rec.chunk_lists()
    golden("cache-object-record-listed.bin", rec.encode())
    golden("cache-list-chunk.bin", lists[0].data)
    assert 1 < len(lists) < 200 and [c for piece in lists for c in canonical.decode(piece.data)] == [
        [bytes.fromhex(c), n] for c, n in chunks]
    head = ObjectRecord.decode("a" * 64, rec.encode())
    assert not head.complete and len(head.lists) == len(lists)
    with pytest.raises(EncodingError, match="never read"):
        head.encode()  # it would say format 2 with no chunks
    found = {piece.id: piece.data for piece in lists}
    assert head.resolve(found.get, _SMALL).chunks == chunks
    # the cuts depend on the chunk ids alone: chunks put in front change the first list chunk only
    longer = ObjectRecord("a" * 64, "blob", 0, (), _many_chunks(300)[250:] + chunks).chunk_lists()
    assert len({piece.id for piece in lists} - {piece.id for piece in longer}) <= 1
    # an inline record stays format 2, byte for byte
    small = ObjectRecord("a" * 64, "blob", 3, (), (("b" * 64, 3),))
    assert small.chunk_lists() == [] and canonical.decode(small.encode())["format"] == 2


@pytest.mark.parametrize("damage, complaint", [
    ("missing", "which is not there"),
    ("other bytes", "hash to"),
    ("count", "the record says"),
    ("not msgpack", "list chunk"),
    ("bad entry", "bad chunk"),
])
def test_list_chunks_are_checked_against_the_record(damage: str, complaint: str) -> None:
    chunks = _many_chunks(100)
    rec = ObjectRecord("a" * 64, "blob", sum(n for _, n in chunks), (), chunks)
    found = {piece.id: piece.data for piece in rec.chunk_lists()}
    fields = canonical.decode(rec.encode())
    first = fields["lists"][0]
    if damage == "missing":
        del found[first[0].hex()]
    elif damage == "other bytes":
        found[first[0].hex()] = canonical.encode([[bytes(32), 5]])
    elif damage == "count":  # a list chunk that hashes right, named by a record that counts otherwise
        first[1] += 1
    else:  # bytes that hash to the id the record names, but do not list chunks
        bad = b"\xc1" if damage == "not msgpack" else canonical.encode([[bytes(31), first[2]]])
        first[0] = bytes.fromhex(hash_bytes(bad))
        found[first[0].hex()] = bad
    head = ObjectRecord.decode("a" * 64, canonical.encode(fields))
    with pytest.raises(CastoreError, match=re.escape(complaint)):
        head.resolve(found.get, _SMALL)


def test_a_record_cannot_name_more_chunks_than_its_size_makes() -> None:
    """One list chunk named 10,000 times would make a 400 KB record list 2.5 million chunks."""
    chunks = _many_chunks(256)
    piece = canonical.encode([[bytes.fromhex(c), n] for c, n in chunks])
    size = sum(n for _, n in chunks)
    fields = {"format": 3, "kind": "blob", "size": size * 10_000, "refs": [],
              "lists": [[bytes.fromhex(hash_bytes(piece)), 256, size]] * 10_000}
    head = ObjectRecord.decode("a" * 64, canonical.encode(fields))
    asked: list[str] = []
    with pytest.raises(EncodingError, match=r"more than .* make at the cache.s chunking minimum of 8192"):
        head.resolve(lambda lid: asked.append(lid) or piece, ChunkParams())
    assert asked == []  # refused from the record alone
    whole = head.resolve(lambda lid: asked.append(lid) or piece, _SMALL)  # honest at small chunking:
    assert len(whole.chunks) == 2_560_000 and len(asked) == 1  # each list chunk is read and decoded once
    with pytest.raises(EncodingError, match="lists 2 chunks, more than 1000 bytes make"):
        ObjectRecord("a" * 64, "blob", 1000, (), (("b" * 64, 500), ("c" * 64, 500))).check_chunks(ChunkParams())


def test_a_format_2_cache_keeps_getting_records_older_castore_reads(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "big", random.Random(5).randbytes(4 << 20)))
    old = DirTransport(tmp_path / "old", create=True)
    old.put("castore-cache.json", CacheConfig(ChunkParams(), format=2).encode())
    new = DirTransport(tmp_path / "new", create=True)
    s_old, s_new = push(a, old, [oid]), push(a, new, [oid])
    assert s_old.lists == 0 and s_new.lists > 0
    assert canonical.decode(old.get(object_path(oid)) or b"")["format"] == 2
    assert canonical.decode(new.get(object_path(oid)) or b"")["format"] == 3
    assert b'"format": 3' in (new.get("castore-cache.json") or b"")
    for cache in (old, new):
        b = LocalStore(tmp_path / f"b-{cache.root.name}")
        pull(b, cache, [oid])
        assert b.blob_path(oid).read_bytes() == a.blob_path(oid).read_bytes()
    with pytest.raises(EncodingError, match="cache format 4 is not supported"):
        CacheConfig.decode(CacheConfig(ChunkParams(), format=4).encode())


def test_a_damaged_chunk_list_in_the_store_is_fetched_again(tmp_path: Path) -> None:
    rng = random.Random(3)
    v1 = rng.randbytes(4 << 20)
    v2 = v1 + rng.randbytes(100_000)
    a = LocalStore(tmp_path / "a")
    id1, id2 = a.add_file(blob_file(tmp_path, "v1", v1)), a.add_file(blob_file(tmp_path, "v2", v2))
    cache = DirTransport(tmp_path / "cache", create=True)
    push(a, cache, [id1, id2])
    b = LocalStore(tmp_path / "b")
    pull(b, cache, [id1])
    shared = len(b.find_lists(lid for lid, _, _ in ObjectRecord.decode(id2, cache.get(object_path(id2)) or b"").lists))
    assert shared > 0
    b.db.execute("UPDATE chunk_lists SET data = x'00'")  # rotted rows: left out, fetched from the cache
    b.db.commit()
    s = pull(b, cache, [id2])
    assert b.blob_path(id2).read_bytes() == v2 and s.lists == len(ObjectRecord.decode(
        id2, cache.get(object_path(id2)) or b"").lists)


def test_round_trip_of_a_realized_closure(tmp_path: Path) -> None:
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    res = castore_json("realize", "tests/recipes/small.py:layer", store=a)  # a tree and its blobs
    refs = castore_json("show", res["id"], store=a)["refs"]
    assert len(refs) == 2  # hello.txt and motd
    pushed = castore_json("push", res["id"][:12], "--to", str(cache), store=a)
    assert pushed["objects"] == 3 and pushed["chunks_sent"] == 3
    assert pushed["ids"][-1] == res["id"]  # the tree is published after its blobs
    again = castore_json("push", res["id"], "--to", str(cache), store=a)
    assert again["objects"] == 0 and again["chunks_sent"] == 0
    pulled = castore_json("pull", res["id"], "--from", f"file://{cache}", store=b)
    assert pulled["objects"] == 3
    assert snapshot(b)[1] == sorted(pulled["ids"])
    for oid in pulled["ids"]:
        assert (b / "blobs" / oid[:2] / oid).read_bytes() == (a / "blobs" / oid[:2] / oid).read_bytes()
    assert castore_json("verify", store=b)["ok"]
    assert castore_json("show", res["id"], store=b)["entries"]


def test_dedup_push_and_seeded_pull(tmp_path: Path) -> None:
    rng = random.Random(11)  # fixed bytes: fixed cut points
    v1 = rng.randbytes(3 << 20)
    v2 = v1[:1_500_000] + rng.randbytes(200_000) + v1[1_500_000:]
    a = LocalStore(tmp_path / "a")
    id1 = a.add_file(blob_file(tmp_path, "v1", v1))
    id2 = a.add_file(blob_file(tmp_path, "v2", v2))
    (tmp_path / "cache").mkdir()
    cache = Counting(tmp_path / "cache")
    s1 = push(a, cache, [id1])
    s2 = push(a, cache, [id2])
    assert s2.chunks_sent < s1.chunks_sent // 4  # only chunks around the insertion
    b = LocalStore(tmp_path / "b")
    pull(b, cache, [id1])
    cache.gets.clear()
    s = pull(b, cache, [id2])
    fetched = [g for g in cache.gets if g.startswith("chunks/")]
    assert len(fetched) == s.chunks_fetched + s.lists == s2.chunks_sent + s2.lists  # exactly what v1 lacks
    lists = ObjectRecord.decode(id2, cache.get(object_path(id2)) or b"").lists
    assert 0 < s.lists < len(lists)  # v2's chunk list is cut in list chunks, and shares most with v1's
    assert s.chunks_seeded > 0 and b.blob_path(id2).read_bytes() == v2
    # a local blob rotted on disk: the chunks seeded from it make v3 hash wrong, and nothing is added
    v3 = v1[:2_500_000] + rng.randbytes(100_000) + v1[2_500_000:]
    id3 = a.add_file(blob_file(tmp_path, "v3", v3))
    push(a, cache, [id3])
    b.blob_path(id1).chmod(0o644)
    with open(b.blob_path(id1), "r+b") as f:
        f.seek(3 << 19)
        f.write(b"rot")
    with pytest.raises(CastoreError, match="local blob") as err:
        pull(b, cache, [id3])
    assert "castore verify" in (err.value.hint or "") and not b.has(id3)
    assert [p for p in b.verify()[0] if id1 in p]  # verify names the rotten blob
    a.close()
    b.close()


def _v1_pulled(tmp_path: Path, seed: int, size: int, *inserts: tuple[int, int]) -> tuple[
        LocalStore, Counting, LocalStore, str, str, bytes]:
    """Store a with v1 and v2 (v1 with random bytes inserted: (offset in v1, how many) each),
    both pushed to a counting cache, and store b holding v1 pulled from it: (a, cache, b, id1,
    id2, v2)."""
    rng = random.Random(seed)  # fixed bytes: fixed cut points
    v1 = rng.randbytes(size)
    v2, last = b"", 0
    for at, added in sorted(inserts):
        v2, last = v2 + v1[last:at] + rng.randbytes(added), at
    v2 += v1[last:]
    a = LocalStore(tmp_path / "a")
    id1, id2 = (a.add_file(blob_file(tmp_path, n, d)) for n, d in (("v1", v1), ("v2", v2)))
    (tmp_path / "cache").mkdir()
    cache = Counting(tmp_path / "cache")
    push(a, cache, [id1, id2])
    b = LocalStore(tmp_path / "b")
    pull(b, cache, [id1])
    return a, cache, b, id1, id2, v2


def test_seeding_copies_runs_and_fetches_what_a_short_blob_lacks(tmp_path: Path) -> None:
    a, cache, b, id1, id2, v2 = _v1_pulled(tmp_path, 12, 2 << 20, (1_000_000, 50_000))
    # v1 lost its tail on disk after it was indexed: the chunks past the new end are fetched
    b.blob_path(id1).chmod(0o644)
    os.truncate(b.blob_path(id1), 1_500_000)
    cache.gets.clear()
    cache.rounds = 0
    s = pull(b, cache, [id2])
    assert cache.rounds == 3  # records, chunks, and what the short blob lacked: found at once, not one by one
    fetched = {g.rpartition("/")[2] for g in cache.gets if g.startswith("chunks/")}
    record = record_of(cache, id2)
    offsets, at = {}, 0
    for cid, n in record.chunks:
        offsets[cid], at = at, at + n
    assert b.blob_path(id2).read_bytes() == v2
    assert s.chunks_seeded and s.chunks_seeded + s.chunks_fetched == len(record.chunks)
    assert any(offsets[c] > 1_600_000 for c in fetched)  # past the short blob's end: fetched
    assert [p for p in b.verify()[0] if id1 in p]
    a.close()
    b.close()


def test_dry_run_counts_and_adds_nothing(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "x", os.urandom(500_000)))
    cache = DirTransport(tmp_path / "cache", create=True)
    sent = push(a, cache, [oid]).chunks_sent
    b = LocalStore(tmp_path / "b")
    s = pull(b, cache, [oid], dry_run=True)
    assert s.chunks_fetched == sent and s.chunks_seeded == 0 and b.objects() == []
    longer = a.add_file(blob_file(tmp_path, "y", a.blob_path(oid).read_bytes() + os.urandom(200_000)))
    push(a, cache, [longer])
    pull(b, cache, [oid])  # its chunks are the first ones of `longer`: a dry run counts them as local
    s = pull(b, cache, [longer], dry_run=True)
    assert s.chunks_seeded > 0 and s.chunks_fetched > 0 and b.objects() and not b.has(longer)
    real = pull(b, cache, [longer])
    assert (real.chunks_seeded, real.chunks_fetched) == (s.chunks_seeded, s.chunks_fetched)


def _pushed(tmp_path: Path, size: int = 400_000) -> tuple[LocalStore, DirTransport, str, bytes]:
    data = os.urandom(size)
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "x", data))
    cache = DirTransport(tmp_path / "cache", create=True)
    push(a, cache, [oid])
    return a, cache, oid, data


def _chunk_files(cache: DirTransport, oid: str) -> list[Path]:
    return [cache.root / chunk_path(c) for c, _ in record_of(cache, oid).chunks]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-chunk", "missing", "bigger"])
def test_a_corrupt_cache_adds_nothing(tmp_path: Path, damage: str) -> None:
    _, cache, oid, _ = _pushed(tmp_path)
    files = _chunk_files(cache, oid)
    target = files[1]
    frame = target.read_bytes()
    raw = zstandard.ZstdDecompressor().decompress(frame)
    if damage == "flip":
        target.write_bytes(zstandard.ZstdCompressor().compress(raw[:-1] + bytes([raw[-1] ^ 1])))
    elif damage == "truncate":
        target.write_bytes(frame[: len(frame) // 2])
    elif damage == "garbage":
        target.write_bytes(b"not zstd at all")
    elif damage == "other-chunk":  # a valid chunk served under the wrong id
        target.write_bytes(files[0].read_bytes())
    elif damage == "missing":
        target.unlink()
    elif damage == "bigger":
        target.write_bytes(zstandard.ZstdCompressor().compress(raw + b"extra"))
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError):
        pull(b, cache, [oid])
    assert b.objects() == [] and not list((b.blobs).glob("*/*"))
    assert b.verify()[0] == []


def test_a_lying_object_record_adds_nothing(tmp_path: Path) -> None:
    a, cache, oid, _ = _pushed(tmp_path)
    other = a.add_file(blob_file(tmp_path, "y", os.urandom(100_000)))
    push(a, cache, [other])
    # the record of `oid` now lists the chunks of `other`: reassembly will not hash to oid
    (cache.root / object_path(oid)).write_bytes((cache.root / object_path(other)).read_bytes())
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError, match=r"reassembles|add up"):
        pull(b, cache, [oid])
    assert b.objects() == []
    (cache.root / object_path(oid)).write_bytes(b"\x93\x01")  # not a record at all
    with pytest.raises(EncodingError):
        pull(b, cache, [oid])


def test_an_interrupted_pull_resumes_without_refetching(tmp_path: Path) -> None:
    _, _, oid, data = _pushed(tmp_path, size=2_000_000)
    flaky = Counting(tmp_path / "cache", fail_after=10)
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError, match="connection dropped"):
        pull(b, flaky, [oid])
    assert b.objects() == []
    again = Counting(tmp_path / "cache")
    s = pull(b, again, [oid])
    assert s.chunks_seeded >= 10  # the ten verified before the drop were kept
    assert len([g for g in again.gets if g.startswith("chunks/")]) == s.chunks_fetched
    assert b.blob_path(oid).read_bytes() == data
    assert list((b.tmp / "pulls").iterdir()) == []


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_pull_onto_a_full_disk_says_so_and_adds_nothing(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "big", random.Random(3).randbytes(4 << 20)))
    push(a, DirTransport(tmp_path / "cache", create=True), [oid])
    a.close()
    with tiny_tmpfs(tmp_path / "small") as small:
        # what the records say does not fit: refused before any chunk is fetched
        proc = castore("pull", oid, "--from", str(tmp_path / "cache"), store=small / "store", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert re.search(r"take at least 4\.0 MiB and the store's filesystem has [\d.]+ MiB free", proc.stderr)
        # what fits by the count, but not once written (the disk filled meanwhile): stopped midway
        with LocalStore(small / "store") as b, pytest.MonkeyPatch.context() as mp:
            mp.setattr("castore.cache.copy.free_bytes", lambda path: 1 << 40)
            with pytest.raises(StoreError, match="no space left on the device") as err:
                pull(b, DirTransport(tmp_path / "cache"), [oid])
            assert err.value.hint and "pull again" in err.value.hint
            assert b.objects() == []
            # the store's own trouble is no reason to ask the next substituter (the CLI, in-process)
            from typer.testing import CliRunner

            from castore.cli import app
            two = f"{tmp_path / 'cache'} {tmp_path / 'cache'}"
            res = CliRunner().invoke(app, ["--store", str(small / "store"), "pull", oid],
                                     env={"CASTORE_SUBSTITUTERS": two, "CASTORE_CONFIG": os.devnull})
            assert isinstance(res.exception, StoreError) and "no space left" in res.exception.message
            assert "next substituter" not in res.stderr
            problems, notes = b.verify()
            assert problems == [] and any("partial" in n for n in notes)
            b.gc()
            assert os.listdir(b.tmp / "pulls") == []


def test_a_record_claiming_more_than_the_disk_holds_is_refused_before_its_lists_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few hundred KB of record naming one list chunk over and over: planning it would take
    gigabytes of memory, and the pull would write verified chunks until the disk was full."""
    _, cache, _, _ = _pushed(tmp_path)
    z = zstandard.ZstdCompressor()

    def put(data: bytes) -> str:
        cid = hash_bytes(data)
        (cache.root / chunk_path(cid)).parent.mkdir(parents=True, exist_ok=True)
        (cache.root / chunk_path(cid)).write_bytes(z.compress(data))
        return cid

    cid = put(os.urandom(8192))
    lid = put(canonical.encode([[bytes.fromhex(cid), 8192]] * 256))
    b = LocalStore(tmp_path / "b")
    monkeypatch.setattr("castore.cache.copy.free_bytes", lambda path: 1 << 30)  # whatever this disk has
    n = (1 << 30) // (256 * 8192) + 8
    oid = hash_bytes(b"claimed")
    (cache.root / object_path(oid)).write_bytes(canonical.encode({
        "format": 3, "kind": "blob", "size": n * 256 * 8192, "refs": [],
        "lists": [[bytes.fromhex(lid), 256, 256 * 8192]] * n}))
    reads: list[str] = []
    real_get_many = cache.get_many
    cache.get_many = lambda paths, *a: reads.extend(paths) or real_get_many(paths, *a)  # type: ignore[method-assign]
    for dry_run in (False, True):
        with pytest.raises(CastoreError, match=r"take at least [\d,.]+ MiB and the store's filesystem has") as err:
            pull(b, cache, [oid], dry_run=dry_run)
        assert "as the cache records it" in err.value.message and "nothing was added" in (err.value.hint or "")
    assert reads == [object_path(oid)] * 2  # no list chunk was read
    assert b.objects() == [] and not (b.tmp / "pulls").exists()


def test_a_damaged_cache_directory_is_the_cache_s_fault_and_the_next_one_is_tried(tmp_path: Path) -> None:
    """Not "I/O error … see dmesg" about the store, nor a hang on a FIFO: the cache is damaged."""
    a, cache, oid, data = _pushed(tmp_path)
    push(a, DirTransport(tmp_path / "good", create=True), [oid])
    first = _chunk_files(cache, oid)[0]
    first.unlink()
    first.mkdir()
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError, match=f"cannot read {first} of the cache: not a regular file") as err:
        pull(b, cache, [oid])
    assert not isinstance(err.value, StoreError) and b.objects() == []
    (cache.root / "castore-cache.json").unlink()
    os.mkfifo(cache.root / "castore-cache.json")
    with returns_within(10), pytest.raises(CastoreError, match=r"castore-cache\.json of the cache: not a regular file"):
        pull(b, cache, [oid])
    proc = castore("pull", oid, store=tmp_path / "b",
                   env={"CASTORE_SUBSTITUTERS": f"{cache.root} {tmp_path / 'good'}"})
    assert "of the cache: not a regular file; trying the next substituter" in proc.stderr
    assert b.blob_path(oid).read_bytes() == data


def test_json_nested_thousands_deep_is_bad_json_not_a_traceback(tmp_path: Path) -> None:
    from castore.cache.server import load_tokens, tokens_file
    from castore.cache.transport import _server_message

    deep = b"[" * 100_000
    with pytest.raises(EncodingError, match="is not JSON"):
        CacheConfig.decode(deep)
    tokens_file(tmp_path).parent.mkdir(parents=True)
    tokens_file(tmp_path).write_bytes(deep)
    with pytest.raises(CastoreError, match="is not JSON"):
        load_tokens(tmp_path)
    assert _server_message(deep).startswith(": [[[")  # an error page's first bytes, as they are


@pytest.mark.parametrize("bad", [b"", b"garbage, not a zstd frame"])
def test_a_push_writes_again_a_chunk_file_that_is_no_frame(tmp_path: Path, bad: bytes) -> None:
    """An empty or garbage file where a chunk should be was built on: every pull failed, and pushing
    again did not mend it."""
    data = os.urandom(300_000)
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "x", data))
    cache = DirTransport(tmp_path / "cache", create=True)
    push(a, cache, [oid])
    victim = _chunk_files(cache, oid)[0]
    (tmp_path / "cache" / object_path(oid)).unlink()  # as if the first push had stopped before its record
    victim.write_bytes(bad)
    stats = push(a, cache, [oid])
    assert stats.chunks_sent == 1 and victim.read_bytes() != bad
    b = LocalStore(tmp_path / "b")
    pull(b, cache, [oid])
    assert b.blob_path(oid).read_bytes() == data


def test_a_pull_that_waited_for_another_counts_what_that_one_added(tmp_path: Path) -> None:
    """It said "pulled 0 objects (0 already there)"."""
    import threading

    _, cache, oid, data = _pushed(tmp_path)
    other = LocalStore(tmp_path / "b")
    with other.lock("pull"):  # another pull, holding the store's pull lock
        result: list[CopyStats] = []
        waiting = threading.Thread(target=lambda: result.append(pull(LocalStore(tmp_path / "b"), cache, [oid])))
        waiting.start()
        time.sleep(0.5)
        other.add_file(blob_file(tmp_path, "same", data))  # what it was pulling
    waiting.join(timeout=30)
    assert result and result[0].present == 1 and result[0].objects == 0


def test_cache_paths_are_checked(tmp_path: Path) -> None:
    for bad in ("../etc/passwd", "objects/../../x", "chunks/ab/" + "c" * 64, "objects/" + "A" * 64, "/abs"):
        with pytest.raises(CastoreError, match="refusing"):
            check_path(bad)
    with pytest.raises(NotFound):
        open_cache(str(tmp_path / "nothing-here"))
    with pytest.raises(CastoreError, match="after 1 attempts"), \
            HttpTransport("http://127.0.0.1:1/", attempts=1) as http:
        http.put("castore-cache.json", b"{}")


def test_pull_of_an_unknown_id_names_it(tmp_path: Path) -> None:
    _, cache, _, _ = _pushed(tmp_path)
    proc = castore("pull", "e" * 64, "--from", str(cache.root), store=tmp_path / "b", check=False)
    assert proc.returncode == 1 and f"has no object {'e' * 64}" in proc.stderr
    proc = castore("pull", "eeee", "--from", str(cache.root), store=tmp_path / "b", check=False)
    assert "not a full object id" in proc.stderr


def test_pull_reads_ids_as_other_commands_do(tmp_path: Path) -> None:
    _, cache, oid, _ = _pushed(tmp_path)
    res = castore_json("pull", oid.upper(), oid, "--from", str(cache.root), store=tmp_path / "b")
    assert res["objects"] == 1 and res["present"] == 0 and res["ids"] == [oid]


def test_pull_fails_over_between_substituters(tmp_path: Path) -> None:
    _, cache, oid, data = _pushed(tmp_path)
    empty = DirTransport(tmp_path / "empty", create=True)
    empty.put("castore-cache.json", (cache.root / "castore-cache.json").read_bytes())
    env = {"CASTORE_SUBSTITUTERS": f"{empty.root} {tmp_path / 'missing'} file://{cache.root}",
           "CASTORE_CONFIG": os.devnull}
    proc = castore("pull", oid, store=tmp_path / "b", env=env)
    assert "trying the next substituter" in proc.stderr and "pulled 1 object " in proc.stdout
    assert (tmp_path / "b" / "blobs" / oid[:2] / oid).read_bytes() == data
    dry = castore_json("pull", oid, "--dry-run", "--from", str(cache.root), store=tmp_path / "c")
    assert dry["chunks_fetched"] > 0 and dry["bytes_on_wire"] == len(data) and dry["chunks_seeded"] == 0
    assert dry["objects"] == 1 and dry["dry_run"] is True  # as the text says: would fetch 1 object
    again = castore("pull", oid, "--dry-run", "--from", str(cache.root), store=tmp_path / "b").stdout
    assert again.startswith("would fetch 0 objects (1 already there): 0 chunks")
    said = castore("pull", oid, "--dry-run", "--from", str(cache.root), store=tmp_path / "c").stdout
    assert f"{dry['chunks_fetched']} chunks, about " in said


def _hostile(root: Path, data: bytes, kind: str, refs: tuple[str, ...] = ()) -> str:
    """Publish data as an object of a directory cache, its record and chunk correctly hashed, as a
    hostile cache would: nothing about its content is checked here."""
    oid = hash_bytes(data)
    cache = DirTransport(root, create=True)
    if cache.get("castore-cache.json") is None:
        cache.put("castore-cache.json", CacheConfig(ChunkParams()).encode())
    cache.put(chunk_path(oid), zstandard.ZstdCompressor().compress(data))
    cache.put(object_path(oid), ObjectRecord(oid, kind, len(data), refs, ((oid, len(data)),)).encode())
    return oid


def _tree_bytes(*entries: dict[str, object]) -> bytes:
    return canonical.encode({"format": 1, "kind": "tree", "entries": list(entries)})


HELLO = b"hello\n"
HELLO_ID = hash_bytes(HELLO)
FIFO = {"path": "a", "type": "fifo", "mode": 0o644, "uid": 0, "gid": 0}
IMAGE = {"format": 1, "kind": "image", "arch": "x86_64", "kernel": HELLO_ID,
         "layers": [{"blob": HELLO_ID, "format": "squashfs"}], "cmdline": "", "overlay_size": 1, "vcpus": 1,
         "mem_mib": 16}

HOSTILE: dict[str, tuple[bytes, str, tuple[str, ...], str]] = {  # data, kind, refs, complaint
    "uid-str": (_tree_bytes({**FIFO, "uid": "root"}), "tree", (), "uid 'root'"),
    "mode-str": (_tree_bytes({**FIFO, "mode": "rw"}), "tree", (), "mode 'rw'"),
    "path-int": (_tree_bytes({**FIFO, "path": 5}), "tree", (), "path 5"),
    "no-entries": (canonical.encode({"format": 1, "kind": "tree"}), "tree", (), "lacks field 'entries'"),
    "entries-int": (canonical.encode({"format": 1, "kind": "tree", "entries": 5}), "tree", (), "not a list"),
    "major-str": (_tree_bytes({**FIFO, "type": "char", "major": "x", "minor": 1}), "tree", (), "major 'x'"),
    "major-huge": (_tree_bytes({**FIFO, "type": "char", "major": 2**40, "minor": 1}), "tree", (), "major"),
    "uid-huge": (_tree_bytes({**FIFO, "uid": 2**63}), "tree", (), "uid 9223372036854775808"),
    "target-int": (_tree_bytes({**FIFO, "type": "symlink", "target": 7}), "tree", (), "target"),
    "size-lie": (_tree_bytes({**FIFO, "type": "file", "blob": HELLO_ID, "size": 999999}), "tree", (HELLO_ID,),
                 "says 999999 bytes, but its blob"),
    "image": (canonical.encode({**IMAGE, "vcpus": -3, "mem_mib": "lots", "cmdline": ["x"]}), "image",
              (HELLO_ID,), "image"),
    "layer-format": (canonical.encode({**IMAGE, "layers": [{"blob": HELLO_ID, "format": "ntfs"}]}), "image",
                     (HELLO_ID,), "format 'ntfs'"),
    "blob-refs": (b"other\n", "blob", (HELLO_ID,), "a blob with references"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_but_correctly_hashed_objects_add_nothing(tmp_path: Path, case: str) -> None:
    data, kind, refs, complaint = HOSTILE[case]
    _hostile(tmp_path / "cache", HELLO, "blob")
    oid = _hostile(tmp_path / "cache", data, kind, refs)
    b = LocalStore(tmp_path / "b")
    with pytest.raises(EncodingError, match=re.escape(complaint)) as err:
        pull(b, DirTransport(tmp_path / "cache"), [oid])
    assert "corrupt" in (err.value.hint or "")
    assert b.objects() == [] and b.verify()[0] == []  # not even the blob it names
    assert not (b.tmp / "pulls" / oid).exists()
    b.close()


def test_a_cache_cannot_change_what_kind_an_object_is(tmp_path: Path) -> None:
    # a tree whose file entry names another tree: the record of a reference must say blob
    inner = _tree_bytes()
    inner_id = _hostile(tmp_path / "c1", inner, "tree")
    outer = _tree_bytes({**FIFO, "type": "file", "blob": inner_id, "size": len(inner)})
    outer_id = _hostile(tmp_path / "c1", outer, "tree", (inner_id,))
    b = LocalStore(tmp_path / "b")
    with pytest.raises(EncodingError, match=f"refers to {inner_id} as a blob, but it is a tree"):
        pull(b, DirTransport(tmp_path / "c1"), [outer_id])
    assert b.objects() == []
    # a tree recorded as a blob: no content check can tell, but a caller that knows the kind refuses it
    _hostile(tmp_path / "c2", HELLO, "blob")
    tree_id = _hostile(tmp_path / "c2", _tree_bytes({**FIFO, "type": "file", "blob": HELLO_ID, "size": 6}), "blob")
    liar = DirTransport(tmp_path / "c2")
    with pytest.raises(CastoreError, match=f"records object {tree_id} as a blob, but it was asked for as a tree"):
        pull(b, liar, [tree_id], kinds={tree_id: "tree"})
    assert b.objects() == []
    pull(b, liar, [tree_id])  # by id alone a blob is what the cache says it is: its bytes are the id's
    with pytest.raises(CastoreError, match=f"the store holds object {tree_id} as a blob, but it was asked for"):
        pull(b, liar, [tree_id], kinds={tree_id: "tree"})
    b.close()


def test_an_ill_typed_tree_already_in_a_store_is_reported_and_not_exported(tmp_path: Path) -> None:
    """A tree pulled before pulls checked types: verify names it, export refuses it in one line."""
    data, _, _, complaint = HOSTILE["uid-huge"]
    with LocalStore(tmp_path / "s") as s:
        oid = s.add_bytes(data, "tree")
        problems, _ = s.verify()
    assert [p for p in problems if oid in p and complaint in p]
    proc = castore("export", oid, str(tmp_path / "out"), store=tmp_path / "s", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and complaint in proc.stderr
    assert not (tmp_path / "out").exists()


_CID = "b" * 64


@pytest.mark.parametrize("rec, complaint", [
    ({"kind": "blob", "refs": ["a" * 64]}, "blob with references"),
    ({"kind": "thing"}, "bad kind"),
    ({"kind": 5}, "bad kind"),
    ({"size": "3"}, "bad size"),
    ({"size": True}, "bad size"),
    ({"size": -1}, "bad size"),
    ({"refs": [5]}, "bad reference"),
    ({"refs": "a" * 64}, "bad reference"),
    ({"chunks": 5}, "bad chunk"),
    ({"chunks": [[bytes.fromhex(_CID), "3"]]}, "bad chunk"),
    ({"chunks": [[bytes.fromhex(_CID)]]}, "bad chunk"),
    ({"chunks": [[bytes.fromhex(_CID), 0]], "size": 0}, "bad chunk"),
    ({"chunks": [[bytes.fromhex(_CID), 1 << 30]], "size": 1 << 30}, "no chunk is over 16 MiB"),
    ({"format": 2, "extra": 1}, "malformed"),
    ({"format": 3}, "format 3 is not supported"),
    ({"format": 3, "lists": [[bytes(32), 1, 3]]}, "malformed"),  # chunks and lists both
])
def test_object_records_are_type_checked(rec: dict[str, object], complaint: str) -> None:
    fields: dict[str, object] = {"format": 2, "kind": "tree", "size": 3, "refs": [],
                                 "chunks": [[bytes.fromhex(_CID), 3]], **rec}
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(EncodingError, match=re.escape(complaint)):
        ObjectRecord.decode("a" * 64, canonical.encode(fields))
    with pytest.raises(EncodingError, match="chunking"):
        CacheConfig.decode(b'{"format": 2, "compression": "zstd", "chunking": {"algorithm": "fastcdc-2020"}}')


@pytest.mark.parametrize("lists, complaint", [
    ([], "bad list chunk"),
    ([[bytes(32), 3]], "bad list chunk"),
    ([[bytes(32), 0, 3]], "bad list chunk"),
    ([[bytes(32), 257, 3]], "bad list chunk"),
    ([[bytes(31), 1, 3]], "bad list chunk"),
    ([[bytes(32), 1, 2]], "add up to 2 bytes"),
])
def test_listed_records_are_type_checked(lists: list[object], complaint: str) -> None:
    fields = {"format": 3, "kind": "blob", "size": 3, "refs": [], "lists": lists}
    with pytest.raises(EncodingError, match=re.escape(complaint)):
        ObjectRecord.decode("a" * 64, canonical.encode(fields))


def test_realisation_records_are_type_checked() -> None:
    record = b"\x80"
    plan = hash_bytes(record)
    good = {"format": 1, "kind": "realisation", "plan": plan, "object": "a" * 64, "record": record,
            "signatures": [{"key": "lab-1", "sig": b"s" * 64}]}
    assert RealisationRecord.decode(plan, canonical.encode(good)).object == "a" * 64
    for bad, complaint in [({"object": 5}, "names 5"), ({"object": ["x"]}, "not an object id"),
                           ({"record": "x"}, "does not hash"), ({"plan": 5}, "another plan"),
                           ({"signatures": 5}, "signature"), ({"signatures": [{"key": 1, "sig": b"s" * 64}]},
                                                              "signature"),
                           ({"signatures": [{"key": "k", "sig": b"short"}]}, "signature"),
                           ({"format": True}, "not a format 1"), ({"extra": 1}, "malformed")]:
        with pytest.raises(EncodingError, match=re.escape(complaint)):
            RealisationRecord.decode(plan, canonical.encode({**good, **bad}))


@pytest.mark.parametrize("length", [1 << 30, 1 << 20])  # over the hard cap; over this cache's chunking max
def test_a_record_with_an_overlong_chunk_is_refused_before_anything_is_fetched(tmp_path: Path, length: int) -> None:
    root = tmp_path / "cache"
    cache = DirTransport(root, create=True)
    cache.put("castore-cache.json", CacheConfig(ChunkParams()).encode())  # chunks of at most 128 KiB
    oid, cid = "c" * 64, "d" * 64
    cache.put(chunk_path(cid), zstandard.ZstdCompressor().compress(bytes(1 << 16)))  # a tiny frame
    cache.put(object_path(oid), ObjectRecord(oid, "blob", length, (), ((cid, length),)).encode())
    counting = Counting(root)
    b = LocalStore(tmp_path / "b")
    with pytest.raises(EncodingError, match=f"chunk of {length} bytes") as err:
        pull(b, counting, [oid])
    assert "corrupt" in (err.value.hint or "")
    assert not [g for g in counting.gets if g.startswith("chunks/")]
    assert b.objects() == [] and not (b.tmp / "pulls" / oid).exists()
    b.close()


@pytest.mark.parametrize("url", ["http://[::1", "http://cache:99999", "http://", "https:///x"])
def test_a_malformed_cache_url_is_a_clean_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(CastoreError, match="not a valid URL"):
        open_cache(url)
    proc = castore("pull", "e" * 64, "--from", url, store=tmp_path / "b", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: " in proc.stderr and "not a valid URL" in proc.stderr


def test_gc_waits_for_a_push(tmp_path: Path) -> None:
    """An unrooted object being pushed is not collected halfway."""
    import subprocess
    import sys
    import threading
    import time

    a = LocalStore(tmp_path / "a")
    (tmp_path / "d").mkdir()
    blob_file(tmp_path / "d", "v", random.Random(5).randbytes(1 << 20))
    oid = a.add_dir(tmp_path / "d")  # a tree and its blob: gc between the two would break the push
    started = threading.Event()

    class Slow(DirTransport):
        def put(self, path: str, data: bytes) -> None:
            started.set()
            time.sleep(0.02)
            super().put(path, data)

    cache = Slow(tmp_path / "cache", create=True)
    failed: list[BaseException] = []

    def pushed() -> None:
        try:
            push(a, cache, [oid])
        except BaseException as exc:
            failed.append(exc)

    pushing = threading.Thread(target=pushed)
    pushing.start()
    started.wait(10)
    code = "import sys; from castore.store import LocalStore; print(LocalStore(sys.argv[1]).gc()[0])"
    gc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True)
    pushing.join()
    assert failed == [] and gc.returncode == 0 and oid in gc.stdout  # collected, but only after the push
    b = LocalStore(tmp_path / "b")
    pull(b, DirTransport(tmp_path / "cache"), [oid])
    assert b.verify()[0] == []
    a.close()
    b.close()


def test_a_directory_or_url_that_is_no_castore_cache_is_named(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "castore-cache.json").write_text("<html>index</html>")
    proc = castore("pull", "a" * 64, "--from", str(tmp_path / "site"), store=tmp_path / "b", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: file://{tmp_path / 'site'}/castore-cache.json is not JSON" in proc.stderr
    assert "hint: is this the URL or directory of a castore cache?" in proc.stderr


def test_a_corrupt_chunk_in_a_seeded_pull_adds_nothing_and_the_rerun_completes(tmp_path: Path) -> None:
    a, cache, b, id1, id2, v2 = _v1_pulled(tmp_path, 13, 3 << 20, (2_000_000, 300_000))
    sent = {c for c, _ in record_of(cache, id2).chunks} - {c for c, _ in record_of(cache, id1).chunks}
    bad = cache.root / chunk_path(max(sent))
    good = bad.read_bytes()
    bad.write_bytes(zstandard.ZstdCompressor().compress(b"not this chunk"))
    with pytest.raises(CastoreError, match=r"chunk [0-9a-f]{64} from .* is 14 bytes, its record says"):
        pull(b, cache, [id2])  # while the seeded runs are being copied beside the fetch
    assert not b.has(id2) and b.verify()[0] == []
    bad.write_bytes(good)
    cache.gets.clear()
    s = pull(b, cache, [id2])
    assert b.blob_path(id2).read_bytes() == v2 and s.chunks_seeded > 0
    lists = {lid for lid, _, _ in ObjectRecord.decode(id2, cache.get(object_path(id2)) or b"").lists}
    fetched = {g.rpartition("/")[2] for g in cache.gets if g.startswith("chunks/")} - lists
    assert fetched and fetched <= sent  # none of v1's chunks: those were copied from the local blob
    a.close()
    b.close()


def test_chunks_that_come_before_their_turn_wait_in_the_partial_file(tmp_path: Path) -> None:
    """Objects are written front to back, one at a time: a chunk one object holds twice, or one
    that another object needed first, comes before its turn and waits on disk until then."""
    rng = random.Random(7)
    r1, r2, r3 = rng.randbytes(1 << 20), rng.randbytes(700_000), rng.randbytes(900_000)
    a = LocalStore(tmp_path / "a")
    ids = [a.add_file(blob_file(tmp_path, n, d)) for n, d in (("x", r1 + r2 + r1 + r3), ("y", r3 + r1))]
    (tmp_path / "cache").mkdir()
    cache = Counting(tmp_path / "cache")
    push(a, cache, ids)
    distinct = {c for oid in ids for c, _ in record_of(cache, oid).chunks}
    cache.gets.clear()
    b = LocalStore(tmp_path / "b")
    stats = pull(b, cache, ids)
    assert stats.chunks_fetched == len(distinct)
    assert stats.chunks_fetched + stats.lists == len([g for g in cache.gets if g.startswith("chunks/")])
    assert [b.blob_path(o).read_bytes() for o in ids] == [r1 + r2 + r1 + r3, r3 + r1]
    assert b.verify() == ([], []) and os.listdir(b.tmp / "pulls") == []
    a.close()
    b.close()


def _pulled(tmp_path: Path, datas: list[bytes]) -> None:
    a = LocalStore(tmp_path / "a")
    ids = [a.add_file(blob_file(tmp_path, f"f{i}", d)) for i, d in enumerate(datas)]
    (tmp_path / "cache").mkdir()
    push(a, DirTransport(tmp_path / "cache"), ids)
    b = LocalStore(tmp_path / "b")
    pull(b, DirTransport(tmp_path / "cache"), ids)
    assert [b.blob_path(o).read_bytes() for o in ids] == datas
    assert b.verify() == ([], []) and os.listdir(b.tmp / "pulls") == []
    a.close()
    b.close()


_R = random.Random(5)
_P = [_R.randbytes(n) for n in (900_000, 700_000, 1 << 20, 300_000, 5 << 20)]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("datas", [
    *([random.Random(n).randbytes(n)] for n in (0, 1, 4095, 4096, 65537, (8 << 20) + 1)),
    [_P[4] + _P[0] + _P[0] + _P[1], _P[1] + _P[0] + _P[4], _P[3] * 3 + _P[2], _P[2] + _P[4] + _P[0], b"", _P[0]],
], ids=["0", "1", "4095", "4096", "64k+1", "8M+1", "shared"])
def test_pulls_come_out_whole_with_o_direct_or_without(tmp_path: Path, datas: list[bytes], direct: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes around the block and piece ends; and objects sharing chunks in every order."""
    if not direct:  # a filesystem that refuses O_DIRECT
        monkeypatch.setattr(fsutil, "_set_direct", lambda fd, on=True: False)
    _pulled(tmp_path, datas)


class _Stalling(DirTransport):
    """Serves `before` chunks, then hangs (a stalled link) until released."""

    def __init__(self, root: Path, before: int) -> None:
        super().__init__(root)
        self.before, self.served = before, 0
        self.stalled, self.release = threading.Event(), threading.Event()
        self.watched: set[str] = set()  # the object's chunks (not its list chunks)

    def get(self, path: str) -> bytes | None:
        if path in self.watched:
            if self.served == self.before:
                self.stalled.set()
                self.release.wait(30)
            self.served += 1
        return super().get(path)


@pytest.mark.parametrize("size", [3 << 20, 600_000], ids=["large", "small"])
def test_verified_chunks_reach_the_partial_file_while_the_link_stalls(tmp_path: Path, size: int) -> None:
    """What a kill -9 would find: the chunks verified before the stall, on disk (a large object's
    by DirectWriter's checkpoints, a small one's written through)."""
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "x", random.Random(1).randbytes(size)))
    push(a, DirTransport(tmp_path / "cache", create=True), [oid])
    cache = _Stalling(tmp_path / "cache", before=3)
    rec = record_of(cache, oid)
    cache.watched = {chunk_path(c) for c, _ in rec.chunks}
    b = LocalStore(tmp_path / "b")
    puller = threading.Thread(target=pull, args=(b, cache, [oid]))
    puller.start()
    try:
        assert cache.stalled.wait(10)
        deadline, verified = time.monotonic() + 5, [False]
        while not all(verified) and time.monotonic() < deadline:
            time.sleep(0.1)
            with open(b.tmp / "pulls" / oid, "rb") as f:
                offsets = [sum(n for _, n in rec.chunks[:i]) for i in range(3)]
                verified = [hash_bytes(os.pread(f.fileno(), n, at)) == cid
                            for (cid, n), at in zip(rec.chunks[:3], offsets, strict=True)]
        assert all(verified) and time.monotonic() < deadline - 4  # within a second (checkpoints: 0.5 s)
    finally:
        cache.release.set()
        puller.join()
    assert b.has(oid)
    a.close()
    b.close()


def test_a_full_disk_behind_a_dropped_link_is_the_store_s_error(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the link is up; the link drops before the writer says so: the
    error is the store's (no next substituter, the hint to free space), not the cache's."""
    a = LocalStore(tmp_path / "a")
    oid = a.add_file(blob_file(tmp_path, "x", random.Random(3).randbytes(6 << 20)))
    push(a, DirTransport(tmp_path / "cache", create=True), [oid])
    real = os.pwrite

    def pwrite(fd: int, data: bytes, at: int) -> int:  # the writer thread's pieces find the disk full
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    b = LocalStore(tmp_path / "b")
    with pytest.raises(StoreError, match="no space left"):
        pull(b, Counting(tmp_path / "cache", fail_after=150), [oid])  # 150 chunks: past the first piece
    monkeypatch.undo()
    assert b.objects() == []
    a.close()
    b.close()


class _Killed(BaseException):
    """What a kill -9 would leave, at a chosen point."""


def test_a_pull_killed_as_it_finishes_an_object_resumes_without_fetching(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the padded last block went out, before the file was cut to its size."""
    a = LocalStore(tmp_path / "a")
    data = random.Random(3).randbytes(3_000_001)  # its last block is not whole
    oid = a.add_file(blob_file(tmp_path, "x", data))
    push(a, DirTransport(tmp_path / "cache", create=True), [oid])
    b = LocalStore(tmp_path / "b")

    def finish_then_die(self: fsutil.DirectWriter) -> int:
        self._send()
        self._wait()
        raise _Killed

    monkeypatch.setattr(fsutil.DirectWriter, "finish", finish_then_die)
    with pytest.raises(_Killed):
        pull(b, DirTransport(tmp_path / "cache"), [oid])
    assert (b.tmp / "pulls" / oid).stat().st_size > len(data)
    monkeypatch.undo()
    s = pull(b, Counting(tmp_path / "cache"), [oid])
    assert b.has(oid) and s.chunks_fetched == 0
    a.close()
    b.close()


def test_a_failed_pull_adds_the_objects_it_finished(tmp_path: Path) -> None:
    """Objects enter the store in batches: those whole when the link dropped are kept, added."""
    a = LocalStore(tmp_path / "a")
    datas = [random.Random(i).randbytes(20_000) for i in range(12)]  # one chunk each, put together in memory
    ids = [a.add_file(blob_file(tmp_path, f"f{i}", d)) for i, d in enumerate(datas)]
    tid = a.add_tree(Tree.build(Entry(f"f{i:02}", "file", 0o644, blob=oid, size=len(d))
                                for i, (oid, d) in enumerate(zip(ids, datas, strict=True))))
    (tmp_path / "cache").mkdir()
    push(a, DirTransport(tmp_path / "cache"), [tid])
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError, match="connection dropped"):
        pull(b, Counting(tmp_path / "cache", fail_after=8), [tid])
    kept = {o.id for o in b.objects()}
    assert kept and kept < set(ids)  # blobs whole before the drop; not the tree, whose blobs are not all there
    assert b.verify()[0] == []  # its notes: the partial objects the next pull keeps
    again = Counting(tmp_path / "cache")
    stats = pull(b, again, [tid])
    assert stats.objects == 13 - len(kept)
    fetched = {g.rpartition("/")[2] for g in again.gets if g.startswith("chunks/")}
    assert not fetched & {c for oid in kept for c, _ in record_of(again, oid).chunks}
    assert b.verify() == ([], [])
    a.close()
    b.close()


def test_objects_whole_but_not_yet_in_the_store_wait_in_their_partial_files(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed before a batch went in: the objects it held are found whole by the next pull."""
    a = LocalStore(tmp_path / "a")
    ids = [a.add_file(blob_file(tmp_path, f"f{i}", random.Random(i).randbytes(n)))
           for i, n in enumerate((50_000, 600_000))]  # small: they wait for a batch (large ones go in at once)
    push(a, DirTransport(tmp_path / "cache", create=True), ids)
    b = LocalStore(tmp_path / "b")

    def killed(self: LocalStore) -> None:
        raise _Killed

    monkeypatch.setattr(LocalStore, "flush", killed)
    with pytest.raises(_Killed):
        pull(b, DirTransport(tmp_path / "cache"), ids)
    monkeypatch.undo()
    assert b.objects() == [] and sorted(os.listdir(b.tmp / "pulls")) == sorted(ids)
    stats = pull(b, Counting(tmp_path / "cache"), ids)
    assert stats.objects == 2 and stats.chunks_fetched == 0
    assert b.verify() == ([], [])
    a.close()
    b.close()


def _ordered(a: LocalStore, tmp_path: Path, first: bytes, then: bytes) -> tuple[str, str]:
    """Add two blobs whose ids put `first` first in a pull's order (refs first, then by id,
    largest first): the seed is varied until they do."""
    for seed in range(100):
        salt = random.Random(seed).randbytes(8)
        x, y = a.add_file(blob_file(tmp_path, "x", first + salt)), a.add_file(blob_file(tmp_path, "y", then + salt))
        if x > y:
            return x, y
    raise AssertionError("no order found")


def test_a_small_object_s_chunks_that_came_before_their_turn_are_kept(tmp_path: Path) -> None:
    """A pull fails while writing X; Y, small, got X's shared chunks before its turn: the next
    pull keeps them (its partial file is checked chunk by chunk, whatever its size)."""
    a = LocalStore(tmp_path / "a")
    x = random.Random(9).randbytes(2_000_000)
    big, small = _ordered(a, tmp_path, x, x[:400_000])
    (tmp_path / "cache").mkdir()
    cache = Counting(tmp_path / "cache")
    push(a, cache, [big, small])
    xc = [c for c, _ in record_of(cache, big).chunks]
    shared = set(xc) & {c for c, _ in record_of(cache, small).chunks}
    assert shared
    last = cache.root / chunk_path(xc[-1])
    saved = last.read_bytes()
    last.unlink()
    b = LocalStore(tmp_path / "b")
    with pytest.raises(NotFound):
        pull(b, cache, [big, small])
    last.write_bytes(saved)
    cache.gets.clear()
    pull(b, cache, [big, small])
    assert not {g.rpartition("/")[2] for g in cache.gets if g.startswith("chunks/")} & shared
    assert b.verify() == ([], [])
    a.close()
    b.close()


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_an_object_finished_before_the_disk_filled_is_in_the_store(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A large object goes in as soon as it is whole: the next one filling the disk takes
    nothing from it, and the error is the disk's, with the pull's hint."""
    a = LocalStore(tmp_path / "a")
    first, then = _ordered(a, tmp_path, random.Random(1).randbytes(3 << 19), random.Random(2).randbytes(3 << 20))
    push(a, DirTransport(tmp_path / "cache", create=True), [first, then])
    monkeypatch.setattr("castore.cache.copy.free_bytes", lambda path: 1 << 40)  # past the check for room
    with tiny_tmpfs(tmp_path / "small", "4m") as small, LocalStore(small / "s") as b:
        with pytest.raises(StoreError, match="no space left") as err:
            pull(b, DirTransport(tmp_path / "cache"), [first, then])
        assert "castore gc also removes partial pulls" in (err.value.hint or "")
        assert b.has(first) and not b.has(then) and b.stray_files() == []
    a.close()


def test_a_damaged_store_is_repaired_by_verify_repair_then_pull_and_never_pushed(tmp_path: Path) -> None:
    """A byte flipped in a blob: push refuses it (every puller would blame the cache), verify
    --repair removes the file, and pull, which takes an object without its file as absent,
    puts the good copy back."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    res = castore_json("realize", "tests/recipes/small.py:layer", store=a)
    castore("push", res["id"], "--to", str(cache), store=a)
    castore("pull", res["id"], "--from", str(cache), store=b)
    motd = hash_bytes(b"welcome\n")
    damaged = b / "blobs" / motd[:2] / motd
    damaged.chmod(0o644)
    damaged.write_bytes(b"welcomE\n")
    damaged.chmod(0o444)
    refused = castore("push", res["id"], "--to", str(tmp_path / "cache2"), store=b, check=False)
    assert refused.returncode == 1 and f"object {motd} is damaged" in refused.stderr
    assert "castore verify --repair" in refused.stderr
    assert not (tmp_path / "cache2" / "objects" / motd).exists()
    found = castore("verify", store=b, check=False)
    assert found.returncode == 1 and "verify --repair" in found.stderr
    castore("verify", "--repair", store=b, check=False)
    assert not damaged.exists()
    again = castore_json("pull", res["id"], "--from", str(cache), store=b)
    assert again["ids"] == [motd] and damaged.read_bytes() == b"welcome\n"
    assert castore_json("verify", store=b)["ok"]


def test_pull_root_keeps_what_it_pulled_through_gc(tmp_path: Path) -> None:
    a, b, c, cache = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "cache"
    res = castore_json("realize", "tests/recipes/small.py:layer", store=a)
    castore("push", res["id"], "--to", str(cache), store=a)
    castore("pull", res["id"], "--from", str(cache), "--root", "layer", store=b)
    assert castore_json("gc", store=b)["deleted"] == []
    assert castore_json("verify", store=b)["ok"] and len(castore_json("ls", store=b)) == 3
    castore("pull", res["id"], "--from", str(cache), store=c)  # no root: the next gc takes it
    assert len(castore_json("gc", store=c)["deleted"]) == 3
    two = castore("pull", res["id"], "0" * 64, "--from", str(cache), "--root", "x", store=c, check=False)
    assert two.returncode == 1 and "--root names one object" in two.stderr
