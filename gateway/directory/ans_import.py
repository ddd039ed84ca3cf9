"""Import of the public ANS MSSanté directory extraction ("Extraction_Correspondance_MSSante").

The file is text, one header line and 31 ``|``-separated columns per row, in
UTF-8 (other ANS extractions are Windows-1252, so the encoding is detected and
reported). The address is the only key of a row; about 169 addresses of the
real file appear on several rows, and the first row wins.

The import is a set difference: the directory's keys are loaded into memory
once, each batch of rows is compared with them in Python, and only what differs
is written, with bulk INSERT / UPDATE statements. Importing the same file twice
writes nothing the second time, and most of it is not even validated again: each
mailbox keeps the digest of the line it was imported from (``source_digest``), and
a line whose digest is known is taken as unchanged after checking only what lies
outside the line (the domain still trusted, still local or not). Each batch is committed on its own so that a
running gateway is never locked out of the database for the whole import; a
batch that fails leaves the earlier ones in place, and running the import again
completes the work (it is idempotent).

Rules (mssante.md §1.4, §4): only PER and ORG rows; the address's domain is one
of ours or on the trust list; PER rows carry a valid IDNPS and a known
profession code; ORG rows carry a valid structure id; a mailbox's address, type
and owner never change once created.
"""

from __future__ import annotations

import codecs
import gc
import hashlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from gateway.directory.addresses import normalise_address
from gateway.directory.identifiers import StructureId, make_idnps, make_idnst, parse_idnps, parse_idnst
from gateway.directory.professions import CATEGORIES, PROFESSIONS
from gateway.directory.search import organisation_search, professional_search
from gateway.errors import UserError
from gateway.storage.db import Database
from gateway.storage.models import (
    LocalDomain,
    Mailbox,
    Organisation,
    Professional,
    ProfessionalOrganisation,
    TrustedDomain,
)

HEADER: tuple[str, ...] = (
    "Type de BAL", "Adresse BAL", "Type Identifiant PP", "Identifiant PP", "Identification nationale PP",
    "Type identifiant structure", "Identification Structure", "Service de rattachement",
    "Civilité d'exercice", "Nom d'exercice", "Prénom d'exercice", "Catégorie profession",
    "Libellé de catégorie profession", "Code Profession", "Libellé Profession", "Code savoir-faire",
    "Libellé savoir-faire", "Dématérialisation", "Raison Sociale structure BAL",
    "Enseigne commerciale structure BAL", "L2COMPLEMENTLOCALISATION structure BAL",
    "L3COMPLEMENTDISTRIBUTION structure BAL", "L4NUMEROVOIE structure BAL",
    "L4COMPLEMENTNUMEROVOIE structure BAL", "NL4TYPEVOIE structure BAL", "L4LIBELLEVOIE structure BAL",
    "L5LIEUDITMENTION structure BAL", "L6LIGNEACHEMINEMENT structure BAL",
    "Code postal structure BAL", "Département structure BAL", "Pays structure BAL",
)
COLUMN_COUNT = len(HEADER)
SEPARATOR = "|"
# Rows per transaction. Each batch rewrites the pages it touches in the random-order indexes
# (address, IDNPS, folded names) to the WAL and then to the database file: at the national
# size a batch touches most of their leaves whatever its size, so fewer, larger batches write
# less (5,000 -> 20,000 rows: half the WAL, about a tenth less CPU). But a running gateway waits
# for the write lock while a batch is written (SQLite's busy_timeout is 10 s), and that wait
# grows with the batch (ImportReport.longest_batch_seconds): 10,000 is the middle ground.
DEFAULT_BATCH_SIZE = 10000
IMPORTED_TYPES = ("PER", "ORG")

# Postal address columns of the structure -> keys of Organisation.address.
_ADDRESS_COLUMNS: dict[str, str] = {
    "L2COMPLEMENTLOCALISATION structure BAL": "complement_localisation",
    "L3COMPLEMENTDISTRIBUTION structure BAL": "complement_distribution",
    "L4NUMEROVOIE structure BAL": "numero_voie",
    "L4COMPLEMENTNUMEROVOIE structure BAL": "complement_numero_voie",
    "NL4TYPEVOIE structure BAL": "type_voie",
    "L4LIBELLEVOIE structure BAL": "libelle_voie",
    "L5LIEUDITMENTION structure BAL": "lieu_dit",
    "L6LIGNEACHEMINEMENT structure BAL": "ligne_acheminement",
    "Département structure BAL": "departement",
    "Pays structure BAL": "pays",
}

Progress = Callable[[int, int], None]

# Column -> the database column it lands in: PostgreSQL enforces these lengths, so a
# longer value is rejected with its row instead of failing the whole batch.
_STORED_IN = {
    "Nom d'exercice": Professional.__table__.c.family_name,
    "Prénom d'exercice": Professional.__table__.c.given_name,
    "Civilité d'exercice": Professional.__table__.c.civility,
    "Catégorie profession": Professional.__table__.c.category_code,
    "Libellé de catégorie profession": Professional.__table__.c.category_label,
    "Code savoir-faire": Professional.__table__.c.savoir_faire_code,
    "Libellé savoir-faire": Professional.__table__.c.savoir_faire_label,
    "Raison Sociale structure BAL": Organisation.__table__.c.name,
    "Enseigne commerciale structure BAL": Organisation.__table__.c.trade_name,
    "Code postal structure BAL": Organisation.__table__.c.postal_code,
    "Service de rattachement": Mailbox.__table__.c.service,
}
_MAX_LENGTH: dict[str, int] = {name: cast(int, cast(String, column.type).length) for name, column in _STORED_IN.items()}
_DISPLAY_NAME_LENGTH: int = cast(int, cast(String, Mailbox.__table__.c.display_name.type).length)


class ExtractionFormatError(UserError):
    """The file as a whole cannot be read as an ANS extraction (encoding, header)."""


# ----------------------------------------------------------------------------- report


@dataclass
class RejectedRow:
    line: int
    address: str
    column: str | None
    reason: str


