"""Pulls over HTTP: from real nginx serving a cache directory, and from a misbehaving server."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from castore.cache.copy import pull, push, record_of
from castore.cache.layout import chunk_path
from castore.cache.transport import DirTransport, HttpTransport
from castore.chunking import ChunkParams
from castore.errors import CastoreError
from castore.hashing import hash_bytes
from castore.store import LocalStore
from tests.conftest import castore, castore_json
from tests.helpers import _serving, cache_server, free_port, returns_within, wait_port


@contextlib.contextmanager
def _nginx(run: Path, root: Path, listen: str = "", tls: str = "") -> Iterator[tuple[int, Path]]:
    """nginx on a free 127.0.0.1 port serving root read-only, run from the directory run;
    yields (port, access log). listen and tls add to the listen line and the server block."""
    run.mkdir()
    port = free_port()
    conf = run / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1;
error_log {run}/error.log; pid {run}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format bytes '$request_method $uri $status $body_bytes_sent';
    access_log {run}/access.log bytes;
    keepalive_requests 7;  # the pipelined client must reconnect and ask again what was in flight
    client_body_temp_path {run}/body; proxy_temp_path {run}/proxy; fastcgi_temp_path {run}/fcgi;
    uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
    server {{ listen 127.0.0.1:{port} {listen}; {tls} root {root}; location / {{ try_files $uri =404; }} }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(run)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, seconds=10)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"nginx did not start: {(run / 'error.log').read_text()}") from None
    try:
        yield port, run / "access.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """nginx on 127.0.0.1 serving tmp_path/cache read-only; yields (url, cache dir, access log)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with _nginx(tmp_path / "nginx", cache) as (port, log):
        yield f"http://127.0.0.1:{port}", cache, log


def test_pull_from_nginx_and_count_bytes_on_the_server(nginx: tuple[str, Path, Path], tmp_path: Path) -> None:
    url, cache_dir, log = nginx
    a = tmp_path / "a"
    layer = castore_json("realize", "tests/recipes/small.py:rootfs", store=a)["id"]
    castore_json("push", layer, "--to", str(cache_dir), store=a)
    pulled = castore_json("pull", layer, "--from", url, store=tmp_path / "b")
    assert pulled["objects"] == 1 and castore_json("verify", store=tmp_path / "b")["ok"]
    # dedup over the wire: v2 = v1 with 200 kB inserted; the server sends only the new chunks
    sa, sb = LocalStore(a), LocalStore(tmp_path / "b")
    rng = random.Random(7)  # fixed bytes, fixed cut points: the byte count below is exact every run
    v1 = rng.randbytes(3 << 20)
    v2 = v1[:1_000_000] + rng.randbytes(200_000) + v1[1_000_000:]
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    id1, id2 = sa.add_file(tmp_path / "v1"), sa.add_file(tmp_path / "v2")
    cache = DirTransport(cache_dir)
    push(sa, cache, [id1])
    new = push(sa, cache, [id2])
    with HttpTransport(url) as http:
        pull(sb, http, [id1])
        before = log.read_text().count("\n")
        s = pull(sb, http, [id2])
    lines = log.read_text().splitlines()[before:]
    sent = sum(int(line.split()[3]) for line in lines if line.split()[1].startswith("/chunks/"))
    assert s.chunks_fetched + s.lists == new.chunks_sent + new.lists == len([x for x in lines if "/chunks/" in x])
    assert sent <= s.bytes_on_wire  # the client counts the records it fetched too
    # the 200 kB inserted plus at most the two chunks it cut into, not 3 MB
    assert sent < 200_000 + 2 * ChunkParams().max
    assert sb.blob_path(id2).read_bytes() == v2
    sa.close()
    sb.close()


def _setup(tmp_path: Path, size: int = 600_000) -> tuple[LocalStore, Path, str, list[str]]:
    a = LocalStore(tmp_path / "a")
    (tmp_path / "x").write_bytes(os.urandom(size))
    oid = a.add_file(tmp_path / "x")
    cache = DirTransport(tmp_path / "cache", create=True)
    push(a, cache, [oid])
    return a, cache.root, oid, [chunk_path(c) for c, _ in record_of(cache, oid).chunks]


@pytest.mark.parametrize("fault", ["500-once", "slow"])
def test_transient_faults_are_retried(tmp_path: Path, fault: str) -> None:
    _, root, oid, chunks = _setup(tmp_path)
    with cache_server(root, {chunks[1]: fault}) as (url, handler):
        b = LocalStore(tmp_path / "b")
        with HttpTransport(url) as http:
            pull(b, http, [oid])
        assert b.has(oid) and b.verify()[0] == []
        b.close()
        if fault == "500-once":
            assert handler.hits[chunks[1]] == 2


