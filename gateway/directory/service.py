"""The directory service: who exists, what they own, and where an address routes.

Every front end (CLI, SMTP, IMAP, webmail, FHIR API) asks this service; none
holds directory SQL of its own. Rules enforced here, once:
- a hosted mailbox lives in a local domain; a directory entry of another
  operator lives in a trusted domain; any other domain is refused;
- address and type are fixed once a mailbox exists;
- the owner matches the type (PER/CAB: professional, ORG/APP: organisation,
  PAT: patient) and a patient's address is ``<INS>@<patient domain>``;
- identifiers pass their check keys (gateway.directory.identifiers).
"""

from __future__ import annotations

import asyncio

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.directory import identifiers as ids
from gateway.directory.addresses import normalise_address, normalise_domain, split_address
from gateway.directory.professions import profession_label
from gateway.directory.search import fold, prefix_upper_bound
from gateway.errors import Conflict, NotFound, UserError
from gateway.security.passwords import PasswordHasher
from gateway.storage.db import Database
from gateway.storage.models import (
    Certificate,
    Delegation,
    DomainKind,
    LocalDomain,
    Mailbox,
    MailboxType,
    Organisation,
    Patient,
    PatientState,
    Professional,
    ProfessionalOrganisation,
    State,
    TrustedDomain,
    utcnow,
)

RIGHTS = ("read", "send", "manage")
OWNER_KIND = {"PER": "professional", "CAB": "professional", "ORG": "organisation", "APP": "organisation", "PAT": "patient"}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Account:
    """An authenticated login: a hosted mailbox and what it may act as."""

    mailbox_id: int
    address: str
    type: str
    display_name: str | None
    send_as: frozenset[str]
    readable: frozenset[str]

    def may_send_as(self, address: str) -> bool:
        return normalise_address(address) in self.send_as


class RouteRefusal(str, Enum):
    UNKNOWN_MAILBOX = "unknown-mailbox"
    MAILBOX_DISABLED = "mailbox-disabled"
    PATIENT_OPPOSED = "patient-opposed"
    PATIENT_CLOSED = "patient-closed"
    DOMAIN_NOT_TRUSTED = "domain-not-trusted"
    MALFORMED = "malformed-address"


@dataclass(frozen=True)
class LocalRoute:
    mailbox_id: int
    address: str
    type: str


@dataclass(frozen=True)
class RemoteRoute:
    address: str
    domain: str


@dataclass(frozen=True)
class RefusedRoute:
    address: str
    reason: RouteRefusal
    text: str


Route = LocalRoute | RemoteRoute | RefusedRoute


# --------------------------------------------------------------------------- helpers


def _parse_date(value: str | dt.date | None, field: str) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{value!r} is not a date (YYYY-MM-DD)", field=field) from None


def _parse_time(value: str | dt.datetime | None, field: str) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{value!r} is not a date or date-time (ISO 8601)", field=field) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _require(value: str | None, field: str) -> str:
    if value is None or not str(value).strip():
        raise UserError("is required", field=field)
    return str(value).strip()


def _clean(value: str | None) -> str | None:
    return value.strip() or None if isinstance(value, str) else value


def _parse_rights(rights: Sequence[str]) -> str:
    chosen = sorted({r.strip().lower() for r in rights if r.strip()})
    unknown = [r for r in chosen if r not in RIGHTS]
    if unknown or not chosen:
        raise UserError(f"rights must be among {', '.join(RIGHTS)} (got {', '.join(unknown) or 'none'})", field="rights")
    return ",".join(chosen)


def describe_organisation(org: Organisation) -> dict[str, Any]:
    return {
        "idnst": org.idnst, "id_type": org.id_type, "id_value": org.id_value, "name": org.name,
        "trade_name": org.trade_name, "postal_code": org.postal_code, "address": org.address or {},
        "state": org.state, "created_at": org.created_at, "updated_at": org.updated_at,
    }


def describe_professional(pro: Professional, organisations: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "idnps": pro.idnps, "id_type": pro.id_type, "id_value": pro.id_value, "civility": pro.civility,
        "family_name": pro.family_name, "given_name": pro.given_name,
        "profession_code": pro.profession_code, "profession_label": pro.profession_label,
        "category_code": pro.category_code, "savoir_faire_code": pro.savoir_faire_code,
        "savoir_faire_label": pro.savoir_faire_label, "organisations": list(organisations),
        "state": pro.state, "created_at": pro.created_at, "updated_at": pro.updated_at,
    }


def describe_patient(patient: Patient) -> dict[str, Any]:
    return {
        "ins": patient.ins, "ins_oid": patient.ins_oid, "ins_kind": ids.INS_OIDS.get(patient.ins_oid),
        "birth_family_name": patient.birth_family_name, "first_given_name": patient.first_given_name,
        "given_names": patient.given_names, "used_family_name": patient.used_family_name,
        "birth_date": patient.birth_date, "sex": patient.sex, "birthplace_code": patient.birthplace_code,
        "state": patient.state, "state_changed_at": patient.state_changed_at,
        "created_at": patient.created_at, "updated_at": patient.updated_at,
    }


