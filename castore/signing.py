"""ed25519 keys and signatures, Nix-style: a key is ``name:base64``.

The secret key file holds ``name:base64(32-byte seed)``; the public key is
``name:base64(32-byte public key)``. The name (by convention ``lab-1``, bumped
on rotation) travels with each signature, so a verifier picks the key by name
and a revoked key is refused by name and bytes. This is the only module that
imports cryptography.

Invariant: no message shows any part of a secret key, not even of a malformed
one (a name where the seed should be, a seed cut short): errors about secret
keys say which key (its file, when the caller knows it) and what shape is
expected. Public keys are shown, as they are not secret.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from castore.errors import CastoreError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


_SHAPE_HINT = "keys look like lab-1:3q2+7w...; make one with `castore key generate lab-1 --out FILE`"
_SECRET_HINT = ("a secret key file holds one line, NAME:BASE64 (the base64 of a 32-byte ed25519 seed), "
                "as `castore key generate lab-1 --out FILE` writes it")


def _split(text: str, what: str, *, secret: bool = False) -> tuple[str, bytes]:
    """(name, 32 key bytes) of NAME:BASE64. For a secret key no message shows any of the text, not even
    the name (a malformed file may hold the seed where the name should be): they say `what` it is."""
    name, sep, b64 = text.strip().partition(":")
    if not sep or not _NAME.fullmatch(name):
        if secret:
            raise CastoreError(f"{what} is not NAME:BASE64", _SECRET_HINT)
        raise CastoreError(f"{what} {text.strip()[:64]!r} is not NAME:BASE64", _SHAPE_HINT)
    label = what if secret else f"{what} {name}"
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        # not chained: binascii's message is about the text, and this may be a secret
        raise CastoreError(f"{label}: the part after ':' is not valid base64",
                           _SECRET_HINT if secret else _SHAPE_HINT) from None
    if len(raw) != 32:
        raise CastoreError(f"{label}: an ed25519 key has 32 bytes, this one {len(raw)}",
                           _SECRET_HINT if secret else _SHAPE_HINT)
    return name, raw


def parse_public(text: str, what: str = "public key") -> PublicKey:
    """A public key from NAME:BASE64 (spaces around it ignored); errors show the text."""
    name, raw = _split(text, what)
    return PublicKey(name, raw)


def parse_name(text: str, what: str = "key name") -> str:
    """A key name (spaces around it ignored): letters, digits, '.', '_' or '-'."""
    name = text.strip()
    if not _NAME.fullmatch(name):
        raise CastoreError(f"{what} {name[:64]!r} is neither a key name nor NAME:BASE64",
                           "for example lab-1, or a whole key lab-1:3q2+7w...")
    return name


def check_secret(text: str, what: str = "secret key") -> str:
    """The secret key text, stripped, once it is NAME:BASE64 of a 32-byte seed. Errors name `what`
    (say, the file) and never show any of the text."""
    _split(text, what, secret=True)
    return text.strip()


def generate(name: str) -> tuple[str, str]:
    """A new key pair: (secret key text, public key text)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not _NAME.fullmatch(name):
        raise CastoreError(f"key name {name!r} must be letters, digits, '.', '_' or '-'", "for example lab-1")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{name}:{base64.b64encode(seed).decode()}", str(PublicKey(name, pub))


def public_of(secret: str, what: str = "secret key") -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, seed = _split(secret, what, secret=True)
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return PublicKey(name, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def sign(secret: str, message: bytes) -> tuple[str, bytes]:
    """(key name, 64-byte signature) of message."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, seed = _split(secret, "secret key", secret=True)
    return name, Ed25519PrivateKey.from_private_bytes(seed).sign(message)


def verify(key: PublicKey, message: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(key.key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