@pytest.mark.parametrize("fault", ["corrupt", "500", "short", "drop"])
def test_bad_responses_add_nothing(tmp_path: Path, fault: str) -> None:
    _, root, oid, chunks = _setup(tmp_path)
    with cache_server(root, {chunks[2]: fault}) as (url, _):
        b = LocalStore(tmp_path / "b")
        with pytest.raises(CastoreError) as err, HttpTransport(url, attempts=2) as http:
            pull(b, http, [oid])
        assert "nothing" in (err.value.hint or "")
        assert b.objects() == [] and not list(b.blobs.glob("*/*")) and b.verify()[0] == []
        # the chunks that were verified stay for the next attempt, which fetches only the rest
    with cache_server(root) as (url, handler), HttpTransport(url) as http:
        s = pull(b, http, [oid])
        assert b.has(oid) and s.chunks_seeded >= 1
        assert sum(1 for p in handler.hits if p.startswith("chunks/")) == s.chunks_fetched
    b.close()


def test_a_dead_server_is_a_clear_error(tmp_path: Path) -> None:
    b = LocalStore(tmp_path / "b")
    with pytest.raises(CastoreError, match=r"after 2 attempts"), \
            HttpTransport(f"http://127.0.0.1:{free_port()}", attempts=2) as http:
        pull(b, http, ["a" * 64])
    b.close()


