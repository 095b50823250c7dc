"""ed25519 keys and signatures, Nix-style: a key is ``name:base64``.

The secret key file holds ``name:base64(32-byte seed)``; the public key is
``name:base64(32-byte public key)``. The name (by convention ``lab-1``, bumped
on rotation) travels with each signature, so a verifier picks the key by name
and a revoked key is refused by name and bytes. This is the only module that
imports cryptography.
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


def _split(text: str, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    if not sep or not _NAME.fullmatch(name):
        raise CastoreError(f"{what} {text.strip()[:40]!r} is not NAME:BASE64",
                           "keys look like lab-1:3q2+7w...; make one with `castore key generate lab-1`")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CastoreError(f"{what} {name}: the key is not valid base64") from exc
    if len(raw) != 32:
        raise CastoreError(f"{what} {name}: an ed25519 key has 32 bytes, this one {len(raw)}")
    return name, raw


def parse_public(text: str) -> PublicKey:
    name, raw = _split(text, "public key")
    return PublicKey(name, raw)


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


def public_of(secret: str) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, seed = _split(secret, "secret key")
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return PublicKey(name, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def sign(secret: str, message: bytes) -> tuple[str, bytes]:
    """(key name, 64-byte signature) of message."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, seed = _split(secret, "secret key")
    return name, Ed25519PrivateKey.from_private_bytes(seed).sign(message)


def verify(key: PublicKey, message: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(key.key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
