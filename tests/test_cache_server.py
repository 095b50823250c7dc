"""castore serve: the ASGI app in-process, and a real server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from castore import canonical
from castore.cache.copy import pull, push
from castore.cache.layout import CacheConfig, ObjectRecord, RealisationRecord, chunk_path, object_path
from castore.cache.server import CacheApp, add_token, load_tokens
from castore.cache.transport import DirTransport, HttpTransport
from castore.chunking import ChunkParams
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.store import LocalStore
from tests.conftest import CASTORE, REPO, castore, castore_json
from tests.helpers import NOT_ROOT, free_port, tiny_tmpfs, wait_port


def asgi(app: CacheApp, method: str, path: str, body: bytes = b"", token: str = "") -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://castore") as client:
            return await client.request(method, path, content=body, headers=headers)

    return asyncio.run(go())


def test_a_small_frame_that_claims_much_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    zeros = bytes(64 << 20)
    bomb = zstandard.ZstdCompressor().compress(zeros)  # 2 KB that say 64 MiB
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(zeros))}", bomb, token=writer)
    assert r.status_code == 400 and "more than the 131072 bytes a chunk may hold here" in r.json()["message"]
    b = LocalStore(tmp_path / "b")  # a pull asked to fetch it as a chunk of its record's length: refused too
    from castore.cache.copy import _verified

    with pytest.raises(CastoreError, match="more than the 1000 bytes it may hold"):
        _verified(DirTransport(tmp_path / "cache"), zstandard.ZstdDecompressor(), hash_bytes(zeros), 1000, bomb)
    b.close()


def test_a_restarted_server_syncs_before_its_first_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk a killed server wrote may not be on disk yet: the record that names it waits for a syncfs."""
    import castore.cache.server as server

    root = tmp_path / "cache"
    writer = add_token(root, ["write"], "ci")
    data = os.urandom(50_000)
    cid = hash_bytes(data)
    frame = zstandard.ZstdCompressor().compress(data)
    assert asgi(CacheApp(root), "PUT", f"/{chunk_path(cid)}", frame, token=writer).status_code == 201
    synced: list[object] = []
    monkeypatch.setattr(server, "syncfs", lambda path: synced.append(path))
    again = CacheApp(root)  # the same directory, a new process
    assert asgi(again, "PUT", f"/{chunk_path(cid)}", frame, token=writer).status_code == 201  # already there
    record = ObjectRecord(cid, "blob", len(data), (), ((cid, len(data)),)).encode()
    assert asgi(again, "PUT", f"/{object_path(cid)}", record, token=writer).status_code == 201
    assert synced


def test_a_file_that_cannot_be_opened_is_absent_not_a_traceback(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    app = CacheApp(tmp_path / "cache")
    where = tmp_path / "cache" / chunk_path("ab" * 32)
    where.parent.mkdir(parents=True)
    monkeypatch.chdir(where.parent)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(where.name)  # opening a socket file fails with ENXIO
        assert asgi(app, "GET", f"/{chunk_path('ab' * 32)}").status_code == 404


def test_a_record_must_say_what_its_object_is(tmp_path: Path) -> None:
    """A tree or image record is refused unless its bytes are one, naming blobs of this cache."""
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")

    def upload(data: bytes, kind: str, refs: tuple[str, ...] = ()) -> int:
        oid = hash_bytes(data)
        asgi(app, "PUT", f"/{chunk_path(oid)}", zstandard.ZstdCompressor().compress(data), token=writer)
        record = ObjectRecord(oid, kind, len(data), refs, ((oid, len(data)),)).encode()
        return asgi(app, "PUT", f"/{object_path(oid)}", record, token=writer).status_code

    hello = b"hello\n"
    assert upload(os.urandom(1000), "tree") == 400  # random bytes as a tree
    assert upload(hello, "blob") == 201
    entry = {"path": "a", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "blob": hash_bytes(hello), "size": 6}
    tree = canonical.encode({"format": 1, "kind": "tree", "entries": [entry]})
    assert upload(tree, "tree", ()) == 400  # its reference is not in its record
    assert upload(tree, "tree", (hash_bytes(hello),)) == 201
    outer = canonical.encode({"format": 1, "kind": "tree", "entries": [{**entry, "blob": hash_bytes(tree),
                                                                          "size": len(tree)}]})
    assert upload(outer, "tree", (hash_bytes(tree),)) == 400  # names a tree as a file's blob
    assert not (tmp_path / "cache" / object_path(hash_bytes(outer))).exists()


def test_uploads_are_verified_and_ordered(tmp_path: Path) -> None:
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    reader = add_token(tmp_path / "cache", ["read"], "someone")
    data = os.urandom(100_000)
    cid = hash_bytes(data)
    frame = zstandard.ZstdCompressor().compress(data)
    assert asgi(app, "PUT", f"/{chunk_path(cid)}", frame).status_code == 401
    r = asgi(app, "PUT", f"/{chunk_path(cid)}", frame, token=reader)
    assert r.status_code == 403 and r.json()["error"] == "forbidden" and set(r.json()) == {"code", "error", "message"}
    wrong = "0" * 64
    assert asgi(app, "PUT", f"/{chunk_path(wrong)}", frame, token=writer).status_code == 400  # not its name
    assert asgi(app, "PUT", "/chunks/../../../etc/passwd", frame, token=writer).status_code in (400, 404)
    assert asgi(app, "PUT", "/objects/..%2F..%2Fx", b"x", token=writer).status_code in (400, 404)
    assert not list((tmp_path).glob("etc*")) and not (tmp_path / "x").exists()
    record = ObjectRecord(cid, "blob", len(data), (), ((cid, len(data)),)).encode()
    r = asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer)
    assert r.status_code == 409  # its chunk is not there yet
    assert asgi(app, "PUT", f"/{chunk_path(cid)}", frame, token=writer).status_code == 201
    lie = ObjectRecord("1" * 64, "blob", len(data), (), ((cid, len(data)),)).encode()
    assert asgi(app, "PUT", f"/{object_path('1' * 64)}", lie, token=writer).status_code == 400
    assert asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer).status_code == 201
    got = asgi(app, "GET", f"/{object_path(cid)}")
    assert got.content == record and "immutable" in got.headers["cache-control"]
    missing = asgi(app, "POST", "/missing", json.dumps([chunk_path(cid), chunk_path(wrong)]).encode())
    assert missing.json() == [chunk_path(wrong)]
    assert asgi(app, "GET", "/castore-cache.json").headers["cache-control"] == "no-cache"
    assert asgi(app, "DELETE", f"/{object_path(cid)}", token=writer).status_code == 405


