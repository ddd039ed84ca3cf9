"""Accent- and case-insensitive directory search, the same on SQLite and PostgreSQL.

SQLite's ``lower()`` folds ASCII only and neither database ignores accents by
default, so the folding is done once, in Python, by ``fold``: the same function
fills the search columns when a row is written (ORM events in
``gateway.storage.models``, the bulk ANS import, the Alembic backfill) and folds
the query. The databases then compare plain folded strings.

Two columns per searchable table:
- ``search_name``: the folded name a person looks for first (family name then
  given name; an organisation's name), indexed: a name prefix is a range scan
  of that index (``search_name >= q AND search_name < q'`` where ``q'`` is ``q``
  with its last character incremented), which works with SQLite's binary
  collation and PostgreSQL's "C" collation (the column's collation there);
- ``search_text``: every searchable field folded and joined, matched as a
  substring when the name prefixes do not fill the page.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from functools import lru_cache

# Letters that NFKD does not decompose but that French (and European) names spell
# with two ASCII letters or a base letter: "CŒUR" is searched as "coeur".
_LIGATURES = str.maketrans({"œ": "oe", "æ": "ae", "ø": "o", "đ": "d", "ł": "l", "ı": "i"})

SEARCH_NAME_LENGTH = 512


# Cached: an import folds the same given names, profession labels and many family names again and again.
@lru_cache(maxsize=1 << 16)
def fold(text: str | None) -> str:
    """The search form of ``text``: NFKD, combining marks removed, casefolded, ligatures split, spaces collapsed.

    "LEFÈVRE", "Lefèvre" and "lefevre" fold to "lefevre"; "GARÇON" to "garcon"; "Hélène" to "helene".
    """
    if not text:
        return ""
    if text.isascii():  # most names: nothing to decompose, and casefold() is lower() on ASCII
        return " ".join(text.lower().split())
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(stripped.casefold().translate(_LIGATURES).split())


def fold_all(parts: Iterable[str | None]) -> str:
    """The folded fields joined by a space (empty ones left out)."""
    return " ".join(folded for part in parts if (folded := fold(part)))


def search_name(*parts: str | None) -> str:
    return fold_all(parts)[:SEARCH_NAME_LENGTH]


def prefix_upper_bound(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix`` (``prefix`` non-empty)."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return prefix + "\U0010ffff"
    return prefix[:-1] + chr(last + 1)


def professional_search(family_name: str | None, given_name: str | None, idnps: str | None,
                        profession_label: str | None) -> dict[str, str]:
    name = fold_all((family_name, given_name))  # folded once, used by both columns
    rest = fold_all((idnps, profession_label))
    return {"search_name": name[:SEARCH_NAME_LENGTH], "search_text": f"{name} {rest}" if name and rest else name or rest}


def organisation_search(name: str | None, trade_name: str | None, idnst: str | None) -> dict[str, str]:
    return {"search_name": search_name(name), "search_text": fold_all((name, trade_name, idnst))}


def patient_search(birth_family_name: str | None, first_given_name: str | None, used_family_name: str | None,
                   given_names: str | None, ins: str | None) -> dict[str, str]:
    return {"search_name": search_name(birth_family_name, first_given_name),
            "search_text": fold_all((birth_family_name, first_given_name, used_family_name, given_names, ins))}
