"""The cache's files: their paths and their records, encoded canonically.

A cache is untrusted input: every record is decoded into exactly the fields of
its grammar, each of its type and within its range, or refused with an
:class:`~castore.errors.EncodingError` (nothing is added from a record that
does not decode).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from castore import canonical
from castore.chunking import ChunkParams
from castore.errors import EncodingError, NotFound, UnsafeArchive
from castore.hashing import hash_bytes, is_id
from castore.manifest import FORMAT, KINDS, MAX_SIZE, Image, Tree, brief

CONFIG = "castore-cache.json"
COMPRESSION = "zstd"
CACHE_FORMAT = 3  # 3: records of over INLINE_CHUNKS chunks name list chunks; 2: every record lists its chunks
READ_FORMATS = (2, 3)  # a format 2 cache (older castore reads it) keeps getting format 2 records
MAX_CHUNK = 16 << 20  # the largest chunking max ChunkParams allows: no chunk is longer
CORRUPT = "the cache is corrupt; nothing was added"
_RECORD_KEYS = frozenset(("format", "kind", "size", "refs", "chunks"))
_LISTED_KEYS = frozenset(("format", "kind", "size", "refs", "lists"))
_REALISATION_KEYS = frozenset(("format", "kind", "plan", "object", "record", "signatures"))


def object_path(oid: str) -> str:
    return f"objects/{oid}"


def chunk_path(cid: str) -> str:
    return f"chunks/{cid[:2]}/{cid}"


@dataclass(frozen=True)
class CacheConfig:
    chunking: ChunkParams
    compression: str = COMPRESSION
    format: int = CACHE_FORMAT

    @property
    def listed(self) -> bool:
        """Whether records of many chunks name list chunks (older castore cannot read those)."""
        return self.format >= 3

    def encode(self) -> bytes:
        rec = {"format": self.format, "chunking": self.chunking.to_record(), "compression": self.compression}
        return (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> CacheConfig:
        try:
            rec = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise EncodingError(f"{CONFIG} is not JSON: {exc}") from exc
        if not isinstance(rec, dict) or rec.get("format") not in READ_FORMATS or type(rec["format"]) is not int:
            raise EncodingError(f"{CONFIG}: cache format {rec.get('format') if isinstance(rec, dict) else rec!r} "
                                f"is not supported (this castore reads formats 2 and 3)",
                                "upgrade castore, or push to a new cache directory with this castore")
        if rec.get("compression") != COMPRESSION:
            raise EncodingError(f"{CONFIG}: compression {brief(rec.get('compression'))} is not {COMPRESSION}")
        chunking = rec.get("chunking")
        if not isinstance(chunking, dict) or not all(type(chunking.get(k)) is int for k in ("min", "avg", "max")):
            raise EncodingError(f"{CONFIG}: chunking {brief(chunking)} does not give min, avg and max as ints")
        return cls(ChunkParams.from_record(chunking), COMPRESSION, rec["format"])


INLINE_CHUNKS = 64  # a record of more chunks lists them in list chunks
LIST_CUT = 32  # a list chunk ends after a chunk id whose first 32 bits are LIST_CUT - 1 modulo LIST_CUT
LIST_MAX = 256  # ... or after this many entries
_ENTRY_MAX = 48  # bytes of one encoded [bin(32), length] entry, with room
LIST_BYTES = LIST_MAX * _ENTRY_MAX + 16  # the most a list chunk may hold


@dataclass(frozen=True)
class ChunkList:
    """A piece of an object's chunk list, kept as a chunk of its own (``chunks/``, zstd) so that
    the next version of an image shares it: its cuts depend only on the chunk ids it lists."""

    id: str  # the BLAKE3 of data
    data: bytes  # canonical msgpack [[bin(32) chunk id, length], ...]
    count: int
    size: int  # bytes of the object its chunks make up


def chunk_lists(chunks: tuple[tuple[str, int], ...]) -> list[ChunkList]:
    lists: list[ChunkList] = []
    piece: list[tuple[str, int]] = []
    for cid, length in chunks:
        piece.append((cid, length))
        if len(piece) == LIST_MAX or int(cid[:8], 16) % LIST_CUT == LIST_CUT - 1:
            lists.append(_chunk_list(piece))
            piece = []
    if piece:
        lists.append(_chunk_list(piece))
    return lists


def _chunk_list(piece: list[tuple[str, int]]) -> ChunkList:
    data = canonical.encode([[bytes.fromhex(c), n] for c, n in piece])
    return ChunkList(hash_bytes(data), data, len(piece), sum(n for _, n in piece))


def list_entries(lid: str, data: bytes) -> tuple[tuple[str, int], ...]:
    """The (chunk id, length) entries a list chunk's bytes hold, checked."""
    return _entries(canonical.decode(data, f"list chunk {lid}"), f"list chunk {lid}")


