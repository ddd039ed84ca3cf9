"""OpenID Connect bearer tokens for SASL OAUTHBEARER and XOAUTH2: the Pro Santé Connect pattern.

MSSanté Ref#2 ECO.1.2.1: a mail client authenticates to SMTP/IMAP, over TLS,
with an access token from Pro Santé Connect (ANS's OpenID Connect federation)
presented as SASL XOAUTH2, or as OAUTHBEARER (RFC 7628). This module decides
whether such a token opens a session, and as which mailbox:

1. The JWS header (RFC 7515 4.1): ``alg`` must be one of the configured
   asymmetric algorithms, never ``none`` nor an HMAC (RFC 8725 2.1, 3.1);
   ``kid`` names the signing key; a ``crit`` header we cannot honour is refused
   (RFC 7515 4.1.11).
2. The key: from the issuer's JWK Set (RFC 7517 5): a file, a URL, or the
   ``jwks_uri`` of the issuer's discovery document (OpenID Connect Discovery
   4, RFC 8414 3). Keys are cached; a ``kid`` we do not know has the set
   fetched again (key rotation), a few times a minute at most.
3. The signature and the claims (RFC 7519 4.1, RFC 9068 4): ``iss`` equals the
   issuer, ``aud`` contains our audience, ``exp`` is required and in the future
   (ECO.1.2.5: a token is never permanent), ``nbf`` and ``iat`` are not in the
   future; each within the configured clock-skew leeway.
4. The practitioner: the subject claim (PSC: ``preferred_username`` or
   ``SubjectNameID``) holds their IDNPS (8 + RPPS, 0 + ADELI) or bare RPPS.
5. The mailbox: the SASL authorization identity (OAUTHBEARER ``a=``, XOAUTH2
   ``user=``) names it. It must be the practitioner's own, or delegated to one
   of theirs; in that case the session is the practitioner's own mailbox, whose
   delegated rights cover the one named. Without a name: their only mailbox.

A refusal's precise reason goes to the log (never the token); the wire only
says 535 5.7.8, with the RFC 7628 3.2.2 error status first for OAUTHBEARER
(``OidcTokenVerifier.error_status``). A token that fails any check yields no
session (ECO.1.2.6).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import OidcSettings, check_oidc_url
from gateway.directory import identifiers as ids
from gateway.directory.service import Account, DirectoryService
from gateway.errors import UserError

log = logging.getLogger("gateway.oidc")

JwkDict = dict[str, Any]
Clock = Callable[[], float]

# RFC 7518 3.1 families: which key type (and curve, RFC 7518 3.4) each algorithm verifies with.
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
MIN_RSA_BITS = 2048                       # RFC 7518 3.3: 2048 bits or larger
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud")  # RFC 9068 2.2: required in a JWT access token
# Keycloak (the software behind PSC) marks its ID and refresh tokens with a "typ" claim: never a bearer.
NOT_ACCESS_TOKENS = frozenset({"ID", "Refresh", "Logout"})
FETCH_TIMEOUT_SECONDS = 10.0
MAX_DOCUMENT_BYTES = 1 << 20
UNKNOWN_KID_RETRY_SECONDS = 30.0          # a kid still unknown after a fetch is not fetched for again this soon
UNKNOWN_KID_FETCHES_PER_MINUTE = 6        # so random kids cannot make us hammer the issuer
DISCOVERY_PATH = "/.well-known/openid-configuration"


class TokenRefused(Exception):
    """A token that opens no session; ``reason`` is for the log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedToken:
    """What a valid token says: the practitioner and until when."""

    idnps: str
    subject: str
    expires_at: int
    claims: Mapping[str, Any] = field(repr=False)


# --------------------------------------------------------------------------- fetching


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 4.1: the configuration document is under the issuer's own path."""
    return issuer.rstrip("/") + DISCOVERY_PATH


async def fetch_json(url: str) -> Any:
    """GET a small JSON document; redirects are not followed (they could leave https)."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, \
                http.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as response:
            if response.status != 200:
                raise TokenRefused(f"{url}: HTTP {response.status}")
            body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        raise TokenRefused(f"{url}: {error!r}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise TokenRefused(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    return _json(body, url)


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenRefused(f"{where}: not JSON ({error})") from None


def parse_jwks(document: Any, where: str) -> list[JwkDict]:
    """RFC 7517 5: an object whose ``keys`` member is an array of JWK objects."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise TokenRefused(f"{where}: not a JWK Set (RFC 7517 5)")
    return [key for key in keys if isinstance(key, dict)]


