"""Password hashing (argon2id, RFC 9106) and the password policy.

Passwords are normalised to Unicode NFC before hashing (RFC 8265 4.2.2, the
OpaqueString profile), so ``é`` typed as one code point on a phone and as
``e`` + combining accent on a desktop is the same password.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.errors import UserError

if TYPE_CHECKING:
    from gateway.config import AuthSettings

# Longer input buys no security and lets a client make every login hash megabytes.
MAX_PASSWORD_LENGTH = 1024
# Words that make up most leaked passwords once digits and symbols are stripped (FR and EN).
COMMON_WORDS = frozenset({
    "password", "motdepasse", "azerty", "qwerty", "azertyuiop", "qwertyuiop", "admin", "administrateur",
    "bonjour", "soleil", "doudou", "loulou", "marseille", "letmein", "welcome", "sante", "medecin", "docteur",
})


def _normalise(password: str) -> str:
    return unicodedata.normalize("NFC", password)


class PasswordHasher:
    """argon2id hashes with the configured cost; old-cost hashes still verify and are flagged for rehash."""

    def __init__(self, time_cost: int = 2, memory_kib: int = 19456, parallelism: int = 1) -> None:
        self._hasher = argon2.PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism,
                                             type=argon2.Type.ID)
        self._dummy_hash: str | None = None

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> PasswordHasher:
        return cls(auth.argon2_time_cost, auth.argon2_memory_kib, auth.argon2_parallelism)

    def hash(self, password: str) -> str:
        return self._hasher.hash(_normalise(password))

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; False on mismatch or a malformed hash, never an exception.

        With ``password_hash=None`` (no such account) it still spends one hash's worth of time, so
        response times do not tell which logins exist.
        """
        if password_hash is None:
            self._burn(password)
            return False
        try:
            return self._hasher.verify(password_hash, _normalise(password))
        except (VerificationError, InvalidHashError):
            return False

    def _burn(self, password: str) -> None:
        try:
            self._hasher.verify(self._dummy(), _normalise(password))
        except (VerificationError, InvalidHashError):
            pass

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash("no account has this password")
        return self._dummy_hash

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters than the configured ones (or is unreadable)."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    @staticmethod
    def check_policy(password: str, min_length: int) -> None:
        """Refuse passwords too short, too long or made of one obvious pattern; UserError(field="password")."""
        reason = policy_violation(_normalise(password), min_length)
        if reason is not None:
            raise UserError(reason, field="password")


def policy_violation(password: str, min_length: int) -> str | None:
    """Why ``password`` is refused, or None. Length counts characters, not bytes."""
    if len(password) < min_length:
        return f"too short: {len(password)} characters, at least {min_length} required"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"too long: at most {MAX_PASSWORD_LENGTH} characters"
    if password.strip() != password:
        return "starts or ends with a space (easy to lose when copied)"
    unit = _repeated_unit(password)
    if unit is not None:
        return f"only the pattern {unit!r} repeated" if len(unit) > 1 else "a single character repeated"
    if _is_sequence(password):
        return "a plain sequence of consecutive characters (like 123456789012 or abcdefghijkl)"
    core = "".join(c for c in password.lower() if c.isalpha())
    if core in COMMON_WORDS:
        return f"built on the very common word {core!r}: choose a passphrase of several unrelated words"
    return None


def _repeated_unit(password: str) -> str | None:
    """The shortest unit of at most 4 characters that ``password`` repeats, if any."""
    for size in range(1, 5):
        unit = password[:size]
        if len(password) > size and len(password) % size == 0 and unit * (len(password) // size) == password:
            return unit
    return None


def _is_sequence(password: str) -> bool:
    """Every character follows the previous by +1 (or every one by -1); digits wrap (…8 9 0 1…)."""
    steps = {_step(a, b) for a, b in zip(password, password[1:])}
    return steps in ({1}, {-1})


def _step(a: str, b: str) -> int:
    if a.isascii() and a.isdigit() and b.isascii() and b.isdigit():
        return {1: 1, 9: -1}.get((int(b) - int(a)) % 10, 0)
    return ord(b) - ord(a)
