"""Sign-in with an OpenID Connect provider (FranceConnect-style), when ``webmail.oidc_issuer`` is set.

Authorization code flow (OIDC Core 3.1) with PKCE (RFC 7636, S256) and a
nonce (OIDC Core 3.1.2.1). The state, nonce and code verifier travel in a
short-lived cookie sealed with the webmail key (AES-GCM), so nothing is stored
for a visitor who never comes back. The ID token is checked with the
gateway's OIDC machinery (security/oidc.py: discovery, JWKS key ring with
rotation, algorithm allow-list, iss/aud/exp/iat): here the audience is our
client id and the nonce must be ours. The patient is found by the INS claim;
the provider's authentication counts as the second factor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from gateway.config import OidcSettings, Settings
from gateway.security.oidc import (KeyRing, TokenPolicy, TokenRefused, decode_claims, discovery_url, fetch_json,
                                   key_source, unverified_header)
from gateway.storage.models import Mailbox, Patient, PatientState, State
from gateway.webmail import throttle
from gateway.webmail.audit_events import audit_unknown_login
from gateway.webmail.sessions import Stage
from gateway.webmail.signin import audit_signed_in
from gateway.webmail.web import CONTEXT, N_, client_ip, context, render, set_session_cookie, translate

START_PATH = "/connexion/oidc"
RETURN_PATH = "/connexion/oidc/retour"
STATE_COOKIE = "__Host-mss-oidc"
STATE_LIFETIME_SECONDS = 600
ID_TOKEN_REFUSED_TYPES = frozenset({"Bearer", "Refresh", "Logout"})   # Keycloak typ values that are not ID tokens
FAILED = N_("Sign-in with your identity provider did not succeed. Try again, or sign in with your password.")


def install(app: web.Application) -> None:
    if app[CONTEXT].settings.webmail.oidc_issuer:
        app.router.add_get(START_PATH, start)
        app.router.add_get(RETURN_PATH, finish)


@dataclass
class Provider:
    """The configured provider: its endpoints (discovery), and the ID token checker built on security/oidc.py."""

    settings: Settings
    keyring: KeyRing
    policy: TokenPolicy
    _endpoints: dict[str, str] | None = None

    @classmethod
    def of(cls, request: web.Request) -> Provider:
        ctx = context(request)
        provider = ctx.extras.get("oidc")
        if not isinstance(provider, Provider):
            webmail = ctx.settings.webmail
            oidc = OidcSettings.model_validate({
                "issuer": webmail.oidc_issuer, "audience": webmail.oidc_client_id,
                "allowed_algorithms": ctx.settings.oidc.allowed_algorithms,
                "leeway_seconds": ctx.settings.oidc.leeway_seconds})
            provider = cls(ctx.settings, KeyRing(key_source(oidc)), TokenPolicy.from_settings(oidc))
            ctx.extras["oidc"] = provider
        return provider

    async def endpoints(self) -> dict[str, str]:
        if self._endpoints is None:
            document = await fetch_json(discovery_url(self.policy.issuer))
            if not isinstance(document, dict) or document.get("issuer") != self.policy.issuer:
                raise TokenRefused("discovery document names another issuer (OIDC Discovery 4.3)")
            endpoints = {name: document.get(name) for name in ("authorization_endpoint", "token_endpoint")}
            if not all(isinstance(v, str) and v for v in endpoints.values()):
                raise TokenRefused("discovery document lacks authorization_endpoint or token_endpoint")
            self._endpoints = {k: str(v) for k, v in endpoints.items()}
        return self._endpoints

    async def verify_id_token(self, token: str, nonce: str) -> dict[str, Any]:
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.policy.algorithms:
            raise TokenRefused(f"algorithm {alg!r} not allowed")
        kid = header.get("kid")
        key = await self.keyring.key_for(kid if isinstance(kid, str) else None, alg)
        claims = decode_claims(token, key, alg, self.policy, refused_types=ID_TOKEN_REFUSED_TYPES,
                               required=("exp", "iat", "iss", "aud", "sub", "nonce"))
        if not secrets.compare_digest(str(claims.get("nonce")), nonce):
            raise TokenRefused("nonce does not match this sign-in (OIDC Core 3.1.3.7 step 11)")
        return claims


def redirect_uri(settings: Settings) -> str:
    base = settings.webmail.public_url.rstrip("/") or f"https://{settings.hostname}:{settings.listen.http_port}"
    return base + RETURN_PATH


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _cipher(request: web.Request) -> AESGCM:
    return AESGCM(context(request).key.derive("oidc-state-cookie"))


def seal_state(request: web.Request, values: dict[str, Any]) -> str:
    nonce = secrets.token_bytes(12)
    return _b64(nonce + _cipher(request).encrypt(nonce, json.dumps(values).encode(), STATE_COOKIE.encode()))


def open_state(request: web.Request) -> dict[str, Any] | None:
    sealed = request.cookies.get(STATE_COOKIE)
    if not sealed:
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        values = json.loads(_cipher(request).decrypt(raw[:12], raw[12:], STATE_COOKIE.encode()))
    except (ValueError, InvalidTag):
        return None
    if not isinstance(values, dict) or values.get("expires", 0) < time.time():
        return None
    return values


async def start(request: web.Request) -> web.StreamResponse:
    """Send the browser to the provider (OIDC Core 3.1.2.1) with state, nonce and an S256 code challenge."""
    provider = Provider.of(request)
    try:
        endpoints = await provider.endpoints()
    except TokenRefused as refused:
        return await _failed_page(request, f"provider unavailable: {refused.reason}")
    verifier = _b64(secrets.token_bytes(32))                   # RFC 7636 4.1: 43 characters
    state, nonce = _b64(secrets.token_bytes(24)), _b64(secrets.token_bytes(24))
    webmail = context(request).settings.webmail
    query = urlencode({
        "response_type": "code", "client_id": webmail.oidc_client_id, "redirect_uri": redirect_uri(context(request).settings),
        "scope": " ".join(webmail.oidc_scopes), "state": state, "nonce": nonce,
        "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256"})
    response = web.HTTPSeeOther(endpoints["authorization_endpoint"] + ("&" if "?" in endpoints["authorization_endpoint"] else "?") + query)
    # Lax, not Strict: the provider sends the browser back with a cross-site top-level GET.
    response.set_cookie(STATE_COOKIE, seal_state(request, {"state": state, "nonce": nonce, "verifier": verifier,
                                                           "expires": time.time() + STATE_LIFETIME_SECONDS}),
                        path="/", secure=True, httponly=True, samesite="Lax", max_age=STATE_LIFETIME_SECONDS)
    raise response


async def finish(request: web.Request) -> web.StreamResponse:
    """The provider's answer: check state, exchange the code with the verifier, check the ID token, sign in."""
    ctx = context(request)
    saved = open_state(request)
    source = client_ip(request)
    if saved is None or not secrets.compare_digest(str(request.query.get("state", "")), str(saved.get("state"))):
        return await _failed_page(request, "state missing, expired or not this browser's (RFC 6749 10.12)")
    if "error" in request.query or not request.query.get("code"):
        return await _failed_page(request, f"provider answered error={request.query.get('error', 'no code')[:64]}")
    provider = Provider.of(request)
    try:
        await throttle.check(ctx.limiter, "oidc", source)
        claims = await provider.verify_id_token(await _exchange(provider, request.query["code"], saved), saved["nonce"])
    except throttle.Throttled as exc:
        return await _failed_page(request, f"throttled: retry in {exc.retry_after} s")
    except TokenRefused as refused:
        await throttle.failed(ctx.limiter, "oidc", source)
        return await _failed_page(request, f"ID token refused: {refused.reason}")
    mailbox_id = await _patient_mailbox(request, claims.get(ctx.settings.webmail.oidc_ins_claim))
    if mailbox_id is None:
        await throttle.failed(ctx.limiter, "oidc", source)
        return await _failed_page(request, "no active patient space for the INS of this identity")
    previous = request.cookies.get("__Host-mss-session")
    if previous:
        current = await ctx.sessions.lookup(previous)
        if current is not None:
            await ctx.sessions.close(current)
    token = await ctx.sessions.open(mailbox_id, Stage.SIGNED_IN, "oidc", source)
    await audit_signed_in(request, mailbox_id, "oidc")
    # A page, not a redirect: the Strict session cookie is then sent by the same-site navigation it starts.
    response = render(request, "signed_in.html", {"title": translate(request, N_("You are signed in"))})
    set_session_cookie(response, token)
    response.del_cookie(STATE_COOKIE, path="/")
    return response


