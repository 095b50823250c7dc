"""Many GETs (or PUTs) to one HTTP server, pipelined on one keep-alive connection.

A pull fetches thousands of small files (chunks), and a push uploads them. One
request at a time through httpx costs about a millisecond of Python each, which
was most of a cold pull; HTTP/1.1 pipelining (as apt does) sends the next
requests before the answers arrive and parses responses straight off a buffered
socket, so the per-chunk cost drops to tens of microseconds and the server works
while we verify.

It speaks only the plain part of HTTP/1.1 that static servers (nginx, a CDN, a
bucket) and `castore serve` answer with: a status line, headers, a
Content-Length body in no content encoding (interim 1xx answers are skipped).
Anything else raises :class:`Unsupported`, and the caller falls back to one
request at a time through httpx. Connection trouble, and an answer that does
not arrive whole in time (see :data:`MIN_RATE`), raise :class:`Broken` after
the responses that arrived whole; the caller resumes from the first path that
did not. An answer that asking again cannot mend (a body over the limit, a
status line that is not HTTP) raises :class:`Malformed`. A server that does not
keep connections alive gets one request per connection, never a pipeline it
would cut off.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from castore import __version__
from castore.errors import CastoreError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_HEADER = 64 * 1024
# The socket's timeout bounds each read, so a server sending a byte every few seconds would hold an
# answer open for ever. Each whole answer therefore gets the timeout, plus a second for each KiB it
# brings (or, for an upload, sends). Only a transfer slower than 1 KiB/s (8 kbit/s, below a GPRS
# modem's) fails; a 128 KiB chunk has 30 s + 2 min. A flat deadline would fail a large file
# on a slow link, or let a dribble run for as long as the largest file could take.
MIN_RATE = 1024
_READ = frozenset((b"content-length", b"transfer-encoding", b"connection", b"content-encoding"))
UNTRUSTED = ("the server's certificate is not trusted here: install its CA in the system store, "
             "or point SSL_CERT_FILE at it")


class Unsupported(Exception):
    """The server answers in a way this client does not parse (chunked, no length, a proxy is set)."""


class Broken(Exception):
    """The connection failed, or an answer was too slow; the responses already yielded are whole."""


class Malformed(Exception):
    """The server's answer is one that asking again would not mend (over the limit, not HTTP)."""


def _host(host: str) -> str | bytes:
    """An ASCII host as bytes: getaddrinfo would otherwise load the idna codec for it (2 ms)."""
    return host.encode() if host.isascii() else host


class Deadline:
    """When an answer must have arrived whole (:data:`MIN_RATE`): the timeout plus a second per KiB
    its request sends, pushed back a second per KiB it brings. Not running: never."""

    __slots__ = ("at", "started")

    def __init__(self) -> None:
        self.started = self.at = math.inf

    def start(self, timeout: float, sent: int = 0) -> None:
        self.started = time.monotonic()
        self.at = self.started + timeout + sent / MIN_RATE

    def stop(self) -> None:
        self.started = self.at = math.inf

    def left(self) -> float:
        """Seconds left; TimeoutError once there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("past the answer's deadline")
        return left

    def got(self, n: int) -> None:
        self.at += n / MIN_RATE

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _Reader(socket.SocketIO):
    """The socket's reading side, holding each answer to a deadline (:data:`MIN_RATE`) that the
    bytes it reads push back. The buffered reader above it calls it only when its buffer runs
    dry, so an answer read ahead with earlier ones costs nothing here: its clock starts at the
    first read it waits for."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__(sock, "rb")
        self.sock = sock
        self.timeout = timeout
        self.upload: int | None = None  # set for each answer: the bytes of its request; None once its clock runs
        self.deadline = Deadline()

    def readinto(self, b: WriteableBuffer) -> int | None:
        if self.upload is not None:
            self.deadline.start(self.timeout, self.upload)
            self.upload = None
        wait = min(self.deadline.left(), self.timeout)
        if self.sock.gettimeout() != wait:
            self.sock.settimeout(wait)
        n = super().readinto(b)
        if n:
            self.deadline.got(n)
        if _QUICKACK is not None:  # re-armed after each read: Linux falls back to delayed ACKs
            self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return n


