"""The S/MIME service the pipeline calls: certificates in the directory, held keys, policy, in and out.

- Certificates: a mailbox's S/MIME certificates live in the directory's
  ``certificates`` table; this service imports them (PEM, DER or PKCS#12, with
  the private key when the owner lets the gateway hold it: sealed under the
  mailbox's data key), publishes them, revokes them and reports their state
  (valid, expiring, expired, revoked, untrusted) against the trust anchors and
  CRLs of the PKI (RFC 5280 6.1, 6.3).
- Outgoing (``check_recipient`` at RCPT, ``protect`` at end of DATA): sign with
  the sender's held key and encrypt to each recipient's published certificate
  as the policy says (gateway.security.smime_policy); recipients with
  certificates get an encrypted copy, the others a signed one (RFC 8551 3.7:
  sign, then encrypt). ``always`` with no usable certificate is refused with
  550 5.7.1, never sent in clear.
- Incoming (``inspect``, for local recipients): decrypt with the keys held for
  the recipient mailboxes, verify, validate the signer's path with revocation,
  compare the signer with From; the verdict becomes an RFC 8601
  Authentication-Results field with the RFC 7281 ``smime`` method, and the
  decrypted content is kept as a blob of each recipient mailbox
  (``decrypted_copy``: for the webmail and the DMP bridge). The message itself is
  delivered as received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.errors import Conflict, NotFound, UserError
from gateway.security.at_rest import FieldSealer
from gateway.security.certpath import PathRule, Purpose, address_matches, validate_path
from gateway.security.keys import mailbox_owner
from gateway.security.pki import TestPKI
from gateway.security.smime import (
    ContentCipher,
    IncomingResult,
    OutgoingOptions,
    RecipientKey,
    SigningIdentity,
    SmimeFailure,
    SmimeStatus,
    process_incoming,
    process_outgoing,
)
from gateway.directory.generation import AnswerCache
from gateway.security.smime_policy import (
    HeldKey,
    InboundResult,
    PartyPolicy,
    PolicyDefaults,
    PolicyScope,
    Requirement,
    SmimeCertificateState,
    SmimePolicyRow,
    resolve,
    stricter,
)
from gateway.mail.codes import Reply, MailRefusal
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Certificate, Mailbox, utcnow

log = logging.getLogger("gateway.smime")

PRIVATE_KEY_COLUMN = "smime-private-key"
# RFC 3463 3.8 X.7.1 "delivery not authorized, message refused": the policy forbids sending in clear.
ENCRYPTION_REQUIRED = Reply(550, "5.7.1", "{address}: S/MIME encryption is required ({source} policy) "
                                          "but {reason}; the message was not sent in clear")
SIGNATURE_REQUIRED = Reply(554, "5.7.1", "{address}: S/MIME signature is required ({source} policy) but {reason}")
SMIME_TYPES = ("multipart/signed", "application/pkcs7-mime", "application/x-pkcs7-mime")
ENVELOPED_TYPES = ("enveloped-data", "authenveloped-data")


class CertificateState(StrEnum):
    VALID = "valid"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    REVOKED = "revoked"
    UNTRUSTED = "untrusted"

    @property
    def usable(self) -> bool:
        return self in (CertificateState.VALID, CertificateState.EXPIRING)


@dataclass(frozen=True)
class TrustMaterial:
    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]


@dataclass(frozen=True)
class Variant:
    """One copy of an outgoing message: its recipients and content (None: the message as received)."""

    recipients: tuple[str, ...]
    content: bytes | None
    signed: bool = False
    encrypted: bool = False


@dataclass(frozen=True)
class InboundVerdict:
    """What ``inspect`` found; ``record`` stores it once the message is queued."""

    result: IncomingResult
    authentication_results: str                 # the whole header field, CRLF-free
    decrypted_for: dict[int, bytes] = field(default_factory=dict)   # mailbox id -> decrypted content
    status_by_mailbox: dict[int, IncomingResult] = field(default_factory=dict)


@dataclass(frozen=True)
class DecryptedCopy:
    status: str
    summary: str
    signer: str | None
    content: bytes


def is_smime_content_type(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() in SMIME_TYPES


def is_enveloped(content_type: str | None) -> bool:
    if content_type is None or "pkcs7-mime" not in content_type.lower():
        return False
    lowered = content_type.lower().replace('"', "")
    return any(f"smime-type={kind}" in lowered for kind in ENVELOPED_TYPES) or "smime-type" not in lowered


def _fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def parse_certificate_and_key(data: bytes, key_data: bytes | None = None,
                              password: bytes | None = None) -> tuple[x509.Certificate, Any | None]:
    """A certificate (PEM, DER, or PKCS#12 with its key) and, optionally, its private key (PEM or DER PKCS#8)."""
    try:
        key, certificate, _chain = pkcs12.load_key_and_certificates(data, password)
        if certificate is not None:
            return certificate, key
    except ValueError:
        pass
    try:
        certificate = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise UserError(f"not a certificate (PEM, DER or PKCS#12): {exc}", field="certificate") from None
    if key_data is None:
        return certificate, None
    try:
        loader = serialization.load_pem_private_key if b"-----BEGIN" in key_data else serialization.load_der_private_key
        key = loader(key_data, password)
    except (ValueError, TypeError) as exc:
        raise UserError(f"not a private key (PEM or DER, PKCS#8 or traditional): {exc}", field="key") from None
    return certificate, key


def _key_matches(certificate: x509.Certificate, key: Any) -> bool:
    public = certificate.public_key()
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        return False
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*der) == public.public_bytes(*der))


