"""argon2id hashing and the password policy."""

from __future__ import annotations

import unicodedata

import pytest

from gateway.config import load_settings
from gateway.errors import UserError
from gateway.security.passwords import PasswordHasher

# The smallest memory argon2 settings accept, to keep the suite quick.
FAST = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}


@pytest.fixture
def hasher() -> PasswordHasher:
    return PasswordHasher(**FAST)


def test_round_trip(hasher: PasswordHasher) -> None:
    hashed = hasher.hash("correct horse battery staple")
    assert hashed.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert hasher.verify(hashed, "correct horse battery staple")
    assert not hasher.verify(hashed, "correct horse battery stapler")
    assert hasher.hash("correct horse battery staple") != hashed  # salted


def test_verify_never_raises(hasher: PasswordHasher) -> None:
    assert hasher.verify(None, "anything") is False
    assert hasher.verify("not a hash", "anything") is False
    assert hasher.verify("$argon2id$v=19$m=8192,t=1,p=1$broken", "anything") is False


def test_unicode_forms_are_the_same_password(hasher: PasswordHasher) -> None:
    composed = unicodedata.normalize("NFC", "mot de passe très sûr")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert hasher.verify(hasher.hash(composed), decomposed)


def test_needs_rehash_when_parameters_change(hasher: PasswordHasher) -> None:
    hashed = hasher.hash("correct horse battery staple")
    assert not hasher.needs_rehash(hashed)
    stronger = PasswordHasher(time_cost=2, memory_kib=8192, parallelism=1)
    assert stronger.needs_rehash(hashed)
    assert stronger.verify(hashed, "correct horse battery staple")  # old hashes still log in
    assert hasher.needs_rehash("garbage")


def test_built_from_settings(tmp_path: pytest.TempPathFactory) -> None:
    settings = load_settings(data_dir=str(tmp_path), environ={"GATEWAY_AUTH_ARGON2_TIME_COST": "3",
                                                             "GATEWAY_AUTH_ARGON2_MEMORY_KIB": "9000"})
    hashed = PasswordHasher.from_settings(settings.auth).hash("correct horse battery staple")
    assert "$m=9000,t=3,p=1$" in hashed


@pytest.mark.parametrize(("password", "reason"), [
    ("short", "too short: 5 characters, at least 12"),
    ("aaaaaaaaaaaaaaaa", "a single character repeated"),
    ("abcabcabcabcabc", "only the pattern 'abc' repeated"),
    ("123456789012", "consecutive characters"),
    ("zyxwvutsrqponm", "consecutive characters"),
    ("Motdepasse2024!", "very common word 'motdepasse'"),
    (" leading space secret", "starts or ends with a space"),
    ("x" * 1025 + "y", "too long"),
])
def test_policy_refusals_name_the_field_and_the_reason(password: str, reason: str) -> None:
    with pytest.raises(UserError, match=reason) as caught:
        PasswordHasher.check_policy(password, 12)
    assert caught.value.field == "password"
    assert str(caught.value).startswith("password: ")


@pytest.mark.parametrize("password", ["correct horse battery staple", "Cardio-Lyon-2024-ward7", "éléphant rose 42 lune"])
def test_policy_accepts_reasonable_passwords(password: str) -> None:
    PasswordHasher.check_policy(password, 12)


def test_length_counts_characters_not_bytes() -> None:
    PasswordHasher.check_policy("ééééééééééé1", 12)  # 12 characters, 23 bytes in UTF-8
    with pytest.raises(UserError, match="too short"):
        PasswordHasher.check_policy("éééééééééé1", 12)
