"""Every string the webmail shows, in one gettext catalogue (Babel).

Source strings are English; ``locale/fr/LC_MESSAGES/messages.po`` holds the
French the pages are served in. The .po is compiled in memory when the webmail
starts, so a clean checkout needs no build step. ``python -m
gateway.webmail.catalogue update`` extracts the strings of the Python modules
and templates into ``locale/messages.pot`` and merges them into every .po.
"""

from __future__ import annotations

import io
import sys
from functools import lru_cache
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po
from babel.support import Translations

PACKAGE = Path(__file__).resolve().parent
LOCALE_DIR = PACKAGE / "locale"
POT_PATH = LOCALE_DIR / "messages.pot"
DOMAIN = "messages"
DEFAULT_LOCALE = "fr"
# Babel extraction: Python modules and Jinja2 templates (jinja2.ext.babel_extract).
EXTRACTION_METHODS = [("**.py", "python"), ("templates/**.html", "jinja2")]
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "translate": (2,), "N_": None}


def po_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.po"


def read_catalogue(locale: str) -> Catalog:
    with po_path(locale).open("rb") as handle:
        return read_po(handle, locale=locale, domain=DOMAIN)


@lru_cache(maxsize=8)
def translations(locale: str = DEFAULT_LOCALE) -> Translations:
    """The locale's translations, compiled from its .po in memory (no .mo file needed)."""
    buffer = io.BytesIO()
    write_mo(buffer, read_catalogue(locale), use_fuzzy=False)
    buffer.seek(0)
    return Translations(buffer, domain=DOMAIN)


def extract() -> Catalog:
    """Every translatable string of the package, as a template catalogue."""
    catalogue = Catalog(project="mss-gateway webmail", domain=DOMAIN, charset="utf-8")
    options = {"templates/**.html": {"extensions": "jinja2.ext.i18n", "trimmed": "true"}}
    for filename, lineno, message, comments, context in extract_from_dir(
            str(PACKAGE), method_map=EXTRACTION_METHODS, options_map=options, keywords=KEYWORDS,
            comment_tags=("Translators:",)):
        catalogue.add(message, None, [(filename, lineno)], auto_comments=comments, context=context)
    return catalogue


def update() -> None:
    """Write messages.pot and merge it into every locale's .po (new strings empty, obsolete ones dropped)."""
    template = extract()
    with POT_PATH.open("wb") as handle:
        write_po(handle, template, width=100, sort_output=True, omit_header=False)
    for po in LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po"):
        locale = po.parent.parent.name
        catalogue = read_catalogue(locale)
        catalogue.update(template, no_fuzzy_matching=True)
        with po.open("wb") as handle:
            write_po(handle, catalogue, width=100, sort_output=True, ignore_obsolete=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["update"]:
        sys.exit("usage: python -m gateway.webmail.catalogue update")
    update()