# --------------------------------------------------------------------------- key sources


class KeySource(Protocol):
    """Where the issuer's signing keys come from."""

    description: str

    async def keys(self, *, refresh: bool = False) -> list[JwkDict]: ...


class JwksFile:
    """A JWK Set file, re-read whenever its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"JWKS file {path}"
        self._stamp: tuple[int, int] | None = None
        self._keys: list[JwkDict] = []

    async def keys(self, *, refresh: bool = False) -> list[JwkDict]:
        # Every call looks at the file (one stat): an operator's key rotation is seen at once.
        try:
            stat = await asyncio.to_thread(self.path.stat)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = await asyncio.to_thread(self.path.read_bytes)
                self._keys, self._stamp = parse_jwks(_json(data, str(self.path)), str(self.path)), stamp
        except OSError as error:
            raise TokenRefused(f"{self.description}: {error}") from None
        return self._keys


class Discovery:
    """The issuer's ``jwks_uri``, read once from its discovery document (OIDC Discovery 4, RFC 8414 3)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.url = discovery_url(issuer)
        self._jwks_uri: str | None = None

    async def jwks_uri(self) -> str:
        if self._jwks_uri is None:
            document = await fetch_json(self.url)
            if not isinstance(document, dict) or document.get("issuer") != self.issuer:
                # OIDC Discovery 4.3 / RFC 8414 3.3: the document must name the issuer it was fetched for.
                raise TokenRefused(f"{self.url}: issuer is not {self.issuer!r}")
            uri = document.get("jwks_uri")
            if not isinstance(uri, str) or not _allowed_url(uri):
                raise TokenRefused(f"{self.url}: jwks_uri {uri!r} missing or not https")
            self._jwks_uri = uri
        return self._jwks_uri


def _allowed_url(url: str) -> bool:
    try:
        return bool(check_oidc_url(url))    # the same https-or-loopback rule as the configuration
    except ValueError:
        return False


class JwksUrl:
    """A JWK Set fetched over HTTPS, kept ``cache_seconds``, fetched again on request."""

    def __init__(self, locate: Callable[[], Awaitable[str]], description: str, cache_seconds: float,
                 clock: Clock = time.monotonic) -> None:
        self.description = description
        self._locate = locate
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._keys: list[JwkDict] | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def keys(self, *, refresh: bool = False) -> list[JwkDict]:
        async with self._lock:          # one fetch at a time, however many sessions wait for it
            if refresh or self._keys is None or self._clock() - self._fetched_at >= self._cache_seconds:
                url = await self._locate()
                self._keys = parse_jwks(await fetch_json(url), url)
                self._fetched_at = self._clock()
                log.info("OIDC signing keys fetched from %s: %s", url, ", ".join(str(k.get("kid")) for k in self._keys))
            return self._keys


def key_source(settings: OidcSettings) -> KeySource:
    """The configured source: a file, a URL, or the issuer's discovery document."""
    if settings.jwks_file:
        return JwksFile(Path(settings.jwks_file).expanduser())
    if settings.jwks_url:
        url = settings.jwks_url

        async def fixed() -> str:
            return url

        return JwksUrl(fixed, f"JWKS {url}", settings.jwks_cache_seconds)
    discovery = Discovery(settings.issuer)
    return JwksUrl(discovery.jwks_uri, f"jwks_uri of {discovery.url}", settings.jwks_cache_seconds)


# --------------------------------------------------------------------------- choosing the key


class KeyRing:
    """The verification key for a token header; an unknown ``kid`` has the source fetched again, rate-limited."""

    def __init__(self, source: KeySource, clock: Clock = time.monotonic) -> None:
        self.source = source
        self._clock = clock
        self._missed: dict[str, float] = {}          # kid -> when a fresh fetch still did not have it
        self._fetches: deque[float] = deque()

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        jwk = select_key(await self.source.keys(), kid, alg)
        if jwk is None and self._may_fetch(kid):
            jwk = select_key(await self.source.keys(refresh=True), kid, alg)
            if jwk is None:
                self._missed[kid or ""] = self._clock()
        if jwk is None:
            raise TokenRefused(f"no {alg} key with kid {kid!r} in {self.source.description}")
        return as_verification_key(jwk, alg)

    def _may_fetch(self, kid: str | None) -> bool:
        now = self._clock()
        if now - self._missed.get(kid or "", -UNKNOWN_KID_RETRY_SECONDS) < UNKNOWN_KID_RETRY_SECONDS:
            return False
        while self._fetches and now - self._fetches[0] >= 60.0:
            self._fetches.popleft()
        if len(self._fetches) >= UNKNOWN_KID_FETCHES_PER_MINUTE:
            return False
        self._fetches.append(now)
        return True


