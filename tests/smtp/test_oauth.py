"""SASL OAUTHBEARER (RFC 7628) and XOAUTH2 on SMTP submission, the Pro Santé Connect pattern (Ref#2 ECO.1.2.1).

A real ``gateway serve`` trusts an OpenID Connect issuer whose signing keys are in a JWKS
file this test writes (RFC 7517 5); tokens are JWTs (RFC 7519) the test signs. smtplib
authenticates with them as a mail client would. A second gateway finds its keys through the
issuer's discovery document (OIDC Discovery 4) served on loopback, and follows a key rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.directory.identifiers import add_luhn_key
from gateway.security.oidc import discovery_url
from tests.harness import GatewayProcess

ISSUER = "https://psc.test/auth/realms/esante-wallet"
AUDIENCE = "mss-gateway-demo"
INVALID = (535, b"5.7.8 Authentication credentials invalid")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------- the test's issuer


@dataclass
class SigningIssuer:
    """Signs access tokens as an OIDC provider would, and publishes its public keys as a JWK Set."""

    issuer: str = ISSUER
    keys: dict[str, tuple[str, PrivateKey]] = field(default_factory=dict)

    def add_key(self, kid: str, alg: str) -> None:
        private: PrivateKey = ec.generate_private_key(ec.SECP256R1()) if alg.startswith("ES") else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = (alg, private)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(kid, alg, private) for kid, (alg, private) in self.keys.items()]}

    def claims(self, idnps: str, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": str(uuid.uuid4()), "iat": now,
                                  "exp": now + 600, "typ": "Bearer", "preferred_username": idnps,
                                  "SubjectNameID": idnps, "scope": "openid scope_all"}
        claims.update(changes)
        return {key: value for key, value in claims.items() if value is not None}

    def token(self, idnps: str, kid: str = "rsa-1", *, signer: PrivateKey | None = None, **changes: Any) -> str:
        alg, private = self.keys[kid]
        return jwt.encode(self.claims(idnps, **changes), signer or private, algorithm=alg, headers={"kid": kid})


def public_jwk(kid: str, alg: str, private: PrivateKey) -> dict[str, Any]:
    exported = RSAAlgorithm.to_jwk(private.public_key()) if isinstance(private, rsa.RSAPrivateKey) \
        else ECAlgorithm.to_jwk(private.public_key())
    jwk: dict[str, Any] = json.loads(exported)
    return jwk | {"kid": kid, "use": "sig", "alg": alg}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any], kid: str) -> str:
    """RFC 7519 6: an Unsecured JWT, alg "none" and an empty signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hmac_with_public_key(claims: dict[str, Any], kid: str, public_pem: bytes) -> str:
    """The classic algorithm confusion: HS256 'signed' with the issuer's public RSA key as the secret."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = f"{header}.{b64url(json.dumps(claims).encode())}"
    return f"{body}.{b64url(hmac.new(public_pem, body.encode(), hashlib.sha256).digest())}"


# --------------------------------------------------------------------------- SMTP helpers


def sasl_response(mechanism: str, user: str, token: str) -> str:
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01"
    # RFC 7628 3.1: gs2-header with the authzid (RFC 5801 4: "," and "=" escaped), then kvpairs.
    saslname = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={saslname},\x01auth=Bearer {token}\x01\x01"


def authenticate(client: smtplib.SMTP, mechanism: str, user: str, token: str,
                 challenges: list[bytes] | None = None) -> tuple[int, bytes]:
    """AUTH with an initial response; to an error challenge, the dummy ^A response (RFC 7628 3.2.3)."""
    def respond(challenge: bytes | None = None) -> str:
        if challenge is None:
            return sasl_response(mechanism, user, token)
        if challenges is not None:
            challenges.append(challenge)
        return "\x01"
    return client.auth(mechanism, respond)


def submission(gateway: GatewayProcess) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], local_hostname="poste.test", timeout=30)
    client.starttls(context=ssl.create_default_context(cafile=gateway.ca_file))
    client.ehlo()
    return client


def note(sender: str, recipient: str, subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipient, subject
    message.set_content("Compte rendu envoyé avec un jeton Pro Santé Connect.\n")
    return message


def refused_with(gateway: GatewayProcess, mechanism: str, user: str, token: str) -> tuple[int, bytes, list[bytes]]:
    challenges: list[bytes] = []
    with submission(gateway) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            authenticate(client, mechanism, user, token, challenges)
    error = failed.value.smtp_error
    return failed.value.smtp_code, error if isinstance(error, bytes) else error.encode(), challenges


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def issuer() -> SigningIssuer:
    signer = SigningIssuer()
    signer.add_key("rsa-1", "RS256")
    signer.add_key("ec-1", "ES256")
    signer.add_key("ps-1", "PS256")
    return signer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, issuer: SigningIssuer) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("oauth")
    jwks = root / "psc-jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    process = GatewayProcess(root / "data", extra_env={
        "GATEWAY_OIDC_ISSUER": ISSUER, "GATEWAY_OIDC_AUDIENCE": AUDIENCE, "GATEWAY_OIDC_JWKS_FILE": str(jwks),
        # Many refusals on purpose from 127.0.0.1: no sign-in delays in the way of the following tests.
        "GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "100", "GATEWAY_AUTH_SOURCE_FAILURES_BEFORE_DELAY": "10000",
    })
    process.start()
    yield process
    process.stop()


def owner(gateway: GatewayProcess, type_: str, index: int = 0) -> tuple[str, str]:
    """(address, IDNPS of its owner) of a demo mailbox."""
    account = gateway.account(type_, index)
    return account["address"], account["owner"]


# --------------------------------------------------------------------------- what is offered


def test_token_mechanisms_offered_only_after_tls(gateway: GatewayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], local_hostname="poste.test", timeout=30) as client:
        client.ehlo()
        assert not client.has_extn("auth")                           # RFC 4954 4 + our rule: AUTH only over TLS
        address, idnps = owner(gateway, "PER")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            authenticate(client, "XOAUTH2", address, "not-even-read")
        # RFC 3207 4: the submission door takes no command but EHLO, STARTTLS, NOOP, RSET, QUIT before TLS.
        assert (refused.value.smtp_code, refused.value.smtp_error) == (530, b"5.7.0 Must issue a STARTTLS command first")
    with submission(gateway) as client:
        assert {"OAUTHBEARER", "XOAUTH2"} <= set(client.esmtp_features["auth"].upper().split())


def test_no_issuer_no_token_mechanisms(shared_gateway: GatewayProcess) -> None:
    with submission(shared_gateway) as client:
        mechanisms = set(client.esmtp_features["auth"].upper().split())
        assert "PLAIN" in mechanisms and not mechanisms & {"OAUTHBEARER", "XOAUTH2"}
        address, _ = owner(shared_gateway, "PER")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            authenticate(client, "XOAUTH2", address, "any")
        assert refused.value.smtp_code == 504


# --------------------------------------------------------------------------- accepted tokens


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ps-1"])
def test_token_opens_a_session_that_sends_as_the_mailbox(gateway: GatewayProcess, issuer: SigningIssuer,
                                                         mechanism: str, kid: str) -> None:
    doctor, idnps = owner(gateway, "PER", 0)
    colleague, _ = owner(gateway, "PER", 1)
    with submission(gateway) as client:
        assert authenticate(client, mechanism, doctor, issuer.token(idnps, kid)) == (235, b"2.7.0 Authentication successful")
        assert client.send_message(note(doctor, colleague, f"{mechanism} {kid}")) == {}
        # The session is the doctor's: another professional's address is not theirs to send as.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.send_message(note(colleague, doctor, "usurpation"))
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (553, b"5.7.1")


def test_bare_rpps_in_subject_nameid(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    """The claim may hold the RPPS without the IDNPS prefix 8; the identifier is the same person."""
    nurse, idnps = owner(gateway, "PER", 2)
    token = issuer.token(idnps, preferred_username=idnps[1:])
    with submission(gateway) as client:
        assert authenticate(client, "XOAUTH2", nurse, token)[0] == 235


def test_delegated_mailbox(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    """The demo secretariat (an ORG mailbox) is delegated to Dr Claire MEDECIN with the send right."""
    doctor, idnps = owner(gateway, "PER", 0)
    secretariat, _ = owner(gateway, "ORG", 0)
    colleague, _ = owner(gateway, "PER", 1)
    with submission(gateway) as client:
        assert authenticate(client, "OAUTHBEARER", secretariat, issuer.token(idnps))[0] == 235
        assert client.send_message(note(secretariat, colleague, "pour le secrétariat")) == {}
        assert client.send_message(note(doctor, colleague, "en mon nom")) == {}


def test_authzid_may_be_left_out_when_the_professional_has_one_mailbox(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    pharmacist, idnps = owner(gateway, "PER", 1)
    doctor, _ = owner(gateway, "PER", 0)
    with submission(gateway) as client:
        assert authenticate(client, "OAUTHBEARER", "", issuer.token(idnps))[0] == 235
        assert client.send_message(note(pharmacist, doctor, "sans authzid")) == {}


def test_key_rotation_in_the_jwks_file(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    doctor, idnps = owner(gateway, "PER", 0)
    jwks = Path(gateway.env["GATEWAY_OIDC_JWKS_FILE"])
    rotated = SigningIssuer(keys=dict(issuer.keys))
    rotated.add_key("rsa-2", "RS256")
    assert refused_with(gateway, "XOAUTH2", doctor, rotated.token(idnps, "rsa-2"))[:2] == INVALID
    jwks.write_text(json.dumps(rotated.jwks()))
    try:
        with submission(gateway) as client:
            assert authenticate(client, "XOAUTH2", doctor, rotated.token(idnps, "rsa-2"))[0] == 235
    finally:
        jwks.write_text(json.dumps(issuer.jwks()))


# --------------------------------------------------------------------------- refused tokens


def _other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


BadToken = Callable[[SigningIssuer, str], str]
REFUSALS: dict[str, tuple[BadToken, str]] = {
    # name: (token for the doctor's IDNPS, what the log says)
    "expired": (lambda i, p: i.token(p, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), "Signature has expired"),
    "not yet valid": (lambda i, p: i.token(p, nbf=int(time.time()) + 3600), "ImmatureSignatureError"),
    "issued in the future": (lambda i, p: i.token(p, iat=int(time.time()) + 3600), "ImmatureSignatureError"),
    "no expiry": (lambda i, p: i.token(p, exp=None), 'missing the "exp" claim'),
    "wrong issuer": (lambda i, p: i.token(p, iss="https://evil.test/realms/x"), "InvalidIssuerError"),
    "wrong audience": (lambda i, p: i.token(p, aud="another-service"), "InvalidAudienceError"),
    "bad signature": (lambda i, p: i.token(p, signer=_other_key()), "InvalidSignatureError"),
    "unknown kid": (lambda i, p: jwt.encode(i.claims(p), _other_key(), algorithm="RS256", headers={"kid": "nobody"}),
                    "no RS256 key with kid 'nobody'"),
    "alg none": (lambda i, p: unsigned_token(i.claims(p), "rsa-1"), "algorithm 'none' not allowed"),
    "hmac with the public key": (lambda i, p: hmac_with_public_key(i.claims(p), "rsa-1", i.keys["rsa-1"][1].public_key()
                                 .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
                                 "algorithm 'HS256' not allowed"),
    "an id token": (lambda i, p: i.token(p, typ="ID"), "a ID token, not an access token"),
    "no national id": (lambda i, p: i.token(p, preferred_username=None), "claim 'preferred_username' missing"),
    "unknown professional": (lambda i, p: i.token("8" + add_luhn_key("1999999999")), "no professional 8"),
    "garbage": (lambda i, p: "not.a.token", "not a JWS compact token"),
}


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_token(gateway: GatewayProcess, issuer: SigningIssuer, mechanism: str, case: str) -> None:
    doctor, idnps = owner(gateway, "PER", 0)
    make, logged = REFUSALS[case]
    token = make(issuer, idnps)
    code, text, challenges = refused_with(gateway, mechanism, doctor, token)
    assert (code, text) == INVALID                                     # generic on the wire
    if mechanism == "OAUTHBEARER":
        # RFC 7628 3.2.2: the failure comes first as a JSON error status in a 334 challenge.
        # It comes from the verifier, so it names where to get a token (scope, openid-configuration).
        assert len(challenges) == 1 and json.loads(challenges[0]) == {
            "status": "invalid_token", "scope": "openid", "openid-configuration": discovery_url(ISSUER)}
    else:
        assert challenges == []
    log = gateway.log_text()
    assert logged in log                                               # precise in the log
    assert token not in log


def test_another_professionals_token(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    doctor, _ = owner(gateway, "PER", 0)
    _, pharmacist_idnps = owner(gateway, "PER", 1)
    for mechanism in ("XOAUTH2", "OAUTHBEARER"):
        assert refused_with(gateway, mechanism, doctor, issuer.token(pharmacist_idnps))[:2] == INVALID
    assert f"{doctor} is neither a mailbox of {pharmacist_idnps}" in gateway.log_text()


def test_mailbox_not_delegated_to_the_professional(gateway: GatewayProcess, issuer: SigningIssuer) -> None:
    """The laboratory's application mailbox belongs to an organisation and is delegated to nobody."""
    lab, _ = owner(gateway, "APP", 0)
    _, doctor_idnps = owner(gateway, "PER", 0)
    assert refused_with(gateway, "OAUTHBEARER", lab, issuer.token(doctor_idnps))[:2] == INVALID


