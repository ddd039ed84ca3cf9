"""The webmail's own secret: CSRF tokens and the sealed OpenID Connect state cookie derive from it.

Kept in ``<data_dir>/keys/webmail.key`` (32 random bytes, 0600), beside the
other key files and never in the database.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


class WebmailKey:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the webmail key must hold at least 32 bytes")
        self._secret = secret

    @classmethod
    def load_or_create(cls, path: Path) -> WebmailKey:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # first writer wins when two processes start together
            except FileExistsError:
                pass
            tmp.unlink(missing_ok=True)
        return cls(path.read_bytes())

    def derive(self, purpose: str) -> bytes:
        """A sub-key for one purpose (HMAC-SHA256 as a KDF, RFC 5869 2.2 extract step)."""
        return hmac.new(self._secret, purpose.encode(), hashlib.sha256).digest()

    def mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.derive(purpose), value.encode(), hashlib.sha256).hexdigest()


def webmail_key_path(data_path: Path) -> Path:
    return data_path / "keys" / "webmail.key"
