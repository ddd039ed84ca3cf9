"""Database tables (SQLAlchemy 2 declarative).

Every schema change goes through an Alembic revision in ``migrations/versions``;
the models here and the latest revision must describe the same schema (a test
compares them).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from gateway.directory.search import SEARCH_NAME_LENGTH, organisation_search, patient_search, professional_search

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on both databases.

    SQLite stores no zone and hands back naive values; PostgreSQL keeps it.
    Values are written in UTC and always read back as aware UTC datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: gateway timestamps are timezone-aware")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


def _search_name_column() -> Mapped[str]:
    """The folded, indexed name (gateway.directory.search); "C" collation on PostgreSQL so a prefix is a range."""
    column_type = String(SEARCH_NAME_LENGTH).with_variant(String(SEARCH_NAME_LENGTH, collation="C"), "postgresql")
    return mapped_column(column_type, default="", server_default="", index=True)


def _search_text_column() -> Mapped[str]:
    """Every searchable field folded and joined, for substring search."""
    return mapped_column(Text, default="", server_default="")


class MailboxType(str, enum.Enum):
    """ANS mailbox types (PER, ORG, APP, CAB) plus patient mailboxes of Mon espace santé."""

    PER = "PER"
    ORG = "ORG"
    APP = "APP"
    CAB = "CAB"
    PAT = "PAT"


class State(str, enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"


class PatientState(str, enum.Enum):
    ACTIVE = "active"
    OPPOSED = "opposed"
    CLOSED = "closed"


class DomainKind(str, enum.Enum):
    PROFESSIONAL = "professional"
    PATIENT = "patient"


class Organisation(Timestamped, Base):
    """A legal entity or site: hospital, laboratory, practice. Keyed by its IDNST."""

    __tablename__ = "organisations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idnst: Mapped[str] = mapped_column(String(32), unique=True)
    id_type: Mapped[str] = mapped_column(String(16))  # FINESS, SIRET, SIREN, RPPS_RANG, ADELI_RANG
    id_value: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    trade_name: Mapped[str | None] = mapped_column(String(256))
    address: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    postal_code: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=State.ACTIVE.value)
    search_name: Mapped[str] = _search_name_column()
    search_text: Mapped[str] = _search_text_column()

    members: Mapped[list["ProfessionalOrganisation"]] = relationship(back_populates="organisation")


class Professional(Timestamped, Base):
    """A health professional, keyed by the national id IDNPS (type prefix + RPPS or ADELI)."""

    __tablename__ = "professionals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idnps: Mapped[str] = mapped_column(String(32), unique=True)
    id_type: Mapped[str] = mapped_column(String(8))  # RPPS or ADELI
    id_value: Mapped[str] = mapped_column(String(16))
    civility: Mapped[str | None] = mapped_column(String(16))
    family_name: Mapped[str] = mapped_column(String(128))
    given_name: Mapped[str | None] = mapped_column(String(128))
    profession_code: Mapped[str] = mapped_column(String(8))
    profession_label: Mapped[str] = mapped_column(String(128))
    category_code: Mapped[str | None] = mapped_column(String(8))
    category_label: Mapped[str | None] = mapped_column(String(128))
    savoir_faire_code: Mapped[str | None] = mapped_column(String(16))
    savoir_faire_label: Mapped[str | None] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default=State.ACTIVE.value)
    search_name: Mapped[str] = _search_name_column()
    search_text: Mapped[str] = _search_text_column()

    organisations: Mapped[list["ProfessionalOrganisation"]] = relationship(back_populates="professional")


class ProfessionalOrganisation(Base):
    """Where a professional practises (an activity), with the service they belong to there."""

    __tablename__ = "professional_organisations"
    __table_args__ = (UniqueConstraint("professional_id", "organisation_id", name="uq_professional_organisations_activity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    professional_id: Mapped[int] = mapped_column(ForeignKey("professionals.id", ondelete="CASCADE"))
    organisation_id: Mapped[int] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    role: Mapped[str | None] = mapped_column(String(128))

    professional: Mapped[Professional] = relationship(back_populates="organisations")
    organisation: Mapped[Organisation] = relationship(back_populates="members")


class Patient(Timestamped, Base):
    """An insured person identified by their INS (NIR or NIA with its OID) and identity traits."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("ins", "ins_oid", name="uq_patients_ins"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ins: Mapped[str] = mapped_column(String(15))
    ins_oid: Mapped[str] = mapped_column(String(32))
    birth_family_name: Mapped[str] = mapped_column(String(128))
    first_given_name: Mapped[str] = mapped_column(String(128))
    given_names: Mapped[str | None] = mapped_column(String(256))
    used_family_name: Mapped[str | None] = mapped_column(String(128))
    birth_date: Mapped[dt.date] = mapped_column(Date)
    sex: Mapped[str] = mapped_column(String(1))  # M, F, I (RNIV "indéterminé")
    birthplace_code: Mapped[str | None] = mapped_column(String(5))  # INSEE COG code
    state: Mapped[str] = mapped_column(String(16), default=PatientState.ACTIVE.value)
    state_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    search_name: Mapped[str] = _search_name_column()
    search_text: Mapped[str] = _search_text_column()