def select_key(keys: list[JwkDict], kid: str | None, alg: str) -> JwkDict | None:
    """The one key that may verify ``alg`` under ``kid`` (without a kid: the only candidate)."""
    candidates = [key for key in keys if _usable_for(key, alg)]
    if kid is not None:
        candidates = [key for key in candidates if key.get("kid") == kid]
    return candidates[0] if len(candidates) == 1 or (kid is not None and candidates) else None


def _usable_for(key: JwkDict, alg: str) -> bool:
    # RFC 7517 4.2-4.4: "use" sig, "key_ops" verify, and "alg" (when present) must all agree.
    if key.get("use", "sig") != "sig" or "verify" not in key.get("key_ops", ["verify"]):
        return False
    if key.get("alg", alg) != alg or key.get("kty") != KEY_TYPES.get(alg[:2]):
        return False
    return alg not in CURVES or key.get("crv") == CURVES[alg]


def as_verification_key(jwk: JwkDict, alg: str) -> jwt.PyJWK:
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWTError as error:
        raise TokenRefused(f"key {jwk.get('kid')!r} unusable: {error}") from None
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        raise TokenRefused(f"key {jwk.get('kid')!r}: RSA {key.key.key_size} bits, {MIN_RSA_BITS} required")
    if not hasattr(key.key, "verify") or hasattr(key.key, "sign"):
        raise TokenRefused(f"key {jwk.get('kid')!r} is not a public key")   # a JWKS publishes public keys only
    return key


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class TokenPolicy:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    leeway_seconds: int
    subject_claim: str

    @classmethod
    def from_settings(cls, settings: OidcSettings) -> "TokenPolicy":
        return cls(settings.issuer, settings.audience, tuple(settings.allowed_algorithms), settings.leeway_seconds,
                   settings.subject_claim)


def unverified_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as error:
        raise TokenRefused(f"not a JWS compact token: {error}") from None
    if "crit" in header:
        raise TokenRefused(f"critical header parameters {header['crit']!r} not understood (RFC 7515 4.1.11)")
    return header


def decode_claims(token: str, key: jwt.PyJWK, alg: str, policy: TokenPolicy, *,
                  refused_types: frozenset[str] = NOT_ACCESS_TOKENS,
                  required: tuple[str, ...] = REQUIRED_CLAIMS) -> dict[str, Any]:
    """Signature, then RFC 7519 4.1 claims: iss exact, aud contains ours, exp/nbf/iat with leeway.

    ``refused_types``: Keycloak ``typ`` claims not accepted here (an access token by default; the webmail's
    sign-in passes the ones an ID token must not be).
    """
    try:
        claims = jwt.decode(token, key.key, algorithms=[alg], audience=policy.audience, issuer=policy.issuer,
                            leeway=policy.leeway_seconds, options={"require": list(required)})
    except jwt.PyJWTError as error:
        raise TokenRefused(f"{type(error).__name__}: {error}") from None
    if claims.get("typ") in refused_types:
        expected = "an access token" if refused_types is NOT_ACCESS_TOKENS else "the token expected here"
        raise TokenRefused(f"a {claims['typ']} token, not {expected}")
    return claims


def national_id(claims: Mapping[str, Any], claim: str) -> str:
    """The practitioner's IDNPS from ``claim``: an IDNPS as is, a bare RPPS (11 digits) as 8 + RPPS."""
    value = claims.get(claim)
    if not isinstance(value, str) or not value.strip():
        raise TokenRefused(f"claim {claim!r} missing or not a string")
    value = value.strip()
    try:
        if re.fullmatch(r"\d{11}", value):
            return ids.make_idnps("RPPS", value).idnps
        return ids.parse_idnps(value).idnps
    except UserError as error:
        raise TokenRefused(f"claim {claim!r} = {value!r} is not a national professional id: {error}") from None


# --------------------------------------------------------------------------- practitioner -> mailbox


