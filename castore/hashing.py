"""Content ids: lowercase hex BLAKE3-256, exactly what ``b3sum`` prints.

This is the only module that imports blake3. Files are hashed by streaming or
by mmap with blake3's own threads, so a 60 MB squashfs hashes in milliseconds.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import blake3

if TYPE_CHECKING:
    import hashlib

ID_LENGTH = 64
_ID_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")
# Below this size one thread is faster than waking blake3's pool.
_THREADED_MIN = 4 * 1024 * 1024


def is_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


def is_prefix(text: str) -> bool:
    return _PREFIX_RE.fullmatch(text) is not None


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


class Hasher:
    """Incremental BLAKE3 with an optional sha256 alongside (for fetch checks)."""

    def __init__(self, sha256: bool = False, *, threads: bool = False) -> None:
        self._b3 = blake3.blake3(max_threads=blake3.blake3.AUTO) if threads else blake3.blake3()
        self._sha = _sha256() if sha256 else None
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        self._b3.update(data)
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._b3.hexdigest()

    def sha256(self) -> str:
        assert self._sha is not None, "Hasher(sha256=True) needed"
        return self._sha.hexdigest()


def _sha256() -> hashlib._Hash:
    import hashlib  # OpenSSL's loading costs 3 ms; only fetch checks need sha256

    return hashlib.sha256()


def hash_fileobj(f: BinaryIO, size: int) -> str:
    if size == 0:
        return hash_bytes(b"")
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if size >= _THREADED_MIN else blake3.blake3()
    if os.fstat(f.fileno()).st_blocks * 512 < size:
        # Holes read through a mapping take pages on tmpfs, and a full one answers with SIGBUS,
        # which kills the process; read() returns zeros for them. Dense files map: 40 % faster.
        buf = bytearray(min(size, 8 << 20))
        view, offset = memoryview(buf), 0
        while n := os.preadv(f.fileno(), [buf], offset):
            h.update(view[:n])
            offset += n
        return h.hexdigest()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h.update(m)
    return h.hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hash_fileobj(f, os.fstat(f.fileno()).st_size)


def sha256_file(path: Path) -> str:
    h = _sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def derive_uuid(seed: str, purpose: str) -> str:
    """A stable RFC 4122-shaped UUID from a plan hash, for mkfs and friends."""
    raw = bytearray(blake3.blake3(f"{purpose}:{seed}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
