from __future__ import annotations

import os
import re
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
    assert c.token_for("http://other", named=False) is None  # a configured substituter: not CASTORE_TOKEN
    assert c.token_for("http://cache:8080/", named=False) == "abc"


def test_a_token_goes_only_to_its_scheme_host_and_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "castore.toml"
    f.write_text('[tokens]\n"http://127.0.0.1:1809" = "local"\n"https://cache.lab" = "lab"\n'
                 '"https://cache.lab/castore/" = "deep"\n"http://Cache.Example" = "example"\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    monkeypatch.delenv("CASTORE_TOKEN", raising=False)
    c = load_config()
    for url in ("http://127.0.0.1:18099", "http://127.0.0.1:180", "http://127.0.0.1", "https://127.0.0.1:1809",
                "http://127.0.0.10:1809", "https://cache.lab.evil.net", "https://cache.lab.evil.net/castore",
                "https://cache.lab:8443", "http://cache.lab", "https://cache.labx", "https://evil.net/https://cache.lab",
                "https://cache.lab@evil.net/", "http://cache.example:8080"):
        assert c.token_for(url) is None, url
    for url, token in (("http://127.0.0.1:1809", "local"), ("http://127.0.0.1:1809/", "local"),
                       ("http://127.0.0.1:1809/sub/dir", "local"), ("https://cache.lab", "lab"),
                       ("https://cache.lab:443/", "lab"), ("HTTPS://CACHE.LAB/x", "lab"),
                       ("https://cache.lab/castore", "deep"), ("https://cache.lab/castore/", "deep"),
                       ("https://cache.lab/castore/v2", "deep"), ("https://cache.lab/castore-evil", "lab"),
                       ("https://user@cache.lab/", "lab"), ("http://cache.example:80/", "example")):
        assert c.token_for(url) == token, url


@pytest.mark.parametrize("key", ["cache.lab:8080", "ftp://cache.lab", "http://", "http://cache:99999",
                                 "http://cache/?q=1"])
def test_a_token_url_that_is_no_http_url_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          key: str) -> None:
    f = tmp_path / "castore.toml"
    f.write_text(f'[tokens]\n"{key}" = "x"\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    with pytest.raises(CastoreError, match=f"{re.escape(str(f))}: tokens: "):
        load_config()


def test_where_each_setting_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "castore.toml"
    f.write_text('trusted-public-keys = ["lab-1:AAAA"]\nrevoked-keys = []\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(f))
    monkeypatch.setenv("CASTORE_REVOKED_KEYS", "lab-0")
    monkeypatch.delenv("CASTORE_TRUSTED_PUBLIC_KEYS", raising=False)
    c = load_config()
    assert c.origin("trusted-public-keys") == str(f) and c.origin("revoked-keys") == "$CASTORE_REVOKED_KEYS"


def test_relative_paths_in_a_file_are_relative_to_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "castore.toml"
    conf.parent.mkdir()
    conf.write_text('substituters = ["caches/lab", "file://caches/b", "/srv/c", "http://127.0.0.1:9/d"]\n'
                    'secret-key-files = ["keys/lab-1.secret", "~/k.secret"]\n')
    monkeypatch.setenv("CASTORE_CONFIG", str(conf))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("SUBSTITUTERS", "SECRET_KEY_FILES"):
        monkeypatch.delenv(f"CASTORE_{var}", raising=False)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory has no say for a file's paths
    c = load_config()
    assert c.substituters == (f"{conf.parent}/caches/lab", f"file://{conf.parent}/caches/b", "/srv/c",
                              "http://127.0.0.1:9/d")
    assert c.secret_key_files == (f"{conf.parent}/keys/lab-1.secret", f"{tmp_path}/home/k.secret")
    monkeypatch.setenv("CASTORE_SUBSTITUTERS", "caches/lab")  # what a shell user typed: from the cwd
    assert load_config().substituters == ("caches/lab",)


def test_castore_config_must_name_a_file_that_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTORE_CONFIG", str(tmp_path / "castor.toml"))  # a typo
    with pytest.raises(CastoreError, match=r"castor\.toml, which does not exist"):
        load_config()
    monkeypatch.setenv("CASTORE_CONFIG", os.devnull)
    assert load_config().substituters == ()