def test_temporary_files_live_in_a_staging_directory_swept_when_their_writer_is_gone(tmp_path: Path) -> None:
    """A killed server or push left .tmp files among the chunks; they are now in
    .castore/tmp/PID-..., removed by the next writer once that process is gone."""
    from castore.fsutil import host_id

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "cache" / ".castore" / "tmp" / f"{dead.pid}-{host_id()}-abcd"
    stale.mkdir(parents=True)
    (stale / ".x.tmp").write_bytes(b"half a chunk")
    elsewhere = stale.with_name(f"{dead.pid}-otherhost.4026531836-abcd")  # that PID means nothing here
    elsewhere.mkdir()
    app = CacheApp(tmp_path / "cache")
    assert not stale.exists() and elsewhere.is_dir() and app.staging.is_dir()
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    data = os.urandom(1000)
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(data))}", zstandard.ZstdCompressor().compress(data), token=writer)
    assert r.status_code == 201 and not list(app.staging.iterdir())
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]
    cache = DirTransport(tmp_path / "dir", create=True)
    cache.put(chunk_path(hash_bytes(data)), b"frame")
    assert cache._staging is not None and cache._staging.parent == tmp_path / "dir" / ".castore" / "tmp"
    cache.close()
    assert not list((tmp_path / "dir" / ".castore" / "tmp").iterdir())
    assert DirTransport(tmp_path / "dir").get(chunk_path(hash_bytes(data))) == b"frame"


def test_only_a_list_chunk_may_be_longer_than_the_chunking_maximum(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "castore-cache.json").write_bytes(CacheConfig(ChunkParams(256, 1024, 4096)).encode())
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    cctx = zstandard.ZstdCompressor()
    data = os.urandom(5000)
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(data))}", cctx.compress(data), token=writer)
    assert r.status_code == 400 and "is not a list chunk" in r.json()["message"]
    listed = canonical.encode([[os.urandom(32), 1000] for _ in range(150)])  # 5.7 KB of entries
    assert len(listed) > 4096
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(listed))}", cctx.compress(listed), token=writer)
    assert r.status_code == 201


