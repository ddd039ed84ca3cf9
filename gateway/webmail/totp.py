"""The second factor: TOTP (RFC 6238, 30-second steps, 6 digits, HMAC-SHA1 as authenticator apps expect)
and ten single-use recovery codes.

The secret is sealed under the mailbox's data key (FieldSealer), so it is
crypto-shredded with the mailbox. A code is accepted once: the step it matched
is remembered and older or equal steps are refused (RFC 6238 5.2). Recovery
codes are 10 characters of a 32-letter alphabet (50 bits), shown once, stored
as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import pyotp
import segno
from aiohttp import web
from sqlalchemy import delete, select

from gateway.security.at_rest import FieldSealer
from gateway.security.keys import mailbox_owner
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from gateway.webmail.tables import WebmailRecoveryCode, WebmailTotp
from gateway.webmail.web import context

STEP_SECONDS = 30                      # RFC 6238 5.2: the recommended time step
RECOVERY_CODES = 10
RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud or copied by hand
SECRET_COLUMN = "webmail_totp.secret"


@dataclass(frozen=True)
class Enrolment:
    secret: str          # base32, shown as text for manual entry
    uri: str             # otpauth:// for the QR code
    qr_svg: str          # the QR code, drawn by us (no external service)


def normalise_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def recovery_digest(code: str) -> str:
    return hashlib.sha256(normalise_code(code).encode()).hexdigest()


class TotpService:
    def __init__(self, db: Database, fields: FieldSealer, issuer: str, window: int) -> None:
        self.db = db
        self.fields = fields
        self.issuer = issuer
        self.window = window

    @classmethod
    def of(cls, request: web.Request) -> TotpService:
        ctx = context(request)
        service = ctx.extras.get("totp")
        if not isinstance(service, TotpService):
            service = cls(ctx.services.db, ctx.services.fields, ctx.settings.webmail.totp_issuer,
                          ctx.settings.webmail.totp_valid_window)
            ctx.extras["totp"] = service
        return service

    async def enrolled(self, mailbox_id: int) -> bool:
        async with self.db.session() as s:
            row = await s.get(WebmailTotp, mailbox_id)
            return row is not None and row.confirmed_at is not None

    async def begin(self, mailbox_id: int, account_name: str) -> Enrolment:
        """A new pending secret (replacing any pending one); a confirmed secret stays until confirm() replaces it."""
        secret = pyotp.random_base32(32)   # 160 bits (RFC 4226 4: at least 128, 160 recommended)
        sealed = await self.fields.seal_bytes(mailbox_owner(mailbox_id), SECRET_COLUMN + ".pending", secret.encode())
        async with self.db.session() as s:
            row = await s.get(WebmailTotp, mailbox_id)
            if row is None:
                s.add(WebmailTotp(mailbox_id=mailbox_id, secret_sealed=sealed, confirmed_at=None, last_step=0))
            elif row.confirmed_at is None:
                row.secret_sealed = sealed
            else:
                raise web.HTTPConflict(text="second factor already active")
        return self.describe(secret, account_name)

    def describe(self, secret: str, account_name: str) -> Enrolment:
        uri = pyotp.TOTP(secret, interval=STEP_SECONDS).provisioning_uri(name=account_name, issuer_name=self.issuer)
        qr = segno.make(uri, error="m")
        svg = qr.svg_inline(scale=5, border=4, dark="#000000", light="#ffffff", omitsize=True,
                             title="QR code", svgclass="qr-code")  # viewBox only: CSS sizes it without cropping
        return Enrolment(secret, uri, svg)

    async def pending(self, mailbox_id: int, account_name: str) -> Enrolment | None:
        async with self.db.session() as s:
            row = await s.get(WebmailTotp, mailbox_id)
        if row is None or row.confirmed_at is not None:
            return None
        secret = await self.fields.open(mailbox_owner(mailbox_id), SECRET_COLUMN + ".pending", row.secret_sealed)
        return self.describe(str(secret), account_name)

    async def confirm(self, mailbox_id: int, code: str) -> list[str] | None:
        """Activate the pending secret if ``code`` matches it; returns the new recovery codes (shown once)."""
        async with self.db.session() as s:
            row = await s.get(WebmailTotp, mailbox_id, with_for_update=True)
            if row is None or row.confirmed_at is not None:
                return None
            secret = await self.fields.open(mailbox_owner(mailbox_id), SECRET_COLUMN + ".pending", row.secret_sealed)
            step = self._matching_step(str(secret), code, after=0)
            if step is None:
                return None
            row.secret_sealed = await self.fields.seal_bytes(mailbox_owner(mailbox_id), SECRET_COLUMN, str(secret).encode())
            row.confirmed_at = utcnow()
            row.last_step = step
            codes = [self._new_recovery_code() for _ in range(RECOVERY_CODES)]
            await s.execute(delete(WebmailRecoveryCode).where(WebmailRecoveryCode.mailbox_id == mailbox_id))
            s.add_all(WebmailRecoveryCode(mailbox_id=mailbox_id, code_hash=recovery_digest(c)) for c in codes)
        return codes

    async def verify(self, mailbox_id: int, code: str) -> bool:
        """True when ``code`` is the current TOTP of the confirmed secret and was not used before."""
        async with self.db.session() as s:
            row = await s.get(WebmailTotp, mailbox_id, with_for_update=True)
            if row is None or row.confirmed_at is None:
                return False
            secret = await self.fields.open(mailbox_owner(mailbox_id), SECRET_COLUMN, row.secret_sealed)
            step = self._matching_step(str(secret), code, after=row.last_step)
            if step is None:
                return False
            row.last_step = step
            return True

    async def use_recovery_code(self, mailbox_id: int, code: str) -> bool:
        digest = recovery_digest(code)
        async with self.db.session() as s:
            rows = (await s.scalars(select(WebmailRecoveryCode).where(
                WebmailRecoveryCode.mailbox_id == mailbox_id, WebmailRecoveryCode.used_at.is_(None)))).all()
            for row in rows:
                if hmac.compare_digest(row.code_hash, digest):
                    row.used_at = utcnow()
                    return True
        return False

    async def recovery_codes_left(self, mailbox_id: int) -> int:
        async with self.db.session() as s:
            rows = await s.scalars(select(WebmailRecoveryCode.id).where(
                WebmailRecoveryCode.mailbox_id == mailbox_id, WebmailRecoveryCode.used_at.is_(None)))
            return len(rows.all())

    def _matching_step(self, secret: str, code: str, *, after: int) -> int | None:
        """The time step within the window whose code equals ``code`` and that comes after ``after``."""
        digits = normalise_code(code)
        if len(digits) != 6 or not (digits.isascii() and digits.isdigit()):
            return None
        totp = pyotp.TOTP(secret, interval=STEP_SECONDS)
        now_step = int(time.time()) // STEP_SECONDS
        for step in range(now_step - self.window, now_step + self.window + 1):
            if step > after and hmac.compare_digest(totp.generate_otp(step), digits):
                return step
        return None

    @staticmethod
    def _new_recovery_code() -> str:
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(10))
        return f"{raw[:5]}-{raw[5:]}"
