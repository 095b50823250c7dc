from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from castore.builders.fetch import BUILD
from castore.errors import CastoreError, HashMismatch
from castore.hashing import hash_bytes
from tests.conftest import castore, castore_json, snapshot
from tests.helpers import context, http_server


def test_http_fetch_checks_the_hash(tmp_path: Path) -> None:
    data = b"payload" * 1000
    with http_server({"/f": data}) as (url, _):
        ctx = context(tmp_path, {"url": f"{url}/f", "blake3": hash_bytes(data)})
        BUILD["fetch"](ctx)
        assert ctx.out.read_bytes() == data
        ctx = context(tmp_path / "x", {"url": f"{url}/f", "sha256": "0" * 64})
        with pytest.raises(HashMismatch) as err:
            BUILD["fetch"](ctx)
        assert err.value.actual == hashlib.sha256(data).hexdigest()
        ctx = context(tmp_path / "y", {"url": f"{url}/missing", "sha256": "0" * 64})
        with pytest.raises(CastoreError, match="HTTP 404"):
            BUILD["fetch"](ctx)


def test_hash_mismatch_through_realize_adds_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"the real bytes")
    store = tmp_path / "store"
    castore("realize", "tests/recipes/small.py:hello", store=store)  # something already there
    before = snapshot(store)
    env = {"CASTORE_TEST_URL": f"file://{src}", "CASTORE_TEST_SHA256": "1" * 64}
    proc = castore("realize", "tests/recipes/fetching.py:download", store=store, env=env, check=False)
    assert proc.returncode == 1
    assert "expected sha256:" + "1" * 64 in proc.stderr
    assert "actual   sha256:" + hashlib.sha256(b"the real bytes").hexdigest() in proc.stderr
    assert snapshot(store) == before
    assert list((store / "tmp").iterdir()) == []
    assert castore("verify", store=store).returncode == 0


@pytest.mark.parametrize("url, message", [
    ("file://f.txt", "fetch URL 'file://f.txt' names no absolute path"),
    ("file://host/etc/passwd", "fetch URL 'file://host/etc/passwd' names no absolute path"),
    ("file:///etc/pass%00wd", "fetch URL 'file:///etc/pass%00wd' holds an encoded NUL"),
])
def test_file_urls_that_name_no_file_are_refused_at_the_recipe_line(tmp_path: Path, url: str, message: str) -> None:
    env = {"CASTORE_TEST_URL": url, "CASTORE_TEST_SHA256": "1" * 64}
    proc = castore("realize", "tests/recipes/fetching.py:download", store=tmp_path / "s", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: tests/recipes/fetching.py:10: {message}"), proc.stderr


def test_a_file_url_naming_a_directory_is_the_recipe_s_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {"CASTORE_TEST_URL": f"file://{tmp_path}", "CASTORE_TEST_SHA256": "1" * 64}
    proc = castore("realize", "tests/recipes/fetching.py:download", store=store, env=env, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert "tests/recipes/fetching.py:10: building" in proc.stderr and "(fetch) failed:" in proc.stderr
    assert f"fetch: cannot read {tmp_path}: Is a directory" in lines, lines
    assert "dmesg" not in proc.stderr  # not the disk's fault
    assert castore("verify", store=store).returncode == 0


def test_a_fetch_is_named_by_its_declared_hash_not_its_url(tmp_path: Path) -> None:
    """Fixed-output: the same bytes from another mirror are the same plan, so nothing downstream
    rebuilds, and a URL that no longer answers is never asked once the plan is realised."""
    data = b"the same bytes on two mirrors"
    for mirror in ("a", "b"):
        (tmp_path / mirror).mkdir()
        (tmp_path / mirror / "src.tar").write_bytes(data)
    store = tmp_path / "store"
    sha = hashlib.sha256(data).hexdigest()
    first = castore_json("realize", "tests/recipes/fetching.py:download", store=store,
                         env={"CASTORE_TEST_URL": f"file://{tmp_path}/a/src.tar", "CASTORE_TEST_SHA256": sha})
    (tmp_path / "b" / "src.tar").unlink()  # the second mirror is down
    again = castore_json("realize", "tests/recipes/fetching.py:download", store=store,
                         env={"CASTORE_TEST_URL": f"file://{tmp_path}/b/src.tar", "CASTORE_TEST_SHA256": sha})
    assert again["id"] == first["id"] and again["built"] == []
    other = castore("realize", "tests/recipes/fetching.py:download", store=tmp_path / "fresh", check=False,
                    env={"CASTORE_TEST_URL": f"file://{tmp_path}/b/src.tar", "CASTORE_TEST_SHA256": sha})
    assert other.returncode == 1 and f"{tmp_path}/b/src.tar does not exist" in other.stderr  # a new store fetches
