"""Who is calling the FHIR API: a client certificate (mTLS) or HTTP Basic with mailbox credentials.

Both only over TLS (the listener has no plaintext port). A client
certificate must chain to the trust anchors during the handshake (the TLS
context checks it, and the CRLs when present) and be bound to an active
mailbox in the directory (``account_for_certificate``: registered with usage
``auth``, not revoked, within its validity). Without a usable certificate,
``Authorization: Basic`` carries the mailbox address and password (RFC 7617,
UTF-8), each attempt going through the gateway's one ``AuthLimiter`` (a throttled
caller gets 429 with Retry-After, its password not looked at). The mailbox then says who acts:

- PER or CAB mailbox: its professional (IDNPS, TRE_G15 profession code,
  savoir-faire), who must be active in the directory;
- PAT mailbox: the patient, for their own record;
- APP or ORG mailbox: an application acting for its organisation, which the
  access policy lets read nothing of any record.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from typing import Any

from gateway.directory.service import Account, DirectoryService
from gateway.dmp_bridge.access import Requester, RequesterKind
from gateway.dmp_bridge.fhir.boundary import note_audited_by_the_limiter
from gateway.errors import UserError
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from gateway.security.revocation import RevocationList
from gateway.security.tls import peer_certificate_info

PROFESSIONAL_MAILBOXES = ("PER", "CAB")
APPLICATION_MAILBOXES = ("APP", "ORG")


class Unauthenticated(Exception):
    """No valid credentials: 401 with a WWW-Authenticate challenge."""


def certificate_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    info = peer_certificate_info(ssl_object)
    return info["fingerprint_sha256"] if info else None


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(login, password) from ``Authorization: Basic ...``, or None when absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, separator, password = decoded.partition(":")
    return (login, password) if separator and login else None


class CallerResolver:
    """Turns TLS peer certificates and Basic credentials into a policy ``Requester``."""

    def __init__(self, directory: DirectoryService, *, basic_allowed: bool = True,
                 auth_limiter: AuthLimiter | None = None, revocation: RevocationList | None = None) -> None:
        self.directory = directory
        self.revocation = revocation
        self.basic_allowed = basic_allowed
        self.auth_limiter = auth_limiter if auth_limiter is not None else AuthLimiter(LimiterPolicy())

    async def resolve(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None, authorization: str | None,
                      source: str = "?") -> Requester:
        """The caller; ``AuthThrottled`` when Basic attempts from ``source`` (its IP address) must wait."""
        account = await self._account(ssl_object, authorization, source)
        if account is None:
            raise Unauthenticated("a registered client certificate or mailbox credentials are required")
        return await self.requester_for(account)

    async def _account(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                       authorization: str | None, source: str) -> Account | None:
        fingerprint = certificate_fingerprint(ssl_object)
        if fingerprint is not None:
            # A kept-alive connection may predate a revocation: the CRLs as they are now decide (RFC 5280 6.3).
            if self.revocation is not None and self.revocation.peer_is_revoked(ssl_object):
                raise Unauthenticated("the client certificate is revoked")
            account = await self.directory.account_for_certificate(fingerprint)
            if account is not None:
                return account
        credentials = basic_credentials(authorization) if self.basic_allowed else None
        if credentials is None:
            return None
        login, password = credentials
        await self.auth_limiter.check("fhir", login, source)
        account = await self.directory.authenticate(login, password)
        if account is None:
            await self.auth_limiter.failed("fhir", login, source)
            note_audited_by_the_limiter()
        else:
            await self.auth_limiter.succeeded("fhir", login, source)
        return account

    async def requester_for(self, account: Account) -> Requester:
        mailbox = await self.directory.show_mailbox(account.address)
        owner = mailbox.get("owner")
        if not owner:
            raise Unauthenticated(f"mailbox {account.address} has no owner")
        if account.type in PROFESSIONAL_MAILBOXES:
            return await self._professional(str(owner))
        if account.type == "PAT":
            return await self._patient(str(owner))
        name = account.display_name or account.address
        return Requester(RequesterKind.APPLICATION, str(owner), name)

    async def _professional(self, idnps: str) -> Requester:
        professional = await self._show(self.directory.show_professional, idnps)
        if professional.get("state") != "active":
            raise Unauthenticated(f"professional {idnps} is not active")
        name = " ".join(part for part in (professional.get("given_name"), professional.get("family_name")) if part)
        return Requester(RequesterKind.PROFESSIONAL, idnps, name or idnps, professional.get("profession_code"),
                         professional.get("savoir_faire_code"))

    async def _patient(self, ins: str) -> Requester:
        patient = await self._show(self.directory.show_patient, ins)
        name = " ".join(part for part in (patient.get("first_given_name"), patient.get("birth_family_name")) if part)
        return Requester(RequesterKind.PATIENT, ins, name or ins)

    @staticmethod
    async def _show(lookup: Any, key: str) -> dict[str, Any]:
        try:
            record: dict[str, Any] = await lookup(key)
        except UserError:
            raise Unauthenticated(f"{key} is not in the directory") from None
        return record