def test_kill_9_mid_pull_then_resume_fetches_only_the_rest(tmp_path: Path) -> None:
    import signal

    from tests.conftest import CASTORE, REPO

    _, root, oid, chunks = _setup(tmp_path, size=1_500_000)
    rec = record_of(DirTransport(root), oid)
    store = tmp_path / "b"
    partial = store / "tmp" / "pulls" / oid

    def verified() -> set[str]:  # the chunks of the partial object that hash right, as the next pull sees them
        found, offset = set(), 0
        with contextlib.suppress(FileNotFoundError), open(partial, "rb") as f:
            for cid, length in rec.chunks:
                if hash_bytes(os.pread(f.fileno(), length, offset)) == cid:
                    found.add(cid)
                offset += length
        return found

    with cache_server(root, dict.fromkeys(chunks, "slow")) as (url, _):
        proc = subprocess.Popen([CASTORE, "--store", str(store), "pull", oid, "--from", url], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(verified()) < 8:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = verified()
    assert 8 <= len(kept) < len(set(chunks))
    assert castore_json("verify", store=store)["ok"] and castore_json("ls", store=store) == []
    with cache_server(root) as (url, handler):
        res = castore_json("pull", oid, "--from", url, store=store)
        refetched = {p.split("/")[-1] for p in handler.hits if p.startswith("chunks/")}
    assert res["objects"] == 1 and not (refetched & kept)
    assert len(refetched) == len(set(c.split("/")[-1] for c in chunks)) - len(kept)
    assert not partial.exists()
    assert castore_json("verify", store=store)["ok"]


def test_pull_over_https_checks_the_certificate(tmp_path: Path) -> None:
    """nginx with a self-signed certificate: trusted through SSL_CERT_FILE it serves the pull;
    untrusted, the pull fails with the TLS error and adds nothing."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    a = LocalStore(tmp_path / "a")
    (tmp_path / "x").write_bytes(random.Random(3).randbytes(300_000))
    oid = a.add_file(tmp_path / "x")
    push(a, DirTransport(tmp_path / "cache", create=True), [oid])
    a.close()
    with _nginx(tmp_path / "nginx", tmp_path / "cache", "ssl",
                f"ssl_certificate {cert}; ssl_certificate_key {key};") as (port, _):
        url = f"https://127.0.0.1:{port}"
        untrusted = castore("pull", oid, "--from", url, store=tmp_path / "b", check=False,
                            env={"SSL_CERT_FILE": str(tmp_path / "none.pem")})
        assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        assert "SSL_CERT_FILE" in untrusted.stderr and "attempts" not in untrusted.stderr  # said once, not retried
        assert castore_json("ls", store=tmp_path / "b") == []
        pulled = castore_json("pull", oid, "--from", url, store=tmp_path / "b", env={"SSL_CERT_FILE": str(cert)})
        assert pulled["objects"] == 1 and castore_json("verify", store=tmp_path / "b")["ok"]


class _Answering(http.server.BaseHTTPRequestHandler):
    """Answers every request with one status and a `castore serve`-style JSON error; counts them."""

    status = 500
    hits: list[str] = []

    def _answer(self) -> None:
        self.hits.append(self.command)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"code": self.status, "error": "e", "message": f"said {self.status}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _answering(status: int) -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Answering,), {"status": status, "hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, said, hint", [
    (507, "disk is full", "free space on the server"),
    (505, "HTTP 505: said 505", "its log"),
    (501, "takes no uploads", "does not accept uploads"),
    (405, "takes no uploads", "does not accept uploads"),
    (409, "HTTP 409: said 409", None),
    (403, "HTTP 403", "write scope"),
])
def test_an_upload_answered_with_a_lasting_error_is_not_retried(status: int, said: str, hint: str | None) -> None:
    with _answering(status) as (url, hits), HttpTransport(url, attempts=3) as http:
        with pytest.raises(CastoreError, match=re.escape(said)) as err:
            http.put("castore-cache.json", b"{}")
        assert hits == ["PUT"]  # asked once
        assert "is the cache server up" not in (err.value.hint or "")
        if hint is not None:
            assert hint in (err.value.hint or "")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_answers_are_retried(status: int) -> None:
    with _answering(status) as (url, hits), HttpTransport(url, attempts=2) as http:
        with pytest.raises(CastoreError, match=f"HTTP {status} \\(after 2 attempts\\)"):
            http.put("castore-cache.json", b"{}")
        assert hits == ["PUT", "PUT"]


def test_a_failing_server_stops_a_pull_at_once(tmp_path: Path) -> None:
    with _answering(501) as (url, hits), HttpTransport(url, attempts=3) as http:
        with pytest.raises(CastoreError, match="HTTP 501") as err:
            pull(LocalStore(tmp_path / "b"), http, ["a" * 64])
        assert "nothing unverified was added" in (err.value.hint or "")
        assert len(hits) == 2  # the pipelined GET, then once through httpx: not four times


def test_a_push_to_a_static_server_says_it_takes_no_uploads(tmp_path: Path, nginx: tuple[str, Path, Path]) -> None:
    a, root, _, _ = _setup(tmp_path)
    url, cache_dir, _ = nginx  # nginx answers a PUT with 404 (try_files) or 405
    (cache_dir / "castore-cache.json").write_bytes((root / "castore-cache.json").read_bytes())
    with cache_server(root) as (python_url, _):  # http.server answers it with 501
        for server in (url, python_url):
            other = a.add_bytes(os.urandom(1000))
            with HttpTransport(server) as http, pytest.raises(CastoreError, match="takes no uploads") as err:
                push(a, http, [other])
            assert "push to the cache's directory" in (err.value.hint or "")
            assert "castore serve" in (err.value.hint or "")
    a.close()


class _Redirecting(http.server.BaseHTTPRequestHandler):
    """/lab/... redirects to /other/... (or to itself, for ever); records each request's token."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []
    loop = False
    to = ""  # redirect to this URL instead

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/lab/"):
            where = self.to or (self.path if self.loop else "/other/" + self.path.removeprefix("/lab/"))
            self.send_response(302)
            self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_a_token_does_not_follow_a_redirect_out_of_its_path() -> None:
    """httpx keeps Authorization for any path of the same host and port; a token configured for
    http://host/lab goes only to /lab and below, as docs/cache.md promises."""
    handler = type("R", (_Redirecting,), {"seen": []})
    with _serving(handler) as (url, _), HttpTransport(f"{url}/lab", token="secret") as http:
        assert http._request("GET", "castore-cache.json")[0] == 200
    assert handler.seen == [("/lab/castore-cache.json", "Bearer secret"), ("/other/castore-cache.json", None)]
    for base in ("http://cache.lab:8080/my cache", "http://bücher.example/c"):  # as httpx writes them
        request = httpx.Request("GET", f"{base}/objects/x", headers={"Authorization": "Bearer t"})
        HttpTransport(base, token="t")._scoped(request)
        assert request.headers["authorization"] == "Bearer t", base
    looping = type("L", (_Redirecting,), {"seen": [], "loop": True})
    with _serving(looping) as (url, _), HttpTransport(f"{url}/lab", attempts=4) as http, \
            pytest.raises(CastoreError, match="redirects") as err:
        http._request("GET", "castore-cache.json")
    assert "attempts" not in str(err.value) and len(looping.seen) <= 25  # one round of 20 redirects, not 4
    elsewhere = type("E", (_Redirecting,), {"seen": [], "to": "file:///etc/passwd"})
    with _serving(elsewhere) as (url, _), HttpTransport(f"{url}/lab", attempts=4) as http, \
            pytest.raises(CastoreError, match="redirects to a URL castore does not fetch") as err:
        http._request("GET", "castore-cache.json")
    assert "attempts" not in str(err.value) and len(elsewhere.seen) == 1 and "http://" in (err.value.hint or "")


class _Hostile(http.server.BaseHTTPRequestHandler):
    """A cache whose answers push castore off the pipeline, onto httpx: bodies without end (chunked,
    or until the connection closes), a gzip bomb, an encoding nobody asked for, a redirect with a
    large body, a body or headers a piece at a time; and POST /missing answers that are not lists
    of the paths asked. HEAD finds the paths in `present`."""

    protocol_version = "HTTP/1.1"
    mode = ""
    missing = b"[]"
    present: frozenset[str] = frozenset()
    heads: list[str] = []

    def do_GET(self) -> None:
        w = self.wfile
        big = b"10000\r\n" + b"A" * 65536 + b"\r\n"  # one 64 KiB chunk; 256 of them: 16 MiB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            if self.path == "/elsewhere":
                w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            elif self.mode == "chunked-endless":
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + big * 256 + b"0\r\n\r\n")
            elif self.mode == "close-endless":
                w.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"A" * (16 << 20))
                self.close_connection = True
            elif self.mode == "redirect-endless":
                w.write(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + big * 256 + b"0\r\n\r\n")
            elif self.mode in ("gzip-bomb", "zstd"):
                body = gzip.compress(bytes(16 << 20)) if self.mode == "gzip-bomb" else zstandard.compress(b"A")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                        % (b"gzip" if self.mode == "gzip-bomb" else b"zstd", len(body)) + body)
            elif self.mode == "dribble-body":
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(400):
                    w.write(b"1\r\nA\r\n")
                    time.sleep(0.05)
                w.write(b"0\r\n\r\n")

    def do_HEAD(self) -> None:
        self.heads.append(self.path.lstrip("/"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self.mode == "dribble-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(400):
                    self.wfile.write(b"X-Slow: a\r\n")
                    time.sleep(0.05)
                self.wfile.write(b"Content-Length: 0\r\n\r\n")
                return
            self.send_response(200 if self.path.lstrip("/") in self.present else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.missing)))
        self.end_headers()
        self.wfile.write(self.missing)

    def log_message(self, *args: object) -> None:
        pass


