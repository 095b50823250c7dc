"""The cache's files: their paths and their records, encoded canonically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from castore import canonical
from castore.chunking import ChunkParams
from castore.errors import EncodingError
from castore.hashing import hash_bytes, is_id
from castore.manifest import FORMAT

CONFIG = "castore-cache.json"
COMPRESSION = "zstd"
CACHE_FORMAT = 2  # 2: chunk ids in object records are 32-byte bin, half the bytes of format 1's hex


def object_path(oid: str) -> str:
    return f"objects/{oid}"


def chunk_path(cid: str) -> str:
    return f"chunks/{cid[:2]}/{cid}"


@dataclass(frozen=True)
class CacheConfig:
    chunking: ChunkParams
    compression: str = COMPRESSION

    def encode(self) -> bytes:
        rec = {"format": CACHE_FORMAT, "chunking": self.chunking.to_record(), "compression": self.compression}
        return (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> CacheConfig:
        try:
            rec = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EncodingError(f"{CONFIG} is not JSON: {exc}") from exc
        if not isinstance(rec, dict) or rec.get("format") != CACHE_FORMAT:
            raise EncodingError(f"{CONFIG}: cache format {rec.get('format') if isinstance(rec, dict) else rec!r} "
                                f"is not supported (this castore reads format {CACHE_FORMAT})",
                                "push to a new cache directory with this castore")
        if rec.get("compression") != COMPRESSION:
            raise EncodingError(f"{CONFIG}: compression {rec.get('compression')!r} is not {COMPRESSION}")
        return cls(ChunkParams.from_record(rec.get("chunking")), COMPRESSION)


@dataclass(frozen=True)
class ObjectRecord:
    """What a cache keeps per object: its kind, size, references and chunks, in order.

    Grammar (format 2)::

        {"format": 2, "kind": "blob" | "tree" | "image", "size": int, "refs": [id, ...],
         "chunks": [[bin(32) chunk id, length], ...]}
    """

    id: str
    kind: str
    size: int
    refs: tuple[str, ...]
    chunks: tuple[tuple[str, int], ...]

    def encode(self) -> bytes:
        return canonical.encode({
            "format": CACHE_FORMAT, "kind": self.kind, "size": self.size, "refs": sorted(self.refs),
            "chunks": [[bytes.fromhex(c), n] for c, n in self.chunks],
        })

    @classmethod
    def decode(cls, oid: str, data: bytes) -> ObjectRecord:
        rec = canonical.decode(data, f"object record {oid}")
        try:
            if rec["format"] != CACHE_FORMAT:
                raise EncodingError(f"object record {oid}: format {rec['format']} is not supported")
            kind, size, refs = rec["kind"], rec["size"], tuple(rec["refs"])
            if not all(isinstance(c, bytes) and len(c) == 32 and isinstance(n, int) and n > 0
                       for c, n in rec["chunks"]):
                raise EncodingError(f"object record {oid} lists a bad chunk")
            chunks = tuple((c.hex(), n) for c, n in rec["chunks"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EncodingError(f"object record {oid} is malformed: {exc}") from exc
        if kind not in ("blob", "tree", "image") or not all(is_id(r) for r in refs):
            raise EncodingError(f"object record {oid} has a bad kind or reference")
        if sum(n for _, n in chunks) != size:
            raise EncodingError(f"object record {oid}: chunk lengths add up to "
                                f"{sum(n for _, n in chunks)}, not its size {size}")
        return cls(oid, kind, size, refs, chunks)


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
        rec = canonical.decode(data, f"realisation {plan_hash}")
        try:
            if rec["format"] != FORMAT or rec["kind"] != "realisation":
                raise EncodingError(f"realisation {plan_hash}: not a format {FORMAT} realisation")
            out = cls(rec["plan"], rec["object"], rec["record"],
                      tuple((s["key"], s["sig"]) for s in rec["signatures"]))
        except (KeyError, TypeError) as exc:
            raise EncodingError(f"realisation {plan_hash} is malformed: {exc}") from exc
        if out.plan != plan_hash:
            raise EncodingError(f"realisation {plan_hash} is for another plan ({out.plan})")
        if not is_id(out.object) or not isinstance(out.record, bytes) or hash_bytes(out.record) != plan_hash:
            raise EncodingError(f"realisation {plan_hash}: its plan record does not hash to its plan")
        return out


def check_chunk(cid: str, data: bytes) -> None:
    actual = hash_bytes(data)
    if actual != cid:
        raise EncodingError(f"chunk {cid} holds bytes that hash to {actual}")


def record_fields(rec: ObjectRecord) -> dict[str, Any]:
    return {"id": rec.id, "kind": rec.kind, "size": rec.size, "refs": list(rec.refs), "chunks": len(rec.chunks)}
