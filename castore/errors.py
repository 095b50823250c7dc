"""The one error tree of castore.

Every error a user can meet derives from :class:`CastoreError` and carries a
message they can act on plus an optional hint. Foreign exceptions (OSError,
sqlite3, subprocess, httpx) are translated at the module boundary with
``raise ... from exc``; the CLI prints ``error: message`` and the hint and
exits non-zero, with a traceback only under ``--debug``.
"""

from __future__ import annotations

import errno

# OSErrors that are the disk's (the store's, a build's scratch), whoever met them: never blamed on an
# input such as an archive or a recipe
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)

class CastoreError(Exception):
    """Base of every error castore raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class RecipeError(CastoreError):
    """A recipe file could not be loaded or evaluated; the message names file:line."""


class ToolMissing(CastoreError):
    """An external program is not installed."""


class ToolError(CastoreError):
    """An external program exited non-zero."""

    def __init__(
        self, message: str, hint: str | None = None, *, returncode: int = 1, stderr: str = ""
    ) -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr = stderr


class HashMismatch(CastoreError):
    """Bytes did not hash to what was declared; nothing was added."""

    def __init__(self, what: str, expected: str, actual: str, algorithm: str = "blake3") -> None:
        super().__init__(
            f"hash mismatch for {what}:\n  expected {algorithm}:{expected}\n  actual   {algorithm}:{actual}",
            hint="nothing was added to the store; fix the declared hash or the source",
        )
        self.expected = expected
        self.actual = actual
        self.algorithm = algorithm


class UnsafeArchive(CastoreError):
    """An archive entry would escape the tree root or is otherwise hostile."""


class BuildError(CastoreError):
    """A builder failed; the message points at the build log."""


class StoreError(CastoreError):
    """The local store is missing, locked, corrupt or full."""


class NotFound(CastoreError):
    """No object or recipe matches what was asked for."""


class AmbiguousId(CastoreError):
    """An id prefix matches more than one object."""


class EncodingError(CastoreError):
    """A value cannot be encoded canonically, or a record does not decode."""