# A server that answers pipelined requests without TCP_NODELAY (nginx between pipelined
# requests, tcp_nopush or not) holds a small answer until its last segment is ACKed, and the
# client's delayed ACK takes 40 ms: 47 small answers took 44 ms instead of 1.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


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
        self._raw: _Reader | None = None
        self._reader: io.BufferedReader | None = None
        self.keepalive: bool | None = None  # unknown until the first response

    def close(self) -> None:
        for thing in (self._reader, self._sock):
            if thing is not None:
                with contextlib.suppress(OSError):
                    thing.close()
        self._sock = self._raw = self._reader = None

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
        self._raw = _Reader(sock, self.timeout)
        self._reader = io.BufferedReader(self._raw, 1 << 20)

    def _request(self, method: bytes, path: str, body: bytes | None) -> bytes:
        line = method + b" " + quote(f"{self.prefix}/{path}").encode() + self._head
        if body is None:
            return line + b"\r\n"
        return line + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def get(self, paths: Sequence[str], limit: int) -> Iterator[tuple[int, bytes]]:
        """(status, body) for each path, in order. Bodies over limit bytes are an error (Malformed)."""
        return self.exchange(b"GET", paths, None, limit)

    def exchange(self, method: bytes, paths: Sequence[str], bodies: Sequence[bytes] | None,
                 limit: int) -> Iterator[tuple[int, bytes]]:
        """(status, answer body) for each request, in order; bodies: what to send with each (PUT)."""
        sent = got = since = 0
        try:
            while got < len(paths):
                if self._sock is None:
                    self._connect()
                    sent = since = got  # whatever was in flight on the old connection is asked again
                assert self._sock is not None
                window = self.depth if self.keepalive else 1
                if sent - got <= window // 2 and sent < len(paths):  # top up in batches: fewer sends
                    upto = min(len(paths), got + window)
                    data = b"".join(self._request(method, paths[k], bodies[k] if bodies is not None else None)
                                    for k in range(sent, upto))
                    try:
                        # sendall's timeout bounds the whole send: give a slow uplink the time the bytes need
                        self._sock.settimeout(self.timeout + len(data) / MIN_RATE)
                        self._sock.sendall(data)
                    except OSError as exc:
                        self.close()
                        raise Broken(f"send failed: {exc}") from exc
                    sent = upto
                try:
                    status, body, close = self._response(limit, 0 if bodies is None else len(bodies[got]))
                except Malformed as exc:
                    if got > since:  # bytes after an earlier answer's body, not this answer: ask again
                        raise Broken(str(exc)) from exc
                    raise
                got += 1
                if close:
                    self.close()
                yield status, body
        finally:
            if sent > got:  # left early: answers still in flight would be read as the next ones'
                self.close()

    def _response(self, limit: int, upload: int = 0) -> tuple[int, bytes, bool]:
        """The next answer: (status, body, whether the server closes the connection after it).
        upload: the bytes of the request it answers, which the link carries first."""
        reader, raw = self._reader, self._raw
        assert reader is not None and raw is not None
        raw.upload = upload
        try:
            size = 0
            while True:  # interim answers (100 Continue, 103 Early Hints) come before the final one
                line = reader.readline(MAX_HEADER)
                if not line:
                    raise Broken("the server closed the connection")
                version, _, rest = line.partition(b" ")
                try:
                    if not version.startswith(b"HTTP/1."):  # bytes a body left over, say: out of step
                        raise ValueError(version)
                    status = int(rest[:3])
                except ValueError:
                    if not line.endswith(b"\n") and len(line) < MAX_HEADER:
                        raise Broken("the server closed the connection inside the status line") from None
                    raise Malformed(f"the status line {line.rstrip()[:60]!r} is not HTTP") from None
                length = None
                close = version != b"HTTP/1.1"
                size += len(line)
                while True:
                    line = reader.readline(MAX_HEADER)
                    size += len(line)
                    if size > MAX_HEADER:
                        raise Malformed(f"response headers over {MAX_HEADER >> 10} KiB")
                    if not line.endswith(b"\n"):
                        raise Broken("the server closed the connection inside the response headers")
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name not in _READ:  # one lookup, cheaper than failing the four tests below
                        continue
                    if name == b"content-length":
                        if length is not None and length != int(value):  # which one frames the body?
                            raise Malformed("two different Content-Length headers")
                        length = int(value)
                    elif name == b"transfer-encoding":
                        raise Unsupported("chunked transfer encoding")
                    elif name == b"connection":
                        token = value.strip().lower()
                        close = token == b"close" or (close and token != b"keep-alive")
                    elif name == b"content-encoding" and value.strip().lower() not in (b"identity", b""):
                        raise Unsupported("a content encoding")  # httpx decodes it
                if status >= 200:
                    break
                if status < 100 or status == 101:  # 101: a switch of protocols that nothing asked for
                    raise Malformed(f"status {status}, which is no answer to this request")
            if status in (204, 304):
                length = length or 0
            if length is None:
                raise Unsupported("a response without Content-Length")
            if length < 0 or length > limit:
                raise Malformed(f"a {length}-byte body, more than the {limit} expected")
            body = reader.read(length)
            if len(body) != length:
                raise Broken(f"the body ended after {len(body)} of {length} bytes")
        except TimeoutError as exc:
            self.close()
            raise Broken(f"timed out: no whole answer after {raw.deadline.elapsed():.1f} s") from exc
        except OSError as exc:
            self.close()
            raise Broken(f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # int() of a Content-Length that is not a number
            self.close()
            raise Malformed(f"a response header that is not HTTP: {exc}") from exc
        except (Broken, Malformed, Unsupported):
            self.close()
            raise
        if self.keepalive is None or not close:
            self.keepalive = not close
        return status, body, close