async def _exchange(provider: Provider, code: str, saved: dict[str, Any]) -> str:
    """OIDC Core 3.1.3.1: the token request, with the PKCE verifier (RFC 7636 4.5); returns the id_token."""
    webmail = provider.settings.webmail
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri(provider.settings),
            "client_id": webmail.oidc_client_id, "code_verifier": saved["verifier"]}
    if webmail.oidc_client_secret:
        form["client_secret"] = webmail.oidc_client_secret
    endpoint = (await provider.endpoints())["token_endpoint"]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.post(endpoint, data=form, headers={"Accept": "application/json"}, allow_redirects=False) as answer:
            body = await answer.content.read(1 << 20)
            status = answer.status
    except (aiohttp.ClientError, TimeoutError) as error:
        raise TokenRefused(f"token endpoint: {error!r}") from None
    if status != 200:
        raise TokenRefused(f"token endpoint answered HTTP {status}: {body[:200]!r}")
    try:
        document = json.loads(body)
    except ValueError:
        raise TokenRefused("token endpoint answered something that is not JSON") from None
    id_token = document.get("id_token") if isinstance(document, dict) else None
    if not isinstance(id_token, str):
        raise TokenRefused("token response without id_token (OIDC Core 3.1.3.3)")
    return id_token


async def _patient_mailbox(request: web.Request, ins: object) -> int | None:
    if not isinstance(ins, str) or not ins.strip():
        return None
    async with context(request).services.db.session() as s:
        row = (await s.execute(select(Mailbox.id, Mailbox.state, Patient.state).join(Patient, Patient.id == Mailbox.patient_id)
                               .where(Patient.ins == ins.strip(), Mailbox.type == "PAT"))).first()
    if row is None or row[1] != State.ACTIVE.value or row[2] != PatientState.ACTIVE.value:
        return None
    return int(row[0])


async def _failed_page(request: web.Request, reason: str) -> web.Response:
    """The sign-in page with a plain message; the precise reason goes to the audit log only."""
    await audit_unknown_login(request, "oidc", reason)
    response = render(request, "signin.html", {"login": "", "error": translate(request, FAILED), "signed_out": False,
                                               "oidc": True}, status=401)
    response.del_cookie(STATE_COOKIE, path="/")
    return response