@dataclass
class EntityCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    """What an import did. A row is one mailbox: created, updated, unchanged or rejected.

    A row counts as updated when its mailbox, its owner or its activity link changed.
    """

    path: str
    encoding: str
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects: list[RejectedRow] = field(default_factory=list)
    organisations: EntityCounts = field(default_factory=EntityCounts)
    professionals: EntityCounts = field(default_factory=EntityCounts)
    activities_created: int = 0
    seconds: float = 0.0
    untrusted_domains: dict[str, int] = field(default_factory=dict)  # domain -> rows refused for it
    # The longest transaction of one batch (from its first statement to its commit): how long
    # a running gateway may have waited for the database's write lock because of the import.
    longest_batch_seconds: float = 0.0
    trusted_domain_count: int = 0  # domains on the trust list when the import ran

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    @property
    def untrusted_domain_rows(self) -> int:
        return sum(self.untrusted_domains.values())

    def advice(self) -> str | None:
        """What to do about rows refused for an untrusted domain, or None."""
        refused = self.untrusted_domain_rows
        if not refused:
            return None
        domains = len(self.untrusted_domains)
        advice = (f"{refused} rows were refused because their domain ({domains} domain{'s' if domains > 1 else ''}) "
                  "is neither ours nor on the trust list")
        if self.trusted_domain_count == 0:
            advice += ("; the trust list is empty: import the ANS whitelist first "
                       "(gateway domain import-whitelist WHITELIST.xml), then run this import again")
        else:
            advice += ("; if they are MSSanté operators, update the trust list "
                       "(gateway domain import-whitelist WHITELIST.xml) and run this import again")
        return advice

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path, "encoding": self.encoding, "rows": self.rows,
            "created": self.created, "updated": self.updated, "unchanged": self.unchanged,
            "rejected": self.rejected, "untrusted_domain_rows": self.untrusted_domain_rows,
            "advice": self.advice(), "organisations": asdict(self.organisations),
            "professionals": asdict(self.professionals), "activities_created": self.activities_created,
            "seconds": round(self.seconds, 3),
        }

    def as_dict(self) -> dict[str, Any]:
        return self.summary() | {"rejects": [asdict(r) for r in self.rejects]}


# ----------------------------------------------------------------------------- reading


def detect_encoding(path: Path) -> tuple[str, int]:
    """('utf-8' | 'utf-8-sig' | 'cp1252', number of lines). UTF-8 when the whole file decodes as such.

    A file that is not UTF-8 must decode entirely as Windows-1252, checked here so
    that an undecodable file is refused before any row is written.
    """
    try:
        utf8, first, lines = _scan(path, "utf-8")
        if utf8:
            return ("utf-8-sig" if first.startswith(codecs.BOM_UTF8) else "utf-8"), lines
        if _scan(path, "cp1252")[0]:
            return "cp1252", lines
    except OSError as exc:
        raise ExtractionFormatError(f"cannot read {path}: {exc.strerror or exc}", field="file") from None
    raise ExtractionFormatError(f"{path} is neither UTF-8 nor Windows-1252 text", field="file")


def _scan(path: Path, encoding: str) -> tuple[bool, bytes, int]:
    """(decodes entirely in ``encoding``, first bytes, line count), reading 1 MiB at a time."""
    decoder = codecs.getincrementaldecoder(encoding)()
    first = last = b""
    lines = 0
    decodes = True
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            first = first or chunk[:3]
            last = chunk
            lines += chunk.count(b"\n")
            decodes = decodes and _decodes(decoder, chunk, final=False)
    decodes = decodes and _decodes(decoder, b"", final=True)
    if last and not last.endswith(b"\n"):
        lines += 1
    return decodes, first, lines


def _decodes(decoder: codecs.IncrementalDecoder, chunk: bytes, *, final: bool) -> bool:
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError:
        return False
    return True


def check_header(fields: Sequence[str]) -> None:
    """Refuse any header other than the 31 ANS columns in their order, naming what differs."""
    if tuple(fields) == HEADER:
        return
    missing = [name for name in HEADER if name not in fields]
    unexpected = [name for name in fields if name not in HEADER]
    problems = []
    if missing:
        problems.append("missing columns: " + ", ".join(repr(n) for n in missing))
    if unexpected:
        problems.append("unexpected columns: " + ", ".join(repr(n) for n in unexpected))
    if not problems:
        problems.append("the columns are not in the ANS order (" + " | ".join(HEADER) + ")")
    raise ExtractionFormatError("not an ANS MSSanté extraction header; " + "; ".join(problems), field="header")


def _split(line: str) -> list[str]:
    return line.rstrip("\r\n").split(SEPARATOR)


def read_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every data line after checking the header; blank lines skipped.

    The line loses its end of line and, when the header has one, its trailing separator
    (some ANS extractions end every line with it), so that ``line.split(SEPARATOR)`` gives
    its fields and a short row stays short.
    """
    try:
        with path.open("r", encoding=encoding, newline="\n") as stream:
            header = _split(stream.readline())
            trailing = len(header) == COLUMN_COUNT + 1 and header[-1] == ""
            check_header(header[:-1] if trailing else header)
            for number, line in enumerate(stream, start=2):
                if not line.strip():
                    continue
                line = line.rstrip("\r\n")
                if trailing and line.endswith(SEPARATOR):
                    line = line[:-1]
                yield number, line
    except UnicodeDecodeError as exc:
        raise ExtractionFormatError(f"{path} is neither UTF-8 nor Windows-1252 text: {exc}", field="file") from None
    except OSError as exc:
        raise ExtractionFormatError(f"cannot read {path}: {exc.strerror or exc}", field="file") from None


# ----------------------------------------------------------------------------- validation

_COL = {name: index for index, name in enumerate(HEADER)}


class RowRejected(Exception):
    def __init__(self, column: str | None, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


class UntrustedDomain(RowRejected):
    """The row's domain is neither ours nor on the trust list (often: the whitelist is not imported yet)."""

    def __init__(self, domain: str) -> None:
        super().__init__("Adresse BAL", f"the domain {domain} is neither ours nor on the trust list")
        self.domain = domain