def describe_certificate(cert: Certificate, address: str) -> dict[str, Any]:
    now = utcnow()
    state = "revoked" if cert.revoked_at else "expired" if cert.not_after < now else "not-yet-valid" if cert.not_before > now else "valid"
    return {
        "mailbox": address, "usage": cert.usage, "subject": cert.subject, "issuer": cert.issuer, "serial": cert.serial,
        "fingerprint_sha256": cert.fingerprint_sha256, "not_before": cert.not_before, "not_after": cert.not_after,
        "state": state,
    }


def describe_mailbox(box: Mailbox, owner: str | None = None, delegates: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    return {
        "address": box.address, "type": box.type, "hosted": box.hosted, "owner": owner,
        "display_name": box.display_name, "description": box.description, "service": box.service,
        "liste_rouge": box.liste_rouge, "preferred": box.preferred, "dematerialisation": box.dematerialisation,
        "quota_mb": box.quota_bytes // (1024 * 1024) if box.quota_bytes else None, "state": box.state,
        "has_password": box.password_hash is not None, "delegates": list(delegates),
        "created_at": box.created_at, "updated_at": box.updated_at,
    }


# --------------------------------------------------------------------------- service


class DirectoryService:
    """Directory operations. Each public method runs in its own transaction."""

    def __init__(self, db: Database, settings: Settings, hasher: PasswordHasher) -> None:
        self.db = db
        self.settings = settings
        self.hasher = hasher

    # ----------------------------------------------------------------- domains

    async def add_local_domain(self, name: str, *, kind: str = DomainKind.PROFESSIONAL.value) -> dict[str, Any]:
        domain = normalise_domain(name, field="name")
        if kind not in {k.value for k in DomainKind}:
            raise UserError(f"{kind!r}: use professional or patient", field="kind")
        async with self.db.session() as s:
            if await s.scalar(select(TrustedDomain).where(TrustedDomain.name == domain)):
                raise Conflict(f"{domain} is on the trust list as another operator's domain; remove it there first", field="name")
            if await s.scalar(select(LocalDomain).where(LocalDomain.name == domain)):
                raise Conflict(f"{domain} is already a local domain", field="name")
            row = LocalDomain(name=domain, kind=kind)
            s.add(row)
        return {"name": domain, "kind": kind}

    async def ensure_local_domain(self, name: str, *, kind: str) -> None:
        domain = normalise_domain(name)
        async with self.db.session() as s:
            if not await s.scalar(select(LocalDomain).where(LocalDomain.name == domain)):
                s.add(LocalDomain(name=domain, kind=kind))

    async def remove_local_domain(self, name: str) -> None:
        domain = normalise_domain(name, field="name")
        async with self.db.session() as s:
            row = await s.scalar(select(LocalDomain).where(LocalDomain.name == domain))
            if row is None:
                raise NotFound(f"{domain} is not a local domain", field="name")
            count = await s.scalar(select(func.count()).select_from(Mailbox).where(Mailbox.domain == domain))
            if count:
                raise Conflict(f"{domain} still has {count} mailboxes; disable or move them first", field="name")
            await s.delete(row)

    async def list_local_domains(self) -> list[dict[str, Any]]:
        async with self.db.session() as s:
            counts = dict((await s.execute(select(Mailbox.domain, func.count()).group_by(Mailbox.domain))).all())
            rows = (await s.scalars(select(LocalDomain).order_by(LocalDomain.name))).all()
            return [{"name": r.name, "kind": r.kind, "mailboxes": counts.get(r.name, 0), "created_at": r.created_at} for r in rows]

    async def trust_domain(self, name: str, *, operator: str | None = None, since: str | dt.datetime | None = None,
                           until: str | dt.datetime | None = None) -> dict[str, Any]:
        domain = normalise_domain(name, field="name")
        since_at, until_at = _parse_time(since, "since"), _parse_time(until, "until")
        if since_at and until_at and until_at <= since_at:
            raise UserError("must be after --since", field="until")
        async with self.db.session() as s:
            if await s.scalar(select(LocalDomain).where(LocalDomain.name == domain)):
                raise Conflict(f"{domain} is one of our local domains, not a remote operator's", field="name")
            row = await s.scalar(select(TrustedDomain).where(TrustedDomain.name == domain))
            if row is None:
                row = TrustedDomain(name=domain, source="manual")
                s.add(row)
            row.operator = _clean(operator) or row.operator
            row.since = since_at or row.since or utcnow()
            row.until = until_at
            return {"name": domain, "operator": row.operator, "since": row.since, "until": row.until, "source": row.source}

    async def untrust_domain(self, name: str) -> None:
        domain = normalise_domain(name, field="name")
        async with self.db.session() as s:
            row = await s.scalar(select(TrustedDomain).where(TrustedDomain.name == domain))
            if row is None:
                raise NotFound(f"{domain} is not on the trust list", field="name")
            await s.delete(row)

    async def list_trusted_domains(self) -> list[dict[str, Any]]:
        now = utcnow()
        async with self.db.session() as s:
            rows = (await s.scalars(select(TrustedDomain).order_by(TrustedDomain.name))).all()
            return [{"name": r.name, "operator": r.operator, "source": r.source, "since": r.since, "until": r.until,
                     "active": _trusted_now(r, now)} for r in rows]

    async def is_local_domain(self, domain: str) -> bool:
        async with self.db.session() as s:
            return await _is_local(s, normalise_domain(domain))

    async def is_trusted_domain(self, domain: str) -> bool:
        async with self.db.session() as s:
            return await _is_trusted(s, normalise_domain(domain))

    # ----------------------------------------------------------------- organisations

    async def add_organisation(self, *, idnst: str | None = None, id_type: str | None = None, id_value: str | None = None,
                               name: str, trade_name: str | None = None, postal_code: str | None = None,
                               address: dict[str, str] | None = None) -> dict[str, Any]:
        structure = ids.parse_idnst(idnst) if idnst else ids.make_idnst(_require(id_type, "id_type"), _require(id_value, "id_value"))
        async with self.db.session() as s:
            if await s.scalar(select(Organisation).where(Organisation.idnst == structure.idnst)):
                raise Conflict(f"an organisation with IDNST {structure.idnst} exists already", field="idnst")
            org = Organisation(idnst=structure.idnst, id_type=structure.id_type, id_value=structure.id_value,
                               name=_require(name, "name"), trade_name=_clean(trade_name), postal_code=_clean(postal_code),
                               address=address or {}, state=State.ACTIVE.value)
            s.add(org)
            await s.flush()
            return describe_organisation(org)

    async def update_organisation(self, idnst: str, /, **changes: Any) -> dict[str, Any]:
        allowed = {"name", "trade_name", "postal_code", "address", "state"}
        async with self.db.session() as s:
            org = await self._organisation(s, idnst)
            for key, value in _changes(changes, allowed, fixed={"idnst", "id_type", "id_value"}).items():
                if key == "state":
                    value = _state(value)
                if key == "name":
                    value = _require(value, "name")
                setattr(org, key, value)
            await _forget_import_sources(s, Mailbox.organisation_id == org.id)
            await s.flush()
            return describe_organisation(org)

    async def show_organisation(self, idnst: str) -> dict[str, Any]:
        async with self.db.session() as s:
            org = await self._organisation(s, idnst)
            record = describe_organisation(org)
            record["mailboxes"] = list((await s.scalars(select(Mailbox.address).where(Mailbox.organisation_id == org.id).order_by(Mailbox.address))).all())
            return record

    async def list_organisations(self, *, query: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        async with self.db.session() as s:
            if query:
                found: Sequence[Any] = await _search(s, Organisation, query, limit)
            else:
                found = (await s.scalars(select(Organisation).order_by(Organisation.name).limit(limit))).all()
            return [describe_organisation(o) for o in found]

    # ----------------------------------------------------------------- professionals

    async def add_professional(self, *, idnps: str | None = None, id_type: str | None = None, id_value: str | None = None,
                               family_name: str, given_name: str | None = None, civility: str | None = None,
                               profession_code: str, category_code: str | None = None,
                               savoir_faire_code: str | None = None, savoir_faire_label: str | None = None,
                               organisations: Sequence[str] = ()) -> dict[str, Any]:
        person = ids.parse_idnps(idnps) if idnps else ids.make_idnps(_require(id_type, "id_type"), _require(id_value, "id_value"))
        label = profession_label(_require(profession_code, "profession_code"))
        async with self.db.session() as s:
            if await s.scalar(select(Professional).where(Professional.idnps == person.idnps)):
                raise Conflict(f"a professional with IDNPS {person.idnps} exists already", field="idnps")
            pro = Professional(idnps=person.idnps, id_type=person.id_type, id_value=person.id_value,
                               family_name=_require(family_name, "family_name"), given_name=_clean(given_name),
                               civility=_clean(civility), profession_code=profession_code.strip(), profession_label=label,
                               category_code=_clean(category_code), savoir_faire_code=_clean(savoir_faire_code),
                               savoir_faire_label=_clean(savoir_faire_label), state=State.ACTIVE.value)
            s.add(pro)
            await s.flush()
            for idnst in organisations:
                org = await self._organisation(s, idnst)
                s.add(ProfessionalOrganisation(professional_id=pro.id, organisation_id=org.id))
            return describe_professional(pro, list(organisations))

    async def update_professional(self, idnps: str, /, **changes: Any) -> dict[str, Any]:
        allowed = {"family_name", "given_name", "civility", "profession_code", "category_code",
                   "savoir_faire_code", "savoir_faire_label", "state", "add_organisation", "remove_organisation"}
        async with self.db.session() as s:
            pro = await self._professional(s, idnps)
            for key, value in _changes(changes, allowed, fixed={"idnps", "id_type", "id_value"}).items():
                if key == "profession_code":
                    pro.profession_label = profession_label(value)
                if key == "add_organisation":
                    org = await self._organisation(s, value)
                    if not await s.scalar(select(ProfessionalOrganisation).where(
                            ProfessionalOrganisation.professional_id == pro.id, ProfessionalOrganisation.organisation_id == org.id)):
                        s.add(ProfessionalOrganisation(professional_id=pro.id, organisation_id=org.id))
                    continue
                if key == "remove_organisation":
                    org = await self._organisation(s, value)
                    link = await s.scalar(select(ProfessionalOrganisation).where(
                        ProfessionalOrganisation.professional_id == pro.id, ProfessionalOrganisation.organisation_id == org.id))
                    if link is None:
                        raise NotFound(f"{pro.idnps} does not practise at {org.idnst}", field="remove_organisation")
                    await s.delete(link)
                    continue
                if key == "state":
                    value = _state(value)
                if key == "family_name":
                    value = _require(value, "family_name")
                setattr(pro, key, value)
            await _forget_import_sources(s, Mailbox.professional_id == pro.id)
            await s.flush()
            return describe_professional(pro, await self._organisations_of(s, pro.id))

    async def show_professional(self, idnps: str) -> dict[str, Any]:
        async with self.db.session() as s:
            pro = await self._professional(s, idnps)
            record = describe_professional(pro, await self._organisations_of(s, pro.id))
            record["mailboxes"] = list((await s.scalars(select(Mailbox.address).where(Mailbox.professional_id == pro.id).order_by(Mailbox.address))).all())
            return record

    async def list_professionals(self, *, query: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        async with self.db.session() as s:
            if query:
                found: Sequence[Any] = await _search(s, Professional, query, limit)
            else:
                found = (await s.scalars(select(Professional).order_by(Professional.family_name, Professional.given_name)
                                         .limit(limit))).all()
            return [describe_professional(p) for p in found]

    # ----------------------------------------------------------------- patients

    async def add_patient(self, *, ins: str, ins_oid: str, birth_family_name: str, first_given_name: str,
                          birth_date: str | dt.date, sex: str, given_names: str | None = None,
                          used_family_name: str | None = None, birthplace_code: str | None = None,
                          with_mailbox: bool = True, password: str | None = None) -> dict[str, Any]:
        nir = ids.validate_nir(ins, field="ins")
        oid = ids.validate_ins_oid(ins_oid, accept_production=self.settings.directory.accept_production_ins)
        sex_code = _sex(sex)
        born = _parse_date(birth_date, "birth_date")
        if born is None or born > dt.date.today():
            raise UserError("must be a past date (YYYY-MM-DD)", field="birth_date")
        if birthplace_code and not (len(birthplace_code) == 5 and birthplace_code[:2].isalnum() and birthplace_code[2:].isdigit()):
            raise UserError(f"{birthplace_code!r} is not an INSEE place code (5 characters, e.g. 75056 or 2A004)", field="birthplace_code")
        async with self.db.session() as s:
            if await s.scalar(select(Patient).where(Patient.ins == nir, Patient.ins_oid == oid)):
                raise Conflict(f"a patient with INS {nir} ({oid}) exists already", field="ins")
            patient = Patient(ins=nir, ins_oid=oid, birth_family_name=_require(birth_family_name, "birth_family_name").upper(),
                              first_given_name=_require(first_given_name, "first_given_name"), given_names=_clean(given_names),
                              used_family_name=_clean(used_family_name), birth_date=born, sex=sex_code,
                              birthplace_code=_clean(birthplace_code), state=PatientState.ACTIVE.value)
            s.add(patient)
            await s.flush()
            record = describe_patient(patient)
        if with_mailbox:
            box = await self.create_mailbox(address=None, type="PAT", owner=nir, password=password,
                                            display_name=f"{first_given_name} {birth_family_name.upper()}")
            record["mailbox"] = box["address"]
        return record

    async def update_patient(self, ins: str, /, **changes: Any) -> dict[str, Any]:
        allowed = {"birth_family_name", "first_given_name", "given_names", "used_family_name", "birth_date",
                   "sex", "birthplace_code", "state"}
        async with self.db.session() as s:
            patient = await self._patient(s, ins)
            for key, value in _changes(changes, allowed, fixed={"ins", "ins_oid"}).items():
                if key == "state":
                    if value not in {p.value for p in PatientState}:
                        raise UserError(f"{value!r}: use active, opposed or closed", field="state")
                    patient.state_changed_at = utcnow()
                elif key == "sex":
                    value = _sex(value)
                elif key == "birth_date":
                    value = _parse_date(value, "birth_date")
                elif key in ("birth_family_name", "first_given_name"):
                    value = _require(value, key)
                setattr(patient, key, value)
            await s.flush()
            return describe_patient(patient)

    async def show_patient(self, ins: str) -> dict[str, Any]:
        async with self.db.session() as s:
            patient = await self._patient(s, ins)
            record = describe_patient(patient)
            record["mailboxes"] = list((await s.scalars(select(Mailbox.address).where(Mailbox.patient_id == patient.id))).all())
            return record

    async def list_patients(self, *, query: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        async with self.db.session() as s:
            if query:
                found: Sequence[Any] = await _search(s, Patient, query, limit)
            else:
                found = (await s.scalars(select(Patient).order_by(Patient.birth_family_name, Patient.first_given_name)
                                         .limit(limit))).all()
            return [describe_patient(p) for p in found]

    # ----------------------------------------------------------------- every kind at once

    async def search_everything(self, query: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """Organisations, professionals and patients matching ``query`` (each record with its ``kind``)."""
        found: list[dict[str, Any]] = []
        for kind, lister in (("organisation", self.list_organisations), ("professional", self.list_professionals),
                             ("patient", self.list_patients)):
            found += [{"kind": kind, **record} for record in await lister(query=query, limit=limit)]
        return found

    async def show_any(self, key: str) -> dict[str, Any]:
        """The one organisation (IDNST), professional (IDNPS) or patient (INS) with this key, with its ``kind``."""
        found: list[dict[str, Any]] = []
        for kind, getter in (("organisation", self.show_organisation), ("professional", self.show_professional),
                             ("patient", self.show_patient)):
            try:
                found.append({"kind": kind, **await getter(key)})
            except NotFound:
                continue
        if not found:
            raise NotFound(f"no organisation (IDNST), professional (IDNPS) or patient (INS) with key {key}", field="key")
        if len(found) > 1:
            kinds = " and ".join(record["kind"] for record in found)
            raise Conflict(f"{key} names a {kinds}: give the kind, e.g. `directory show {found[0]['kind']} {key}`", field="key")
        return found[0]

    # ----------------------------------------------------------------- mailboxes

    async def create_mailbox(self, *, address: str | None, type: str, owner: str, display_name: str | None = None,
                             description: str | None = None, service: str | None = None, quota_mb: int | None = None,
                             liste_rouge: bool = False, preferred: bool = False, password: str | None = None) -> dict[str, Any]:
        box_type = type.strip().upper()
        if box_type not in {t.value for t in MailboxType}:
            raise UserError(f"{type!r}: use PER, ORG, APP, CAB or PAT", field="type")
        if password is not None:
            self.hasher.check_policy(password, self.settings.auth.min_password_length)
        async with self.db.session() as s:
            box = Mailbox(type=box_type, display_name=_clean(display_name), description=_clean(description),
                          service=_clean(service), liste_rouge=liste_rouge, preferred=preferred, state=State.ACTIVE.value)
            owner_label = await self._attach_owner(s, box, box_type, owner)
            if box_type == "PAT":
                patient_domain = normalise_domain(self.settings.directory.patient_domain)
                expected = f"{owner_label.lower()}@{patient_domain}"
                if address is not None and normalise_address(address) != expected:
                    raise UserError(f"a patient's address is its INS at the patient domain: {expected}", field="address")
                address = expected
            canonical = normalise_address(_require(address, "address"))
            domain = canonical.split("@", 1)[1]
            if await s.scalar(select(Mailbox.id).where(Mailbox.address == canonical)):
                raise Conflict(f"{canonical} exists already", field="address")
            if await _is_local(s, domain):
                box.hosted = True
            elif await _is_trusted(s, domain):
                box.hosted = False
                if password is not None:
                    raise UserError(f"{domain} belongs to another operator: its mailboxes have no credentials here", field="password")
            else:
                raise UserError(f"{domain} is neither one of our domains nor on the trust list", field="address")
            box.address, box.domain = canonical, domain
            box.quota_bytes = (quota_mb or self.settings.directory.default_quota_mb) * 1024 * 1024 if box.hosted else 0
            if password is not None:
                box.password_hash = self.hasher.hash(password)
                box.password_changed_at = utcnow()
            s.add(box)
            await s.flush()
            return describe_mailbox(box, owner_label)

    async def update_mailbox(self, address: str, /, **changes: Any) -> dict[str, Any]:
        allowed = {"display_name", "description", "service", "liste_rouge", "preferred", "quota_mb", "state"}
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            for key, value in _changes(changes, allowed, fixed={"address", "type", "owner"}).items():
                if key == "quota_mb":
                    if int(value) < 1:
                        raise UserError("must be at least 1", field="quota_mb")
                    box.quota_bytes = int(value) * 1024 * 1024
                    continue
                if key == "state":
                    value = _state(value)
                setattr(box, key, value)
            box.source_digest = None
            await s.flush()
            return await self._describe_mailbox(s, box)

    async def set_password(self, address: str, password: str) -> None:
        self.hasher.check_policy(password, self.settings.auth.min_password_length)
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            if not box.hosted:
                raise UserError(f"{box.address} is another operator's mailbox: no credentials here", field="address")
            box.password_hash = self.hasher.hash(password)
            box.password_changed_at = utcnow()

    async def delegate(self, address: str, delegate_address: str, rights: Sequence[str]) -> dict[str, Any]:
        rights_value = _parse_rights(rights)
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            delegate = await self._mailbox(s, delegate_address, field="delegate")
            if box.id == delegate.id:
                raise UserError("a mailbox cannot be delegated to itself", field="delegate")
            if not (box.hosted and delegate.hosted):
                raise UserError("delegation is between mailboxes hosted here", field="delegate")
            if box.type == "PAT" or delegate.type == "PAT":
                raise UserError("patient mailboxes cannot be delegated", field="delegate")
            row = await s.scalar(select(Delegation).where(Delegation.mailbox_id == box.id, Delegation.delegate_id == delegate.id))
            if row is None:
                row = Delegation(mailbox_id=box.id, delegate_id=delegate.id, rights=rights_value)
                s.add(row)
            row.rights = rights_value
            return {"mailbox": box.address, "delegate": delegate.address, "rights": rights_value.split(",")}

    async def revoke_delegation(self, address: str, delegate_address: str) -> None:
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            delegate = await self._mailbox(s, delegate_address, field="delegate")
            row = await s.scalar(select(Delegation).where(Delegation.mailbox_id == box.id, Delegation.delegate_id == delegate.id))
            if row is None:
                raise NotFound(f"{delegate.address} has no delegation on {box.address}", field="delegate")
            await s.delete(row)

    async def show_mailbox(self, address: str) -> dict[str, Any]:
        async with self.db.session() as s:
            return await self._describe_mailbox(s, await self._mailbox(s, address))

    async def list_mailboxes(self, *, query: str | None = None, domain: str | None = None, type: str | None = None,
                             hosted: bool | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        stmt = select(Mailbox).order_by(Mailbox.address).limit(limit)
        if query:
            like = f"%{query.lower()}%"
            stmt = stmt.where(or_(Mailbox.address.like(like), func.lower(func.coalesce(Mailbox.display_name, "")).like(like)))
        if domain:
            stmt = stmt.where(Mailbox.domain == normalise_domain(domain))
        if type:
            stmt = stmt.where(Mailbox.type == type.upper())
        if hosted is not None:
            stmt = stmt.where(Mailbox.hosted == hosted)
        async with self.db.session() as s:
            return [describe_mailbox(b) for b in (await s.scalars(stmt)).all()]

    async def register_certificate(self, address: str, pem: str | bytes, *, usage: str) -> dict[str, Any]:
        """Bind a certificate to a hosted mailbox: ``auth`` (client certificate login) or ``smime``."""
        if usage not in ("auth", "smime"):
            raise UserError(f"{usage!r}: use auth or smime", field="usage")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
        except ValueError as exc:
            raise UserError(f"not a PEM certificate: {exc}", field="certificate") from None
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            if await s.scalar(select(Certificate.id).where(Certificate.fingerprint_sha256 == fingerprint)):
                raise Conflict(f"certificate {fingerprint[:16]}... is registered already", field="certificate")
            row = Certificate(mailbox_id=box.id, usage=usage, subject=cert.subject.rfc4514_string(),
                              issuer=cert.issuer.rfc4514_string(), serial=format(cert.serial_number, "x"),
                              fingerprint_sha256=fingerprint, not_before=cert.not_valid_before_utc,
                              not_after=cert.not_valid_after_utc,
                              pem=cert.public_bytes(serialization.Encoding.PEM).decode())
            s.add(row)
            await s.flush()
            return describe_certificate(row, box.address)

    async def list_certificates(self, address: str) -> list[dict[str, Any]]:
        async with self.db.session() as s:
            box = await self._mailbox(s, address)
            rows = (await s.scalars(select(Certificate).where(Certificate.mailbox_id == box.id).order_by(Certificate.not_after))).all()
            return [describe_certificate(r, box.address) for r in rows]

    # ----------------------------------------------------------------- authentication and routing

    async def authenticate(self, login: str, password: str) -> Account | None:
        """The account for ``login``/``password``, or None. Never says which half was wrong."""
        try:
            address = normalise_address(login)
        except UserError:
            return None
        async with self.db.session() as s:
            box = await s.scalar(select(Mailbox).where(Mailbox.address == address))
            stored = box.password_hash if box is not None else None
            usable = box is not None and stored is not None and box.hosted and box.state == State.ACTIVE.value
        # argon2id takes ~30 ms of CPU and releases the GIL: verified in a worker thread, outside any
        # database session (on PostgreSQL a pooled connection would be held for the whole verification),
        # so that every other session of the event loop keeps being served meanwhile.
        if not usable or stored is None:
            await asyncio.to_thread(self.hasher.verify, None, password)  # same cost either way: no enumeration
            return None
        if not await asyncio.to_thread(self.hasher.verify, stored, password):
            return None
        rehashed = await asyncio.to_thread(self.hasher.hash, password) if self.hasher.needs_rehash(stored) else None
        async with self.db.session() as s:
            box = await s.scalar(select(Mailbox).where(Mailbox.address == address))
            # What was verified must still be the mailbox's password and state (changed meanwhile: refused).
            if (box is None or box.password_hash != stored or not box.hosted
                    or box.state != State.ACTIVE.value):
                return None
            if rehashed is not None:
                box.password_hash = rehashed
            if box.type == "PAT" and not await self._patient_active(s, box):
                return None
            return await self._account(s, box)

    async def account_for_certificate(self, fingerprint_sha256: str) -> Account | None:
        """The account bound to a client certificate (SASL EXTERNAL), if valid now."""
        now = utcnow()
        async with self.db.session() as s:
            cert = await s.scalar(select(Certificate).where(
                Certificate.fingerprint_sha256 == fingerprint_sha256.lower().replace(":", ""), Certificate.usage == "auth"))
            if cert is None or cert.revoked_at is not None or not (cert.not_before <= now <= cert.not_after) or cert.mailbox_id is None:
                return None
            box = await s.get(Mailbox, cert.mailbox_id)
            if box is None or box.state != State.ACTIVE.value or not box.hosted:
                return None
            return await self._account(s, box)

    async def account(self, address: str) -> Account | None:
        async with self.db.session() as s:
            box = await s.scalar(select(Mailbox).where(Mailbox.address == normalise_address(address)))
            return await self._account(s, box) if box is not None and box.hosted else None

    async def route_recipient(self, address: str) -> Route:
        """Where mail for ``address`` goes: a hosted mailbox, another trusted operator, or nowhere (and why)."""
        try:
            canonical = normalise_address(address)
        except UserError as exc:
            return RefusedRoute(address, RouteRefusal.MALFORMED, str(exc))
        domain = canonical.split("@", 1)[1]
        # One SQL Core statement on the acceptance hot path (every RCPT): the local domain, the mailbox and
        # its patient's state; no ORM session. A row means the domain is ours.
        mailbox, patient = Mailbox.__table__.c, Patient.__table__.c
        local = (select(LocalDomain.__table__.c.id, mailbox.id.label("mailbox_id"), mailbox.type, mailbox.state,
                        patient.state.label("patient_state"))
                 .select_from(LocalDomain.__table__)
                 .outerjoin(Mailbox.__table__, mailbox.address == canonical)
                 .outerjoin(Patient.__table__, patient.id == mailbox.patient_id)
                 .where(LocalDomain.__table__.c.name == domain).limit(1))
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(local)).first()
            if row is not None:
                return _local_route(canonical, row.mailbox_id, row.type, row.state, row.patient_state)
            trusted = (await conn.execute(select(TrustedDomain.__table__.c.since, TrustedDomain.__table__.c.until)
                                          .where(TrustedDomain.__table__.c.name == domain))).first()
        if trusted is not None and _trusted_between(trusted.since, trusted.until, utcnow()):
            return RemoteRoute(canonical, domain)
        return RefusedRoute(canonical, RouteRefusal.DOMAIN_NOT_TRUSTED, f"{domain} is not in the MSSanté trust space")

    # ----------------------------------------------------------------- internals

    async def _account(self, s: AsyncSession, box: Mailbox) -> Account:
        rows = (await s.execute(select(Mailbox.address, Delegation.rights).join(Delegation, Delegation.mailbox_id == Mailbox.id)
                                .where(Delegation.delegate_id == box.id, Mailbox.state == State.ACTIVE.value))).all()
        send_as = {box.address} | {addr for addr, rights in rows if "send" in rights.split(",")}
        readable = {box.address} | {addr for addr, rights in rows if "read" in rights.split(",")}
        return Account(box.id, box.address, box.type, box.display_name, frozenset(send_as), frozenset(readable))

    async def _patient_active(self, s: AsyncSession, box: Mailbox) -> bool:
        patient = await s.get(Patient, box.patient_id)
        return patient is not None and patient.state == PatientState.ACTIVE.value

    async def _attach_owner(self, s: AsyncSession, box: Mailbox, box_type: str, owner: str) -> str:
        owner = _require(owner, "owner")
        kind = OWNER_KIND[box_type]
        if kind == "professional":
            pro = await self._professional(s, owner, field="owner")
            box.professional_id = pro.id
            return pro.idnps
        if kind == "organisation":
            org = await self._organisation(s, owner, field="owner")
            box.organisation_id = org.id
            return org.idnst
        patient = await self._patient(s, owner, field="owner")
        if patient.state != PatientState.ACTIVE.value:
            raise Conflict(f"patient {patient.ins} is {patient.state}: no mailbox can be opened", field="owner")
        box.patient_id = patient.id
        return patient.ins

    async def _describe_mailbox(self, s: AsyncSession, box: Mailbox) -> dict[str, Any]:
        owner: str | None = None
        if box.professional_id:
            owner = (await s.get(Professional, box.professional_id)).idnps  # type: ignore[union-attr]
        elif box.organisation_id:
            owner = (await s.get(Organisation, box.organisation_id)).idnst  # type: ignore[union-attr]
        elif box.patient_id:
            owner = (await s.get(Patient, box.patient_id)).ins  # type: ignore[union-attr]
        rows = (await s.execute(select(Mailbox.address, Delegation.rights).join(Delegation, Delegation.delegate_id == Mailbox.id)
                                .where(Delegation.mailbox_id == box.id).order_by(Mailbox.address))).all()
        return describe_mailbox(box, owner, [{"delegate": a, "rights": r} for a, r in rows])

    async def _organisations_of(self, s: AsyncSession, professional_id: int) -> list[str]:
        return list((await s.scalars(select(Organisation.idnst).join(ProfessionalOrganisation)
                                     .where(ProfessionalOrganisation.professional_id == professional_id))).all())

    async def _organisation(self, s: AsyncSession, idnst: str, *, field: str = "idnst") -> Organisation:
        org = await s.scalar(select(Organisation).where(Organisation.idnst == idnst.strip()))
        if org is None:
            raise NotFound(f"no organisation with IDNST {idnst}", field=field)
        return org

    async def _professional(self, s: AsyncSession, idnps: str, *, field: str = "idnps") -> Professional:
        pro = await s.scalar(select(Professional).where(Professional.idnps == idnps.strip()))
        if pro is None:
            raise NotFound(f"no professional with IDNPS {idnps}", field=field)
        return pro

    async def _patient(self, s: AsyncSession, ins: str, *, field: str = "ins") -> Patient:
        rows = (await s.scalars(select(Patient).where(Patient.ins == ins.replace(" ", "").upper()))).all()
        if not rows:
            raise NotFound(f"no patient with INS {ins}", field=field)
        if len(rows) > 1:
            raise Conflict(f"INS {ins} exists under several OIDs; name the patient by INS and OID", field=field)
        return rows[0]

    async def _mailbox(self, s: AsyncSession, address: str, *, field: str = "address") -> Mailbox:
        box = await s.scalar(select(Mailbox).where(Mailbox.address == normalise_address(address, field=field)))
        if box is None:
            raise NotFound(f"no mailbox {address}", field=field)
        return box


# --------------------------------------------------------------------------- module helpers


Searchable = Organisation | Professional | Patient


async def _search(s: AsyncSession, model: type[Searchable], query: str, limit: int) -> Sequence[Any]:
    """Rows whose folded name starts with the folded query (index range), then those containing it anywhere.

    Accent- and case-insensitive on every database: both sides are folded by gateway.directory.search.fold.
    """
    folded = fold(query)
    if not folded:
        raise UserError("the search needs at least one letter or digit", field="query")
    name, text = model.search_name, model.search_text
    in_prefix = (name >= folded) & (name < prefix_upper_bound(folded))
    found: list[Any] = list((await s.scalars(select(model).where(in_prefix).order_by(name, model.id).limit(limit))).all())
    if len(found) < limit:
        pattern = "%" + _escape_like(folded) + "%"
        rest = select(model).where(text.like(pattern, escape="\\"), ~in_prefix).order_by(name, model.id)
        found += (await s.scalars(rest.limit(limit - len(found)))).all()
    return found


async def _forget_import_sources(s: AsyncSession, where: Any) -> None:
    """An edit outside the ANS import: the next import validates these mailboxes' lines again
    (and puts the file's values back) instead of taking them as unchanged (ans_import.source_digest)."""
    await s.execute(update(Mailbox).where(where).values(source_digest=None))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def _is_local(s: AsyncSession, domain: str) -> bool:
    return await s.scalar(select(LocalDomain.id).where(LocalDomain.name == domain)) is not None


def _trusted_now(row: TrustedDomain, now: dt.datetime) -> bool:
    return _trusted_between(row.since, row.until, now)


def _trusted_between(since: dt.datetime | None, until: dt.datetime | None, now: dt.datetime) -> bool:
    return (since is None or since <= now) and (until is None or now < until)


def _local_route(address: str, mailbox_id: int | None, mailbox_type: str | None, state: str | None,
                 patient_state: str | None) -> Route:
    """The route to ``address`` in one of our domains, from its mailbox row and its patient's state."""
    if mailbox_id is None or mailbox_type is None:
        return RefusedRoute(address, RouteRefusal.UNKNOWN_MAILBOX, f"no mailbox {address} here")
    if mailbox_type == "PAT" and patient_state == PatientState.OPPOSED.value:
        return RefusedRoute(address, RouteRefusal.PATIENT_OPPOSED, "this patient has opposed their Mon espace santé space")
    if mailbox_type == "PAT" and patient_state == PatientState.CLOSED.value:
        return RefusedRoute(address, RouteRefusal.PATIENT_CLOSED, "this patient has closed their Mon espace santé space")
    if state != State.ACTIVE.value:
        return RefusedRoute(address, RouteRefusal.MAILBOX_DISABLED, f"mailbox {address} is disabled")
    return LocalRoute(mailbox_id, address, mailbox_type)


async def _is_trusted(s: AsyncSession, domain: str) -> bool:
    row = await s.scalar(select(TrustedDomain).where(TrustedDomain.name == domain))
    return row is not None and _trusted_now(row, utcnow())


def _changes(changes: dict[str, Any], allowed: set[str], *, fixed: set[str]) -> dict[str, Any]:
    """Keep the fields actually given; refuse fixed or unknown ones by name."""
    given = {k: v for k, v in changes.items() if v is not None}
    for key in given:
        if key in fixed:
            raise Conflict("is fixed once created", field=key)
        if key not in allowed:
            raise UserError(f"cannot be changed here (changeable: {', '.join(sorted(allowed))})", field=key)
    if not given:
        raise UserError(f"nothing to change (changeable: {', '.join(sorted(allowed))})")
    return given


def _state(value: str) -> str:
    if value not in {s.value for s in State}:
        raise UserError(f"{value!r}: use active or disabled", field="state")
    return value


def _sex(value: str) -> str:
    code = value.strip().upper()[:1]
    if code not in {"M", "F", "I"}:
        raise UserError(f"{value!r}: use M, F or I (indéterminé)", field="sex")
    return code


__all__ = [
    "Account", "DirectoryService", "LocalRoute", "RefusedRoute", "RemoteRoute", "Route", "RouteRefusal",
    "split_address",
]
