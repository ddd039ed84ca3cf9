"""Synthetic ANS extraction files, made up by us, for tests and benchmarks.

The rows follow the 31-column format of ``ans_import.HEADER`` with identifiers
that pass their real checks (RPPS, FINESS and SIRET with Luhn keys) and
plausible French names and places. No real directory data is used. A few
addresses are repeated on purpose (the real file has such duplicates), and with
``bad_rows`` one row in about fifty is broken in one of the ways the importer
must report.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.directory.addresses import normalise_domain
from gateway.directory.ans_import import HEADER, SEPARATOR
from gateway.directory.identifiers import add_luhn_key
from gateway.directory.professions import profession_label

GIVEN_NAMES = ("Camille", "Jean", "Marie", "Louis", "Claire", "Hugo", "Léa", "Julien", "Chloé", "Nicolas",
               "Inès", "Thomas", "Manon", "Antoine", "Élodie", "Mathieu", "Sarah", "Pierre", "Anaïs", "François",
               "Zoé", "Rémi", "Hélène", "Yannick", "Océane", "Benoît", "Maëlle", "Loïc", "Agnès", "Gaël")
FAMILY_NAMES = ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
                "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier",
                "Morel", "Girard", "André", "Lefort", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Martinez")
CITIES = (("PARIS", "75013"), ("LYON", "69003"), ("MARSEILLE", "13005"), ("TOULOUSE", "31059"), ("NANTES", "44093"),
          ("LILLE", "59037"), ("RENNES", "35033"), ("BORDEAUX", "33076"), ("STRASBOURG", "67091"), ("AJACCIO", "20090"))
STREETS = (("RUE", "DE LA RÉPUBLIQUE"), ("AV", "JEAN JAURÈS"), ("BD", "PASTEUR"), ("RUE", "DES LILAS"),
           ("PL", "DU MARCHÉ"), ("CHE", "DES VIGNES"))
SERVICES = ("cardiologie", "radiologie", "urgences", "pediatrie", "laboratoire", "secretariat", "pharmacie", "maternite")
# (profession code, weight, civility, savoir-faire code, savoir-faire label)
PROFESSION_MIX = (("10", 45, "DR", "SM54", "Médecine générale (SM)"), ("10", 10, "DR", "SM04", "Cardiologie et Maladies vasculaires (SM)"),
                  ("60", 15, "", "", ""), ("21", 8, "DR", "", ""), ("70", 7, "", "", ""), ("40", 6, "DR", "", ""),
                  ("50", 4, "", "", ""), ("91", 3, "", "", ""), ("96", 2, "", "", ""))
UNKNOWN_PROFESSION_CODE = "07"
UNTRUSTED_DOMAIN = "inconnu.example.org"
BAD_KINDS = ("column_count", "profession_code", "rpps_key", "untrusted_domain", "malformed_address")


@dataclass
class SyntheticFile:
    """What was written, so that tests and benchmarks know the expected outcome."""

    path: Path
    rows: int
    valid_rows: int = 0
    duplicate_lines: list[int] = field(default_factory=list)
    bad_lines: dict[str, list[int]] = field(default_factory=lambda: {kind: [] for kind in BAD_KINDS})


@dataclass
class _Structure:
    idnst_type: str
    idnst: str
    name: str
    trade_name: str
    street: tuple[str, str, str]
    city: str
    postal_code: str


class _Generator:
    def __init__(self, rows: int, domains: Sequence[str], seed: int) -> None:
        self.random = random.Random(seed)
        self.domains = [normalise_domain(d) for d in domains]
        self.structures = [self._structure(i) for i in range(max(1, rows // 20))]
        self.professional_serial = 0

    def _structure(self, index: int) -> _Structure:
        city, postal = self.random.choice(CITIES)
        street_type, street_name = self.random.choice(STREETS)
        number = str(self.random.randint(1, 250))
        if index % 3 == 0:
            finess = add_luhn_key(f"{postal[:2]}{index:06d}")
            return _Structure("1", "1" + finess, f"CENTRE HOSPITALIER {city} {index}", "", (number, street_type, street_name), city, postal)
        siret = add_luhn_key(f"8{index:08d}{self.random.randint(0, 9999):04d}"[:13])
        family = self.random.choice(FAMILY_NAMES).upper()
        return _Structure("3", "3" + siret, f"CABINET MEDICAL {family} {index}", f"MAISON DE SANTÉ {city}", (number, street_type, street_name), city, postal)

    def personal_row(self, serial: int) -> list[str]:
        self.professional_serial += 1
        rpps = add_luhn_key(f"1{self.professional_serial:09d}")
        given, family = self.random.choice(GIVEN_NAMES), self.random.choice(FAMILY_NAMES)
        code, _, civility, sf_code, sf_label = self.random.choices(PROFESSION_MIX, [m[1] for m in PROFESSION_MIX])[0]
        local = f"{_ascii(given)}.{_ascii(family)}.{serial}"
        structure = self.random.choice(self.structures) if self.random.random() < 0.7 else None
        return self._row("PER", f"{local}@{self.random.choice(self.domains)}", structure, service="",
                         person=("8", rpps, civility, family.upper(), given, code, sf_code, sf_label))

    def organisation_row(self, serial: int) -> list[str]:
        structure = self.random.choice(self.structures)
        service = self.random.choice(SERVICES)
        return self._row("ORG", f"{service}.{serial}@{self.random.choice(self.domains)}", structure,
                         service=service.capitalize(), person=None)

    def _row(self, kind: str, address: str, structure: _Structure | None, *, service: str,
             person: tuple[str, str, str, str, str, str, str, str] | None) -> list[str]:
        values = dict.fromkeys(HEADER, "")
        values["Type de BAL"] = kind
        values["Adresse BAL"] = address
        values["Service de rattachement"] = service
        values["Dématérialisation"] = self.random.choice(("True", "False"))
        if person is not None:
            self._fill_person(values, person)
        if structure is not None:
            self._fill_structure(values, structure)
        return [values[name] for name in HEADER]

    @staticmethod
    def _fill_person(values: dict[str, str], person: tuple[str, str, str, str, str, str, str, str]) -> None:
        id_type, rpps, civility, family, given, code, sf_code, sf_label = person
        values.update({
            "Type Identifiant PP": id_type, "Identifiant PP": rpps, "Identification nationale PP": id_type + rpps,
            "Civilité d'exercice": civility, "Nom d'exercice": family, "Prénom d'exercice": given,
            "Catégorie profession": "C", "Libellé de catégorie profession": "Civil", "Code Profession": code,
            "Libellé Profession": profession_label(code), "Code savoir-faire": sf_code, "Libellé savoir-faire": sf_label,
        })

    @staticmethod
    def _fill_structure(values: dict[str, str], structure: _Structure) -> None:
        number, street_type, street_name = structure.street
        values.update({
            "Type identifiant structure": structure.idnst_type, "Identification Structure": structure.idnst,
            "Raison Sociale structure BAL": structure.name, "Enseigne commerciale structure BAL": structure.trade_name,
            "L4NUMEROVOIE structure BAL": number, "NL4TYPEVOIE structure BAL": street_type,
            "L4LIBELLEVOIE structure BAL": street_name,
            "L6LIGNEACHEMINEMENT structure BAL": f"{structure.postal_code} {structure.city}",
            "Code postal structure BAL": structure.postal_code, "Département structure BAL": structure.postal_code[:2],
            "Pays structure BAL": "FRANCE",
        })

    def break_row(self, kind: str, serial: int) -> list[str]:
        """A row spoilt in one way: the importer must reject it naming the right column."""
        row = self.personal_row(serial)
        position = {name: index for index, name in enumerate(HEADER)}
        if kind == "column_count":
            row.pop()
        elif kind == "profession_code":
            row[position["Code Profession"]] = UNKNOWN_PROFESSION_CODE
        elif kind == "rpps_key":
            national = row[position["Identification nationale PP"]]
            wrong_key = str((int(national[-1]) + 1) % 10)
            row[position["Identification nationale PP"]] = national[:-1] + wrong_key
            row[position["Identifiant PP"]] = national[1:-1] + wrong_key
        elif kind == "untrusted_domain":
            local = row[position["Adresse BAL"]].partition("@")[0]
            row[position["Adresse BAL"]] = f"{local}@{UNTRUSTED_DOMAIN}"
        elif kind == "malformed_address":
            row[position["Adresse BAL"]] = row[position["Adresse BAL"]].replace("@", " chez ")
        return row


def _ascii(name: str) -> str:
    table = str.maketrans("éèêëàâäîïôöûüùçÉÈÊËÀÂÎÏÔÖÛÜÇ", "eeeeaaaiioouuucEEEEAAIIOOUUC")
    return name.translate(table).lower().replace(" ", "-")


def write_synthetic_extraction(path: Path, rows: int, *, domains: list[str], seed: int = 0, bad_rows: bool = False,
                               encoding: str = "utf-8") -> SyntheticFile:
    """Write ``rows`` data lines (header apart) to ``path`` and describe what they hold.

    About 75 % of the rows are personal (PER) mailboxes, the rest organisational
    (ORG); one row in 500 (at least one when rows >= 20) repeats an earlier
    address; with ``bad_rows`` one row in 50 (at least one of each kind) is broken.
    """
    if rows < 0:
        raise ValueError("rows must be >= 0")
    if not domains:
        raise ValueError("at least one mailbox domain is needed")
    generator = _Generator(rows, domains, seed)
    plan = _plan(rows, bad_rows, generator.random)
    result = SyntheticFile(path=Path(path), rows=rows)
    written: deque[list[str]] = deque(maxlen=1000)  # recent rows, the originals of duplicates
    with Path(path).open("w", encoding=encoding, newline="\n") as stream:
        stream.write(SEPARATOR.join(HEADER) + "\n")
        for serial in range(rows):
            line = serial + 2
            kind = plan.get(serial)
            if kind == "duplicate" and written:
                row = list(generator.random.choice(written))
                result.duplicate_lines.append(line)
            elif kind in BAD_KINDS:
                row = generator.break_row(kind, serial)
                result.bad_lines[kind].append(line)
            else:
                row = generator.personal_row(serial) if generator.random.random() < 0.75 else generator.organisation_row(serial)
                written.append(row)
                result.valid_rows += 1
            stream.write(SEPARATOR.join(row) + "\n")
    return result


def _plan(rows: int, bad_rows: bool, rng: random.Random) -> dict[int, str]:
    """Which serials hold a duplicate or a broken row; never the first row (a duplicate needs an original)."""
    candidates = list(range(1, rows))
    rng.shuffle(candidates)
    kinds: list[str] = ["duplicate"] * (max(1, rows // 500) if rows >= 20 else 0)
    if bad_rows:
        per_kind = max(1, rows // (50 * len(BAD_KINDS)))
        kinds += [kind for kind in BAD_KINDS for _ in range(per_kind)]
    return dict(zip(candidates, kinds))
