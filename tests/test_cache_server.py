"""castore serve: the ASGI app in-process, and a real server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from castore import canonical
from castore.cache.copy import pull, push
from castore.cache.layout import ObjectRecord, chunk_path, object_path
from castore.cache.server import CacheApp, add_token, load_tokens
from castore.cache.transport import DirTransport, HttpTransport
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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    root = tmp_path / "served"
    root.mkdir()
    token = add_token(root, ["read", "write"], "test")
    port = free_port()
    proc = subprocess.Popen([CASTORE, "serve", str(root), "--bind", f"127.0.0.1:{port}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
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
    with HttpTransport(url, token="wrong") as http, pytest.raises(CastoreError, match="403"):
        push(a, http, [a.add_bytes(b"new")])
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
    assert [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True)] == [(0, "")] * 12
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