def test_a_listed_record_waits_for_its_list_chunks_and_must_agree_with_them(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()  # chunking that makes chunks of about 1000 bytes
    (tmp_path / "cache" / "castore-cache.json").write_bytes(CacheConfig(ChunkParams(512, 1024, 4096)).encode())
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    cctx = zstandard.ZstdCompressor()
    rng = random.Random(3)  # fixed bytes: list chunks are cut where a chunk id says, about one in 32
    pieces = [rng.randbytes(1000 + i) for i in range(100)]
    data = b"".join(pieces)
    chunks = tuple((hash_bytes(p), len(p)) for p in pieces)
    for p in pieces:
        assert asgi(app, "PUT", f"/{chunk_path(hash_bytes(p))}", cctx.compress(p), token=writer).status_code == 201
    rec = ObjectRecord(hash_bytes(data), "blob", len(data), (), chunks)
    lists = rec.chunk_lists()
    assert len(lists) > 1
    r = asgi(app, "PUT", f"/{object_path(rec.id)}", rec.encode(), token=writer)
    assert r.status_code == 409 and "list chunk" in r.json()["message"]  # its list chunks are not there yet
    for piece in lists:
        assert asgi(app, "PUT", f"/{chunk_path(piece.id)}", cctx.compress(piece.data), token=writer).status_code == 201
    fields = canonical.decode(rec.encode())
    fields["lists"][0][1] += 1  # a record that counts a list chunk otherwise than it lists
    r = asgi(app, "PUT", f"/{object_path(rec.id)}", canonical.encode(fields), token=writer)
    assert r.status_code == 400 and "the record says" in r.json()["message"]
    assert not (tmp_path / "cache" / object_path(rec.id)).exists()
    assert asgi(app, "PUT", f"/{object_path(rec.id)}", rec.encode(), token=writer).status_code == 201
    b = LocalStore(tmp_path / "b")
    assert pull(b, DirTransport(tmp_path / "cache"), [rec.id]).lists == len(lists)
    assert b.blob_path(rec.id).read_bytes() == data
    b.close()
    # a format 2 cache (older castore reads it) takes no format 3 record
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "castore-cache.json").write_bytes(CacheConfig(ChunkParams(512, 1024, 4096), format=2).encode())
    old = CacheApp(tmp_path / "old")
    writer = add_token(tmp_path / "old", ["write"], "ci")
    for p in [*pieces, *(piece.data for piece in lists)]:
        assert asgi(old, "PUT", f"/{chunk_path(hash_bytes(p))}", cctx.compress(p), token=writer).status_code == 201
    r = asgi(old, "PUT", f"/{object_path(rec.id)}", rec.encode(), token=writer)
    assert r.status_code == 400 and "format 2" in r.json()["message"]
    assert asgi(old, "PUT", f"/{object_path(rec.id)}", rec.encode(listed=False), token=writer).status_code == 201


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """A real `castore serve` of tmp_path/served; its stderr goes to tmp_path/serve.log."""
    root = tmp_path / "served"
    root.mkdir()
    token = add_token(root, ["read", "write"], "test")
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([CASTORE, "serve", str(root), "--bind", f"127.0.0.1:{port}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}", root, token
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_private_server_wants_a_read_token_and_castore_token_goes_only_where_it_is_named(tmp_path: Path) -> None:
    root = tmp_path / "served"
    root.mkdir()
    reader = add_token(root, ["read"], "lab-2")
    writer = add_token(root, ["write"], "ci")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([CASTORE, "serve", str(root), "--bind", f"127.0.0.1:{port}", "--private"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port)
        assert httpx.get(f"{url}/castore-cache.json").status_code == 401
        oid = castore_json("add", str(Path(__file__)), store=tmp_path / "a")["id"]
        none = {"CASTORE_CONFIG": os.devnull}
        castore("push", oid, "--to", url, store=tmp_path / "a", env={**none, "CASTORE_TOKEN": writer})
        no = castore("pull", oid, "--from", url, store=tmp_path / "b", env=none, check=False)
        assert no.returncode == 1 and "read scope" in no.stderr
        castore("pull", oid, "--from", url, store=tmp_path / "b", env={**none, "CASTORE_TOKEN": reader})
        # a configured substituter gets the token configured for its URL, never CASTORE_TOKEN
        env = {**none, "CASTORE_SUBSTITUTERS": url, "CASTORE_TOKEN": reader}
        no = castore("pull", oid, store=tmp_path / "c", env=env, check=False)
        assert no.returncode == 1 and "401" in no.stderr
        dry = castore("realize", "tests/recipes/small.py:layer", "--dry-run", store=tmp_path / "c", env=env)
        assert "not asked again in this run (hint: no token was sent" in dry.stderr  # what to do, not just 401
        assert dry.stderr.count(url) == 1
        (tmp_path / "castore.toml").write_text(f'[tokens]\n"{url}" = "{reader}"\n')
        env = {"CASTORE_CONFIG": str(tmp_path / "castore.toml"), "CASTORE_SUBSTITUTERS": url}
        assert castore_json("pull", oid, store=tmp_path / "c", env=env)["objects"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_missing_asks_in_batches_the_server_takes(server: tuple[str, Path, str]) -> None:
    """The chunks of a blob over 3 GB are more than one POST /missing may list: they go in batches."""
    url, root, token = server
    present = chunk_path(hash_bytes(b"here"))
    (root / present).parent.mkdir(parents=True, exist_ok=True)
    (root / present).write_bytes(b"")
    asked = [chunk_path(f"{i:064x}") for i in range(120_000)] + [present]
    with HttpTransport(url, token=token) as http:
        assert http.missing(asked) == set(asked) - {present}
        assert http._batch  # answered in batches (a 413 would have turned them off), not by 120,001 HEADs
    assert "Traceback" not in (root.parent / "serve.log").read_text()


def test_push_and_pull_through_a_real_server(server: tuple[str, Path, str], tmp_path: Path) -> None:
    url, root, token = server
    a = tmp_path / "a"
    res = castore_json("realize", "tests/recipes/small.py:layer", store=a)
    proc = castore("push", res["id"], "--to", url, store=a, check=False, env={"CASTORE_TOKEN": ""})
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr
    pushed = castore_json("push", res["id"], "--to", url, store=a, env={"CASTORE_TOKEN": token})
    assert pushed["objects"] == 3
    again = castore_json("push", res["id"], "--to", url, store=a, env={"CASTORE_TOKEN": token})
    assert again["objects"] == 0 and again["chunks_sent"] == 0
    pulled = castore_json("pull", res["id"], "--from", url, store=tmp_path / "b")
    assert pulled["objects"] == 3 and castore_json("verify", store=tmp_path / "b")["ok"]
    # the same directory is a plain static cache too
    b2 = LocalStore(tmp_path / "c")
    pull(b2, DirTransport(root), [res["id"]])
    assert b2.has(res["id"])
    b2.close()


def test_dedup_on_upload(server: tuple[str, Path, str], tmp_path: Path) -> None:
    url, _, token = server
    a = LocalStore(tmp_path / "a")
    rng = random.Random(5)  # fixed bytes: fixed cut points
    v1 = rng.randbytes(2 << 20)
    v2 = v1[:700_000] + rng.randbytes(100_000) + v1[700_000:]
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    id1, id2 = a.add_file(tmp_path / "v1"), a.add_file(tmp_path / "v2")
    with HttpTransport(url, token=token) as http:
        s1 = push(a, http, [id1])
        s2 = push(a, http, [id2])
    assert s2.chunks_sent <= 8 and s2.bytes_on_wire < s1.bytes_on_wire // 4
    with HttpTransport(url, token="wrong") as http, pytest.raises(CastoreError, match="401") as refused:
        push(a, http, [a.add_bytes(b"new")])
    assert "does not know the token" in str(refused.value.hint)
    a.close()


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Network namespaces "lab" and "server" joined by a veth pair (TEST-NET-1 addresses)."""
    tag = os.urandom(3).hex()
    lab, srv = f"castore-lab-{tag}", f"castore-srv-{tag}"
    cmds = [
        ["ip", "netns", "add", lab], ["ip", "netns", "add", srv],
        ["ip", "link", "add", f"cl{tag}", "type", "veth", "peer", "name", f"cs{tag}"],
        ["ip", "link", "set", f"cl{tag}", "netns", lab], ["ip", "link", "set", f"cs{tag}", "netns", srv],
        ["ip", "-n", lab, "addr", "add", "192.0.2.1/30", "dev", f"cl{tag}"],
        ["ip", "-n", srv, "addr", "add", "192.0.2.2/30", "dev", f"cs{tag}"],
        ["ip", "-n", lab, "link", "set", f"cl{tag}", "up"], ["ip", "-n", srv, "link", "set", f"cs{tag}", "up"],
        ["ip", "-n", lab, "link", "set", "lo", "up"], ["ip", "-n", srv, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield lab, srv
    finally:
        subprocess.run(["ip", "netns", "del", lab], capture_output=True)
        subprocess.run(["ip", "netns", "del", srv], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_lab_and_server_in_two_network_namespaces(two_hosts: tuple[str, str], tmp_path: Path) -> None:
    lab, srv = two_hosts
    served = tmp_path / "served"
    served.mkdir()
    token = add_token(served, ["write"], "lab")
    a = tmp_path / "a"
    res = castore_json("realize", "tests/recipes/small.py:rootfs", store=a)
    server = subprocess.Popen(["ip", "netns", "exec", srv, CASTORE, "serve", str(served), "--bind", "192.0.2.2:8080"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        in_lab = ["ip", "netns", "exec", lab, CASTORE]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", lab, "python3", "-c",
                                    "import socket; socket.create_connection(('192.0.2.2', 8080), 1)"],
                                   capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        env = {**os.environ, "CASTORE_TOKEN": token}
        push = subprocess.run([*in_lab, "--store", str(a), "push", res["id"], "--to", "http://192.0.2.2:8080",
                               "--json"], env=env, cwd=REPO, capture_output=True, text=True)
        assert push.returncode == 0, push.stderr
        pulled = subprocess.run([*in_lab, "--store", str(tmp_path / "b"), "pull", res["id"], "--from",
                                 "http://192.0.2.2:8080", "--json"], cwd=REPO, capture_output=True, text=True)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["objects"] == 1
        # the host itself cannot reach the server: it really lives in its own namespace
        with pytest.raises(OSError):
            socket.create_connection(("192.0.2.2", 8080), timeout=1)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "b" / "blobs" / res["id"][:2] / res["id"]).read_bytes() == Path(res["path"]).read_bytes()


def test_malformed_records_are_a_400_with_a_json_error(tmp_path: Path) -> None:
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    record = b"\x80"
    plan = hash_bytes(record)
    bad = canonical.encode({"format": 1, "kind": "realisation", "plan": plan, "object": 5, "record": record,
                            "signatures": []})
    r = asgi(app, "PUT", f"/realisations/{plan}", bad, token=writer)
    assert r.status_code == 400 and r.json()["error"] == "invalid" and "names 5" in r.json()["message"]
    data = b"x" * 1000
    cid = hash_bytes(data)
    assert asgi(app, "PUT", f"/{chunk_path(cid)}", zstandard.ZstdCompressor().compress(data),
                token=writer).status_code == 201
    with_refs = ObjectRecord(cid, "blob", len(data), ("a" * 64,), ((cid, len(data)),)).encode()
    r = asgi(app, "PUT", f"/{object_path(cid)}", with_refs, token=writer)
    assert r.status_code == 400 and "blob with references" in r.json()["message"]
    overlong = ObjectRecord("e" * 64, "blob", 1 << 20, (), ((cid, 1 << 20),)).encode()
    r = asgi(app, "PUT", f"/{object_path('e' * 64)}", overlong, token=writer)
    assert r.status_code == 400 and "chunking maximum" in r.json()["message"]
    big = random.Random(1).randbytes(200_000)  # longer than this cache's chunks (128 KiB at most)
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(big))}", zstandard.ZstdCompressor().compress(big), token=writer)
    assert r.status_code == 400 and "chunking maximum" in r.json()["message"]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == [
        "castore-cache.json", cid, "tokens.json", "tokens.lock"]


def test_a_corrupt_token_file_is_a_clean_error(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    writer = add_token(root, ["write"], "ci")
    app = CacheApp(root)
    tokens = root / ".castore" / "tokens.json"
    for corrupt in (b"{not json", b'{"x": 5}', b"[]"):
        tokens.write_bytes(corrupt)
        r = asgi(app, "PUT", "/castore-cache.json", b"{}", token=writer)
        assert r.status_code == 500 and set(r.json()) == {"code", "error", "message"}
        assert str(root) not in r.json()["message"]  # no server internals in the answer
        with pytest.raises(CastoreError, match=re.escape(f"{tokens} is not")):
            CacheApp(root)
        proc = castore("token", "add", str(root), "--scope", "write", "--name", "x", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"error: {tokens} is not" in proc.stderr and "castore token add" in proc.stderr
        assert tokens.read_bytes() == corrupt  # left as it was for its owner to fix
    assert asgi(app, "GET", "/castore-cache.json").status_code == 200  # reads need no token


@pytest.mark.skipif(NOT_ROOT, reason="mounting a tiny tmpfs needs root")
def test_a_full_disk_answers_507_and_the_client_says_so(tmp_path: Path) -> None:
    proc = None
    stderr = ""
    with tiny_tmpfs(tmp_path / "small", "1m") as small:
        try:
            root = small / "cache"
            token = add_token(root, ["write"], "ci")
            port = free_port()
            proc = subprocess.Popen([CASTORE, "serve", str(root), "--bind", f"127.0.0.1:{port}"], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wait_port(port)
            with open(small / "filler", "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            data = random.Random(2).randbytes(100_000)
            frame = zstandard.ZstdCompressor().compress(data)
            url = f"http://127.0.0.1:{port}"
            r = httpx.put(f"{url}/{chunk_path(hash_bytes(data))}", content=frame,
                          headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 507
            assert r.json()["code"] == 507 and r.json()["error"] == "insufficient-storage"
            assert "disk is full" in r.json()["message"] and str(root) not in r.json()["message"]
            with HttpTransport(url, token=token) as http, pytest.raises(CastoreError, match="disk is full") as err:
                http.put(chunk_path(hash_bytes(data)), frame)
            assert "free space on the server" in (err.value.hint or "")
            files = sorted(p.name for p in root.rglob("*") if not p.is_dir())
            assert files == ["castore-cache.json", "tokens.json", "tokens.lock"]  # nothing partial, no temporary file
        finally:
            if proc is not None:
                proc.terminate()
                stderr = proc.communicate(timeout=10)[1]
    err_lines = [line for line in stderr.splitlines() if not line.startswith("serving ")]
    assert "Traceback" not in "\n".join(err_lines)
    assert len([line for line in err_lines if "cannot store chunks/" in line]) == 2  # one a request: no retry


def test_concurrent_token_adds_keep_every_token(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    procs = [subprocess.Popen([CASTORE, "token", "add", str(root), "--scope", "write", "--name", f"ci-{i}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(12)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 12
    assert all(err.startswith("note: ") and "holds no cache yet" in err for _, err in outs)
    known = load_tokens(root)
    assert sorted(known) == sorted(hash_bytes(out.strip().encode()) for out, _ in outs)
    assert sorted(v["name"] for v in known.values()) == sorted(f"ci-{i}" for i in range(12))
    assert sorted(p.name for p in (root / ".castore").iterdir()) == ["tokens.json", "tokens.lock"]  # no temporary
    assert (root / ".castore" / "tokens.json").stat().st_mode & 0o777 == 0o600


def test_push_checks_its_secret_keys_before_uploading(server: tuple[str, Path, str], tmp_path: Path) -> None:
    url, root, token = server
    a = tmp_path / "a"
    res = castore_json("realize", "tests/recipes/small.py:layer", store=a)
    sec = tmp_path / "lab1.sec"
    castore("key", "generate", "lab-1", "--out", str(sec))
    b64 = sec.read_text().strip().split(":")[1]
    nameless = tmp_path / "nameless.sec"
    nameless.write_text(b64 + "\n")
    nameless.chmod(0o600)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for key, says in ((nameless, f"secret key file {nameless} is not NAME:BASE64"),
                      (sec, f"secret key file {sec} has mode 0644")):
        if key == sec:
            sec.chmod(0o644)
        proc = castore("push", res["id"], "--to", url, store=a, check=False,
                       env={"CASTORE_TOKEN": token, "CASTORE_SECRET_KEY_FILES": str(key)})
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr
        assert not any(b64[i:i + 6] in proc.stderr for i in range(len(b64) - 5))
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing uploaded


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _answer(sock: socket.socket) -> tuple[int, Any]:
    """One HTTP answer read from sock: its status and its JSON body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        assert got, f"the server closed the connection after {buf!r}"
        buf += got
    head, body = buf.split(b"\r\n\r\n", 1)
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert found is not None, head
    while len(body) < int(found.group(1)):
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body) if body else None


def _closed(sock: socket.socket) -> bool:
    """Whether the server closes sock (True), rather than sending something; socket.timeout if neither."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _log_lines(tmp_path: Path) -> list[str]:
    """What the `server` fixture's process said, but for its "serving ..." line."""
    return [line for line in (tmp_path / "serve.log").read_text().splitlines() if not line.startswith("serving ")]


def _one_chunk(tmp_path: Path, data: bytes) -> tuple[CacheApp, str, str, bytes, bytes]:
    """A served cache holding one chunk of data: (app, write token, chunk id, its frame, the
    record of a blob of that one chunk, not yet uploaded)."""
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    cid = hash_bytes(data)
    frame = zstandard.ZstdCompressor().compress(data)
    assert asgi(app, "PUT", f"/{chunk_path(cid)}", frame, token=writer).status_code == 201
    return app, writer, cid, frame, ObjectRecord(cid, "blob", len(data), (), ((cid, len(data)),)).encode()


@pytest.mark.parametrize("damage", ["empty", "garbage", "other-bytes", "fifo"])
def test_a_chunk_damaged_in_the_cache_is_removed_and_the_next_push_repairs_it(tmp_path: Path, damage: str) -> None:
    """Not a 500 with a traceback for ever (a chunk there is never uploaded again), nor a server
    blocked on a FIFO: the damaged file goes, the upload is told to push again, and that works."""
    app, writer, cid, frame, record = _one_chunk(tmp_path, random.Random(5).randbytes(100_000))
    here = tmp_path / "cache" / chunk_path(cid)
    here.unlink()
    if damage == "fifo":
        os.mkfifo(here)
    else:
        here.write_bytes({"empty": b"", "garbage": b"\x28\xb5\x2f\xfd" + b"x" * 100,
                          "other-bytes": zstandard.ZstdCompressor().compress(b"y" * 100_000)}[damage])
    r = asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer)
    assert r.status_code == 409 and r.json()["error"] == "damaged" and "push again" in r.json()["message"], r.text
    assert not here.exists() and not here.is_symlink()
    assert asgi(app, "POST", "/missing", json.dumps([chunk_path(cid)]).encode()).json() == [chunk_path(cid)]
    assert asgi(app, "PUT", f"/{chunk_path(cid)}", frame, token=writer).status_code == 201
    assert asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer).status_code == 201


def test_uploads_are_not_written_through_a_link_out_of_the_cache(tmp_path: Path) -> None:
    """chunks/ itself may lead to a bigger disk; chunks/ab may not lead anywhere else."""
    (tmp_path / "bigger-disk").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "chunks").symlink_to(tmp_path / "bigger-disk")
    app = CacheApp(tmp_path / "cache")
    writer = add_token(tmp_path / "cache", ["write"], "ci")
    data = random.Random(6).randbytes(1000)
    cid = hash_bytes(data)
    (tmp_path / "outside").mkdir()
    (tmp_path / "bigger-disk" / cid[:2]).symlink_to(tmp_path / "outside")
    r = asgi(app, "PUT", f"/{chunk_path(cid)}", zstandard.ZstdCompressor().compress(data), token=writer)
    assert r.status_code == 500 and "nothing was written" in r.json()["message"]
    assert list((tmp_path / "outside").iterdir()) == []
    (tmp_path / "bigger-disk" / cid[:2]).unlink()
    r = asgi(app, "PUT", f"/{chunk_path(cid)}", zstandard.ZstdCompressor().compress(data), token=writer)
    assert r.status_code == 201 and (tmp_path / "bigger-disk" / cid[:2] / cid).is_file()


