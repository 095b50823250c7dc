from __future__ import annotations

import pytest

from castore.errors import CastoreError
from castore.signing import generate, parse_public, public_of, sign, verify


def test_sign_and_verify() -> None:
    secret, public = generate("lab-1")
    assert public.startswith("lab-1:") and str(public_of(secret)) == public
    name, sig = sign(secret, b"message")
    key = parse_public(public)
    assert name == "lab-1" and len(sig) == 64
    assert verify(key, b"message", sig)
    assert not verify(key, b"messagE", sig)
    _, other = generate("lab-1")
    assert not verify(parse_public(other), b"message", sig)


@pytest.mark.parametrize("text", ["nocolon", "bad name:AAAA", "lab-1:not-base64!", "lab-1:AAAA"])
def test_malformed_keys_are_clear_errors(text: str) -> None:
    with pytest.raises(CastoreError):
        parse_public(text)
