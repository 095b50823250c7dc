"""Content-defined chunking of blobs (FastCDC 2020), the unit a binary cache stores and moves.

Cut points depend only on the bytes, so two squashfs images that differ in one
file share most chunks even though the change moves every later byte. A
chunk's id is the BLAKE3 of its uncompressed bytes. The parameters are fixed
per cache (``castore-cache.json``): changing them moves every cut point.

Why 8/32/128 KiB (min/avg/max), measured on the Debian minbase squashfs (57 MiB) and a
v2 with /etc/hostname changed and 5 MiB of random bytes added. What a pull of v2 moves when
v1 is there is the new chunks plus v2's record, which listed every chunk (38 bytes each)
when these were measured; records now cut long lists into list chunks that v1 shares
(castore.cache.layout.ChunkList), and v2 at 8/32/128 moves a 2 KiB record and 9 KiB of new
list chunks instead of 60 KiB: 5.29 MiB in all:

    min/avg/max KiB   v1 chunks   v2 new chunk data   + record   = on the wire
    4/16/64           2,958       5.243 MiB           119 KiB    5.360 MiB
    2/16/128          3,129       5.241 MiB           126 KiB    5.364 MiB
    8/24/96           1,678       5.278 MiB            67 KiB    5.343 MiB
    8/32/128          1,486       5.278 MiB            60 KiB    5.336 MiB
    4/32/128          1,559       5.278 MiB            63 KiB    5.339 MiB
    16/32/64          1,420       5.296 MiB            57 KiB    5.352 MiB
    16/64/256           734       5.358 MiB            30 KiB    5.387 MiB

Smaller chunks find the changed bytes more closely but the record grows as fast; larger ones
halve the requests of a cold pull but waste more around each change. 8/32/128 moves the
least, and a cold pull of v1 is 1,486 requests, which a pipelined connection answers in
about 35 ms here.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from castore.errors import EncodingError, HashMismatch
from castore.hashing import Hasher, hash_bytes

ALGORITHM = "fastcdc-2020"


@dataclass(frozen=True)
class ChunkParams:
    min: int = 8 * 1024
    avg: int = 32 * 1024
    max: int = 128 * 1024

    def __post_init__(self) -> None:
        if not (self.min <= self.avg <= self.max):
            raise EncodingError(f"chunk sizes {self.min}/{self.avg}/{self.max} are not min <= avg <= max")
        for name, value, low, high in (("min", self.min, 64, 1 << 20), ("avg", self.avg, 256, 4 << 20),
                                       ("max", self.max, 1024, 16 << 20)):
            if not low <= value <= high:  # pyfastcdc's bounds
                raise EncodingError(f"chunking {name} {value} is not from {low} to {high}")

    def to_record(self) -> dict[str, Any]:
        return {"algorithm": ALGORITHM, "min": self.min, "avg": self.avg, "max": self.max}

    @classmethod
    def from_record(cls, rec: Any) -> ChunkParams:
        if not isinstance(rec, dict) or rec.get("algorithm") != ALGORITHM:
            raise EncodingError(f"chunking {rec!r} is not {ALGORITHM}")
        return cls(int(rec["min"]), int(rec["avg"]), int(rec["max"]))


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    id: str


def cut(data: bytes | memoryview | mmap.mmap, params: ChunkParams) -> Iterator[Chunk]:
    """The chunks of data, in order; an empty input has no chunks."""
    if len(data) == 0:
        return
    for c in _cdc(params).cut_buf(memoryview(data)):
        yield Chunk(c.offset, c.length, hash_bytes(c.data))


def cut_file(path: str | os.PathLike[str], params: ChunkParams, expect: str | None = None) -> list[Chunk]:
    """The chunks of a file; with expect, the whole file is hashed on the way too (what a push
    sends must be what the store's id says), and HashMismatch raised when it differs."""
    whole = Hasher(threads=True)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            chunks: list[Chunk] = []
        elif st.st_blocks * 512 < st.st_size:  # sparse: read, not mapped (see hashing.hash_fileobj)
            chunks = []
            for c in _cdc(params).cut_stream(f):
                chunks.append(Chunk(c.offset, c.length, hash_bytes(c.data)))
                if expect is not None:
                    whole.update(c.data)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                chunks = list(cut(m, params))
                if expect is not None:
                    whole.update(m)
    if expect is not None and whole.hexdigest() != expect:
        raise HashMismatch(os.fspath(path), expect, whole.hexdigest())
    return chunks


def _cdc(params: ChunkParams) -> Any:
    from pyfastcdc import FastCDC

    return FastCDC(avg_size=params.avg, min_size=params.min, max_size=params.max)