def _entries(value: Any, what: str) -> tuple[tuple[str, int], ...]:
    """[[bin(32), length], ...] checked: every length positive and at most MAX_CHUNK."""
    if not isinstance(value, list):
        raise EncodingError(f"{what} lists a bad chunk", CORRUPT)
    for c in value:
        if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], bytes) and len(c[0]) == 32
                and type(c[1]) is int and c[1] > 0):
            raise EncodingError(f"{what} lists a bad chunk", CORRUPT)
        if c[1] > MAX_CHUNK:
            raise EncodingError(f"{what} lists a chunk of {c[1]} bytes; no chunk is over "
                                f"{MAX_CHUNK >> 20} MiB", CORRUPT)
    return tuple((c.hex(), n) for c, n in value)


@dataclass(frozen=True)
class ObjectRecord:
    """What a cache keeps per object: its kind, size, references and chunks, in order.

    Grammar, format 2 (up to INLINE_CHUNKS chunks)::

        {"format": 2, "kind": "blob" | "tree" | "image", "size": int, "refs": [id, ...],
         "chunks": [[bin(32) chunk id, length], ...]}

    and format 3, where the chunk list is cut into list chunks (:class:`ChunkList`)::

        {"format": 3, "kind": ..., "size": int, "refs": [id, ...],
         "lists": [[bin(32) list chunk id, chunks it lists, bytes they hold], ...]}

    A decoded format 3 record knows its lists but not yet its chunks (:attr:`complete` is
    False) until :meth:`resolve` is given the list chunks.
    """

    id: str
    kind: str
    size: int
    refs: tuple[str, ...]
    chunks: tuple[tuple[str, int], ...]
    lists: tuple[tuple[str, int, int], ...] = ()  # (list chunk id, count, size), from a format 3 record

    @property
    def complete(self) -> bool:
        return bool(self.chunks) or not self.lists

    def chunk_lists(self, listed: bool = True) -> list[ChunkList]:
        """The list chunks to publish (before the record) when the record is format 3 (listed:
        the cache takes those, CacheConfig.listed); else none."""
        return chunk_lists(self.chunks) if listed and len(self.chunks) > INLINE_CHUNKS else []

    def check_chunks(self, chunking: ChunkParams) -> None:
        """No chunk may be longer than the cache's chunking maximum, nor may a record list more
        chunks than its size allows at the chunking minimum (every chunk but the last is at
        least that long): a record must not make a reader allocate what it never verifies."""
        longest = max((n for _, n in self.chunks), default=0)
        if longest > chunking.max:
            raise EncodingError(f"object record {self.id} lists a chunk of {longest} bytes, longer than "
                                f"the cache's chunking maximum of {chunking.max}", CORRUPT)
        self.check_count(len(self.chunks), chunking)

    def check_count(self, count: int, chunking: ChunkParams) -> None:
        if count > self.size // chunking.min + 1:
            raise EncodingError(f"object record {self.id} lists {count} chunks, more than {self.size} bytes "
                                f"make at the cache's chunking minimum of {chunking.min}", CORRUPT)

    def encode(self, listed: bool = True) -> bytes:
        if not self.complete:
            raise EncodingError(f"object record {self.id}: its chunk lists were never read (resolve)")
        head = {"kind": self.kind, "size": self.size, "refs": sorted(self.refs)}
        lists = self.chunk_lists(listed)
        if lists:
            return canonical.encode({**head, "format": 3,
                                     "lists": [[bytes.fromhex(c.id), c.count, c.size] for c in lists]})
        return canonical.encode({**head, "format": 2,
                                 "chunks": [[bytes.fromhex(c), n] for c, n in self.chunks]})

    @classmethod
    def decode(cls, oid: str, data: bytes) -> ObjectRecord:
        what = f"object record {oid}"
        rec = canonical.decode(data, what)
        if not isinstance(rec, dict) or rec.keys() not in (_RECORD_KEYS, _LISTED_KEYS):
            raise EncodingError(f"{what} is malformed: not a map of {', '.join(sorted(_RECORD_KEYS))} "
                                "(or lists instead of chunks)", CORRUPT)
        if rec["format"] != (2 if "chunks" in rec else 3):
            raise EncodingError(f"{what}: format {brief(rec['format'])} is not supported",
                                "a newer or older castore wrote this cache: upgrade, or push to a new cache directory")
        kind, size, refs = rec["kind"], rec["size"], rec["refs"]
        if not isinstance(kind, str) or kind not in KINDS:
            raise EncodingError(f"{what} has a bad kind {brief(kind)}", CORRUPT)
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            raise EncodingError(f"{what} has a bad size {brief(size)}", CORRUPT)
        if not isinstance(refs, list) or not all(isinstance(r, str) and is_id(r) for r in refs):
            raise EncodingError(f"{what} has a bad reference", CORRUPT)
        if kind == "blob" and refs:
            raise EncodingError(f"{what} is a blob with references: a blob names nothing", CORRUPT)
        if "chunks" in rec:
            chunks = _entries(rec["chunks"], what)
            total = sum(n for _, n in chunks)
            if total != size:
                raise EncodingError(f"{what}: chunk lengths add up to {total}, not its size {size}", CORRUPT)
            return cls(oid, kind, size, tuple(refs), chunks)
        lists = rec["lists"]
        if not isinstance(lists, list) or not lists or not all(
                isinstance(c, list) and len(c) == 3 and isinstance(c[0], bytes) and len(c[0]) == 32
                and type(c[1]) is int and 0 < c[1] <= LIST_MAX and type(c[2]) is int and c[2] > 0 for c in lists):
            raise EncodingError(f"{what} lists a bad list chunk", CORRUPT)
        total = sum(c[2] for c in lists)
        if total != size:
            raise EncodingError(f"{what}: its list chunks add up to {total} bytes, not its size {size}", CORRUPT)
        return cls(oid, kind, size, tuple(refs), (), tuple((c[0].hex(), c[1], c[2]) for c in lists))

    def resolve(self, found: Callable[[str], bytes | None], chunking: ChunkParams) -> ObjectRecord:
        """The record with its chunks, read from its list chunks (found: list chunk id -> its
        bytes, decompressed, or None; asked once per list chunk). Each must hash to its id and
        list what the record says, and the count they add up to is checked (check_count) first."""
        if self.complete:
            return self
        self.check_count(sum(count for _, count, _ in self.lists), chunking)
        what = f"object record {self.id}"
        chunks: list[tuple[str, int]] = []
        decoded: dict[str, tuple[tuple[str, int], ...]] = {}
        for lid, count, size in self.lists:
            entries = decoded.get(lid)
            if entries is None:
                data = found(lid)
                if data is None:
                    raise NotFound(f"{what} names list chunk {lid}, which is not there",
                                   "the cache is incomplete; nothing was added")
                if hash_bytes(data) != lid:
                    raise EncodingError(f"{what}: list chunk {lid} holds bytes that hash to {hash_bytes(data)}",
                                        CORRUPT)
                entries = decoded[lid] = list_entries(lid, data)
            if len(entries) != count or sum(n for _, n in entries) != size:
                raise EncodingError(f"{what}: list chunk {lid} lists {len(entries)} chunks of "
                                    f"{sum(n for _, n in entries)} bytes, the record says {count} of {size}", CORRUPT)
            chunks += entries
        return ObjectRecord(self.id, self.kind, self.size, self.refs, tuple(chunks), self.lists)


