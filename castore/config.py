"""Where things live: the store location and the environment that overrides it."""

from __future__ import annotations

import os
from pathlib import Path


def default_store() -> Path:
    """``--store`` > ``CASTORE_STORE`` > /var/lib/castore (root) > $XDG_DATA_HOME/castore."""
    env = os.environ.get("CASTORE_STORE")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/castore")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "castore"
