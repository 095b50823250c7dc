"""The pipelined GET client, against HTTP/1.1 servers that keep connections, cut them, or answer oddly."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import time
from typing import Any

import pytest

from castore.cache.pipeline import Pipeline, Unsupported
from castore.cache.transport import HttpTransport
from castore.errors import CastoreError
from tests.helpers import _serving, returns_within

CHUNKS = {f"chunks/{i:02x}/{i:02x}" + "0" * 62: bytes([i]) * (1000 + 37 * i) for i in range(200)}


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; counts connections; can cut a connection after some answers,
    answer chunked or gzip-encoded, claim an oversized body, send 1xx answers first, a status
    line that is not HTTP, bytes after each body, or a body `piece` bytes at a time (dribble,
    every `pause` seconds)."""

    protocol_version = "HTTP/1.1"
    mode = "plain"
    per_connection = 0  # close after this many answers (nginx's keepalive_requests); 0: never
    piece, pause = 1, 0.05
    connections: list[int] = []  # answers given on each connection
    hits: dict[str, int] = {}

    def setup(self) -> None:
        super().setup()
        self.connections.append(0)
        self.index = len(self.connections) - 1

    def do_GET(self) -> None:
        path = self.path.lstrip("/")
        self.hits[path] = self.hits.get(path, 0) + 1
        body = CHUNKS.get(path)
        self.connections[self.index] += 1
        if body is None:
            self.send_error(404)
            return
        if self.mode == "interim":  # what a CDN sends with Early Hints
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                             b"Link: </style.css>; rel=preload\r\nContent-Length: 9\r\n\r\n")
        if self.mode == "bad-status":
            self.wfile.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")
            return
        if self.mode == "two-lengths":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: 3\r\n\r\n%s"
                             % (len(body), body))
            return
        if self.mode == "dribble":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                for k in range(0, len(body), self.piece):
                    self.wfile.write(body[k:k + self.piece])
                    time.sleep(self.pause)
            return
        self.send_response(200)
        self._last_on_this_connection()
        if self.mode == "gzip":  # as nginx's gzip_static always: whatever the request accepts
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        if self.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        self.send_header("Content-Length", str(len(body) * (1000 if self.mode == "huge" else 1)))
        self.end_headers()
        self.wfile.write(body + {"garbage-after": b"GARBAGE\r\n\r\n", "glued": b"GARBAGE"}.get(self.mode, b""))

    def do_PUT(self) -> None:
        path = self.path.lstrip("/")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.connections[self.index] += 1
        if self.mode == "locked" and path.endswith("7" * 8):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.received.append((path, body))
        self.send_response(201)
        self._last_on_this_connection()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _last_on_this_connection(self) -> bool:
        last = bool(self.per_connection) and self.connections[self.index] >= self.per_connection
        if last:
            self.send_header("Connection", "close")
            self.close_connection = True
        return last

    def log_message(self, *args: Any) -> None:
        pass


def _server(**attrs: Any) -> Any:
    return _serving(type("KA", (_KeepAlive,), {"connections": [], "hits": {}, "received": [], **attrs}))


def test_many_gets_share_one_connection_in_order() -> None:
    with _server() as (url, handler):
        pipe = Pipeline(url)
        paths = [*CHUNKS, "chunks/ff/" + "f" * 64]
        got = list(pipe.get(paths, limit=1 << 20))
        pipe.close()
    assert [b for s, b in got[:-1]] == list(CHUNKS.values()) and got[-1][0] == 404
    assert handler.connections == [len(paths)] and pipe.keepalive


