"""fetch: download one file over http(s) or copy a file:// URL, checked against a declared hash.

The only builder with network access; nothing it downloads is used before
the whole output matches the declared sha256 or blake3.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from pathlib import Path
from typing import BinaryIO

from castore.builders import BlobResult, BuildContext, Result
from castore.errors import CastoreError, HashMismatch, NotFound
from castore.hashing import Hasher


def check_digest(ctx: BuildContext, h: Hasher, what: str) -> None:
    for algo in ("sha256", "blake3"):
        expected = ctx.params.get(algo)
        if expected is None:
            continue
        actual = h.sha256() if algo == "sha256" else h.hexdigest()
        if actual != expected:
            raise HashMismatch(what, expected, actual, algo)


def _fetch(ctx: BuildContext) -> Result:
    url: str = ctx.params["url"]
    h = Hasher(sha256=True)
    if url.startswith("file://"):
        src = Path(os.fsdecode(urllib.parse.unquote_to_bytes(urllib.parse.urlsplit(url).path)))  # any bytes
        with _opened(src) as f, open(ctx.out, "xb") as out:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    else:
        download(url, ctx.out, h, ctx.status)
    check_digest(ctx, h, url)
    return BlobResult()


def _opened(src: Path) -> BinaryIO:
    try:
        return open(src, "rb")
    except FileNotFoundError:
        raise NotFound(f"fetch: {src} does not exist") from None
    except OSError as exc:  # a directory, a file not readable: the recipe's, not the store's
        raise CastoreError(f"fetch: cannot read {src}: {exc.strerror}") from None


def download(url: str, dest: Path, h: Hasher, status: object = None) -> None:
    import httpx  # imported here: 140 ms that a no-op realize should not pay

    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as resp:
            if resp.status_code != 200:
                raise CastoreError(f"fetch {url}: HTTP {resp.status_code}")
            total = int(resp.headers.get("content-length") or 0)
            with open(dest, "xb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    if callable(status):
                        status(f"{h.size >> 20} / {total >> 20} MiB" if total else f"{h.size >> 20} MiB")
    except httpx.HTTPError as exc:
        raise CastoreError(f"fetch {url}: {exc}", "check the URL and the network") from exc


def copy(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)


BUILD = {"fetch": _fetch}
