"""The [oidc] settings' rules and the key choice of gateway.security.oidc, without a gateway:
what a JWK Set entry may verify (RFC 7517 4, RFC 7518 3), the refetch budget for unknown kids,
and the national id read from the subject claim."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import ConfigError, load_settings
from gateway.directory.identifiers import add_luhn_key
from gateway.security.oidc import (
    UNKNOWN_KID_FETCHES_PER_MINUTE, KeyRing, TokenRefused, as_verification_key, national_id, select_key,
)

ISSUER = "https://psc.test/auth/realms/esante-wallet"


def settings(**oidc: Any) -> Any:
    return load_settings(environ={}, overrides={"oidc": oidc}).oidc


def rsa_jwk(kid: str, bits: int = 2048, **extra: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))
    return jwk | {"kid": kid} | extra


def ec_jwk(kid: str, curve: ec.EllipticCurve, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(curve).public_key()))
    return jwk | {"kid": kid} | extra


# --------------------------------------------------------------------------- settings


def test_disabled_by_default() -> None:
    assert not settings().enabled


@pytest.mark.parametrize("oidc, problem", [
    ({"issuer": ISSUER}, "audience is required"),
    ({"issuer": "http://psc.example.org/realm", "audience": "gw"}, "https://"),
    ({"issuer": ISSUER, "audience": "gw", "jwks_url": "http://keys.example.org/certs"}, "https://"),
    ({"issuer": ISSUER, "audience": "gw", "jwks_file": "/k.json", "jwks_url": "https://psc.test/certs"}, "not both"),
    ({"issuer": ISSUER, "audience": "gw", "allowed_algorithms": ["HS256"]}, "choose among"),
    ({"issuer": ISSUER, "audience": "gw", "allowed_algorithms": ["none"]}, "choose among"),
    ({"issuer": ISSUER, "audience": "gw", "allowed_algorithms": []}, "choose among"),
])
def test_settings_refused(oidc: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings(**oidc)
    assert problem in str(refused.value) and "oidc" in str(refused.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/realms/t", "http://localhost/realms/t", "http://[::1]:9/r",
                                 "https://auth.esante.gouv.fr/auth/realms/esante-wallet"])
def test_settings_accepted(url: str) -> None:
    assert settings(issuer=url, audience="gw", jwks_url=url + "/certs").enabled


def test_environment_names() -> None:
    oidc = load_settings(environ={"GATEWAY_OIDC_ISSUER": ISSUER, "GATEWAY_OIDC_AUDIENCE": "gw",
                                  "GATEWAY_OIDC_ALLOWED_ALGORITHMS": '["ES256"]', "GATEWAY_OIDC_SUBJECT_CLAIM": "SubjectNameID"}).oidc
    assert (oidc.issuer, oidc.allowed_algorithms, oidc.subject_claim) == (ISSUER, ["ES256"], "SubjectNameID")


# --------------------------------------------------------------------------- which key verifies


def test_key_choice_follows_kid_alg_use_and_curve() -> None:
    rsa_key, p256, p384 = rsa_jwk("r"), ec_jwk("e", ec.SECP256R1()), ec_jwk("e384", ec.SECP384R1())
    encryption = rsa_jwk("enc", use="enc")
    keys = [rsa_key, p256, p384, encryption]
    assert select_key(keys, "r", "RS256") is rsa_key
    assert select_key(keys, "r", "PS256") is rsa_key                  # RSA verifies RS* and PS*
    assert select_key(keys, "r", "ES256") is None                     # RFC 7518 3.4: ES256 needs an EC key
    assert select_key(keys, "e", "ES256") is p256
    assert select_key(keys, "e384", "ES256") is None                  # P-384 is ES384's curve
    assert select_key(keys, "enc", "RS256") is None                   # RFC 7517 4.2: not a signature key
    assert select_key(keys, None, "ES256") is p256                    # no kid: the only candidate
    assert select_key(keys + [rsa_jwk("r2")], None, "RS256") is None  # no kid and two candidates: refuse
    assert select_key([rsa_jwk("r", alg="RS512")], "r", "RS256") is None  # RFC 7517 4.4: alg pinned
    assert select_key([rsa_jwk("r", key_ops=["encrypt"])], "r", "RS256") is None  # RFC 7517 4.3


def test_short_rsa_keys_and_private_keys_refused() -> None:
    with pytest.raises(TokenRefused, match="RSA 1024 bits"):
        as_verification_key(rsa_jwk("short", bits=1024), "RS256")
    private = json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048))) | {"kid": "p"}
    with pytest.raises(TokenRefused, match="not a public key"):
        as_verification_key(private, "RS256")


class CountingSource:
    """A cached key set: what the issuer publishes is seen only when a refresh is asked for."""

    description = "test keys"

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.published = self.cached = keys
        self.refreshes = 0

    async def keys(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        if refresh:
            self.refreshes += 1
            self.cached = self.published
        return self.cached


async def test_unknown_kids_fetch_again_within_a_budget() -> None:
    now = [1000.0]
    source = CountingSource([rsa_jwk("old")])
    ring = KeyRing(source, clock=lambda: now[0])
    source.published = [rsa_jwk("new")]                               # the issuer rotated
    assert (await ring.key_for("new", "RS256")).key_id == "new"
    assert source.refreshes == 1
    with pytest.raises(TokenRefused):
        await ring.key_for("ghost", "RS256")
    with pytest.raises(TokenRefused):
        await ring.key_for("ghost", "RS256")                          # a kid just missed is not fetched for again
    assert source.refreshes == 2
    for n in range(3, UNKNOWN_KID_FETCHES_PER_MINUTE + 5):
        with pytest.raises(TokenRefused):
            await ring.key_for(f"random-{n}", "RS256")
    assert source.refreshes == UNKNOWN_KID_FETCHES_PER_MINUTE         # random kids cannot hammer the issuer
    now[0] += 61
    with pytest.raises(TokenRefused):
        await ring.key_for("ghost", "RS256")
    assert source.refreshes == UNKNOWN_KID_FETCHES_PER_MINUTE + 1


# --------------------------------------------------------------------------- the national id


def test_national_id_from_the_subject_claim() -> None:
    rpps = add_luhn_key("1000000001")
    assert national_id({"preferred_username": "8" + rpps}, "preferred_username") == "8" + rpps
    assert national_id({"SubjectNameID": rpps}, "SubjectNameID") == "8" + rpps
    with pytest.raises(TokenRefused, match="Luhn"):
        national_id({"sub": rpps[:-1] + str((int(rpps[-1]) + 1) % 10)}, "sub")
    with pytest.raises(TokenRefused, match="missing"):
        national_id({"sub": 810000000001}, "sub")
