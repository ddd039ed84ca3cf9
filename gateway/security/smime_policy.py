"""S/MIME policy: who signs, who is encrypted to, which keys the gateway holds; the tables behind it.

A policy row names a mailbox address or a domain and says, for signing and
for encryption, ``always`` / ``when-available`` / ``never`` (RFC 8551 does not
mandate either; MSSanté operators choose per mailbox and per domain).

Resolution, for one party: its mailbox row, else its domain row, else the
default from ``[smime]`` in the settings. Signing follows the *sender*'s
policy. Encryption follows the stricter of the sender's and the recipient's
policies (``always`` > ``when-available`` > ``never``): a clinician who
encrypts everything, or a patient who accepts only encrypted mail, are both
obeyed.

Tables (revision 0008, a branch off 0003):

- ``smime_policies``: the rows above;
- ``smime_certificates``: per directory certificate (``certificates`` table),
  publication and the reason it was revoked;
- ``smime_held_keys``: private keys the gateway holds for a mailbox (patients
  reading in the webmail, applications that asked), sealed under the mailbox's
  data key (gateway.security.at_rest), so crypto-shredding a mailbox destroys
  them too;
- ``smime_inbound_results``: the verdict on each S/MIME message delivered to a
  local mailbox, and the blob holding its decrypted content (for the DMP bridge).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.errors import UserError
from gateway.storage.models import Base, UTCDateTime, utcnow


class Requirement(str, enum.Enum):
    NEVER = "never"
    WHEN_AVAILABLE = "when-available"
    ALWAYS = "always"

    @property
    def strength(self) -> int:
        return {"never": 0, "when-available": 1, "always": 2}[self.value]

    @classmethod
    def parse(cls, value: str, field: str) -> Requirement:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise UserError(f"{value!r}: use always, when-available or never", field=field) from None


class PolicyScope(str, enum.Enum):
    MAILBOX = "mailbox"
    DOMAIN = "domain"


class SmimePolicyRow(Base):
    __tablename__ = "smime_policies"
    __table_args__ = (UniqueConstraint("scope", "target", name="uq_smime_policies_scope_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))              # mailbox | domain
    target: Mapped[str] = mapped_column(String(320))           # the address or the domain, lower case
    sign: Mapped[str | None] = mapped_column(String(16))       # None: inherit (domain, then default)
    encrypt: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow,
                                                    server_default=func.now())


class SmimeCertificateState(Base):
    __tablename__ = "smime_certificates"

    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id", ondelete="CASCADE"), primary_key=True)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revocation_reason: Mapped[str | None] = mapped_column(String(32))


class HeldKey(Base):
    __tablename__ = "smime_held_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id", ondelete="CASCADE"), unique=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    sealed_key: Mapped[str] = mapped_column(Text)              # PKCS#8 DER, sealed under mailbox:<id>
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class InboundResult(Base):
    __tablename__ = "smime_inbound_results"
    __table_args__ = (
        UniqueConstraint("queue_id", "mailbox_id", name="uq_smime_inbound_results_queue_mailbox"),
        Index("ix_smime_inbound_results_mailbox", "mailbox_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue_id: Mapped[str] = mapped_column(String(32))
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))            # RFC 7281: pass fail policy neutral permerror none
    summary: Mapped[str] = mapped_column(Text)                 # the Authentication-Results resinfo
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    signer: Mapped[str | None] = mapped_column(String(320))
    decrypted_blob_id: Mapped[str | None] = mapped_column(String(32))  # blob of mailbox:<id>, plaintext content
    decrypted_size: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


@dataclass(frozen=True)
class PartyPolicy:
    """The resolved policy of one address."""

    sign: Requirement
    encrypt: Requirement
    sign_source: str     # "mailbox", "domain" or "default": where each came from (for the CLI and refusals)
    encrypt_source: str

    @property
    def source(self) -> str:
        if self.sign_source == self.encrypt_source:
            return self.sign_source
        return f"sign from {self.sign_source}, encrypt from {self.encrypt_source}"


@dataclass(frozen=True)
class PolicyDefaults:
    sign: Requirement
    encrypt: Requirement


def resolve(address: str, rows: dict[tuple[str, str], SmimePolicyRow], defaults: PolicyDefaults) -> PartyPolicy:
    """Mailbox row, then domain row, then the defaults; each of sign and encrypt resolved separately."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    layers = [(scope, rows.get((scope.value, target))) for scope, target in
              ((PolicyScope.MAILBOX, address), (PolicyScope.DOMAIN, domain))]

    def pick(attribute: str, default: Requirement) -> tuple[Requirement, str]:
        for scope, row in layers:
            value = getattr(row, attribute) if row is not None else None
            if value is not None:
                return Requirement(value), scope.value
        return default, "default"

    sign, sign_source = pick("sign", defaults.sign)
    encrypt, encrypt_source = pick("encrypt", defaults.encrypt)
    return PartyPolicy(sign, encrypt, sign_source, encrypt_source)


def stricter(first: Requirement, second: Requirement) -> Requirement:
    return first if first.strength >= second.strength else second