def _hostile(**attrs: object) -> contextlib.AbstractContextManager[tuple[str, type[_Hostile]]]:
    return _serving(type("Hostile", (_Hostile,), {"heads": [], **attrs}))


CHUNK = chunk_path("c" * 64)


@pytest.mark.parametrize("mode", ["chunked-endless", "close-endless", "gzip-bomb", "redirect-endless"])
def test_a_body_past_the_limit_is_cut_off_through_httpx_too(mode: str) -> None:
    """16 MiB where 100 kB were asked for: refused once past the limit, not read whole into memory."""
    with _hostile(mode=mode) as (url, _), HttpTransport(url, attempts=3) as http, returns_within(20), \
            pytest.raises(CastoreError, match="more than the 100000") as err:
        list(http.get_many([CHUNK], limit=100_000))
    assert str(err.value).startswith(f"{url}/{CHUNK}: ") and "attempts" not in str(err.value)
    assert "cannot use" in (err.value.hint or "")


def test_an_encoding_castore_did_not_ask_for_is_refused() -> None:
    """httpx decodes zstd in one piece, as large as the frame says: castore asks for gzip at most."""
    with _hostile(mode="zstd") as (url, _), HttpTransport(url) as http, \
            pytest.raises(CastoreError, match="Content-Encoding 'zstd'") as err:
        http.get(CHUNK)
    assert "cannot use" in (err.value.hint or "")


@pytest.mark.parametrize("mode", ["dribble-body", "dribble-headers"])
def test_an_answer_a_piece_at_a_time_is_given_up_on_through_httpx_too(mode: str) -> None:
    """A piece every 0.05 s keeps each read within the 0.5 s timeout: the answer's deadline ends it."""
    said = r"timed out: no whole answer after [0-9.]+ s \(after 2 attempts\)"
    with _hostile(mode=mode) as (url, _), HttpTransport(url, timeout=0.5, attempts=2) as http, returns_within(10), \
            pytest.raises(CastoreError, match=said) as err:
        if mode == "dribble-body":
            http.get(CHUNK)
        else:
            http.exists(CHUNK)
    assert str(err.value).startswith(f"{url}/{CHUNK}: ")


@pytest.mark.parametrize("answer", [
    b"<html>a login page</html>", b'{"a": 1}', b'[["x"]]', b"[1, 2]", json.dumps([chunk_path("f" * 64)]).encode(),
    b"[" * 100_000 + b"]" * 100_000,
], ids=["html", "object", "nested", "numbers", "not-asked", "deep"])
def test_a_missing_answer_that_is_not_a_list_of_the_paths_asked_falls_back_to_head(answer: bytes) -> None:
    paths = [chunk_path(c * 64) for c in "abc"]
    with _hostile(missing=answer, present=frozenset(paths[:1])) as (url, handler), HttpTransport(url) as http:
        assert http.missing(paths) == set(paths[1:])
        assert sorted(handler.heads) == paths
        handler.heads.clear()
        assert http.missing(paths[1:]) == set(paths[1:])  # the batch endpoint is not asked again
    assert sorted(handler.heads) == paths[1:]
