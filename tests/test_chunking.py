from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from castore.chunking import ChunkParams, cut, cut_file
from castore.errors import EncodingError
from castore.hashing import hash_bytes
from tests.helpers import sparse_file


def test_chunks_cover_the_bytes_and_are_named_by_content(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    params = ChunkParams()
    chunks = list(cut(data, params))
    assert chunks[0].offset == 0 and sum(c.length for c in chunks) == len(data)
    assert all(params.min <= c.length <= params.max for c in chunks[:-1])
    assert all(c.id == hash_bytes(data[c.offset:c.offset + c.length]) for c in chunks)
    f = tmp_path / "f"
    f.write_bytes(data)
    assert cut_file(f, params) == chunks
    (tmp_path / "empty").write_bytes(b"")
    assert cut_file(tmp_path / "empty", params) == []


def test_an_insertion_keeps_most_chunks() -> None:
    data = random.Random(3).randbytes(4 << 20)
    edited = data[:1_000_000] + b"inserted bytes" + data[1_000_000:]
    a = {c.id for c in cut(data, ChunkParams())}
    b = [c for c in cut(edited, ChunkParams())]
    new = [c for c in b if c.id not in a]
    assert sum(c.length for c in new) < 3 * ChunkParams().max  # only around the edit


def test_params_record_roundtrip_and_checks() -> None:
    p = ChunkParams(4096, 16384, 65536)
    assert ChunkParams.from_record(p.to_record()) == p
    with pytest.raises(EncodingError):
        ChunkParams(65536, 16384, 4096)
    with pytest.raises(EncodingError):
        ChunkParams.from_record({"algorithm": "rabin", "min": 1, "avg": 2, "max": 3})


def test_a_sparse_file_is_cut_as_its_bytes(tmp_path: Path) -> None:
    """Sparse files are streamed, not mapped (a mapped hole on a full tmpfs is a SIGBUS): same cuts."""
    rng = random.Random(4)
    f = sparse_file(tmp_path / "sparse", {0: rng.randbytes(300_000), 3 << 20: rng.randbytes(700_000)}, 6 << 20)
    params = ChunkParams()
    assert cut_file(f, params) == list(cut(f.read_bytes(), params))
