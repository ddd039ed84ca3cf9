"""Import of the ANS MSSanté whitelist (liste blanche) into the trust list.

The whitelist is an XML document in the namespace
``https://listeblanche.mssante.fr/schema`` whose domains are the text of
``Domaine/Nom`` elements (mssante.md §1.1; zehome/mssantelisteblanche reads it
with the XPath ``//n:Domaine/n:Nom``). No published schema gives further
per-domain fields, so only the names are read.

The file is parsed with defusedxml: a DTD, entity declarations or external
references are refused, so an entity bomb or an XXE cannot get through. Names
may be Unicode (IDN) and are stored as lower-case A-labels.

Whitelist-sourced trust entries follow the file: new names are added
(source "whitelist", since = now), names no longer listed get ``until = now``,
names listed again are reopened. Entries added by hand (source "manual") are
never touched, and an active manual entry of a listed name is only counted as kept.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.directory.addresses import normalise_domain
from gateway.errors import UserError
from gateway.storage.db import Database
from gateway.storage.models import TrustedDomain, utcnow

NAMESPACE = "https://listeblanche.mssante.fr/schema"
SOURCE = "whitelist"
MANUAL_SOURCE = "manual"


class WhitelistFormatError(UserError):
    """The file is not a readable ANS whitelist."""


@dataclass
class InvalidName:
    name: str
    reason: str


@dataclass
class WhitelistReport:
    path: str
    listed: int = 0  # distinct valid names in the file
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reopened: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    invalid: list[InvalidName] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "listed": self.listed, "added": len(self.added), "kept": len(self.kept),
                "reopened": len(self.reopened), "removed": len(self.removed), "invalid": len(self.invalid)}

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "listed": self.listed, "added": self.added, "kept": self.kept,
                "reopened": self.reopened, "removed": self.removed,
                "invalid": [asdict(item) for item in self.invalid]}


def _tag(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def parse_whitelist(data: bytes) -> list[str]:
    """The raw ``Domaine/Nom`` texts of a whitelist document, in file order.

    Raises WhitelistFormatError for XML that is malformed, carries a DTD or
    entities, or is not in the whitelist namespace.
    """
    root = _parse_root(data)
    if not root.tag.startswith(f"{{{NAMESPACE}}}"):
        found = root.tag.partition("}")[0].lstrip("{") if root.tag.startswith("{") else "no namespace"
        raise WhitelistFormatError(
            f"not an MSSanté whitelist: the root element <{_local(root.tag)}> is in {found!r}, "
            f"expected the namespace {NAMESPACE}", field="file")
    domains = list(root.iter(_tag("Domaine")))
    if not domains:
        raise WhitelistFormatError("not an MSSanté whitelist: it has no <Domaine> element", field="file")
    return [(name.text or "").strip() for domain in domains for name in domain.findall(_tag("Nom"))]


def _parse_root(data: bytes) -> Element:
    try:
        root: Element = safe_xml.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        return root
    except DefusedXmlException as exc:
        raise WhitelistFormatError(f"refused: the document declares a DTD or entities ({type(exc).__name__})", field="file") from None
    except ParseError as exc:
        raise WhitelistFormatError(f"not well-formed XML: {exc}", field="file") from None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def normalise_names(raw_names: list[str]) -> tuple[list[str], list[InvalidName]]:
    """(distinct A-label names in file order, the names that are not valid domains)."""
    names: dict[str, None] = {}
    invalid: list[InvalidName] = []
    for raw in raw_names:
        try:
            names.setdefault(normalise_domain(raw, field="Nom"), None)
        except UserError as exc:
            invalid.append(InvalidName(raw, Exception.__str__(exc)))
    return list(names), invalid


async def import_whitelist(db: Database, path: Path, *, operator: str | None = None) -> WhitelistReport:
    """Bring the whitelist-sourced trust entries in line with the file at ``path``.

    ``operator`` is recorded on the entries this import adds (the file names no operator).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WhitelistFormatError(f"cannot read {path}: {exc.strerror or exc}", field="file") from None
    names, invalid = normalise_names(parse_whitelist(data))
    if not names:
        # An empty list would close every whitelisted domain at once: far more likely a broken file.
        raise WhitelistFormatError("the whitelist lists no valid domain name; nothing was changed", field="file")
    report = WhitelistReport(path=str(path), listed=len(names), invalid=invalid)
    async with db.session() as session:
        existing = {row.name: row for row in (await session.scalars(select(TrustedDomain))).all()}
        now = utcnow()
        _apply_listed(session, existing, names, now, operator, report)
        _close_unlisted(existing, set(names), now, report)
    return report


def _is_open(entry: TrustedDomain, now: dt.datetime) -> bool:
    if entry.until is None:
        return True
    # SQLite may hand back naive timestamps; every timestamp we store is UTC.
    until = entry.until if entry.until.tzinfo else entry.until.replace(tzinfo=dt.timezone.utc)
    return until > now


def _apply_listed(session: AsyncSession, existing: dict[str, TrustedDomain], names: list[str], now: dt.datetime,
                  operator: str | None, report: WhitelistReport) -> None:
    for name in names:
        entry = existing.get(name)
        if entry is None:
            session.add(TrustedDomain(name=name, operator=operator, since=now, until=None, source=SOURCE))
            report.added.append(name)
        elif entry.source != SOURCE or _is_open(entry, now):
            report.kept.append(name)
        else:
            entry.until = None
            entry.since = now
            report.reopened.append(name)


def _close_unlisted(existing: dict[str, TrustedDomain], listed: set[str], now: dt.datetime, report: WhitelistReport) -> None:
    for name, entry in sorted(existing.items()):
        if entry.source == SOURCE and name not in listed and _is_open(entry, now):
            entry.until = now
            report.removed.append(name)
