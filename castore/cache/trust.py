"""Which realisations to believe: signed by a trusted key that is not revoked.

Content fetched by id needs no trust (it is verified against its id); a
realisation "plan P produced O" is used only with a valid signature over
(P, O) by a key in ``trusted-public-keys`` that is not in ``revoked-keys``.

Trusted and revoked entries are read alike: spaces around them are ignored and
a malformed one is an error naming where it came from (the config file or the
``$CASTORE_...`` variable), so no typo quietly trusts or un-revokes a key. A
revoked ``NAME:BASE64`` revokes those key bytes under any name; a revoked
``NAME`` revokes every key of that name, in any case (``LAB-1`` revokes
``lab-1``): revocation errs on the side of refusing.

Secret key files are read only through :func:`read_secret_key`: a file that
group or others may open is refused (as ssh does), and no message shows any
part of a key. :func:`secret_keys` checks every configured file, so a command
that signs calls it before it changes anything.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from castore.cache.layout import RealisationRecord
from castore.config import Config
from castore.errors import CastoreError
from castore.signing import PublicKey, check_secret, parse_name, parse_public, sign, verify


@dataclass(frozen=True)
class Trust:
    keys: tuple[PublicKey, ...] = ()
    revoked_names: frozenset[str] = frozenset()  # casefolded key names
    revoked_keys: frozenset[bytes] = frozenset()  # key bytes, whatever name they came with

    @classmethod
    def from_config(cls, config: Config) -> Trust:
        where = config.origin("trusted-public-keys")
        keys = tuple(_in(where, "trusted-public-keys", parse_public, k) for k in config.trusted_public_keys)
        names: set[str] = set()
        revoked: set[bytes] = set()
        where = config.origin("revoked-keys")
        for entry in config.revoked_keys:
            if ":" in entry:
                revoked.add(_in(where, "revoked-keys", lambda e: parse_public(e, "revoked key"), entry).key)
            else:
                names.add(_in(where, "revoked-keys", lambda e: parse_name(e, "revoked key"), entry).casefold())
        return cls(keys, frozenset(names), frozenset(revoked))

    def is_revoked(self, key: PublicKey) -> bool:
        return key.name.casefold() in self.revoked_names or key.key in self.revoked_keys

    def refusal(self, rec: RealisationRecord) -> str:
        """Why rec is not believed, when vouching(rec) is empty: for the note that says so. Key
        names come from the cache: they are shown escaped, and at most five of them."""
        if not rec.signatures:
            return "is unsigned"
        reasons = []
        for name in sorted({name for name, _ in rec.signatures})[:5]:
            keys = [k for k in self.keys if k.name == name]
            if not keys:
                why = "not trusted"
            elif all(self.is_revoked(k) for k in keys):
                why = "revoked"
            else:
                why = "does not verify"
            reasons.append(f"{_shown(name)} ({why})")
        more = len({name for name, _ in rec.signatures}) - len(reasons)
        return "is signed by " + ", ".join(reasons) + (f" and {more} more" if more > 0 else "")

    def vouching(self, rec: RealisationRecord) -> tuple[tuple[str, bytes], ...]:
        """The signatures on rec by trusted, unrevoked keys that verify."""
        message = rec.message()
        return tuple((name, sig) for name, sig in rec.signatures
                     if any(key.name == name and not self.is_revoked(key) and verify(key, message, sig)
                            for key in self.keys))


def _shown(name: str) -> str:
    """A key name from a cache, safe to print: printable and short, else escaped and cut."""
    return name if name.isprintable() and len(name) <= 64 else repr(name[:64])


T = TypeVar("T")


def _in(where: str, setting: str, parse: Callable[[str], T], entry: str) -> T:
    """parse(entry), its error prefixed with where the entry came from."""
    try:
        return parse(entry)
    except CastoreError as exc:
        raise CastoreError(f"{where}: {setting}: {exc.message}", exc.hint) from exc


_MAX_KEY_FILE = 4096  # a key file is one line of about 50 bytes


def read_secret_key(path: str | os.PathLike[str]) -> str:
    """The secret key in the file at path, checked: group and others may not open the file (mode
    0600 or stricter, whoever reads it), and it holds NAME:BASE64 of a 32-byte seed. Errors name
    the file and show nothing of what it holds."""
    what = f"secret key file {os.fspath(path)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CastoreError(f"cannot read {what}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            raise CastoreError(f"{what} has mode {stat.S_IMODE(mode):04o}: others than its owner may open it",
                               f"chmod 600 {shlex.quote(os.fspath(path))}")
        data = b""
        while len(data) <= _MAX_KEY_FILE and (part := os.read(fd, _MAX_KEY_FILE + 1 - len(data))):
            data += part
    except OSError as exc:
        raise CastoreError(f"cannot read {what}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    hint = "a secret key file holds one line, NAME:BASE64, as `castore key generate NAME --out FILE` writes it"
    if len(data) > _MAX_KEY_FILE:
        raise CastoreError(f"{what} is not NAME:BASE64: it is longer than {_MAX_KEY_FILE} bytes", hint)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CastoreError(f"{what} is not text (UTF-8)", hint) from None  # not chained: it quotes a byte
    return check_secret(text, what)


def secret_keys(config: Config) -> list[str]:
    """Every configured secret key, read and checked (:func:`read_secret_key`). A command that signs
    calls this first, so a bad key file stops it before it uploads anything."""
    return [read_secret_key(path) for path in config.secret_key_files]


def signed(rec: RealisationRecord, secrets: list[str]) -> RealisationRecord:
    sigs = dict(rec.signatures)
    for secret in secrets:
        name, sig = sign(secret, rec.message())
        sigs[name] = sig
    return RealisationRecord(rec.plan, rec.object, rec.record, tuple(sorted(sigs.items())))
