"""Where things live and whom to trust: the store location and castore.toml.

Configuration is read, later files winning, from ``/etc/castore/castore.toml``
and ``$XDG_CONFIG_HOME/castore/castore.toml`` (or the one file named by
``CASTORE_CONFIG``); environment variables override both::

    substituters = ["https://cache.lab.example/castore", "/mnt/shared/cache"]   # CASTORE_SUBSTITUTERS
    trusted-public-keys = ["lab-1:3q2+7w..."]                  # CASTORE_TRUSTED_PUBLIC_KEYS
    revoked-keys = ["lab-0:Zm9v..."]                           # CASTORE_REVOKED_KEYS
    secret-key-files = ["/etc/castore/lab-1.secret"]           # CASTORE_SECRET_KEY_FILES
    [tokens]                                                    # CASTORE_TOKEN (for any URL)
    "http://cache.lab.example:8080" = "token from castore token add"

Lists in the environment are separated by spaces. Substituters are tried in
the order given. Relative paths in a file (a substituter directory, a key
file) are relative to that file's directory; in the environment, to the
working directory. :meth:`Config.origin` says where each setting came from (a
file, or ``$CASTORE_...``), for errors about its values.

A token goes only where its URL says: the same scheme, host and port (80 and
443 when none is written), and a path that is the configured one or below it
on a ``/`` boundary; the longest such URL wins. ``http://cache:1809`` does not
match ``http://cache:18099``, nor ``https://cache.lab`` ``https://cache.lab.evil.net``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from castore.errors import CastoreError

KEYS = ("substituters", "trusted-public-keys", "revoked-keys", "secret-key-files")
TABLES = ("tokens",)


def default_store() -> Path:
    """``--store`` > ``CASTORE_STORE`` > /var/lib/castore (root) > $XDG_DATA_HOME/castore."""
    env = os.environ.get("CASTORE_STORE")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/castore")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "castore"


@dataclass(frozen=True)
class Config:
    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    revoked_keys: tuple[str, ...] = ()
    secret_key_files: tuple[str, ...] = ()
    tokens: tuple[tuple[str, str], ...] = ()  # (URL prefix, token)
    sources: tuple[str, ...] = field(default=(), compare=False)
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (setting, file or $VARIABLE)

    def origin(self, key: str) -> str:
        """Where setting `key` (say "revoked-keys") came from: a file's path or "$CASTORE_..."."""
        return dict(self.origins).get(key, "the configuration")

    def token_for(self, url: str, *, named: bool = True) -> str | None:
        """CASTORE_TOKEN when url was named on the command line (named), else the token configured
        for url's scheme, host and port whose path is url's or above it (on a "/" boundary); the
        longest path wins. A configured substituter never gets CASTORE_TOKEN: that token is for
        the cache the command names, not for every cache it asks."""
        if named and os.environ.get("CASTORE_TOKEN"):
            return os.environ["CASTORE_TOKEN"]
        best = [(len(_path(prefix)), token) for prefix, token in self.tokens if within(url, prefix)]
        return max(best)[1] if best else None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def within(url: str, base: str) -> bool:
    """Whether url is base's scheme, host and port, at or below base's path on a "/" boundary:
    where a token configured for base may go."""
    target, mine = _origin_and_path(url), _origin_and_path(base)
    if target is None or mine is None or mine[0] != target[0]:
        return False
    return mine[1] == "" or target[1] == mine[1] or target[1].startswith(mine[1] + "/")


def _path(url: str) -> str:
    found = _origin_and_path(url)
    return found[1] if found else ""


def _origin_and_path(url: str) -> tuple[tuple[str, str, int], str] | None:
    """((scheme, host, port), path without its trailing "/") of an http(s) URL, or None."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:  # a port out of range, a malformed IPv6 address
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return (scheme, host, port or _DEFAULT_PORTS[scheme]), parts.path.rstrip("/")


def _check_token_url(url: str, where: str) -> None:
    if _origin_and_path(url) is None or urlsplit(url.strip()).query or urlsplit(url.strip()).fragment:
        raise CastoreError(f"{where}: tokens: {url!r} is not an http(s) URL with a host",
                           'for example "http://cache.lab.example:8080" = "TOKEN", or with a path: '
                           '"https://cache.lab.example/castore" = "TOKEN"')


def config_files() -> list[Path]:
    if os.environ.get("CASTORE_CONFIG"):
        named = Path(os.environ["CASTORE_CONFIG"])
        if not named.exists():  # a typo would silently drop every substituter and trusted key
            raise CastoreError(f"CASTORE_CONFIG names {named}, which does not exist",
                               f"fix the path, or set CASTORE_CONFIG={os.devnull} to read no configuration file")
        return [named]
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path("/etc/castore/castore.toml"), Path(xdg) / "castore" / "castore.toml"]


def load_config() -> Config:
    values: dict[str, tuple[str, ...]] = {}
    origins: dict[str, str] = {}
    tokens: dict[str, str] = {}
    sources = []
    for path in config_files():
        if not path.exists():
            continue
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CastoreError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise CastoreError(f"cannot read {path}: {exc.strerror}") from exc
        sources.append(str(path))
        for key, value in data.items():
            if key == "tokens":
                if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                    raise CastoreError(f"{path}: tokens must be a table of URL = \"token\"")
                for url in value:
                    _check_token_url(url, str(path))
                tokens.update(value)
                continue
            if key not in KEYS:
                raise CastoreError(f"{path}: unknown setting {key!r}",
                                   f"known settings: {', '.join(KEYS + TABLES)}")
            values[key] = _strings(value, f"{path}: {key}")
            if key in _PATHS:
                values[key] = tuple(_beside(v, path) for v in values[key])
            origins[key] = str(path)
    for key in KEYS:
        var = "CASTORE_" + key.upper().replace("-", "_")
        env = os.environ.get(var)
        if env is not None:
            values[key] = tuple(env.split())
            origins[key] = f"${var}"
            sources.append(f"${var}")
    return Config(
        substituters=values.get("substituters", ()),
        trusted_public_keys=values.get("trusted-public-keys", ()),
        revoked_keys=values.get("revoked-keys", ()),
        secret_key_files=values.get("secret-key-files", ()),
        tokens=tuple(sorted(tokens.items())),
        sources=tuple(sources),
        origins=tuple(sorted(origins.items())),
    )


_PATHS = ("substituters", "secret-key-files")


def _beside(value: str, config: Path) -> str:
    """A path written in a config file, relative to that file's directory (``~`` expanded);
    URLs other than file:// as they are. Paths in the environment stay relative to the cwd."""
    if "://" in value and not value.startswith("file://"):
        return value
    scheme = "file://" if value.startswith("file://") else ""
    where = os.path.expanduser(value.removeprefix(scheme))
    return scheme + os.path.join(config.parent, where) if where else value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise CastoreError(f"{what} must be a string or a list of strings")