def realisation_path(plan_hash: str) -> str:
    return f"realisations/{plan_hash}"


@dataclass(frozen=True)
class RealisationRecord:
    """"Plan P produced object O", with the plan record itself and ed25519 signatures over (P, O).

    Grammar::

        {"format": 1, "kind": "realisation", "plan": hash, "object": id,
         "record": bin (the canonical plan record; its BLAKE3 is "plan"),
         "signatures": [{"key": key name, "sig": bin(64)}, ...]}

    What is signed is :meth:`message`: the canonical ``{format, kind, plan, object}``.
    """

    plan: str
    object: str
    record: bytes
    signatures: tuple[tuple[str, bytes], ...] = ()

    def message(self) -> bytes:
        return canonical.encode({"format": FORMAT, "kind": "realisation", "plan": self.plan, "object": self.object})

    def encode(self) -> bytes:
        return canonical.encode({
            "format": FORMAT, "kind": "realisation", "plan": self.plan, "object": self.object,
            "record": self.record,
            "signatures": [{"key": k, "sig": s} for k, s in sorted(self.signatures)],
        })

    @classmethod
    def decode(cls, plan_hash: str, data: bytes) -> RealisationRecord:
        what = f"realisation {plan_hash}"
        rec = canonical.decode(data, what)
        if not isinstance(rec, dict) or rec.keys() != _REALISATION_KEYS:
            raise EncodingError(f"{what} is malformed: not a map of {', '.join(sorted(_REALISATION_KEYS))}")
        if type(rec["format"]) is not int or rec["format"] != FORMAT or rec["kind"] != "realisation":
            raise EncodingError(f"{what}: not a format {FORMAT} realisation")
        plan, oid, record, sigs = rec["plan"], rec["object"], rec["record"], rec["signatures"]
        if plan != plan_hash:
            raise EncodingError(f"{what} is for another plan ({brief(plan)})")
        if not isinstance(oid, str) or not is_id(oid):
            raise EncodingError(f"{what} names {brief(oid)}, not an object id")
        if not isinstance(record, bytes) or hash_bytes(record) != plan_hash:
            raise EncodingError(f"{what}: its plan record does not hash to its plan")
        if not isinstance(sigs, list) or not all(
                isinstance(s, dict) and s.keys() == {"key", "sig"} and isinstance(s["key"], str) and s["key"]
                and isinstance(s["sig"], bytes) and len(s["sig"]) == 64 for s in sigs):
            raise EncodingError(f"{what} has a malformed signature (each is a key name and 64 bytes)")
        return cls(plan, oid, record, tuple((s["key"], s["sig"]) for s in sigs))