@dataclass(slots=True)
class OrganisationData:
    idnst: str
    id_type: str
    id_value: str
    name: str
    trade_name: str | None
    address: dict[str, str]
    postal_code: str | None
    _digest: int | None = field(default=None, compare=False, repr=False)  # one OrganisationData serves every row naming the structure: hashed once

    def digest(self) -> int:
        """``fingerprint`` of ``values()`` (ORGANISATION_FIELDS order), without building the dict."""
        if self._digest is None:
            self._digest = fingerprint((self.idnst, self.id_type, self.id_value, self.name, self.trade_name,
                                        self.address, self.postal_code))
        return self._digest

    def row(self) -> tuple[Any, ...]:
        """The INSERT values in OWNER_INSERT_COLUMNS order: ORGANISATION_FIELDS (the address as JSON text), then search."""
        search = organisation_search(self.name, self.trade_name, self.idnst)
        return (self.idnst, self.id_type, self.id_value, self.name, self.trade_name, json.dumps(self.address),
                self.postal_code, search["search_name"], search["search_text"])

    def values(self) -> dict[str, Any]:
        return {"idnst": self.idnst, "id_type": self.id_type, "id_value": self.id_value, "name": self.name,
                "trade_name": self.trade_name, "address": self.address, "postal_code": self.postal_code}

    def search_values(self) -> dict[str, str]:
        """The folded search columns, computed only for rows that are written."""
        return organisation_search(self.name, self.trade_name, self.idnst)


@dataclass(slots=True)
class ProfessionalData:
    idnps: str
    id_type: str
    id_value: str
    civility: str | None
    family_name: str
    given_name: str | None
    profession_code: str
    profession_label: str
    category_code: str | None
    category_label: str | None
    savoir_faire_code: str | None
    savoir_faire_label: str | None

    def digest(self) -> int:
        """``fingerprint`` of ``values()`` (PROFESSIONAL_FIELDS order; no dict among them)."""
        return hash((self.idnps, self.id_type, self.id_value, self.civility, self.family_name, self.given_name,
                     self.profession_code, self.profession_label, self.category_code, self.category_label,
                     self.savoir_faire_code, self.savoir_faire_label))

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROFESSIONAL_FIELDS}

    def row(self) -> tuple[Any, ...]:
        """The INSERT values in OWNER_INSERT_COLUMNS order: PROFESSIONAL_FIELDS, then the search columns."""
        search = professional_search(self.family_name, self.given_name, self.idnps, self.profession_label)
        return (self.idnps, self.id_type, self.id_value, self.civility, self.family_name, self.given_name,
                self.profession_code, self.profession_label, self.category_code, self.category_label,
                self.savoir_faire_code, self.savoir_faire_label, search["search_name"], search["search_text"])

    def search_values(self) -> dict[str, str]:
        """The folded search columns, computed only for rows that are written."""
        return professional_search(self.family_name, self.given_name, self.idnps, self.profession_label)


PROFESSIONAL_FIELDS = ("idnps", "id_type", "id_value", "civility", "family_name", "given_name", "profession_code",
                       "profession_label", "category_code", "category_label", "savoir_faire_code", "savoir_faire_label")
ORGANISATION_FIELDS = ("idnst", "id_type", "id_value", "name", "trade_name", "address", "postal_code")
# The mailbox columns an import may change (address, type and owner are fixed).
MAILBOX_MUTABLE = ("hosted", "display_name", "service", "dematerialisation")
SEARCH_COLUMNS = ("search_name", "search_text")
# The columns of the owners' and mailboxes' bulk INSERTs, in the order of their rows' tuples.
OWNER_INSERT_COLUMNS = {"idnps": (*PROFESSIONAL_FIELDS, *SEARCH_COLUMNS), "idnst": (*ORGANISATION_FIELDS, *SEARCH_COLUMNS)}
MAILBOX_INSERT_COLUMNS = ("address", "domain", "type", "professional_id", "organisation_id", "source_digest",
                          *MAILBOX_MUTABLE)


@dataclass(slots=True)
class Entry:
    """One valid row: the mailbox and what owns it."""

    line: int
    address: str
    domain: str
    type: str
    hosted: bool
    display_name: str | None
    service: str | None
    dematerialisation: bool
    professional: ProfessionalData | None
    organisation: OrganisationData | None
    source_digest: int = 0  # of its line (source_digest())

    def mailbox_digest(self) -> int:
        """``fingerprint`` of ``mailbox_values()`` (MAILBOX_MUTABLE order)."""
        return hash((self.hosted, self.display_name, self.service, self.dematerialisation))

    def mailbox_values(self) -> dict[str, Any]:
        return {"hosted": self.hosted, "display_name": self.display_name, "service": self.service,
                "dematerialisation": self.dematerialisation}