def _load_pem_objects(path: Path) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
    try:
        data = path.read_bytes()
    except OSError:
        return [], []
    certificates = x509.load_pem_x509_certificates(data) if b"BEGIN CERTIFICATE" in data else []
    crls = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part.split(b"-----END X509 CRL-----")[0]
                                   + b"-----END X509 CRL-----")
            for part in data.split(b"-----BEGIN X509 CRL-----")[1:]]
    return certificates, crls


class SmimeService:
    def __init__(self, db: Database, settings: Settings, pki: TestPKI, blobs: BlobStore, sealer: FieldSealer) -> None:
        self.db = db
        self.settings = settings
        self.pki = pki
        self.blobs = blobs
        self.sealer = sealer
        self.defaults = PolicyDefaults(Requirement(settings.smime.sign), Requirement(settings.smime.encrypt))
        self._trust: tuple[tuple[float, ...], TrustMaterial] | None = None

    # ================================================================== trust material

    def _trust_files(self) -> list[Path]:
        files = [self.pki.root_cert_path, self.pki.intermediate_cert_path, *self.pki.crl_paths]
        return files + [Path(p).expanduser() for p in self.settings.pki.trust_anchors]

    def trust(self) -> TrustMaterial:
        """The PKI's root as anchor, its intermediate, its CRLs and ``pki.trust_anchors``; re-read when a file changes."""
        files = self._trust_files()
        stamp = tuple(path.stat().st_mtime if path.exists() else 0.0 for path in files)
        if self._trust is None or self._trust[0] != stamp:
            self._trust = (stamp, self._load_trust(files))
        return self._trust[1]

    def _load_trust(self, files: list[Path]) -> TrustMaterial:
        anchors: list[x509.Certificate] = []
        intermediates: list[x509.Certificate] = []
        crls: list[x509.CertificateRevocationList] = []
        for path in files:
            if path.suffix == ".crl" or path in self.pki.crl_paths:
                crls.extend(self._read_crl(path))
                continue
            certificates, found_crls = _load_pem_objects(path)
            crls.extend(found_crls)
            for certificate in certificates:
                self_signed = certificate.issuer == certificate.subject
                (anchors if self_signed or path != self.pki.intermediate_cert_path else intermediates).append(certificate)
        return TrustMaterial(tuple(anchors), tuple(intermediates), tuple(crls))

    @staticmethod
    def _read_crl(path: Path) -> list[x509.CertificateRevocationList]:
        try:
            data = path.read_bytes()
        except OSError:
            return []
        try:
            return [x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)]
        except ValueError:
            log.warning("CRL %s is unreadable; ignored", path)
            return []

    def certificate_state(self, certificate: x509.Certificate, row: Certificate | None = None, *,
                          now: dt.datetime | None = None, within_days: int | None = None,
                          purpose: Purpose = Purpose.ENCRYPTION) -> tuple[CertificateState, str]:
        """State and reason: revoked (ours or the CRL), expired, untrusted path, expiring soon, or valid."""
        now = now or utcnow()
        if row is not None and row.revoked_at is not None:
            return CertificateState.REVOKED, f"revoked in the directory on {row.revoked_at:%Y-%m-%d}"
        if certificate.not_valid_after_utc < now:
            return CertificateState.EXPIRED, f"expired on {certificate.not_valid_after_utc:%Y-%m-%d}"
        if certificate.not_valid_before_utc > now:
            return CertificateState.NOT_YET_VALID, f"valid only from {certificate.not_valid_before_utc:%Y-%m-%d}"
        trust = self.trust()
        path = validate_path(certificate, anchors=trust.anchors, intermediates=trust.intermediates, crls=trust.crls,
                             now=now, purpose=purpose, require_revocation=self.settings.smime.require_revocation)
        if not path.valid:
            revoked = any(failure.rule is PathRule.REVOKED for failure in path.failures)
            return (CertificateState.REVOKED if revoked else CertificateState.UNTRUSTED), path.reason
        days = self.settings.smime.expiry_warning_days if within_days is None else within_days
        if certificate.not_valid_after_utc < now + dt.timedelta(days=days):
            return CertificateState.EXPIRING, f"expires on {certificate.not_valid_after_utc:%Y-%m-%d}"
        return CertificateState.VALID, "ok"

    # ================================================================== certificates in the directory

    async def import_certificate(self, address: str, data: bytes, *, key_data: bytes | None = None,
                                 password: bytes | None = None, hold_key: bool = False,
                                 publish: bool = True) -> dict[str, Any]:
        """Bind an S/MIME certificate to a mailbox; hold its private key (sealed) when asked and given."""
        certificate, key = parse_certificate_and_key(data, key_data, password)
        if hold_key and key is None:
            raise UserError("--hold-key needs the private key (--key, or a PKCS#12 file)", field="key")
        if key is not None and not _key_matches(certificate, key):
            raise UserError("the private key does not belong to the certificate", field="key")
        if not address_matches(certificate, address):
            raise UserError(f"the certificate names no e-mail address {address} (RFC 8550 3)", field="certificate")
        async with self.db.session() as session:
            mailbox_id = (await self._mailbox(session, address)).id
        # Sealed before the write transaction: creating the mailbox's data key takes its own (SQLite: one writer).
        sealed_key = await self._seal_key(mailbox_id, key) if hold_key and key is not None else None
        async with self.db.session() as session:
            mailbox = await self._mailbox(session, address)
            row = await self._certificate_row(session, mailbox, certificate)
            session.add(SmimeCertificateState(certificate_id=row.id, published_at=utcnow() if publish else None))
            if sealed_key is not None:
                session.add(HeldKey(certificate_id=row.id, mailbox_id=mailbox.id, sealed_key=sealed_key))
            await session.flush()
            return await self._describe(session, row, mailbox.address)

    async def _certificate_row(self, session: AsyncSession, mailbox: Mailbox, certificate: x509.Certificate) -> Certificate:
        fingerprint = _fingerprint(certificate)
        if await session.scalar(select(Certificate.id).where(Certificate.fingerprint_sha256 == fingerprint)):
            raise Conflict(f"certificate {fingerprint[:16]}... is registered already", field="certificate")
        row = Certificate(mailbox_id=mailbox.id, usage="smime", subject=certificate.subject.rfc4514_string(),
                          issuer=certificate.issuer.rfc4514_string(), serial=format(certificate.serial_number, "x"),
                          fingerprint_sha256=fingerprint, not_before=certificate.not_valid_before_utc,
                          not_after=certificate.not_valid_after_utc,
                          pem=certificate.public_bytes(serialization.Encoding.PEM).decode())
        session.add(row)
        await session.flush()
        return row

    async def _seal_key(self, mailbox_id: int, key: Any) -> str:
        """The private key as PKCS#8 DER, sealed under the mailbox's data key (shredded with the mailbox)."""
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return await self.sealer.seal_bytes(mailbox_owner(mailbox_id), PRIVATE_KEY_COLUMN, der)

    async def set_published(self, fingerprint: str, published: bool) -> dict[str, Any]:
        async with self.db.session() as session:
            row, address = await self._find_certificate(session, fingerprint)
            state = await self._state_row(session, row.id)
            state.published_at = utcnow() if published else None
            await session.flush()
            return await self._describe(session, row, address)

    async def revoke(self, fingerprint: str, reason: str = "unspecified") -> dict[str, Any]:
        """Mark a certificate revoked in the directory (never used again) and drop its held key."""
        async with self.db.session() as session:
            row, address = await self._find_certificate(session, fingerprint)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            state = await self._state_row(session, row.id)
            state.revocation_reason = reason[:32]
            state.published_at = None
            await session.execute(delete(HeldKey).where(HeldKey.certificate_id == row.id))
            await session.flush()
            return await self._describe(session, row, address)

    async def list_certificates(self, address: str | None = None, *, within_days: int | None = None) -> list[dict[str, Any]]:
        async with self.db.session() as session:
            query = (select(Certificate, Mailbox.address).join(Mailbox, Mailbox.id == Certificate.mailbox_id)
                     .where(Certificate.usage == "smime").order_by(Mailbox.address, Certificate.not_after))
            if address is not None:
                query = query.where(Mailbox.address == address.lower())
            rows = (await session.execute(query)).all()
            return [await self._describe(session, row, box_address, within_days=within_days) for row, box_address in rows]

    async def expiring(self, days: int) -> list[dict[str, Any]]:
        """Certificates that expire within ``days`` or already have: the administrator's warning list."""
        listed = await self.list_certificates(within_days=days)
        return [entry for entry in listed if entry["state"] in (CertificateState.EXPIRING, CertificateState.EXPIRED)]

    async def _describe(self, session: AsyncSession, row: Certificate, address: str, *,
                        within_days: int | None = None) -> dict[str, Any]:
        certificate = x509.load_pem_x509_certificate(row.pem.encode())
        state, reason = self.certificate_state(certificate, row, within_days=within_days)
        extra = await session.get(SmimeCertificateState, row.id)
        held = await session.scalar(select(HeldKey.id).where(HeldKey.certificate_id == row.id))
        return {"address": address, "state": state.value, "reason": reason, "subject": row.subject,
                "serial": row.serial, "not_after": row.not_after, "fingerprint": row.fingerprint_sha256,
                "published": bool(extra and extra.published_at), "key_held": held is not None,
                "key": _describe_key(certificate),
                "revocation_reason": extra.revocation_reason if extra else None}

    async def _find_certificate(self, session: AsyncSession, fingerprint: str) -> tuple[Certificate, str]:
        prefix = fingerprint.lower().replace(":", "")
        if len(prefix) < 8:
            raise UserError("give at least 8 hex digits of the SHA-256 fingerprint", field="fingerprint")
        rows = (await session.execute(
            select(Certificate, Mailbox.address).join(Mailbox, Mailbox.id == Certificate.mailbox_id)
            .where(Certificate.usage == "smime", Certificate.fingerprint_sha256.startswith(prefix)))).all()
        if not rows:
            raise NotFound(f"no S/MIME certificate with fingerprint {prefix}...", field="fingerprint")
        if len(rows) > 1:
            raise UserError(f"{prefix} matches {len(rows)} certificates: give more digits", field="fingerprint")
        return rows[0][0], rows[0][1]

    @staticmethod
    async def _state_row(session: AsyncSession, certificate_id: int) -> SmimeCertificateState:
        state = await session.get(SmimeCertificateState, certificate_id)
        if state is None:
            state = SmimeCertificateState(certificate_id=certificate_id)
            session.add(state)
        return state

    @staticmethod
    async def _mailbox(session: AsyncSession, address: str) -> Mailbox:
        mailbox = await session.scalar(select(Mailbox).where(Mailbox.address == address.strip().lower()))
        if mailbox is None:
            raise NotFound(f"no mailbox {address}", field="address")
        return mailbox

    # ================================================================== policy

    async def set_policy(self, target: str, *, sign: str | None = None, encrypt: str | None = None) -> dict[str, Any]:
        """``target`` is a mailbox address or a domain; ``inherit`` clears a setting."""
        scope = PolicyScope.MAILBOX if "@" in target else PolicyScope.DOMAIN
        target = target.strip().lower()
        async with self.db.session() as session:
            row = await session.scalar(select(SmimePolicyRow).where(SmimePolicyRow.scope == scope.value,
                                                                    SmimePolicyRow.target == target))
            if row is None:
                row = SmimePolicyRow(scope=scope.value, target=target)
                session.add(row)
            for name, value in (("sign", sign), ("encrypt", encrypt)):
                if value is not None:
                    setattr(row, name, None if value == "inherit" else Requirement.parse(value, name).value)
            await session.flush()
            return _describe_policy(row)

    async def list_policies(self) -> list[dict[str, Any]]:
        async with self.db.session() as session:
            rows = (await session.scalars(select(SmimePolicyRow).order_by(SmimePolicyRow.scope, SmimePolicyRow.target))).all()
        return [_describe_policy(row) for row in rows]

    async def policy_for(self, address: str, answers: AnswerCache | None = None) -> PartyPolicy:
        if answers is not None:       # the acceptance path: kept while the directory is unchanged
            return await answers.get("smime-policy", address.lower(), lambda: self.policy_for(address))
        address = address.lower()
        targets = (address, address.rpartition("@")[2])
        async with self.db.session() as session:
            rows = (await session.scalars(select(SmimePolicyRow).where(SmimePolicyRow.target.in_(targets)))).all()
        return resolve(address, {(row.scope, row.target): row for row in rows}, self.defaults)

    # ================================================================== keys and certificates in use

    async def usable_certificates(self, address: str,
                                  answers: AnswerCache | None = None) -> tuple[list[x509.Certificate], str]:
        """Published, valid certificates of ``address`` for encryption; else why none (for the refusal).
        ``answers`` caches the directory's rows only: validity and CRLs are judged now, every time."""
        if answers is not None:
            rows = await answers.get("smime-certificates", address.lower(), lambda: self._certificate_rows(address))
        else:
            rows = await self._certificate_rows(address)
        usable: list[x509.Certificate] = []
        reasons: list[str] = []
        for row, certificate, published_at in rows:
            state, reason = self.certificate_state(certificate, row)
            if not state.usable:
                reasons.append(f"its certificate is {state.value} ({reason})")
            elif published_at is None:
                reasons.append("its certificate is not published")
            else:
                usable.append(certificate)
        return usable, (reasons[0] if reasons else "the directory has no S/MIME certificate for it")

    async def _certificate_rows(self, address: str) -> list[tuple[Certificate, x509.Certificate, dt.datetime | None]]:
        async with self.db.session() as session:
            rows = (await session.execute(
                select(Certificate, SmimeCertificateState.published_at)
                .join(Mailbox, Mailbox.id == Certificate.mailbox_id)
                .outerjoin(SmimeCertificateState, SmimeCertificateState.certificate_id == Certificate.id)
                .where(Mailbox.address == address.lower(), Certificate.usage == "smime"))).all()
        return [(row, x509.load_pem_x509_certificate(row.pem.encode()), published_at) for row, published_at in rows]

    async def held_keys(self, mailbox_id: int) -> list[RecipientKey]:
        """The private keys held for a mailbox, unsealed (for decryption and signing)."""
        async with self.db.session() as session:
            rows = (await session.execute(
                select(HeldKey, Certificate).join(Certificate, Certificate.id == HeldKey.certificate_id)
                .where(HeldKey.mailbox_id == mailbox_id, Certificate.revoked_at.is_(None)))).all()
        keys = []
        for held, row in rows:
            der = await self.sealer.open_bytes(mailbox_owner(mailbox_id), PRIVATE_KEY_COLUMN, held.sealed_key)
            private_key = serialization.load_der_private_key(der, None)
            assert isinstance(private_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
            keys.append(RecipientKey(x509.load_pem_x509_certificate(row.pem.encode()), private_key))
        return keys

    async def signing_identity(self, address: str,
                               answers: AnswerCache | None = None) -> tuple[SigningIdentity | None, str]:
        """``answers`` caches the held keys (as the directory has them); validity and CRLs are judged now."""
        if answers is not None:
            keys = await answers.get("smime-held-keys", address.lower(), lambda: self._held_keys_of(address))
        else:
            keys = await self._held_keys_of(address)
        if keys is None:
            return None, "it is not a mailbox of ours"
        for key in keys:
            state, reason = self.certificate_state(key.certificate, purpose=Purpose.SIGNING)
            if state.usable:
                return SigningIdentity(key.certificate, key.private_key, self.trust().intermediates), "ok"
            log.info("held key of %s not used for signing: %s", address, reason)
        return None, "the gateway holds no valid signing key for it"

    async def _held_keys_of(self, address: str) -> list[RecipientKey] | None:
        async with self.db.session() as session:
            mailbox_id = await session.scalar(select(Mailbox.id).where(Mailbox.address == address.lower()))
        return None if mailbox_id is None else await self.held_keys(mailbox_id)

    # ================================================================== outgoing

    async def check_recipient(self, sender: str, recipient: str, answers: AnswerCache | None = None) -> None:
        """RCPT time: refuse a recipient the policy says must be encrypted to but cannot be (RFC 3463 X.7.1)."""
        requirement, source = await self._encryption_requirement(sender, recipient, answers)
        if requirement is not Requirement.ALWAYS:
            return
        usable, reason = await self.usable_certificates(recipient, answers)
        if not usable:
            raise MailRefusal(ENCRYPTION_REQUIRED.format(address=recipient, source=source, reason=reason))

    async def _encryption_requirement(self, sender: str, recipient: str,
                                      answers: AnswerCache | None = None) -> tuple[Requirement, str]:
        theirs = await self.policy_for(recipient, answers)
        ours = (await self.policy_for(sender, answers) if sender
                else PartyPolicy(Requirement.NEVER, Requirement.NEVER, "default", "default"))
        requirement = stricter(ours.encrypt, theirs.encrypt)
        source = f"recipient's {theirs.encrypt_source}" if theirs.encrypt is requirement else f"sender's {ours.encrypt_source}"
        return requirement, source

    async def protect(self, read_message: Callable[[], bytes], content_type: str | None, sender: str,
                      recipients: Sequence[str], answers: AnswerCache | None = None) -> list[Variant]:
        """End of DATA: the copies to queue. One variant with ``content=None`` means "unchanged".
        ``read_message`` (blocking) is called only when the message has to be signed or encrypted."""
        if is_enveloped(content_type):
            return [Variant(tuple(recipients), None)]          # the client encrypted it already: as is
        identity = await self._signer(sender, already_signed=is_smime_content_type(content_type), answers=answers)
        encrypted: dict[str, list[x509.Certificate]] = {}
        clear: list[str] = []
        for recipient in recipients:
            certificates = await self._encryption_certificates(sender, recipient, answers)
            if certificates:
                encrypted[recipient] = certificates
            else:
                clear.append(recipient)
        if identity is None and not encrypted:
            return [Variant(tuple(recipients), None)]
        sender_certificate = await self._sender_certificate(sender, answers) if encrypted else None
        return await asyncio.to_thread(lambda: self._variants(read_message(), identity, encrypted, clear,
                                                              sender_certificate))

    async def _signer(self, sender: str, *, already_signed: bool,
                      answers: AnswerCache | None = None) -> SigningIdentity | None:
        if not sender or already_signed:
            return None
        policy = await self.policy_for(sender, answers)
        if policy.sign is Requirement.NEVER:
            return None
        identity, reason = await self.signing_identity(sender, answers)
        if identity is None and policy.sign is Requirement.ALWAYS:
            raise MailRefusal(SIGNATURE_REQUIRED.format(address=sender, source=f"{policy.sign_source}", reason=reason))
        return identity

    async def _encryption_certificates(self, sender: str, recipient: str,
                                       answers: AnswerCache | None = None) -> list[x509.Certificate]:
        requirement, source = await self._encryption_requirement(sender, recipient, answers)
        if requirement is Requirement.NEVER:
            return []
        usable, reason = await self.usable_certificates(recipient, answers)
        if not usable and requirement is Requirement.ALWAYS:      # a certificate revoked since RCPT
            raise MailRefusal(ENCRYPTION_REQUIRED.format(address=recipient, source=source, reason=reason))
        return usable

    async def _sender_certificate(self, sender: str, answers: AnswerCache | None = None) -> x509.Certificate | None:
        """RFC 8551 3.3 practice: also encrypt to the sender, so their Sent copy stays readable."""
        if not sender:
            return None
        usable, _reason = await self.usable_certificates(sender, answers)
        return usable[0] if usable else None

    def _variants(self, raw: bytes, identity: SigningIdentity | None,
                  encrypted: dict[str, list[x509.Certificate]], clear: list[str],
                  sender_certificate: x509.Certificate | None) -> list[Variant]:
        options = OutgoingOptions(cipher=ContentCipher(self.settings.smime.cipher))
        variants: list[Variant] = []
        if encrypted:
            certificates = [certificate for group in encrypted.values() for certificate in group]
            content = process_outgoing(raw, sign_with=identity, encrypt_to=certificates,
                                       sender_certificate=sender_certificate, options=options)
            variants.append(Variant(tuple(encrypted), content, signed=identity is not None, encrypted=True))
        if clear:
            signed_only = process_outgoing(raw, sign_with=identity, options=options) if identity else None
            variants.append(Variant(tuple(clear), signed_only, signed=identity is not None))
        return variants

    # ================================================================== incoming

    async def inspect(self, raw: bytes, mailbox_ids: Sequence[int], *, encrypted_here: bool = False) -> InboundVerdict:
        """Decrypt (with each recipient mailbox's held keys), verify, validate; never raises for bad input.

        ``encrypted_here``: the message is the envelope this gateway made at submission (the sender's
        policy) for recipients whose keys it does not hold; the result says so instead of "encrypted
        for other recipients only", which would read as mail addressed to someone else.
        """
        trust = self.trust()
        now = utcnow()
        by_mailbox: dict[int, IncomingResult] = {}
        for mailbox_id in sorted(set(mailbox_ids)):
            keys = await self.held_keys(mailbox_id)
            if keys:
                by_mailbox[mailbox_id] = await asyncio.to_thread(self._verify, raw, keys, trust, now)
        results = list(by_mailbox.values()) or [await asyncio.to_thread(self._verify, raw, [], trust, now)]
        best = min(results, key=_rank)
        if encrypted_here and _not_for_our_keys(best):
            best = _encrypted_here(best)
        field = f"Authentication-Results: {self.settings.hostname};\r\n\t{best.summary}"
        decrypted = {mailbox_id: result.content for mailbox_id, result in by_mailbox.items()
                     if result.decryption is not None and result.decryption.decrypted}
        return InboundVerdict(best, field, decrypted, by_mailbox)

    def _verify(self, raw: bytes, keys: Sequence[RecipientKey], trust: TrustMaterial, now: dt.datetime) -> IncomingResult:
        return process_incoming(raw, keys=keys, trust_anchors=trust.anchors, intermediates=trust.intermediates,
                                crls=trust.crls, now=now, require_revocation=self.settings.smime.require_revocation)

    async def record(self, queue_id: str, verdict: InboundVerdict, mailbox_ids: Sequence[int]) -> None:
        """After the queue commit: the verdict per recipient mailbox, and its decrypted copy as a sealed blob."""
        stored_copies = {mailbox_id: await self.blobs.put(mailbox_owner(mailbox_id), content)
                         for mailbox_id, content in verdict.decrypted_for.items() if mailbox_id in mailbox_ids}
        async with self.db.session() as session:
            for mailbox_id in sorted(set(mailbox_ids)):
                result = verdict.status_by_mailbox.get(mailbox_id, verdict.result)
                stored = stored_copies.get(mailbox_id)
                signer = result.signature.signer_emails[0] if result.signature and result.signature.signer_emails else None
                session.add(InboundResult(queue_id=queue_id, mailbox_id=mailbox_id, status=result.status.value,
                                          summary=result.summary, encrypted=result.encrypted, signer=signer,
                                          decrypted_blob_id=stored.blob_id if stored else None,
                                          decrypted_size=stored.size if stored else None))

    async def inbound_result(self, queue_id: str, mailbox_id: int) -> InboundResult | None:
        async with self.db.session() as session:
            return await session.scalar(select(InboundResult).where(InboundResult.queue_id == queue_id,
                                                                    InboundResult.mailbox_id == mailbox_id))

    async def decrypted_copy(self, delivery_key: str, mailbox_id: int) -> DecryptedCopy | None:
        """For the webmail and the DMP bridge: the decrypted content of a delivery (``<queue id>:<recipient>``),
        None when the message was not decrypted here."""
        row = await self.inbound_result(delivery_key.split(":", 1)[0], mailbox_id)
        if row is None or row.decrypted_blob_id is None:
            return None
        content = await self.blobs.read(mailbox_owner(mailbox_id), row.decrypted_blob_id)
        return DecryptedCopy(row.status, row.summary, row.signer, content)


def _rank(result: IncomingResult) -> tuple[int, int]:
    """Prefer a decrypted result, then the most favourable status."""
    order = [SmimeStatus.PASS, SmimeStatus.POLICY, SmimeStatus.FAIL, SmimeStatus.NONE, SmimeStatus.PERMERROR,
             SmimeStatus.NEUTRAL]
    decrypted = result.decryption is not None and result.decryption.decrypted
    return (0 if decrypted or result.decryption is None else 1, order.index(result.status))


def _describe_key(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _describe_policy(row: SmimePolicyRow) -> dict[str, Any]:
    return {"scope": row.scope, "target": row.target, "sign": row.sign or "inherit",
            "encrypt": row.encrypt or "inherit", "updated_at": row.updated_at}


ENCRYPTED_HERE = ("encrypted by this gateway at submission to the recipient's certificate, by the sender's policy; "
                  "the recipient's mail client decrypts it")


def _not_for_our_keys(result: IncomingResult) -> bool:
    decryption = result.decryption
    return decryption is not None and not decryption.decrypted and decryption.failure is SmimeFailure.NO_RECIPIENT_KEY


def _encrypted_here(result: IncomingResult) -> IncomingResult:
    """RFC 7281 smime=neutral, with a comment saying what happened (RFC 8601 2.7.1 allows one)."""
    summary = f"smime={result.status.value} ({ENCRYPTED_HERE})"
    if result.from_address:
        summary += f" header.from={result.from_address}"
    return replace(result, reasons=(ENCRYPTED_HERE,), summary=summary)

