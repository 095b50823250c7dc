from __future__ import annotations

from pathlib import Path

import pytest

from castore.config import load_config
from castore.errors import CastoreError


def test_files_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "castore.toml"
    f.write_text('substituters = ["/srv/a", "http://127.0.0.1:9/c"]\ntrusted-public-keys = "lab-1:AAAA"\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    for var in ("SUBSTITUTERS", "TRUSTED_PUBLIC_KEYS", "REVOKED_KEYS", "SECRET_KEY_FILES"):
        monkeypatch.delenv(f"CASTORE_{var}", raising=False)
    c = load_config()
    assert c.substituters == ("/srv/a", "http://127.0.0.1:9/c") and c.trusted_public_keys == ("lab-1:AAAA",)
    monkeypatch.setenv("CASTORE_SUBSTITUTERS", "/x /y")
    assert load_config().substituters == ("/x", "/y")


def test_bad_config_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "castore.toml"
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    f.write_text("substituters = [1, 2]\n")
    with pytest.raises(CastoreError, match="list of strings"):
        load_config()
    f.write_text("substitutors = []\n")
    with pytest.raises(CastoreError, match="unknown setting 'substitutors'"):
        load_config()
    f.write_text("substituters = [\n")
    with pytest.raises(CastoreError, match="not valid TOML"):
        load_config()


def test_tokens_by_url_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "castore.toml"
    f.write_text('[tokens]\n"http://cache:8080" = "abc"\n"http://cache:8080/lab-b" = "def"\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    monkeypatch.delenv("CASTORE_TOKEN", raising=False)
    c = load_config()
    assert c.token_for("http://cache:8080/") == "abc" and c.token_for("http://cache:8080/lab-b") == "def"
    assert c.token_for("http://other") is None
    monkeypatch.setenv("CASTORE_TOKEN", "env")
    assert c.token_for("http://other") == "env"
