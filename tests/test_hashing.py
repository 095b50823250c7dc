from __future__ import annotations

import os
import subprocess
from pathlib import Path

from castore.hashing import Hasher, derive_uuid, hash_bytes, hash_file, is_id, is_prefix
from tests.helpers import sparse_file


def test_id_is_what_b3sum_prints(tmp_path: Path) -> None:
    for size in (0, 1, 1024, 5 * 1024 * 1024 + 7):
        f = tmp_path / f"f{size}"
        f.write_bytes(os.urandom(size))
        b3 = subprocess.run(["b3sum", "--no-names", str(f)], capture_output=True, text=True, check=True)
        assert hash_file(f) == b3.stdout.strip()
        assert hash_bytes(f.read_bytes()) == b3.stdout.strip()


def test_sparse_files_hash_like_b3sum(tmp_path: Path) -> None:
    """Sparse files are read, not mapped (a mapped hole on a full tmpfs is a SIGBUS)."""
    f = sparse_file(tmp_path / "sparse", {0: b"head", 9 << 20: b"tail"}, 20 << 20)
    b3 = subprocess.run(["b3sum", "--no-names", str(f)], capture_output=True, text=True, check=True)
    assert hash_file(f) == b3.stdout.strip()


def test_known_vector() -> None:
    assert hash_bytes(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_incremental_matches_and_sha256() -> None:
    h = Hasher(sha256=True)
    h.update(b"hello ")
    h.update(b"world")
    assert h.hexdigest() == hash_bytes(b"hello world")
    assert h.sha256() == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert h.size == 11


def test_id_syntax_and_uuid() -> None:
    assert is_id("a" * 64) and not is_id("A" * 64) and not is_id("a" * 63)
    assert is_prefix("abcdef01") and not is_prefix("abc")
    u = derive_uuid("seed", "x")
    assert u == derive_uuid("seed", "x") != derive_uuid("seed", "y")
    assert u[14] == "4" and len(u) == 36