def test_a_chunk_the_server_cannot_read_or_that_was_replaced_is_not_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors, or EIO, is the server's trouble, not the chunk's; and a good chunk an
    upload renamed in after a damaged one was read stays."""
    app, writer, cid, good, record = _one_chunk(tmp_path, random.Random(7).randbytes(50_000))
    here = tmp_path / "cache" / chunk_path(cid)

    def no_descriptors(path: Any, limit: int, **kw: Any) -> bytes:
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as mp:
        mp.setattr("castore.cache.server.read_regular", no_descriptors)
        r = asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer)
    assert r.status_code == 500 and here.read_bytes() == good
    with pytest.raises(Exception, match="damaged"):  # a damaged one was read, and a good one is there now
        app._damaged(cid, here, 1 << 20, "a test")
    assert here.read_bytes() == good
    assert asgi(app, "PUT", f"/{object_path(cid)}", record, token=writer).status_code == 201


def test_a_chunk_is_one_frame_and_one_already_there_stays(server: tuple[str, Path, str]) -> None:
    url, root, token = server
    auth = {"Authorization": f"Bearer {token}"}
    data = random.Random(4).randbytes(100_000)
    cid = hash_bytes(data)
    frame = zstandard.ZstdCompressor().compress(data)
    where = f"{url}/{chunk_path(cid)}"
    for extra in (b"\0" * 4096, frame):  # padding; a second frame (a plain decompress stops at the first)
        r = httpx.put(where, content=frame + extra, headers=auth)
        assert r.status_code == 400 and r.json()["error"] == "bad-chunk", r.text
        assert f": {len(extra)} bytes after its zstd frame" in r.json()["message"]
    assert not (root / chunk_path(cid)).exists()
    assert httpx.put(where, content=frame, headers=auth).status_code == 201
    other = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data)  # the same chunk, other bytes
    assert other != frame
    assert httpx.put(where, content=other, headers=auth).status_code == 201
    assert httpx.put(where, content=frame + b"\0" * 4096, headers=auth).status_code == 400
    assert (root / chunk_path(cid)).read_bytes() == frame  # the first one stays


@contextlib.contextmanager
def _serving(root: Path, **limits: float) -> Iterator[int]:
    """castore.cache.server.serve with smaller limits than the CLI's, in a process of its own."""
    port = free_port()
    code = ("import sys; from castore.cache.server import CacheApp, listen, serve; "
            f"serve(CacheApp(sys.argv[1]), listen('127.0.0.1', {port}), **{limits!r})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_slow_and_surplus_connections_are_closed(tmp_path: Path) -> None:
    with _serving(tmp_path / "cache", max_connections=8, header_timeout=1.0) as port:
        time.sleep(0.2)  # wait_port's probe is gone
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        start = time.monotonic()
        time.sleep(0.2)  # all accepted
        conns[0].sendall(b"GET /castore-cache.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(conns[0])[0] == 200  # at the limit, not over it
        for sock in conns[:6]:  # a head that never ends (the first one's second request)
            sock.sendall(b"GET /castore-cache.json HTTP/1.1\r\nHo")
        # conns[6] and conns[7] send nothing at all
        with socket.create_connection(("127.0.0.1", port), timeout=5) as surplus:
            assert _closed(surplus)
        assert time.monotonic() - start < 0.9
        assert all(_closed(sock) for sock in conns)
        assert 0.9 < time.monotonic() - start < 4
        for sock in conns:
            sock.close()
        assert httpx.get(f"http://127.0.0.1:{port}/castore-cache.json").status_code == 200


def test_an_upload_that_stalls_is_closed_and_a_slow_one_is_not(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    token = add_token(root, ["write"], "t")
    data = os.urandom(3000)
    frame = zstandard.ZstdCompressor().compress(data)
    cid = hash_bytes(data)
    head = (f"PUT /{chunk_path(cid)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(frame)}\r\n\r\n").encode()
    with _serving(root, body_timeout=1.0) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=6) as stalled, \
            socket.create_connection(("127.0.0.1", port), timeout=6) as slow:
        start = time.monotonic()
        stalled.sendall(head + frame[:10])  # and no more
        slow.sendall(head)
        for i in range(0, len(frame), len(frame) // 5 + 1):  # a piece every 0.4 s: 2 s in all
            time.sleep(0.4)
            slow.sendall(frame[i:i + len(frame) // 5 + 1])
        assert _answer(slow)[0] == 201  # slow, but never 1 s without a byte
        assert _closed(stalled)
        assert 1.0 <= time.monotonic() - start < 5
        assert (root / chunk_path(cid)).exists()
        stalled_too = socket.create_connection(("127.0.0.1", port), timeout=6)
        other = os.urandom(3000)
        stalled_too.sendall(head.replace(cid.encode(), hash_bytes(other).encode()) + frame[:10])
        assert _closed(stalled_too)
        stalled_too.close()
        assert not (root / chunk_path(hash_bytes(other))).exists()
        assert not [p for p in root.rglob("*") if p.is_file() and ".castore/tmp" in str(p)]


def test_post_missing_takes_a_bounded_flat_list_of_paths(server: tuple[str, Path, str], tmp_path: Path) -> None:
    url, _, _ = server
    r = httpx.post(f"{url}/missing", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400
    assert r.json() == {"code": 400, "error": "bad-request",
                        "message": "POST /missing takes a JSON list of cache paths"}
    good = chunk_path("ab" * 32)
    r = httpx.post(f"{url}/missing", content=json.dumps([good, "../../etc/passwd", good]).encode())
    assert r.status_code == 400 and r.json()["error"] == "bad-request"
    assert r.json()["message"] == "the list sent to POST /missing is invalid: '../../etc/passwd' is not a cache path"
    r = httpx.post(f"{url}/missing", content=json.dumps([good] * 100_001).encode())
    assert r.status_code == 413 and "at most 100,000 paths" in r.json()["message"]
    r = httpx.post(f"{url}/missing", content=json.dumps([good] * 100_000).encode())
    assert r.status_code == 200 and r.json() == [good] * 100_000
    assert _log_lines(tmp_path) == []  # no traceback


def test_a_big_post_missing_does_not_stall_other_clients(server: tuple[str, Path, str]) -> None:
    url, _, _ = server
    body = json.dumps([chunk_path(f"{i % 256:02x}{i:062x}") for i in range(99_999)]).encode()
    took: list[float] = []

    def post() -> None:
        begun = time.monotonic()
        if httpx.post(f"{url}/missing", content=body, timeout=60).status_code == 200:
            took.append(time.monotonic() - begun)

    with httpx.Client(base_url=url) as client:
        client.get("/castore-cache.json")  # connected before the clock starts
        poster = threading.Thread(target=post)
        poster.start()
        worst = 0.0
        while poster.is_alive():
            begun = time.monotonic()
            assert client.get("/castore-cache.json").status_code == 200
            worst = max(worst, time.monotonic() - begun)
            time.sleep(0.002)
        poster.join()
    # on the event loop, the listing held every GET for about as long as the POST took
    assert took and worst < took[0] / 4, (worst, took)


def test_concurrent_realisations_keep_every_signature(server: tuple[str, Path, str]) -> None:
    url, _, token = server
    data = b"signed"
    cid = hash_bytes(data)
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=auth) as client:
        assert client.put(f"/{chunk_path(cid)}", content=zstandard.ZstdCompressor().compress(data)).status_code == 201
        record = ObjectRecord(cid, "blob", len(data), (), ((cid, len(data)),)).encode()
        assert client.put(f"/{object_path(cid)}", content=record).status_code == 201
    plan_record = b"\x80"
    plan = hash_bytes(plan_record)
    bodies = [RealisationRecord(plan, cid, plan_record, ((f"lab-{i}", bytes([i]) * 64),)).encode() for i in range(16)]

    async def put_all() -> list[int]:
        async with httpx.AsyncClient(base_url=url, headers=auth) as client:
            answers = await asyncio.gather(*(client.put(f"/realisations/{plan}", content=b) for b in bodies))
            return [r.status_code for r in answers]

    assert asyncio.run(put_all()) == [201] * 16
    merged = RealisationRecord.decode(plan, httpx.get(f"{url}/realisations/{plan}").content)
    assert sorted(k for k, _ in merged.signatures) == sorted(f"lab-{i}" for i in range(16))


def test_an_upload_cut_short_is_not_kept(server: tuple[str, Path, str]) -> None:
    url, root, token = server
    data = random.Random(12).randbytes(50_000)
    cid = hash_bytes(data)
    frame = zstandard.ZstdCompressor().compress(data)
    with socket.create_connection(("127.0.0.1", _port(url))) as sock:
        sock.sendall(f"PUT /{chunk_path(cid)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Length: {len(frame) + 1000}\r\n\r\n".encode() + frame)
        time.sleep(0.3)  # the server has read the frame and waits for the rest
    time.sleep(0.3)
    assert not (root / chunk_path(cid)).exists()  # a whole frame, but not the whole body announced
    r = httpx.put(f"{url}/{chunk_path(cid)}", content=frame, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201 and (root / chunk_path(cid)).exists()


def test_a_reader_that_leaves_makes_no_traceback(server: tuple[str, Path, str], tmp_path: Path) -> None:
    url, root, _ = server
    names = [f"aa{i:062x}" for i in range(4)]
    (root / "chunks" / "aa").mkdir(parents=True)
    for name in names:  # big enough to fill the socket buffers (the server serves files as they are)
        (root / "chunks" / "aa" / name).write_bytes(random.Random(name).randbytes(2 << 20))
    pipelined = b"".join(f"GET /chunks/aa/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for name in names)
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", _port(url)))
        sock.sendall(pipelined)
        time.sleep(0.2)  # answers pile up unread, the next one waits to be written
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with a reset
    time.sleep(0.3)
    assert httpx.get(f"{url}/castore-cache.json").status_code == 200
    assert _log_lines(tmp_path) == []


def test_a_port_in_use_is_one_error_and_makes_no_directory(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = castore("serve", str(tmp_path / "cache"), "--bind", f"127.0.0.1:{port}", check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: address already in use",
                                        "hint: pick another port with --bind"]
    assert not (tmp_path / "cache").exists()


def test_oversized_bodies_bearer_case_and_empty_details(server: tuple[str, Path, str]) -> None:
    url, _, token = server
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as sock:
        sock.sendall(f"PUT /{chunk_path('ab' * 32)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Length: 99999999999\r\n\r\n".encode())
        status, body = _answer(sock)  # at once, though none of the body came
    assert status == 413 and body["error"] == "too-large"
    data = b"lower case"
    r = httpx.put(f"{url}/{chunk_path(hash_bytes(data))}", content=zstandard.ZstdCompressor().compress(data),
                  headers={"Authorization": f"bearer {token}"})
    assert r.status_code == 201, r.text
    r = httpx.put(f"{url}/realisations/{'c' * 64}", content=b"\xc1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 400
    assert r.json()["message"] == f"realisation {'c' * 64} is not valid msgpack: a byte that starts no msgpack value"


def test_tokens_are_listed_and_revoked_and_an_unknown_one_is_told_so(tmp_path: Path) -> None:
    root = tmp_path / "served"
    root.mkdir()
    writer = castore("token", "add", str(root), "--scope", "write", "--name", "ci").stdout.strip()
    castore("token", "add", str(root), "--scope", "read", "--name", "lab-2")
    listed = castore_json("token", "list", str(root))
    assert [(t["name"], t["scopes"]) for t in listed] == [("ci", ["write"]), ("lab-2", ["read"])]
    assert hash_bytes(writer.encode()) in {t["hash"] for t in listed}  # the token itself is not kept
    app = CacheApp(root)
    data = b"x" * 100
    frame = zstandard.ZstdCompressor().compress(data)
    assert asgi(app, "PUT", f"/{chunk_path(hash_bytes(data))}", frame, token=writer).status_code == 201
    assert castore_json("token", "remove", str(root), "ci")["removed"] == [hash_bytes(writer.encode())]
    r = asgi(app, "PUT", f"/{chunk_path(hash_bytes(data))}", frame, token=writer)
    assert r.status_code == 401 and "not known here" in r.json()["message"]
    assert [t["name"] for t in castore_json("token", "list", str(root))] == ["lab-2"]
    typo = castore("token", "add", str(tmp_path / "typo"), "--scope", "read")
    assert f"{tmp_path / 'typo'} holds no cache yet" in typo.stderr  # a new cache, or a typo: said
    gone = castore("token", "list", str(tmp_path / "nowhere"), check=False)
    assert gone.returncode == 1 and "is not a directory" in gone.stderr
    none = castore("token", "remove", str(root), "nobody", check=False)
    assert none.returncode == 1 and "token list" in none.stderr