# --------------------------------------------------------------------------- keys found by discovery


class IssuerSite:
    """The issuer's discovery document and JWK Set, served on loopback (OIDC Discovery 4, RFC 7517 5)."""

    def __init__(self, signer: SigningIssuer) -> None:
        self.signer = signer
        self.requests: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                site.requests.append(self.path)
                body = site.document(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body or {}).encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/test"
        signer.issuer = self.url
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def document(self, path: str) -> dict[str, Any] | None:
        if path == "/realms/test/.well-known/openid-configuration":
            return {"issuer": self.url, "jwks_uri": self.url + "/protocol/openid-connect/certs"}
        if path == "/realms/test/protocol/openid-connect/certs":
            return self.signer.jwks()
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_keys_from_discovery_and_rotation(tmp_path: Path) -> None:
    signer = SigningIssuer()
    signer.add_key("k1", "RS256")
    site = IssuerSite(signer)
    process = GatewayProcess(tmp_path / "data", extra_env={
        "GATEWAY_OIDC_ISSUER": site.url, "GATEWAY_OIDC_AUDIENCE": AUDIENCE})
    try:
        process.start()
        doctor, idnps = owner(process, "PER", 0)
        with submission(process) as client:
            assert authenticate(client, "OAUTHBEARER", doctor, signer.token(idnps, "k1"))[0] == 235
        assert site.requests == ["/realms/test/.well-known/openid-configuration", "/realms/test/protocol/openid-connect/certs"]
        # The issuer rotates its key: a token under the new kid has the set fetched again and passes;
        # the retired key is gone from the set, and its tokens with it.
        old_token = signer.token(idnps, "k1")
        signer.keys = {}
        signer.add_key("k2", "ES256")
        with submission(process) as client:
            assert authenticate(client, "XOAUTH2", doctor, signer.token(idnps, "k2"))[0] == 235
        assert site.requests[-1] == "/realms/test/protocol/openid-connect/certs" and len(site.requests) == 3
        assert refused_with(process, "XOAUTH2", doctor, old_token)[:2] == INVALID
    finally:
        process.stop()
        site.close()
