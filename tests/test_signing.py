from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from castore.cache.layout import RealisationRecord
from castore.cache.trust import Trust, read_secret_key, secret_keys, signed
from castore.config import load_config
from castore.errors import CastoreError
from castore.signing import check_secret, generate, parse_public, public_of, sign, verify
from tests.conftest import castore


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


# --- secret keys: no message ever shows any of them ---------------------------------------------

def _leaks(secret_b64: str, text: str) -> bool:
    """Whether text holds any 6 consecutive characters of the secret's base64."""
    return any(secret_b64[i:i + 6] in text for i in range(len(secret_b64) - 5))


def _malformed(secret: str) -> list[str]:
    name, b64 = secret.split(":")
    return [b64, f"lab 1:{b64}", f"{name}:{b64[:-2]}!!", f"{name}:{b64[:-4]}", f"{b64}:{name}", f"{name}:{b64}x"]


def test_a_malformed_secret_key_is_never_echoed() -> None:
    secret, _ = generate("lab-1")
    b64 = secret.split(":")[1]
    for text in _malformed(secret):
        for call in (lambda t: public_of(t), lambda t: sign(t, b"m"), lambda t: check_secret(t, "secret key file k")):
            with pytest.raises(CastoreError) as err:
                call(text)
            assert not _leaks(b64, f"{err.value.message} {err.value.hint}"), err.value.message


def _key_file(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


def test_secret_key_files_are_checked_and_named_not_echoed(tmp_path: Path) -> None:
    secret, public = generate("lab-1")
    b64 = secret.split(":")[1]
    good = _key_file(tmp_path / "good.sec", secret + "\n")
    assert read_secret_key(good) == secret and str(public_of(read_secret_key(good))) == public
    for i, text in enumerate(_malformed(secret)):
        bad = _key_file(tmp_path / f"bad{i}.sec", text + "\n")
        with pytest.raises(CastoreError, match=re.escape(str(bad))) as err:
            read_secret_key(bad)
        assert not _leaks(b64, f"{err.value.message} {err.value.hint}")
        assert "NAME:BASE64" in f"{err.value.message} {err.value.hint}"
    binary = _key_file(tmp_path / "binary.sec", b"x\xff" + b64.encode())
    with pytest.raises(CastoreError, match=f"{re.escape(str(binary))} is not text") as err:
        read_secret_key(binary)
    assert err.value.__cause__ is None and not _leaks(b64, err.value.message)
    with pytest.raises(CastoreError, match="cannot read secret key file"):
        read_secret_key(tmp_path / "absent.sec")


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o604, 0o620])
def test_a_secret_key_file_others_can_open_is_refused(tmp_path: Path, mode: int) -> None:
    secret, _ = generate("lab-1")
    f = _key_file(tmp_path / "lab-1.sec", secret, mode)
    with pytest.raises(CastoreError, match=f"{re.escape(str(f))} has mode {mode:04o}") as err:
        read_secret_key(f)
    assert err.value.hint == f"chmod 600 {f}"