class LocalDomain(Timestamped, Base):
    """A domain this gateway hosts. Names are stored as lower-case A-labels (IDNA)."""

    __tablename__ = "local_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default=DomainKind.PROFESSIONAL.value)


class TrustedDomain(Timestamped, Base):
    """A remote operator's domain on the trust list (ANS whitelist or added by hand)."""

    __tablename__ = "trusted_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    operator: Mapped[str | None] = mapped_column(String(256))
    since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(16), default="manual")  # manual | whitelist


class Mailbox(Timestamped, Base):
    """A mailbox address with its owner. Address and type never change once created.

    A mailbox in a local domain is hosted here (it has credentials and a store);
    one in a trusted remote domain is a directory entry of another operator,
    imported from the national directory.
    """

    __tablename__ = "mailboxes"
    __table_args__ = (
        CheckConstraint(
            "(type IN ('PER','CAB') AND professional_id IS NOT NULL)"
            " OR (type IN ('ORG','APP') AND organisation_id IS NOT NULL)"
            " OR (type = 'PAT' AND patient_id IS NOT NULL)",
            name="owner_matches_type",
        ),
        Index("ix_mailboxes_domain", "domain"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain: Mapped[str] = mapped_column(String(253))
    type: Mapped[str] = mapped_column(String(3))
    hosted: Mapped[bool] = mapped_column(Boolean, default=True)
    professional_id: Mapped[int | None] = mapped_column(ForeignKey("professionals.id", ondelete="RESTRICT"), index=True)
    organisation_id: Mapped[int | None] = mapped_column(ForeignKey("organisations.id", ondelete="RESTRICT"), index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"), index=True)
    display_name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    service: Mapped[str | None] = mapped_column(String(256))  # service de rattachement
    liste_rouge: Mapped[bool] = mapped_column(Boolean, default=False)
    preferred: Mapped[bool] = mapped_column(Boolean, default=False)
    dematerialisation: Mapped[bool] = mapped_column(Boolean, default=False)
    quota_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default=State.ACTIVE.value)
    password_hash: Mapped[str | None] = mapped_column(String(256))
    password_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # BLAKE2b-64 of the ANS extraction line this mailbox was last imported from (signed): an
    # unchanged line is recognised on re-import without validation. NULL = validate again.
    source_digest: Mapped[int | None] = mapped_column(BigInteger)

    professional: Mapped[Professional | None] = relationship()
    organisation: Mapped[Organisation | None] = relationship()
    patient: Mapped[Patient | None] = relationship()
    delegations: Mapped[list["Delegation"]] = relationship(
        foreign_keys="Delegation.mailbox_id", back_populates="mailbox", cascade="all, delete-orphan"
    )


class Delegation(Base):
    """Grants the account of ``delegate`` rights on ``mailbox`` (read, send as, manage)."""

    __tablename__ = "delegations"
    __table_args__ = (UniqueConstraint("mailbox_id", "delegate_id", name="uq_delegations_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    delegate_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    rights: Mapped[str] = mapped_column(String(64))  # comma-separated: read,send,manage
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

    mailbox: Mapped[Mailbox] = relationship(foreign_keys=[mailbox_id], back_populates="delegations")
    delegate: Mapped[Mailbox] = relationship(foreign_keys=[delegate_id])


class Certificate(Timestamped, Base):
    """An X.509 certificate bound to a mailbox: S/MIME, or a client certificate to log in with."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    usage: Mapped[str] = mapped_column(String(16))  # smime | auth
    subject: Mapped[str] = mapped_column(String(512))
    issuer: Mapped[str] = mapped_column(String(512))
    serial: Mapped[str] = mapped_column(String(64))
    fingerprint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    pem: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


# --------------------------------------------------------------------------- search columns
# Every ORM insert or update of a searchable row refreshes its folded search columns
# (the bulk ANS import, which writes with Core statements, fills them itself).


@event.listens_for(Organisation, "before_insert")
@event.listens_for(Organisation, "before_update")
def _organisation_search(mapper: Any, connection: Any, row: Organisation) -> None:
    for key, value in organisation_search(row.name, row.trade_name, row.idnst).items():
        setattr(row, key, value)


@event.listens_for(Professional, "before_insert")
@event.listens_for(Professional, "before_update")
def _professional_search(mapper: Any, connection: Any, row: Professional) -> None:
    for key, value in professional_search(row.family_name, row.given_name, row.idnps, row.profession_label).items():
        setattr(row, key, value)


@event.listens_for(Patient, "before_insert")
@event.listens_for(Patient, "before_update")
def _patient_search(mapper: Any, connection: Any, row: Patient) -> None:
    for key, value in patient_search(row.birth_family_name, row.first_given_name, row.used_family_name,
                                     row.given_names, row.ins).items():
        setattr(row, key, value)