def merged_realisation(plan_hash: str, old: bytes | None, new: bytes) -> bytes:
    """What to store when realisation `new` arrives where `old` is: for the same object, one
    record with the signatures of both, so a lab's signature is not lost to another's push."""
    if old is None:
        return new
    try:
        prev = RealisationRecord.decode(plan_hash, old)
    except EncodingError:
        return new  # what was there is damaged: the new one replaces it
    rec = RealisationRecord.decode(plan_hash, new)
    if prev.object != rec.object:
        return new
    sigs = dict(prev.signatures) | dict(rec.signatures)
    return RealisationRecord(rec.plan, rec.object, rec.record, tuple(sorted(sigs.items()))).encode()


def frame_limit(length: int) -> int:
    """The most bytes a zstd frame of length bytes takes: zstd's worst case, incompressible data, with room."""
    return length + length // 64 + 4096


def unframe(frame: bytes, limit: int, dctx: zstandard.ZstdDecompressor | None = None, *,
            whole: bool = False, most: str = "") -> bytes:
    """The bytes of one zstd frame, never more than limit. A frame whose header claims more is
    refused before anything is decompressed: max_output_size bounds only frames that do not say
    their size, and a 2 KB frame can say 64 MiB of zeros. whole: nothing may follow the frame (a
    second frame, padding), as a server must insist before it keeps a chunk. most: what limit is,
    for the error (default: "the N bytes it may hold")."""
    try:
        claimed = zstandard.get_frame_parameters(frame).content_size
        if claimed != zstandard.CONTENTSIZE_UNKNOWN and claimed > limit:
            raise EncodingError(f"a zstd frame that holds {claimed} bytes, more than "
                                f"{most or f'the {limit} bytes it may hold'}")
        data = (dctx or zstandard.ZstdDecompressor()).decompress(frame, max_output_size=limit)
        if len(data) > limit:  # cannot happen (the bound above); said plainly if it ever does
            raise EncodingError(f"a zstd frame of {len(data)} bytes, more than {most or limit}")
        if whole:
            rest = zstandard.ZstdDecompressor().decompressobj()
            rest.decompress(frame)  # the frame just decompressed within limit: bounded as well
            if not rest.eof or rest.unused_data:
                raise EncodingError(f"{len(rest.unused_data)} bytes after its zstd frame; a chunk is one "
                                    "frame and nothing else")
    except zstandard.ZstdError as exc:
        raise EncodingError(f"not a valid zstd frame: {exc}") from exc
    return data


def check_chunk(cid: str, data: bytes) -> None:
    actual = hash_bytes(data)
    if actual != cid:
        raise EncodingError(f"chunk {cid} holds bytes that hash to {actual}")


def kind_check(rec: ObjectRecord, data: bytes, known: Callable[[list[str]], dict[str, tuple[str, int]]]) -> None:
    """Trees and images (data: the object's bytes) must decode before they enter a store or a
    cache, with the references their record lists; every reference must be a blob, and a tree's
    file entries must give the sizes of their blobs (known: ids -> (kind, size) of those known)."""
    if rec.kind not in ("tree", "image"):
        return
    try:
        if rec.kind == "tree":
            tree = Tree.decode(data)
            refs = tree.refs()
        else:
            refs = Image.decode(data).refs()
    except (EncodingError, UnsafeArchive) as exc:
        raise EncodingError(f"{rec.kind} {rec.id}: {exc.message}", CORRUPT) from exc
    if sorted(refs) != sorted(rec.refs):
        raise EncodingError(f"{rec.kind} {rec.id}: its record's references do not match its manifest", CORRUPT)
    found = known(refs)
    for ref in refs:
        if (kind := found.get(ref, ("unknown object", 0))[0]) != "blob":
            raise EncodingError(f"{rec.kind} {rec.id} refers to {ref} as a blob, but it is a {kind}", CORRUPT)
    if rec.kind == "tree":
        sizes = {oid: size for oid, (_, size) in found.items()}
        for e in tree:
            if e.type == "file" and e.blob is not None and e.size != (actual := sizes.get(e.blob)):
                raise EncodingError(f"tree {rec.id}: {e.path!r} says {e.size} bytes, but its blob {e.blob} "
                                    f"has {actual}", CORRUPT)