class PractitionerMailboxes:
    """Which session a practitioner's token opens for the mailbox they named (the SASL authzid)."""

    def __init__(self, directory: DirectoryService) -> None:
        self.directory = directory

    async def account_for(self, idnps: str, requested: str) -> Account:
        own = await self._own_mailboxes(idnps)
        if not requested.strip():
            return await self._only_mailbox(idnps, own)
        box = await self._mailbox(requested)
        if box["address"] in own:
            return await self._account(box)
        for delegation in box["delegates"]:
            if delegation["delegate"] in own:
                self._require_active(box)
                return await self._account(await self._mailbox(delegation["delegate"]))
        raise TokenRefused(f"{box['address']} is neither a mailbox of {idnps} nor delegated to one of theirs")

    async def _own_mailboxes(self, idnps: str) -> set[str]:
        try:
            professional = await self.directory.show_professional(idnps)
        except UserError:
            raise TokenRefused(f"no professional {idnps} in the directory") from None
        if professional["state"] != "active":
            raise TokenRefused(f"professional {idnps} is {professional['state']}")
        return set(professional["mailboxes"])

    async def _only_mailbox(self, idnps: str, own: set[str]) -> Account:
        boxes = [await self._mailbox(address) for address in sorted(own)]
        usable = [box for box in boxes if box["hosted"] and box["state"] == "active"]
        if len(usable) != 1:
            raise TokenRefused(f"no mailbox named, and {idnps} has {len(usable)} mailboxes here: the client must name one")
        return await self._account(usable[0])

    async def _mailbox(self, address: str) -> dict[str, Any]:
        try:
            return await self.directory.show_mailbox(address)
        except UserError as error:
            raise TokenRefused(f"mailbox {address!r}: {error}") from None

    @staticmethod
    def _require_active(box: Mapping[str, Any]) -> None:
        if not box["hosted"] or box["state"] != "active":
            raise TokenRefused(f"mailbox {box['address']} is {'not hosted here' if not box['hosted'] else box['state']}")

    async def _account(self, box: Mapping[str, Any]) -> Account:
        self._require_active(box)
        account = await self.directory.account(box["address"])
        if account is None:
            raise TokenRefused(f"mailbox {box['address']} has no account")
        return account


# --------------------------------------------------------------------------- the verifier


class OidcTokenVerifier:
    """The ``TokenVerifier`` of the SMTP (and IMAP) doors: an access token and a mailbox name -> an account."""

    def __init__(self, policy: TokenPolicy, keyring: KeyRing, mailboxes: PractitionerMailboxes) -> None:
        self.policy = policy
        self.keyring = keyring
        self.mailboxes = mailboxes

    @classmethod
    def from_settings(cls, settings: OidcSettings, directory: DirectoryService) -> "OidcTokenVerifier | None":
        """None when no issuer is configured: token mechanisms are then not offered at all."""
        if not settings.enabled:
            return None
        return cls(TokenPolicy.from_settings(settings), KeyRing(key_source(settings)), PractitionerMailboxes(directory))

    async def account_for_token(self, user: str, token: str) -> Account | None:
        """The account, or None; why not is logged here and never told to the client (RFC 6750 3.1)."""
        try:
            verified = await self.verify(token)
            account = await self.mailboxes.account_for(verified.idnps, user)
        except TokenRefused as refused:
            log.warning("bearer token refused (mailbox %r): %s", user or "-", refused.reason)
            return None
        log.info("bearer token of %s accepted for %s (session %s), valid until %s",
                 verified.idnps, user or "-", account.address, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(verified.expires_at)))
        return account

    async def verify(self, token: str) -> VerifiedToken:
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.policy.algorithms:
            raise TokenRefused(f"algorithm {alg!r} not allowed (allowed: {', '.join(self.policy.algorithms)})")
        kid = header.get("kid")
        key = await self.keyring.key_for(kid if isinstance(kid, str) else None, alg)
        claims = decode_claims(token, key, alg, self.policy)
        idnps = national_id(claims, self.policy.subject_claim)
        return VerifiedToken(idnps, str(claims.get("sub", "")), int(claims["exp"]), claims)

    def error_status(self) -> bytes:
        """RFC 7628 3.2.2: the JSON error status sent in the 334 challenge after a refused OAUTHBEARER."""
        return json.dumps({"status": "invalid_token", "scope": "openid",
                           "openid-configuration": discovery_url(self.policy.issuer)}).encode()
