"""Small test helpers: build contexts without a store, tarballs, a local HTTP server, a tiny
tmpfs to fill up, a deadline for code that could loop for ever."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from castore.builders import BuildContext, Input


def context(tmp_path: Path, params: dict[str, Any], inputs: dict[str, Input] | None = None,
            blobs: Path | None = None, plan_hash: str = "f" * 64) -> BuildContext:
    scratch = tmp_path / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    log = io.BytesIO()
    blobs = blobs or tmp_path / "blobs"
    return BuildContext(scratch=scratch, out=scratch / "out", params=params, inputs=inputs or {},
                        plan_hash=plan_hash, blob_path=lambda oid: blobs / oid[:2] / oid, log=log)


def tarball(members: list[tuple[str, str, Any]], mode: str = "w:gz") -> bytes:
    """members: (name, type, data-or-linkname); type in file, dir, sym, hard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = value
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = value
            tar.addfile(info)
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    delay: float = 0.0

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = 64 * 1024
        try:
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                if self.delay:
                    time.sleep(self.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        pass


H = TypeVar("H", bound=http.server.BaseHTTPRequestHandler)


@contextmanager
def _serving(handler: type[H]) -> Iterator[tuple[str, type[H]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def http_server(files: dict[str, bytes], delay: float = 0.0) -> Iterator[tuple[str, type[_Handler]]]:
    with _serving(type("Handler", (_Handler,), {"files": files, "delay": delay})) as served:
        yield served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port} after {seconds} s")


class _CacheHandler(http.server.BaseHTTPRequestHandler):
    """Serves a cache directory, with faults injected per path: a test's misbehaving server."""

    root: Path
    faults: dict[str, str] = {}
    hits: dict[str, int] = {}

    def _body(self) -> bytes | None:
        path = self.path.lstrip("/")
        self.hits[path] = self.hits.get(path, 0) + 1
        try:
            return (self.root / path).read_bytes() if ".." not in path else None
        except (FileNotFoundError, IsADirectoryError):
            return None

    def do_HEAD(self) -> None:
        data = self._body()
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()

    def do_GET(self) -> None:
        data = self._body()
        fault = self.faults.get(self.path.lstrip("/"), "")
        if data is None:
            self.send_error(404)
            return
        if fault == "500-once" and self.hits[self.path.lstrip("/")] == 1:
            self.send_error(500)
            return
        if fault == "500":
            self.send_error(500)
            return
        if fault == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) + (10 if fault in ("short", "drop") else 0)))
        self.end_headers()
        if fault == "slow":
            time.sleep(0.5)
        if fault == "drop":  # half the body, then the connection goes away
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def cache_server(root: Path, faults: dict[str, str] | None = None) -> Iterator[tuple[str, type[_CacheHandler]]]:
    with _serving(type("CacheHandler", (_CacheHandler,), {"root": root, "faults": faults or {}, "hits": {}})) as s:
        yield s


@contextmanager
def tiny_tmpfs(path: Path, size: str = "3m", inodes: int = 0) -> Iterator[Path]:
    """A small tmpfs mounted at path (root only): what a full disk does to a command. inodes: so
    few that creating a file fails with ENOSPC while bytes are left."""
    path.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


NOT_ROOT = os.geteuid() != 0  # for skipif: mounting needs root


@contextmanager
def returns_within(seconds: int) -> Iterator[None]:
    """Turn a hang into a failure (SIGALRM reaches a loop of pure Python)."""
    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sparse_file(path: Path, pieces: dict[int, bytes], size: int) -> Path:
    """A file of size bytes holding each piece at its offset, holes elsewhere."""
    with open(path, "wb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    assert path.stat().st_blocks * 512 < size  # the filesystem kept the holes
    return path