def test_a_server_that_closes_every_few_answers_gets_each_path_asked_once() -> None:
    with _server(per_connection=7) as (url, handler), HttpTransport(url) as http:
        got = dict(http.get_many(list(CHUNKS)))
    assert got == CHUNKS
    assert len(handler.connections) == -(-len(CHUNKS) // 7) and set(handler.hits.values()) == {1}


def test_chunked_answers_fall_back_to_one_request_at_a_time() -> None:
    with _server(mode="chunked") as (url, _):
        with pytest.raises(Unsupported):
            list(Pipeline(url).get(list(CHUNKS)[:2], limit=1 << 20))
        with HttpTransport(url) as http:
            assert dict(http.get_many(list(CHUNKS)[:20])) == dict(list(CHUNKS.items())[:20])


def test_a_body_over_the_limit_is_refused_at_once() -> None:
    paths = list(CHUNKS)[:3]
    with _server(mode="huge") as (url, handler), HttpTransport(url, attempts=3) as http, \
            pytest.raises(CastoreError, match="more than the") as err:
        list(http.get_many(paths, limit=100_000))
    assert handler.hits[paths[0]] == 1 and "attempts" not in str(err.value)  # asking again would not mend it
    assert "proxy in front of it" in (err.value.hint or "")


def test_a_status_line_that_is_not_http_is_refused_at_once() -> None:
    paths = list(CHUNKS)[:3]
    with _server(mode="bad-status") as (url, handler), HttpTransport(url, attempts=3) as http, \
            pytest.raises(CastoreError, match=r"2OO OK.* is not HTTP") as err:
        list(http.get_many(paths))
    assert handler.hits[paths[0]] == 1 and "attempts" not in str(err.value)
    assert "cannot use" in (err.value.hint or "") and "is the cache server up" not in (err.value.hint or "")


def test_bytes_after_a_body_cost_a_reconnection_not_the_pull() -> None:
    """The junk reads as the next answer's status line: not that answer's fault, so it is asked again."""
    paths = list(CHUNKS)[:5]
    with _server(mode="garbage-after") as (url, handler), HttpTransport(url) as http:
        assert dict(http.get_many(paths)) == {p: CHUNKS[p] for p in paths}
    assert len(handler.connections) == len(paths)


def test_bytes_glued_to_the_next_status_line_are_out_of_step_too() -> None:
    """"GARBAGEHTTP/1.1 200 OK" was read as an answer: the link is out of step, so it is dropped."""
    paths = list(CHUNKS)[:5]
    with _server(mode="glued") as (url, handler), HttpTransport(url) as http:
        assert dict(http.get_many(paths)) == {p: CHUNKS[p] for p in paths}
    assert len(handler.connections) == len(paths)


def test_two_different_content_lengths_are_not_http() -> None:
    with _server(mode="two-lengths") as (url, _), HttpTransport(url, attempts=3) as http, \
            pytest.raises(CastoreError, match="two different Content-Length headers") as err:
        list(http.get_many(list(CHUNKS)[:3]))
    assert "attempts" not in str(err.value)


def test_interim_answers_are_skipped() -> None:
    with _server(mode="interim") as (url, _):
        pipe = Pipeline(url)
        got = list(pipe.get(list(CHUNKS)[:30], limit=1 << 20))
        pipe.close()
    assert got == [(200, body) for body in list(CHUNKS.values())[:30]]


def test_an_encoded_body_goes_through_httpx_which_decodes_it() -> None:
    paths = list(CHUNKS)[:20]
    with _server(mode="gzip") as (url, _):
        with pytest.raises(Unsupported):
            list(Pipeline(url).get(paths, limit=1 << 20))
        with HttpTransport(url) as http:
            assert dict(http.get_many(paths)) == {p: CHUNKS[p] for p in paths}


def test_a_server_sending_a_byte_at_a_time_is_given_up_on() -> None:
    """Each read gets a byte within the timeout, so only a deadline for the whole answer ends it."""
    path = next(iter(CHUNKS))
    with _server(mode="dribble", pause=0.05) as (url, _), HttpTransport(url, timeout=0.5, attempts=2) as http, \
            returns_within(20), pytest.raises(CastoreError, match="timed out") as err:
        list(http.get_many([path]))
    assert f"{url}/{path}" in str(err.value) and "\n" not in str(err.value)


def test_a_slow_steady_link_is_not_given_up_on() -> None:
    """0.9 s for 1740 bytes, past a 0.4 s timeout, at twice the 1 KiB/s floor: whole."""
    path = list(CHUNKS)[20]
    with _server(mode="dribble", piece=100, pause=0.05) as (url, _), \
            HttpTransport(url, timeout=0.4, attempts=1) as http:
        assert dict(http.get_many([path])) == {path: CHUNKS[path]}


def test_leaving_early_does_not_mix_up_answers() -> None:
    with _server() as (url, _):
        pipe = Pipeline(url)
        paths = list(CHUNKS)
        for status, body in pipe.get(paths, limit=1 << 20):
            assert status == 200 and body == CHUNKS[paths[0]]
            break  # answers to the rest are still in flight
        assert [b for _, b in pipe.get(paths[5:9], limit=1 << 20)] == [CHUNKS[p] for p in paths[5:9]]
        pipe.close()


def test_puts_are_pipelined_in_order_and_a_refusal_is_an_error() -> None:
    items = list(CHUNKS.items())
    with _server(per_connection=50) as (url, handler), HttpTransport(url) as http:
        http.put_many(iter(items))
    assert handler.received == items  # every body, once, in order, across reconnections
    assert len(handler.connections) == -(-len(items) // 50)
    locked = [*items[:3], ("chunks/77/" + "7" * 64, b"x"), *items[3:6]]
    with _server(mode="locked") as (url, handler), HttpTransport(url) as http, \
            pytest.raises(CastoreError, match="HTTP 403") as err:
        http.put_many(iter(locked))
    assert "token" in (err.value.hint or "")
    # the uploads behind the refused one may have been on the wire already, and the server kept
    # those it read before the client hung up: harmless, since chunks are named by their content
    assert handler.received[:3] == items[:3] and handler.received == items[:len(handler.received)]
