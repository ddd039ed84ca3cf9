"""ANS whitelist import: parsing, IDNA normalisation, add/keep/remove semantics, hostile XML."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.directory.addresses import normalise_domain
from gateway.directory.whitelist import NAMESPACE, WhitelistFormatError, import_whitelist, parse_whitelist
from gateway.storage.db import Database
from gateway.storage.models import TrustedDomain

FIXTURE = Path(__file__).parent.parent / "data" / "whitelist.xml"
IDN = normalise_domain("hôpital-test.mssante.fr")
FIXTURE_NAMES = ["labo-test.mssante.fr", IDN, "cabinet-test.mssante.fr", "clinique-test.mssante.fr"]


def whitelist(path: Path, *names: str) -> Path:
    domains = "".join(f"<Domaine><Nom>{name}</Nom></Domaine>" for name in names)
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?><ListeBlanche xmlns="{NAMESPACE}">{domains}</ListeBlanche>',
                    encoding="utf-8")
    return path


async def trust_list(db: Database) -> dict[str, TrustedDomain]:
    async with db.session() as session:
        return {row.name: row for row in (await session.scalars(select(TrustedDomain))).all()}


def test_idn_name_is_the_expected_a_label() -> None:
    assert IDN == "xn--hpital-test-2eb.mssante.fr"


async def test_import_adds_normalised_names(database: Database) -> None:
    report = await import_whitelist(database, FIXTURE, operator="Opérateur de test")
    assert report.added == FIXTURE_NAMES
    assert report.listed == 4 and not report.kept and not report.removed
    assert [item.name for item in report.invalid] == ["pas un domaine"]
    entries = await trust_list(database)
    assert set(entries) == set(FIXTURE_NAMES)
    assert all(e.source == "whitelist" and e.until is None and e.since is not None for e in entries.values())
    assert entries[IDN].operator == "Opérateur de test"


async def test_second_import_changes_nothing(database: Database) -> None:
    await import_whitelist(database, FIXTURE)
    before = {name: (e.since, e.until, e.source) for name, e in (await trust_list(database)).items()}
    report = await import_whitelist(database, FIXTURE)
    assert (report.added, report.removed, report.reopened) == ([], [], [])
    assert sorted(report.kept) == sorted(FIXTURE_NAMES)
    assert {name: (e.since, e.until, e.source) for name, e in (await trust_list(database)).items()} == before


async def test_unlisted_whitelist_domains_are_closed_and_manual_ones_kept(database: Database, tmp_path: Path) -> None:
    async with database.session() as session:
        session.add(TrustedDomain(name="manuel.mssante.fr", source="manual"))
    await import_whitelist(database, FIXTURE)
    report = await import_whitelist(database, whitelist(tmp_path / "w.xml", "labo-test.mssante.fr", "hôpital-test.mssante.fr"))
    assert sorted(report.removed) == ["cabinet-test.mssante.fr", "clinique-test.mssante.fr"]
    entries = await trust_list(database)
    closed = entries["clinique-test.mssante.fr"].until
    assert closed is not None
    closed = closed if closed.tzinfo else closed.replace(tzinfo=dt.timezone.utc)  # SQLite drops the zone
    assert closed <= dt.datetime.now(dt.timezone.utc)
    assert entries["labo-test.mssante.fr"].until is None
    assert entries["manuel.mssante.fr"].until is None and entries["manuel.mssante.fr"].source == "manual"


async def test_a_name_listed_again_is_reopened(database: Database, tmp_path: Path) -> None:
    await import_whitelist(database, FIXTURE)
    await import_whitelist(database, whitelist(tmp_path / "w.xml", "labo-test.mssante.fr"))
    report = await import_whitelist(database, FIXTURE)
    assert sorted(report.reopened) == sorted(set(FIXTURE_NAMES) - {"labo-test.mssante.fr"})
    assert all(e.until is None for e in (await trust_list(database)).values())


async def test_listed_manual_entry_is_kept_untouched(database: Database) -> None:
    async with database.session() as session:
        session.add(TrustedDomain(name="labo-test.mssante.fr", source="manual", operator="à la main"))
    report = await import_whitelist(database, FIXTURE)
    assert "labo-test.mssante.fr" in report.kept and "labo-test.mssante.fr" not in report.added
    entry = (await trust_list(database))["labo-test.mssante.fr"]
    assert (entry.source, entry.operator) == ("manual", "à la main")


ENTITY_BOMB = f"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<ListeBlanche xmlns="{NAMESPACE}"><Domaine><Nom>&lol3;.mssante.fr</Nom></Domaine></ListeBlanche>"""

EXTERNAL_ENTITY = f"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<ListeBlanche xmlns="{NAMESPACE}"><Domaine><Nom>&secret;</Nom></Domaine></ListeBlanche>"""

DTD_ONLY = f"""<?xml version="1.0"?>
<!DOCTYPE ListeBlanche SYSTEM "http://example.org/liste.dtd">
<ListeBlanche xmlns="{NAMESPACE}"><Domaine><Nom>a.mssante.fr</Nom></Domaine></ListeBlanche>"""


@pytest.mark.parametrize("document", [ENTITY_BOMB, EXTERNAL_ENTITY, DTD_ONLY], ids=["entity-bomb", "xxe", "dtd"])
async def test_hostile_xml_is_refused(database: Database, tmp_path: Path, document: str) -> None:
    path = tmp_path / "hostile.xml"
    path.write_text(document, encoding="utf-8")
    with pytest.raises(WhitelistFormatError, match="DTD or entities"):
        await import_whitelist(database, path)
    assert await trust_list(database) == {}


@pytest.mark.parametrize(("document", "message"), [
    ('<ListeBlanche xmlns="urn:autre"><Domaine><Nom>a.mssante.fr</Nom></Domaine></ListeBlanche>', "expected the namespace"),
    ("<ListeBlanche><Domaine><Nom>a.mssante.fr</Nom></Domaine></ListeBlanche>", "no namespace"),
    (f'<ListeBlanche xmlns="{NAMESPACE}"><Autre/></ListeBlanche>', "no <Domaine> element"),
    (f'<ListeBlanche xmlns="{NAMESPACE}"><Domaine><Nom>', "not well-formed"),
])
def test_documents_of_another_shape_are_refused(document: str, message: str) -> None:
    with pytest.raises(WhitelistFormatError, match=message) as caught:
        parse_whitelist(document.encode())
    assert caught.value.field == "file"


async def test_a_list_without_any_valid_name_changes_nothing(database: Database, tmp_path: Path) -> None:
    await import_whitelist(database, FIXTURE)
    with pytest.raises(WhitelistFormatError, match="no valid domain"):
        await import_whitelist(database, whitelist(tmp_path / "w.xml", "pas un domaine", ""))
    assert all(e.until is None for e in (await trust_list(database)).values())


async def test_unreadable_file_is_a_user_error(database: Database, tmp_path: Path) -> None:
    with pytest.raises(WhitelistFormatError, match="cannot read"):
        await import_whitelist(database, tmp_path / "absent.xml")
