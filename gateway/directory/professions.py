"""ANS profession and professional-category codes.

Sources (ANS FHIR IG "Terminologies de Santé" v1.12.0, ansforge/IG-terminologie-de-sante):
- TRE_G15 ProfessionSante, OID 1.2.250.1.71.1.2.7, CodeSystem version 20250328120000:
  the professions of the Code de la santé publique. Codes 35-39 and 93 are
  deprecated there (end date 2024-12-13 / 2021-12-17) but still appear on older
  directory records, so they are accepted and flagged.
- TRE_R95 UsagerTitre (71, 72, 73, 93) and TRE_R94 ProfessionSocial (41): the
  holders of a protected title that JDV_J05/J71 (MSSanté) list beside G15.
- TRE_R09 CategorieProfessionnelle, OID 1.2.250.1.213.1.6.1.10, version
  20260223120000. "M" was "Militaire" in older releases and is "Agent public" now;
  "F" is deprecated since 2026-02-23.

This table is used by the ANS extraction import and when professionals are added by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.errors import UserError


@dataclass(frozen=True)
class Profession:
    code: str
    label: str
    table: str  # the ANS terminology the code comes from (TRE_G15, TRE_R95, TRE_R94)
    active: bool = True


_G15 = "TRE_G15"
_R95 = "TRE_R95"
_R94 = "TRE_R94"

_PROFESSIONS: tuple[Profession, ...] = (
    Profession("10", "Médecin", _G15),
    Profession("21", "Pharmacien", _G15),
    Profession("26", "Audioprothésiste", _G15),
    Profession("28", "Opticien-Lunetier", _G15),
    Profession("31", "Assistant dentaire", _G15),
    Profession("32", "Physicien médical", _G15),
    Profession("35", "Aide-soignant", _G15, active=False),
    Profession("36", "Ambulancier", _G15, active=False),
    Profession("37", "Auxiliaire de puériculture", _G15, active=False),
    Profession("38", "Préparateur en pharmacie hospitalière", _G15, active=False),
    Profession("39", "Préparateur en pharmacie (officine)", _G15, active=False),
    Profession("40", "Chirurgien-Dentiste", _G15),
    Profession("41", "Assistant de service social", _R94),
    Profession("50", "Sage-Femme", _G15),
    Profession("60", "Infirmier", _G15),
    Profession("69", "Infirmier psychiatrique", _G15),
    Profession("70", "Masseur-Kinésithérapeute", _G15),
    Profession("71", "Ostéopathe", _R95),
    Profession("72", "Psychothérapeute", _R95),
    Profession("73", "Chiropracteur", _R95),
    Profession("80", "Pédicure-Podologue", _G15),
    Profession("81", "Orthoprothésiste", _G15),
    Profession("82", "Podo-Orthésiste", _G15),
    Profession("83", "Orthopédiste-Orthésiste", _G15),
    Profession("84", "Oculariste", _G15),
    Profession("85", "Epithésiste", _G15),
    Profession("86", "Technicien de laboratoire médical", _G15),
    Profession("91", "Orthophoniste", _G15),
    Profession("92", "Orthoptiste", _G15),
    Profession("93", "Psychologue", _R95),
    Profession("94", "Ergothérapeute", _G15),
    Profession("95", "Diététicien", _G15),
    Profession("96", "Psychomotricien", _G15),
    Profession("98", "Manipulateur ERM", _G15),
)

PROFESSIONS: Mapping[str, Profession] = MappingProxyType({p.code: p for p in _PROFESSIONS})

CATEGORIES: Mapping[str, str] = MappingProxyType({
    "C": "Civil",
    "E": "Etudiant",
    "F": "Fonctionnaire d'Etat ou de collectivité locale",
    "M": "Agent public",
})


def is_known_profession(code: str) -> bool:
    return code.strip() in PROFESSIONS


def profession(code: str) -> Profession:
    """The profession of ``code``; UserError naming ``profession_code`` when unknown."""
    found = PROFESSIONS.get(code.strip())
    if found is None:
        known = ", ".join(f"{p.code} {p.label}" for p in _PROFESSIONS if p.active)
        raise UserError(f"{code!r} is not an ANS profession code (TRE_G15); known codes: {known}", field="profession_code")
    return found


def profession_label(code: str) -> str:
    """The ANS label of a profession code, e.g. '10' -> 'Médecin'."""
    return profession(code).label


def category_label(code: str) -> str:
    """The ANS label of a professional category (TRE_R09), e.g. 'C' -> 'Civil'."""
    label = CATEGORIES.get(code.strip().upper())
    if label is None:
        known = ", ".join(f"{k} {v}" for k, v in CATEGORIES.items())
        raise UserError(f"{code!r} is not an ANS professional category (TRE_R09); known: {known}", field="category_code")
    return label