def source_digest(line: str) -> int:
    """BLAKE2b-64 of a line, signed so that it fits a BIGINT: stable across processes and databases."""
    digest = hashlib.blake2b(line.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _opt(value: str) -> str | None:
    value = value.strip()
    return value or None


class RowValidator:
    """Turns the fields of a row into an Entry, or raises RowRejected naming the column."""

    def __init__(self, local_domains: set[str], trusted_domains: set[str]) -> None:
        self.local_domains = local_domains
        self.trusted_domains = trusted_domains
        # Thousands of rows share a domain or a structure: check each distinct value once.
        self._structures: dict[tuple[str, str], StructureId | UserError] = {}
        # ... and a structure's columns, identical on each row naming it: one OrganisationData per distinct set.
        self._organisations: dict[tuple[str, ...], OrganisationData] = {}

    def validate(self, line: int, fields: list[str]) -> Entry:
        if len(fields) != COLUMN_COUNT:
            raise RowRejected(None, f"{COLUMN_COUNT} columns expected, {len(fields)} found")
        get = _Getter(fields)
        _check_lengths(get)
        kind = get("Type de BAL").upper()
        if kind not in IMPORTED_TYPES:
            raise RowRejected("Type de BAL", f"{kind or '(empty)'!r} is not a mailbox type of this file (PER or ORG)")
        address, domain = self._address(get("Adresse BAL"))
        organisation = self._organisation(get, required=kind == "ORG")
        professional = self._professional(get) if kind == "PER" else None
        return Entry(
            line=line, address=address, domain=domain, type=kind, hosted=domain in self.local_domains,
            display_name=_truncate(self._display_name(professional, organisation, get), _DISPLAY_NAME_LENGTH),
            service=_opt(get("Service de rattachement")),
            dematerialisation=get("Dématérialisation").lower() in ("true", "1", "oui", "o", "vrai"),
            professional=professional, organisation=organisation,
        )

    def _address(self, raw: str) -> tuple[str, str]:
        if not raw:
            raise RowRejected("Adresse BAL", "the address is empty")
        try:
            address = self._canonical_address(raw)
        except UserError as exc:
            raise RowRejected("Adresse BAL", _message(exc)) from None
        domain = address.rpartition("@")[2]
        if domain not in self.local_domains and domain not in self.trusted_domains:
            raise UntrustedDomain(domain)
        return address, domain

    def _canonical_address(self, raw: str) -> str:
        return normalise_address(raw, field="Adresse BAL")  # IDNA work is cached per domain

    def _structure(self, kind: str, value: str) -> StructureId:
        key = (kind, value)
        if key not in self._structures:
            try:
                self._structures[key] = _structure_id(kind, value)
            except UserError as exc:
                self._structures[key] = exc
        found = self._structures[key]
        if isinstance(found, UserError):
            raise found
        return found

    def _professional(self, get: _Getter) -> ProfessionalData:
        national = get("Identification nationale PP")
        column = "Identification nationale PP"
        try:
            if national:
                person = parse_idnps(national, field=column)
            else:
                column = "Identifiant PP"
                person = make_idnps(get("Type Identifiant PP") or "RPPS", get("Identifiant PP"), field=column)
        except UserError as exc:
            raise RowRejected(column, _message(exc)) from None
        code = get("Code Profession")
        profession = PROFESSIONS.get(code)
        if profession is None:
            raise RowRejected("Code Profession", f"{code or '(empty)'!r} is not an ANS profession code (TRE_G15)")
        family_name = get("Nom d'exercice")
        if not family_name:
            raise RowRejected("Nom d'exercice", "a personal mailbox needs the holder's name")
        category = _opt(get("Catégorie profession"))
        return ProfessionalData(
            idnps=person.idnps, id_type=person.id_type, id_value=person.id_value,
            civility=_opt(get("Civilité d'exercice")), family_name=family_name,
            given_name=_opt(get("Prénom d'exercice")), profession_code=profession.code,
            profession_label=profession.label, category_code=category,
            category_label=CATEGORIES.get(category or "") or _opt(get("Libellé de catégorie profession")),
            savoir_faire_code=_opt(get("Code savoir-faire")), savoir_faire_label=_opt(get("Libellé savoir-faire")),
        )

    def _organisation(self, get: _Getter, *, required: bool) -> OrganisationData | None:
        raw = get("Identification Structure")
        if not raw:
            if required:
                raise RowRejected("Identification Structure", "an organisational mailbox needs its structure id")
            return None
        try:
            structure = self._structure(get("Type identifiant structure"), raw)
        except UserError as exc:
            raise RowRejected("Identification Structure", _message(exc)) from None
        key = (structure.idnst, *get.slice(_ORGANISATION_COLUMNS))
        known = self._organisations.get(key)
        if known is None:
            known = self._organisations[key] = self._new_organisation(structure, get)
        return known

    @staticmethod
    def _new_organisation(structure: StructureId, get: _Getter) -> OrganisationData:
        name = get("Raison Sociale structure BAL")
        trade_name = _opt(get("Enseigne commerciale structure BAL"))
        address = {key: value for column, key in _ADDRESS_COLUMNS.items() if (value := get(column))}
        return OrganisationData(
            idnst=structure.idnst, id_type=structure.id_type, id_value=structure.id_value,
            name=name or trade_name or structure.idnst, trade_name=trade_name, address=address,
            postal_code=_opt(get("Code postal structure BAL")),
        )

    @staticmethod
    def _display_name(pro: ProfessionalData | None, org: OrganisationData | None, get: _Getter) -> str | None:
        if pro is not None:
            return " ".join(part for part in (pro.given_name, pro.family_name) if part)
        service = get("Service de rattachement")
        if org is not None:
            return f"{org.name} - {service}" if service else org.name
        return service or None


def _truncate(text: str | None, limit: int) -> str | None:
    return text[:limit] if text else text


def _check_lengths(get: _Getter) -> None:
    fields = get.fields
    for index, limit, column in _LENGTH_CHECKS:
        if len(fields[index]) > limit:
            raise RowRejected(column, f"longer than {limit} characters")


class _Getter:
    __slots__ = ("fields",)

    def __init__(self, fields: list[str]) -> None:
        self.fields = list(map(str.strip, fields))  # once per row, not once per read

    def __call__(self, column: str) -> str:
        return self.fields[_COL[column]]

    def slice(self, columns: Callable[[list[str]], tuple[str, ...]]) -> tuple[str, ...]:
        """The fields an ``itemgetter`` of several columns picks."""
        return columns(self.fields)


_LENGTH_CHECKS: tuple[tuple[int, int, str], ...] = tuple((_COL[column], limit, column) for column, limit in _MAX_LENGTH.items())

# Every column an OrganisationData is made of (its cache key, with the IDNST).
_ORGANISATION_COLUMNS: Callable[[list[str]], tuple[str, ...]] = itemgetter(*(_COL[name] for name in (
    "Raison Sociale structure BAL", "Enseigne commerciale structure BAL", "Code postal structure BAL",
    *_ADDRESS_COLUMNS)))

_STRUCTURE_KINDS = {"0": "ADELI_RANG", "1": "FINESS", "2": "SIREN", "3": "SIRET", "4": "RPPS_RANG",
                    "ADELI": "ADELI_RANG", "RPPS": "RPPS_RANG"}


# Structure types whose raw number has a fixed length: a value one character longer that
# starts with the type's IDNST prefix is the IDNST itself.
_RAW_LENGTH = {"FINESS": 9, "SIREN": 9, "SIRET": 14}
_IDNST_PREFIX = {"ADELI_RANG": "0", "FINESS": "1", "SIREN": "2", "SIRET": "3", "RPPS_RANG": "4"}


def _structure_id(kind: str, value: str) -> StructureId:
    """The IDNST of a row: the column holds either the IDNST itself or the raw number of ``kind``.

    Which of the two it holds is decided from its shape first, and only that reading is
    checked, so that a fault is reported as what it is (a FINESS with a wrong check key
    is "its Luhn key is wrong", not the length error of the other reading).
    """
    if not kind:
        return parse_idnst(value, field="Identification Structure")
    expected = _STRUCTURE_KINDS.get(kind.upper(), kind.upper())
    if _holds_idnst(expected, value):
        return parse_idnst(value, field="Identification Structure")
    try:
        return make_idnst(kind, value, field="Identification Structure")
    except UserError:
        # A rang (no fixed length) may still be given as its IDNST.
        if expected in _RAW_LENGTH or not value.startswith(_IDNST_PREFIX.get(expected, "?")):
            raise
        return parse_idnst(value, field="Identification Structure")


def _holds_idnst(expected: str, value: str) -> bool:
    raw_length = _RAW_LENGTH.get(expected)
    return raw_length is not None and len(value) == raw_length + 1 and value[:1] == _IDNST_PREFIX[expected]


def _message(exc: UserError) -> str:
    return Exception.__str__(exc)


def _hashable(value: Any) -> Any:
    return tuple(sorted(value.items())) if type(value) is dict else value


def fingerprint(row: Sequence[Any]) -> int:
    """A 64-bit digest of comparable values (a row's fields in order), so that the state of 500,000 rows fits in memory.

    Python's hash of a tuple (its strings hashed with SipHash under a key drawn per
    process): cheap, and enough here since digests are only compared within one
    import, between the values loaded from the database and those of the file.
    A dict (an organisation's address) is compared as its sorted items.
    """
    try:
        return hash(tuple(row))
    except TypeError:  # a dict among the values: hashed as its sorted items
        return hash(tuple([_hashable(value) for value in row]))


# ----------------------------------------------------------------------------- directory state


@dataclass(slots=True)
class _MailboxState:
    id: int
    type: str
    professional_id: int | None
    organisation_id: int | None
    digest: int  # fingerprint of the MAILBOX_MUTABLE values
    hosted: bool
    source_digest: int | None  # of the line it was last imported from, when still valid


@dataclass(slots=True)
class Unchanged:
    """A line recognised by its digest: its mailbox and owners stay as they are."""

    line: int
    address: str
    professional_id: int | None
    organisation_id: int | None


@dataclass
class DirectoryState:
    """The directory keys and comparable values, loaded once per import."""

    local_domains: set[str]
    trusted_domains: set[str]
    organisations: dict[str, tuple[int, int]]  # IDNST -> (id, fingerprint)
    professionals: dict[str, tuple[int, int]]  # IDNPS -> (id, fingerprint)
    activities: set[tuple[int, int]]
    mailboxes: dict[str, _MailboxState]
    by_source: dict[int, str] = field(default_factory=dict)  # source_digest -> address

    def __post_init__(self) -> None:
        self.by_source = {box.source_digest: address for address, box in self.mailboxes.items()
                          if box.source_digest is not None}

    def unchanged_line(self, number: int, digest: int) -> Unchanged | None:
        """The line's mailbox when the line is the one it was imported from and nothing outside it changed."""
        address = self.by_source.get(digest)
        if address is None:
            return None
        box = self.mailboxes[address]
        domain = address.rpartition("@")[2]
        local = domain in self.local_domains
        if box.hosted != local or not (local or domain in self.trusted_domains):
            return None  # validated again: the row may now be refused, or its "hosted" changes
        return Unchanged(number, address, box.professional_id, box.organisation_id)

    @classmethod
    async def load(cls, session: AsyncSession) -> DirectoryState:
        now = dt.datetime.now(dt.timezone.utc)
        local = set((await session.scalars(select(LocalDomain.name))).all())
        trusted_rows = await session.execute(select(TrustedDomain.name, TrustedDomain.until))
        trusted = {name for name, until in trusted_rows if until is None or _aware(until) > now}
        return cls(
            local_domains=local, trusted_domains=trusted,
            organisations=await _load_keyed(session, _table(Organisation), "idnst", ORGANISATION_FIELDS),
            professionals=await _load_keyed(session, _table(Professional), "idnps", PROFESSIONAL_FIELDS),
            activities={(p, o) for p, o in await session.execute(
                select(ProfessionalOrganisation.professional_id, ProfessionalOrganisation.organisation_id))},
            mailboxes=await _load_mailboxes(session),
        )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


async def _load_keyed(session: AsyncSession, table: Table, key: str, fields: Sequence[str]) -> dict[str, tuple[int, int]]:
    # Plain rows, not mappings: the fields are columns 2.. of each row, in order.
    result = await session.execute(select(table.c.id, table.c[key], *(table.c[name] for name in fields)))
    return {row[1]: (row[0], fingerprint(row[2:])) for row in result}


async def _load_mailboxes(session: AsyncSession) -> dict[str, _MailboxState]:
    table = _table(Mailbox)
    result = await session.execute(select(
        table.c.address, table.c.id, table.c.type, table.c.professional_id, table.c.organisation_id,
        table.c.source_digest, *(table.c[name] for name in MAILBOX_MUTABLE)))
    hosted_at = 6 + MAILBOX_MUTABLE.index("hosted")
    return {row[0]: _MailboxState(row[1], row[2], row[3], row[4], fingerprint(row[6:]), bool(row[hosted_at]), row[5])
            for row in result}


# ----------------------------------------------------------------------------- writing


class _BatchWriter:
    """Applies one batch of valid entries to the database as a set difference against the state."""

    def __init__(self, state: DirectoryState, report: ImportReport, dialect: Dialect) -> None:
        self.state = state
        self.report = report
        self.dialect = dialect
        self.inserts = _DriverInserts(dialect)
        self.seen_organisations: set[str] = set()
        self.seen_professionals: set[str] = set()
        # Owners named by unchanged lines, by id (their lines were not validated, so no IDNPS / IDNST).
        self.seen_organisation_ids: set[int] = set()
        self.seen_professional_ids: set[int] = set()
        self.changed_owners: set[str] = set()  # IDNPS / IDNST created or updated by this import
        self.updated_organisation_ids: set[int] = set()
        self.updated_professional_ids: set[int] = set()

    async def write(self, session: AsyncConnection, items: list[Entry | Unchanged]) -> None:
        # Owners in line order, unchanged lines included: the first line naming an owner wins.
        organisations = [item.organisation if isinstance(item, Entry) else item.organisation_id for item in items]
        professionals = [item.professional if isinstance(item, Entry) else item.professional_id for item in items]
        updated_orgs = await self._upsert_owners(
            session, _table(Organisation), "idnst", self.state.organisations, self.seen_organisations,
            self.seen_organisation_ids, self.report.organisations, organisations)
        updated_pros = await self._upsert_owners(
            session, _table(Professional), "idnps", self.state.professionals, self.seen_professionals,
            self.seen_professional_ids, self.report.professionals, professionals)
        await self._forget_sources(session, updated_orgs, updated_pros)
        self.updated_organisation_ids.update(updated_orgs)
        self.updated_professional_ids.update(updated_pros)
        for item in items:
            if isinstance(item, Unchanged):  # its mailbox is as it was; its owner may have been updated by this import
                if item.organisation_id in self.updated_organisation_ids or \
                        item.professional_id in self.updated_professional_ids:
                    self.report.updated += 1
                else:
                    self.report.unchanged += 1
        entries = self._check_mailbox_owners([item for item in items if isinstance(item, Entry)])
        new_links = await self._insert_activities(session, entries)
        await self._upsert_mailboxes(session, entries, new_links)

    async def _upsert_owners(self, session: AsyncConnection, table: Table, key: str,
                             known: dict[str, tuple[int, int]], seen: set[str], seen_ids: set[int],
                             counts: EntityCounts,
                             records: Sequence[OrganisationData | ProfessionalData | int | None]) -> list[int]:
        """Insert or update the owners first named here; the ids of those updated."""
        inserts: list[tuple[Any, ...]] = []
        updates: list[dict[str, Any]] = []
        new_digests: dict[str, int] = {}
        for record in records:
            if record is None:
                continue
            if isinstance(record, int):  # named by an unchanged line: kept as it is
                if record not in seen_ids:
                    seen_ids.add(record)
                    counts.unchanged += 1
                continue
            ident = getattr(record, key)
            if ident in seen:
                continue  # the first row naming an owner wins (thousands of rows name the same structure)
            seen.add(ident)
            current = known.get(ident)
            if current is not None:
                if current[0] in seen_ids:
                    continue  # an earlier unchanged line named it first
                seen_ids.add(current[0])
            digest = record.digest()
            if current is None:
                inserts.append(record.row())
                new_digests[ident] = digest
            elif current[1] != digest:
                updates.append({"b_id": current[0], **record.values(), **record.search_values()})
                known[ident] = (current[0], digest)
            else:
                counts.unchanged += 1
        if inserts:
            await self.inserts.run(session, _bulk_insert(table), OWNER_INSERT_COLUMNS[key], inserts)
            ids = await _ids_of(session, table, key, list(new_digests))
            for ident, digest in new_digests.items():
                known[ident] = (ids[ident], digest)
        if updates:
            await session.execute(_update_by_id(table, [k for k in updates[0] if k != "b_id"]), updates)
        counts.created += len(inserts)
        counts.updated += len(updates)
        self.changed_owners.update(new_digests)
        self.changed_owners.update(v[key] for v in updates)
        return [v["b_id"] for v in updates]

    @staticmethod
    async def _forget_sources(session: AsyncConnection, organisation_ids: list[int], professional_ids: list[int]) -> None:
        """An owner updated: the lines of its other mailboxes no longer describe what is stored."""
        table = _table(Mailbox)
        for column, ids in (("organisation_id", organisation_ids), ("professional_id", professional_ids)):
            for start in range(0, len(ids), 1000):
                await session.execute(update(table).where(table.c[column].in_(ids[start:start + 1000]))
                                      .values(source_digest=None))

    def _source_to_keep(self, entry: Entry) -> int | None:
        """The line's digest, when its owner data is what is stored (else the line must be validated again)."""
        pro, org = entry.professional, entry.organisation
        if pro is not None and self.state.professionals[pro.idnps][1] != pro.digest():
            return None
        if org is not None and self.state.organisations[org.idnst][1] != org.digest():
            return None
        return entry.source_digest

    def _owner_ids(self, entry: Entry) -> tuple[int | None, int | None]:
        pro = self.state.professionals[entry.professional.idnps][0] if entry.professional else None
        org = self.state.organisations[entry.organisation.idnst][0] if entry.organisation else None
        return pro, org

    def _check_mailbox_owners(self, entries: list[Entry]) -> list[Entry]:
        """Keep the entries whose existing mailbox has the same type and owner; reject the others."""
        kept = []
        for entry in entries:
            existing = self.state.mailboxes.get(entry.address)
            problem = self._fixed_field_problem(entry, existing) if existing else None
            if problem:
                self.report.rejects.append(RejectedRow(entry.line, entry.address, *problem))
            else:
                kept.append(entry)
        return kept

    def _fixed_field_problem(self, entry: Entry, existing: _MailboxState) -> tuple[str, str] | None:
        if existing.type != entry.type:
            return "Type de BAL", f"the mailbox exists with type {existing.type}; a mailbox's type never changes"
        pro_id, org_id = self._owner_ids(entry)
        if entry.type == "PER" and existing.professional_id != pro_id:
            return "Identification nationale PP", "the mailbox exists and belongs to another professional"
        if entry.type == "ORG" and existing.organisation_id != org_id:
            return "Identification Structure", "the mailbox exists and belongs to another structure"
        return None

    async def _insert_activities(self, session: AsyncConnection, entries: list[Entry]) -> set[tuple[int, int]]:
        links: set[tuple[int, int]] = set()
        for entry in entries:
            if entry.type == "PER" and entry.organisation is not None:
                pro_id, org_id = self._owner_ids(entry)
                assert pro_id is not None and org_id is not None
                if (pro_id, org_id) not in self.state.activities:
                    links.add((pro_id, org_id))
        if links:
            await self.inserts.run(session, _insert_ignoring_duplicates(self.dialect.name, _table(ProfessionalOrganisation)),
                                   ("professional_id", "organisation_id"), sorted(links))
            self.state.activities.update(links)
            self.report.activities_created += len(links)
        return links

    async def _upsert_mailboxes(self, session: AsyncConnection, entries: list[Entry], new_links: set[tuple[int, int]]) -> None:
        inserts: list[tuple[Any, ...]] = []  # MAILBOX_INSERT_COLUMNS
        updates: list[dict[str, Any]] = []
        sources: list[dict[str, Any]] = []  # unchanged mailboxes whose line digest is (re)written
        for entry in entries:
            pro_id, org_id = self._owner_ids(entry)
            source = self._source_to_keep(entry)
            existing = self.state.mailboxes.get(entry.address)
            if existing is None:
                # Not added to the state: no later line of this import reaches here with the same
                # address (it is rejected as a duplicate before), so the new mailbox is never looked up.
                inserts.append((entry.address, entry.domain, entry.type, pro_id, org_id, source, entry.hosted,
                                entry.display_name, entry.service, entry.dematerialisation))
                self.report.created += 1
                continue
            owner_changed = self._owner_key(entry) in self.changed_owners or (pro_id, org_id) in new_links
            digest = entry.mailbox_digest()
            mailbox_changed = existing.digest != digest
            if mailbox_changed:
                updates.append({"b_id": existing.id, "source_digest": source, **entry.mailbox_values()})
                existing.digest = digest
            elif owner_changed or existing.source_digest != source:
                sources.append({"b_id": existing.id, "source_digest": source})
            existing.source_digest = source
            if mailbox_changed or owner_changed:
                self.report.updated += 1
            else:
                self.report.unchanged += 1
        if inserts:
            # No RETURNING: a plain executemany. A new mailbox's id is never needed by this
            # import (an address appears once; later rows with it are rejected as duplicates).
            await self.inserts.run(session, _bulk_insert(_table(Mailbox)), MAILBOX_INSERT_COLUMNS, inserts)
        if updates:
            await session.execute(_update_by_id(_table(Mailbox), ["source_digest", *MAILBOX_MUTABLE]), updates)
        if sources:
            await session.execute(_update_by_id(_table(Mailbox), ["source_digest"]), sources)

    @staticmethod
    def _owner_key(entry: Entry) -> str | None:
        if entry.professional is not None:
            return entry.professional.idnps
        return entry.organisation.idnst if entry.organisation is not None else None


def _table(model: Any) -> Table:
    """A mapped class's Core table (typed: ``__table__`` is declared as a FromClause)."""
    return cast(Table, model.__table__)


# The timestamps of a bulk statement are the database's clock, written in the SQL itself: the
# columns' Python defaults would be one datetime per row to build and convert (a fifth of an import).
def _bulk_insert(table: Table) -> Any:
    return insert(table).values(created_at=func.now(), updated_at=func.now())


# How a statement's parameters are taken from a row: itemgetter over (row + the defaults' constants).
_Arrange = tuple[Callable[[tuple[Any, ...]], tuple[Any, ...]], tuple[Any, ...]]



class BulkInsertUnsupported(RuntimeError):
    """A driver or a model the bulk insert path does not serve (a programming error: the import tests run it
    on SQLite and PostgreSQL, whose drivers bind by position and whose models' defaults are constants)."""

class _DriverInserts:
    """Bulk INSERTs compiled once for the dialect, run by the DB-API driver's ``executemany`` on tuples.

    SQLAlchemy's Core ``executemany`` builds and processes a dict of parameters per row in
    Python (a sixth of an import's CPU); the rows here are tuples of what the drivers take
    as they are (str, int, bool, None, JSON as text), in the order the statement binds them.
    Both drivers of the gateway (aiosqlite, asyncpg) bind positionally.
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[tuple[str, tuple[str, ...]], tuple[str, _Arrange | None]] = {}

    async def run(self, connection: AsyncConnection, statement: Any, columns: tuple[str, ...],
                  rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` (tuples in ``columns`` order) with ``statement`` (an INSERT of ``table``, without values for them)."""
        key = (statement.table.name, columns)
        if key not in self._compiled:
            self._compiled[key] = self._compile(statement, columns)
        sql, arrange = self._compiled[key]
        if arrange is not None:
            pick, constants = arrange
            rows = [pick(row + constants) for row in rows]
        await connection.exec_driver_sql(sql, list(rows))

    def _compile(self, statement: Any, columns: tuple[str, ...]) -> tuple[str, _Arrange | None]:
        if not self.dialect.positional:
            raise BulkInsertUnsupported(f"bulk import through {self.dialect.driver}: a driver binding by position is needed")
        compiled = statement.values({name: bindparam(name) for name in columns}).compile(
            dialect=self.dialect, for_executemany=True)
        # Columns left out take their Python default, a constant here (what Core would bind for each row).
        defaults: dict[str, Any] = {}
        for column in compiled.insert_prefetch:
            if column.key in columns:
                continue
            if column.default is None or not column.default.is_scalar:
                raise BulkInsertUnsupported(f"{column} has a computed default: give it among the bulk insert's columns")
            defaults[column.key] = column.default.arg
        names = list(compiled.positiontup or ())
        source = (*columns, *defaults)
        if names == list(columns):
            return str(compiled), None
        if sorted(names) != sorted(source):
            raise AssertionError(f"{statement.table.name}: the INSERT binds {names}, not {list(source)}")
        return str(compiled), (itemgetter(*(source.index(name) for name in names)), tuple(defaults.values()))


async def _ids_of(connection: AsyncConnection, table: Table, key: str, idents: list[str]) -> dict[str, int]:
    """The ids of the rows just inserted, by their key (IDNPS / IDNST), 1,000 per query."""
    ids: dict[str, int] = {}
    for start in range(0, len(idents), 1000):
        result = await connection.execute(select(table.c[key], table.c.id).where(table.c[key].in_(idents[start:start + 1000])))
        ids.update({ident: row_id for ident, row_id in result})
    return ids


def _update_by_id(table: Table, columns: Sequence[str]) -> Any:
    values: dict[str, Any] = {name: bindparam(name) for name in columns}
    return update(table).where(table.c.id == bindparam("b_id")).values(values | {"updated_at": func.now()})


def _insert_ignoring_duplicates(dialect: str, table: Table) -> Any:
    """INSERT that skips rows already present (another process may link the same pair meanwhile)."""
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


# ----------------------------------------------------------------------------- entry point


async def import_ans_extraction(db: Database, path: Path, *, progress: Progress | None = None,
                                batch_size: int = DEFAULT_BATCH_SIZE) -> ImportReport:
    """Import an ANS extraction file into the directory; see the module docstring for the rules.

    ``progress(done, total)`` is called after each batch, ``total`` being the file's data lines.
    Raises ExtractionFormatError (a UserError) when the file cannot be read or its header is wrong;
    row-level problems are reported in ``ImportReport.rejects`` instead.
    """
    if batch_size < 1:
        raise UserError("the batch size must be at least 1", field="batch_size")
    started = time.perf_counter()
    path = Path(path)
    encoding, lines = detect_encoding(path)
    total = max(lines - 1, 0)
    report = ImportReport(path=str(path), encoding="utf-8" if encoding == "utf-8-sig" else encoding)
    rows = read_lines(path, encoding)
    first = next(rows, None)  # reads and checks the header before touching the database
    with _collector_paused():
        async with db.session() as session:
            state = await DirectoryState.load(session)
        report.trusted_domain_count = len(state.trusted_domains)
        validator = RowValidator(state.local_domains, state.trusted_domains)
        importer = _Importer(state, report, validator, db.engine.dialect)
        async with db.engine.connect() as connection, _import_settings(connection):
            await _import_rows(importer, connection, chain(() if first is None else (first,), rows), batch_size, total, progress)
    if progress:
        progress(total, total)
    report.seconds = time.perf_counter() - started
    return report


async def _import_rows(importer: _Importer, connection: AsyncConnection, rows: Iterator[tuple[int, str]],
                       batch_size: int, total: int, progress: Progress | None) -> None:
    batch: list[Entry | Unchanged] = []
    for number, line in rows:
        entry = importer.accept(number, line)
        if entry is not None:
            batch.append(entry)
        if len(batch) >= batch_size:
            await importer.flush(connection, batch)
            batch = []
            if progress:
                progress(number - 1, total)
    await importer.flush(connection, batch)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the import runs (and back as it was after).

    The import builds about a million long-lived objects (the directory state, one
    entry per professional, structure and mailbox) and no reference cycles; each full
    pass of the collector walks all of them, a fifth of the import's Python time.
    Objects freed by their reference count, i.e. all of the import's, are freed as before.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# SQLite settings of the import's own connection while it imports (put back afterwards):
# - temp_store=MEMORY: each INSERT of a batch is a statement of its own inside the batch's
#   transaction, and SQLite first saves every page it is about to change to a statement
#   journal (to undo that one statement on a constraint error). By default that journal is
#   a temporary file: two pwrite calls per page, about 18 system calls per imported row, a
#   sixth of an import's CPU. In memory, a journal holds the pages of one statement.
# - cache_size: 64 MiB of page cache instead of 2 MiB, so that the indexes' pages (the
#   address, the IDNPS, the folded names: inserted in no order) are not read again for
#   each batch; the memory is given back when the setting is put back.
# Durability is unchanged: the WAL, fsynced at each batch's commit (synchronous=FULL).
_SQLITE_IMPORT_PRAGMAS = {"temp_store": 2, "cache_size": -65536}


@asynccontextmanager
async def _import_settings(connection: AsyncConnection) -> AsyncIterator[None]:
    """The import's connection with _SQLITE_IMPORT_PRAGMAS while it imports (SQLite only)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    previous = {name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar_one()
                for name in _SQLITE_IMPORT_PRAGMAS}
    await _set_pragmas(connection, _SQLITE_IMPORT_PRAGMAS)
    try:
        yield
    finally:
        await _set_pragmas(connection, previous)


async def _set_pragmas(connection: AsyncConnection, values: dict[str, int]) -> None:
    if connection.in_transaction():
        await connection.rollback()  # a failed batch's, if any: temp_store cannot change inside one
    for name, value in values.items():
        await connection.exec_driver_sql(f"PRAGMA {name}={int(value)}")
    await connection.commit()


class _Importer:
    """Validates rows one by one (de-duplicating addresses) and writes them batch by batch."""

    def __init__(self, state: DirectoryState, report: ImportReport, validator: RowValidator, dialect: Dialect) -> None:
        self.state = state
        self.report = report
        self.validator = validator
        self.writer = _BatchWriter(state, report, dialect)
        self.first_seen: dict[str, int] = {}

    def accept(self, number: int, line: str) -> Entry | Unchanged | None:
        self.report.rows += 1
        digest = source_digest(line)
        unchanged = self.state.unchanged_line(number, digest)
        if unchanged is not None:
            return self._first_with_address(unchanged)
        fields = line.split(SEPARATOR)
        try:
            entry = self.validator.validate(number, fields)
        except RowRejected as exc:
            if isinstance(exc, UntrustedDomain):
                self.report.untrusted_domains[exc.domain] = self.report.untrusted_domains.get(exc.domain, 0) + 1
            address = fields[1].strip() if len(fields) > 1 else ""
            self.report.rejects.append(RejectedRow(number, address, exc.column, exc.reason))
            return None
        entry.source_digest = digest
        return self._first_with_address(entry)

    def _first_with_address(self, item: Entry | Unchanged) -> Entry | Unchanged | None:
        first = self.first_seen.setdefault(item.address, item.line)
        if first != item.line:
            self.report.rejects.append(RejectedRow(item.line, item.address, "Adresse BAL",
                                                   f"duplicate address, first seen on line {first}"))
            return None
        return item

    async def flush(self, connection: AsyncConnection, batch: list[Entry | Unchanged]) -> None:
        """Write one batch in a transaction of its own, committed before the next batch is read."""
        if not batch:
            return
        started = time.perf_counter()
        async with connection.begin():
            await self.writer.write(connection, batch)
        self.report.longest_batch_seconds = max(self.report.longest_batch_seconds, time.perf_counter() - started)
