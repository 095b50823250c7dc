"""castore serve: the ASGI app in-process, and a real server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from castore.cache.copy import pull, push
from castore.cache.layout import ObjectRecord, chunk_path, object_path
from castore.cache.server import CacheApp, add_token
from castore.cache.transport import DirTransport, HttpTransport
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.store import LocalStore
from tests.conftest import CASTORE, REPO, castore, castore_json


def asgi(app: CacheApp, method: str, path: str, body: bytes = b"", token: str = "") -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://castore") as client:
            return await client.request(method, path, content=body, headers=headers)

    return asyncio.run(go())


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    root = tmp_path / "served"
    root.mkdir()
    token = add_token(root, ["read", "write"], "test")
    port = free_port()
    proc = subprocess.Popen([CASTORE, "serve", str(root), "--bind", f"127.0.0.1:{port}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", root, token
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
    v1 = os.urandom(2 << 20)
    v2 = v1[:700_000] + os.urandom(100_000) + v1[700_000:]
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    id1, id2 = a.add_file(tmp_path / "v1"), a.add_file(tmp_path / "v2")
    with HttpTransport(url, token=token) as http:
        s1 = push(a, http, [id1])
        s2 = push(a, http, [id2])
    assert s2.chunks_sent <= 8 and s2.bytes_on_wire < s1.bytes_on_wire // 4
    with HttpTransport(url, token="wrong") as http, pytest.raises(CastoreError, match="403"):
        push(a, http, [a.add_bytes(b"new")])
    a.close()
