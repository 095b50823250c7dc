"""Many GETs (or PUTs) to one HTTP server, pipelined on one keep-alive connection.

A pull fetches thousands of small files (chunks), and a push uploads them. One
request at a time through httpx costs about a millisecond of Python each, which
was most of a cold pull; HTTP/1.1 pipelining (as apt does) sends the next
requests before the answers arrive and parses responses straight off a buffered
socket, so the per-chunk cost drops to tens of microseconds and the server works
while we verify.

It speaks only the plain part of HTTP/1.1 that static servers (nginx, a CDN, a
bucket) and `castore serve` answer with: a status line, headers, a
Content-Length body. Anything
else raises :class:`Unsupported`, and the caller falls back to one request at a
time through httpx. Connection trouble raises :class:`Broken` after the
responses that arrived whole; the caller resumes from the first path that did
not. A server that does not keep connections alive gets one request per
connection, never a pipeline it would cut off.
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator, Sequence
from urllib.parse import quote, urlsplit

from castore import __version__
from castore.errors import CastoreError

MAX_HEADER = 64 * 1024
UNTRUSTED = ("the server's certificate is not trusted here: install its CA in the system store, "
             "or point SSL_CERT_FILE at it")


class Unsupported(Exception):
    """The server answers in a way this client does not parse (chunked, no length, a proxy is set)."""


class Broken(Exception):
    """The connection failed; the responses already yielded are whole."""


def _host(host: str) -> str | bytes:
    """An ASCII host as bytes: getaddrinfo would otherwise load the idna codec for it (2 ms)."""
    return host.encode() if host.isascii() else host


class Pipeline:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, depth: int = 64) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Unsupported(url)
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.depth = depth
        host_header = parts.netloc.rpartition("@")[2]
        extra = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head = (f" HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: castore/{__version__}\r\n"
                      f"Accept-Encoding: identity\r\n{extra}").encode()  # the blank line comes per request
        self._sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None
        self.keepalive: bool | None = None  # unknown until the first response

    def close(self) -> None:
        for thing in (self._reader, self._sock):
            if thing is not None:
                with contextlib.suppress(OSError):
                    thing.close()
        self._sock = self._reader = None

    def _connect(self) -> None:
        self.close()
        try:
            sock = socket.create_connection((_host(self.host), self.port),  # type: ignore[arg-type]
                                            timeout=self.timeout)  # getaddrinfo takes bytes
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import ssl

                try:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
                except ssl.SSLCertVerificationError as exc:  # not transient: no retry
                    sock.close()
                    raise CastoreError(f"{self.scheme}://{self.host}:{self.port}: {exc}", UNTRUSTED) from exc
        except OSError as exc:
            raise Broken(f"cannot connect: {exc}") from exc
        self._sock = sock
        self._reader = io.BufferedReader(socket.SocketIO(sock, "rb"), 1 << 20)

    def _request(self, method: bytes, path: str, body: bytes | None) -> bytes:
        line = method + b" " + quote(f"{self.prefix}/{path}").encode() + self._head
        if body is None:
            return line + b"\r\n"
        return line + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def get(self, paths: Sequence[str], limit: int) -> Iterator[tuple[int, bytes]]:
        """(status, body) for each path, in order. Bodies over limit bytes are an error (Broken)."""
        return self.exchange(b"GET", paths, None, limit)

    def exchange(self, method: bytes, paths: Sequence[str], bodies: Sequence[bytes] | None,
                 limit: int) -> Iterator[tuple[int, bytes]]:
        """(status, answer body) for each request, in order; bodies: what to send with each (PUT)."""
        sent = got = 0
        try:
            while got < len(paths):
                if self._sock is None:
                    self._connect()
                    sent = got  # whatever was in flight on the old connection is asked again
                assert self._sock is not None
                window = self.depth if self.keepalive else 1
                if sent - got <= window // 2 and sent < len(paths):  # top up in batches: fewer sends
                    upto = min(len(paths), got + window)
                    try:
                        self._sock.sendall(b"".join(
                            self._request(method, paths[k], bodies[k] if bodies is not None else None)
                            for k in range(sent, upto)))
                    except OSError as exc:
                        self.close()
                        raise Broken(f"send failed: {exc}") from exc
                    sent = upto
                status, body, close = self._response(limit)
                got += 1
                if close:
                    self.close()
                yield status, body
        finally:
            if sent > got:  # left early: answers still in flight would be read as the next ones'
                self.close()

    def _response(self, limit: int) -> tuple[int, bytes, bool]:
        reader = self._reader
        assert reader is not None
        try:
            line = reader.readline(MAX_HEADER)
            if not line:
                raise Broken("the server closed the connection")
            version, _, rest = line.partition(b" ")
            status = int(rest[:3])
            length = None
            close = version != b"HTTP/1.1"
            size = len(line)
            while True:
                line = reader.readline(MAX_HEADER)
                size += len(line)
                if not line.endswith(b"\n") or size > MAX_HEADER:
                    raise Broken("truncated or oversized response headers")
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    raise Unsupported("chunked transfer encoding")
                elif name == b"connection":
                    token = value.strip().lower()
                    close = token == b"close" or (close and token != b"keep-alive")
            if status < 200 or status in (204, 304):
                length = length or 0
            if length is None:
                raise Unsupported("a response without Content-Length")
            if length < 0 or length > limit:
                raise Broken(f"a {length}-byte body, more than the {limit} expected")
            body = reader.read(length)
            if len(body) != length:
                raise Broken(f"the body ended after {len(body)} of {length} bytes")
        except (OSError, ValueError) as exc:
            self.close()
            raise Broken(f"{type(exc).__name__}: {exc}") from exc
        except (Broken, Unsupported):
            self.close()
            raise
        if self.keepalive is None or not close:
            self.keepalive = not close
        return status, body, close
