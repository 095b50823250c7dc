"""Which realisations to believe: signed by a trusted key that is not revoked.

Content fetched by id needs no trust (it is verified against its id); a
realisation "plan P produced O" is used only with a valid signature over
(P, O) by a key in ``trusted-public-keys`` that is not in ``revoked-keys``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from castore.cache.layout import RealisationRecord
from castore.config import Config
from castore.errors import CastoreError
from castore.signing import PublicKey, parse_public, sign, verify


@dataclass(frozen=True)
class Trust:
    keys: tuple[PublicKey, ...] = ()
    revoked: tuple[str, ...] = ()  # key names, or whole NAME:BASE64 keys

    @classmethod
    def from_config(cls, config: Config) -> Trust:
        return cls(tuple(parse_public(k) for k in config.trusted_public_keys), config.revoked_keys)

    def is_revoked(self, key: PublicKey) -> bool:
        return key.name in self.revoked or str(key) in self.revoked

    def signer(self, rec: RealisationRecord) -> str | None:
        """The name of a trusted, unrevoked key with a valid signature on rec, or None."""
        message = rec.message()
        for name, sig in rec.signatures:
            for key in self.keys:
                if key.name == name and not self.is_revoked(key) and verify(key, message, sig):
                    return name
        return None


def secret_keys(config: Config) -> list[str]:
    keys = []
    for path in config.secret_key_files:
        try:
            keys.append(Path(path).read_text().strip())
        except OSError as exc:
            raise CastoreError(f"cannot read secret key file {path}: {exc.strerror}") from exc
    return keys


def signed(rec: RealisationRecord, secrets: list[str]) -> RealisationRecord:
    sigs = dict(rec.signatures)
    for secret in secrets:
        name, sig = sign(secret, rec.message())
        sigs[name] = sig
    return RealisationRecord(rec.plan, rec.object, rec.record, tuple(sorted(sigs.items())))
