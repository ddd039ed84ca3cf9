"""XDS classCode and formatCode of a CDA, derived from the ANS's tables (data in ``codes_data/``).

The DMP needs both on every document entry (mssante.md §3.2):

- classCode (JDV_J06, TRE_A03 1.2.250.1.213.1.1.4.1) is deduced from the
  document type (JDV_J07, the CDA's ``code``) through ASS_X04
  CorrespondanceType-Classe;
- formatCode (JDV_J10): a structured CDA's model templateId (TRE_R220) through
  ASS_A11 CorresModeleCDA-XdsFormatCode; a level-1 CDA (nonXMLBody) by the
  media type of its body through ASS_A12 CorresMediaTypeCDANonStructure.

The facts are rows of CSV files (``codes_data/SOURCES.md`` says which table and
version each holds), not code. A value the sender declared (XDM METADATA) is
kept; only what is missing is derived. What cannot be derived is said, in
words, in ``DerivedCodes.gaps``: the document is filed anyway and the filing
outcome carries the gap.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.dmp_bridge.cda import BodyKind, CdaDocument

DATA_PACKAGE = "gateway.dmp_bridge.codes_data"


@dataclass(frozen=True)
class Coding:
    code: str
    system: str
    display: str | None = None


@dataclass(frozen=True)
class CodeTables:
    """The four tables, keyed for lookup."""

    class_by_type: Mapping[tuple[str, str], Coding]  # (type code system, type code) -> class
    format_by_template: Mapping[str, Coding]  # CDA model templateId root -> format
    format_by_media_type: Mapping[str, Coding]  # level-1 body media type -> format

    def class_for(self, type_code: str, type_system: str | None) -> Coding | None:
        if type_system:
            return self.class_by_type.get((type_system, type_code))
        matches = {coding for (_system, code), coding in self.class_by_type.items() if code == type_code}
        return matches.pop() if len(matches) == 1 else None  # a code without its system: only when unambiguous


@dataclass(frozen=True)
class DerivedCodes:
    columns: dict[str, Any]  # record_documents columns to add (class_*, format_*)
    gaps: tuple[str, ...]  # what could not be derived, for the filing outcome


def _rows(name: str) -> Iterator[dict[str, str]]:
    text = resources.files(DATA_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    yield from csv.DictReader(text.splitlines())


@functools.cache
def code_tables() -> CodeTables:
    displays = {(row["class_code_system"], row["class_code"]): row["display"] for row in _rows("class_codes.csv")}
    class_by_type = {
        (row["type_code_system"], row["type_code"]): Coding(
            row["class_code"], row["class_code_system"], displays.get((row["class_code_system"], row["class_code"])))
        for row in _rows("type_to_class.csv")
    }
    by_template = {row["template_id"]: Coding(row["format_code"], row["format_code_system"])
                   for row in _rows("template_to_format.csv")}
    by_media = {row["media_type"]: Coding(row["format_code"], row["format_code_system"])
                for row in _rows("media_type_to_format.csv")}
    return CodeTables(class_by_type, by_template, by_media)


def derive_xds_codes(cda: CdaDocument, declared: Mapping[str, Any], tables: CodeTables | None = None) -> DerivedCodes:
    """The classCode and formatCode columns ``declared`` lacks, derived from ``cda``; and the gaps."""
    tables = tables or code_tables()
    columns: dict[str, Any] = {}
    gaps: list[str] = []
    if not declared.get("class_code"):
        found = _class_code(cda, tables)
        if isinstance(found, Coding):
            columns |= {"class_code": found.code, "class_code_system": found.system, "class_display": found.display}
        else:
            gaps.append(found)
    if not declared.get("format_code"):
        format_found = _format_code(cda, tables)
        if isinstance(format_found, Coding):
            columns |= {"format_code": format_found.code, "format_code_system": format_found.system}
        else:
            gaps.append(format_found)
    return DerivedCodes(columns, tuple(gaps))


def _class_code(cda: CdaDocument, tables: CodeTables) -> Coding | str:
    if cda.code is None:
        return "classCode missing: the CDA has no document type (code) to deduce it from"
    found = tables.class_for(cda.code.code, cda.code.code_system)
    if found is None:
        return (f"classCode missing: document type {cda.code.code} ({cda.code.code_system or 'no code system'}) "
                "has no class in ASS_X04 CorrespondanceType-Classe")
    return found


def _format_code(cda: CdaDocument, tables: CodeTables) -> Coding | str:
    if cda.body is not None and cda.body.kind is BodyKind.UNSTRUCTURED:
        media_type = (cda.body.media_type or "").strip().lower()
        found = tables.format_by_media_type.get(media_type)
        if found is None:
            return (f"formatCode missing: a level-1 body of media type {media_type or '(none)'} "
                    "has no format in ASS_A12 CorresMediaTypeCDANonStructure")
        return found
    for template in cda.template_ids:
        found = tables.format_by_template.get(template.root)
        if found is not None:
            return found  # the first CDA model the document declares that ASS_A11 knows
    roots = ", ".join(t.root for t in cda.template_ids) or "none"
    return f"formatCode missing: no templateId of the CDA is a model of ASS_A11 CorresModeleCDA (templateIds: {roots})"