def test_the_configured_secret_keys_are_all_checked_before_use(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    one, _ = generate("lab-1")
    two, _ = generate("lab-2")
    a = _key_file(tmp_path / "a.sec", one)
    b = _key_file(tmp_path / "b.sec", two.split(":")[1])  # no name
    monkeypatch.setenv("CASTORE_CONFIG", os.devnull)
    monkeypatch.setenv("CASTORE_SECRET_KEY_FILES", str(a))
    assert secret_keys(load_config()) == [one]
    monkeypatch.setenv("CASTORE_SECRET_KEY_FILES", f"{a} {b}")
    with pytest.raises(CastoreError, match=re.escape(str(b))):
        secret_keys(load_config())


def test_key_public_names_the_file_and_hides_the_key(tmp_path: Path) -> None:
    sec = tmp_path / "lab1.sec"
    public = castore("key", "generate", "lab-1", "--out", str(sec)).stdout.strip()
    assert castore("key", "public", str(sec)).stdout.strip() == public
    b64 = sec.read_text().strip().split(":")[1]
    for i, text in enumerate((b64, f"lab 1:{b64}")):
        bad = _key_file(tmp_path / f"bad{i}.sec", text + "\n")
        proc = castore("key", "public", str(bad), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "error: secret key" in proc.stderr and not _leaks(b64, proc.stderr + proc.stdout)


# --- trusted and revoked keys ------------------------------------------------------------------

def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, **env: str) -> Path:
    f = tmp_path / "castore.toml"
    f.write_text(toml)
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    for var in ("SUBSTITUTERS", "TRUSTED_PUBLIC_KEYS", "REVOKED_KEYS", "SECRET_KEY_FILES"):
        monkeypatch.delenv(f"CASTORE_{var}", raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return f


def _signed_record(secret: str) -> RealisationRecord:
    rec = RealisationRecord("a" * 64, "b" * 64, b"plan")
    return signed(rec, [secret])


def test_revoked_keys_are_normalised_and_revoke_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret, public = generate("lab-1")
    rec = _signed_record(secret)
    b64 = public.split(":")[1]
    _config(tmp_path, monkeypatch, f'trusted-public-keys = ["{public}"]\n')
    assert [name for name, _ in Trust.from_config(load_config()).vouching(rec)] == ["lab-1"]
    for entry in (public, f" {public}", f"{public}\n", f"\t{public} ", f"LAB-1:{b64}", f"lab-0:{b64}",
                  "lab-1", " lab-1", "LAB-1", "lab-1\n"):
        _config(tmp_path, monkeypatch, f"trusted-public-keys = [{public!r}]\nrevoked-keys = [{json.dumps(entry)}]\n")
        trust = Trust.from_config(load_config())
        assert trust.is_revoked(parse_public(public)), repr(entry)
        assert trust.vouching(rec) == () and "revoked" in trust.refusal(rec), repr(entry)
    _, other = generate("lab-1")  # another key of the same name, revoked by its bytes: lab-1 stays trusted
    _config(tmp_path, monkeypatch, f'trusted-public-keys = ["{public}"]\nrevoked-keys = ["{other}"]\n')
    assert [name for name, _ in Trust.from_config(load_config()).vouching(rec)] == ["lab-1"]
    _config(tmp_path, monkeypatch, f'trusted-public-keys = ["{other}"]\n')  # the name, not the key
    trust = Trust.from_config(load_config())
    assert trust.vouching(rec) == () and trust.refusal(rec) == "is signed by lab-1 (does not verify)"
    assert Trust().refusal(RealisationRecord("a" * 64, "b" * 64, b"plan")) == "is unsigned"
    # each key its own reason; names from a cache are printed escaped, five at most
    hostile = RealisationRecord("a" * 64, "b" * 64, b"plan", (
        *rec.signatures, ("\x1b[2Jlab-x\nrootfs: substituted", b"s" * 64), *((f"k{i}", b"s" * 64) for i in range(9))))
    said = trust.refusal(hostile)
    assert said.startswith("is signed by '\\x1b[2Jlab-x\\nrootfs: substituted' (not trusted), k0 (not trusted)")
    assert "\x1b" not in said and "\n" not in said and said.endswith("and 6 more")


@pytest.mark.parametrize("entry", ["lab-1:AAAA", "lab 1", "lab-1:not base64!", "", ":"])
def test_a_malformed_revoked_key_names_where_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          entry: str) -> None:
    _, public = generate("lab-1")
    f = _config(tmp_path, monkeypatch, f'trusted-public-keys = ["{public}"]\nrevoked-keys = [{json.dumps(entry)}]\n')
    with pytest.raises(CastoreError, match=f"^{re.escape(str(f))}: revoked-keys: "):
        Trust.from_config(load_config())
    if entry.strip() and " " not in entry:  # the environment splits on spaces
        _config(tmp_path, monkeypatch, "", CASTORE_TRUSTED_PUBLIC_KEYS=public, CASTORE_REVOKED_KEYS=entry)
        with pytest.raises(CastoreError, match=r"^\$CASTORE_REVOKED_KEYS: revoked-keys: "):
            Trust.from_config(load_config())


def test_a_malformed_trusted_key_names_where_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _config(tmp_path, monkeypatch, 'trusted-public-keys = ["lab-1:AAAA"]\n')
    with pytest.raises(CastoreError, match=f"^{re.escape(str(f))}: trusted-public-keys: public key lab-1: ") as err:
        Trust.from_config(load_config())
    assert "32 bytes" in err.value.message
    _config(tmp_path, monkeypatch, "", CASTORE_TRUSTED_PUBLIC_KEYS="nocolon")
    with pytest.raises(CastoreError, match=r"^\$CASTORE_TRUSTED_PUBLIC_KEYS: trusted-public-keys: .*'nocolon'"):
        Trust.from_config(load_config())


def test_realize_stops_on_a_malformed_trusted_key_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    env = {"CASTORE_CONFIG": os.devnull, "CASTORE_SUBSTITUTERS": str(tmp_path / "cache"),
           "CASTORE_TRUSTED_PUBLIC_KEYS": "lab-1:AAAA", "CASTORE_REVOKED_KEYS": ""}
    proc = castore("realize", "tests/recipes/small.py:layer", store=tmp_path / "s", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: $CASTORE_TRUSTED_PUBLIC_KEYS: trusted-public-keys: public key lab-1: " in proc.stderr
