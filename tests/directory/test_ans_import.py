"""ANS MSSanté extraction import: counts, rejections, idempotence, encodings, header.

Runs on the shared ``database`` fixture (tests/conftest.py: SQLite and PostgreSQL).
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, insert, select

from gateway.cli.main import cli
from gateway.directory.ans_import import HEADER, ExtractionFormatError, RowValidator, _import_settings, import_ans_extraction
from gateway.directory.identifiers import add_luhn_key
from gateway.directory.search import fold
from gateway.directory.professions import CATEGORIES, category_label, profession_label
from gateway.directory.synthetic import write_synthetic_extraction
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

DATA = Path(__file__).parent.parent / "data"
FIXTURE = DATA / "extraction_small.txt"
LOCAL = "ch-test.mssante.fr"
TRUSTED = "labo-test.mssante.fr"
FIXTURE_VALID_ROWS = 44
# line -> (column, words of the reason) for every bad row of the fixture
FIXTURE_REJECTS: dict[int, tuple[str | None, str]] = {
    3: ("Adresse BAL", "is not a mail address"),
    9: ("Adresse BAL", "the domain inconnu.example.org is neither ours nor on the trust list"),
    14: ("Code Profession", "'07' is not an ANS profession code"),
    31: ("Adresse BAL", "duplicate address, first seen on line 23"),
    43: ("Identification nationale PP", "Luhn key is wrong"),
    46: (None, "31 columns expected, 30 found"),
}
COL = {name: index for index, name in enumerate(HEADER)}


@pytest.fixture
async def directory(database: Database) -> Database:
    """The database with our local domain and one trusted remote domain."""
    async with database.session() as session:
        session.add(LocalDomain(name=LOCAL))
        session.add(TrustedDomain(name=TRUSTED, source="manual"))
    return database


def lines_of(path: Path) -> list[list[str]]:
    return [line.split("|") for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, rows: list[list[str]], *, encoding: str = "utf-8", suffix: str = "") -> Path:
    path.write_text("".join("|".join(row) + suffix + "\n" for row in rows), encoding=encoding)
    return path


def make_row(**values: str) -> list[str]:
    """A row from column values given by python-friendly keys (see ROW_KEYS)."""
    row = [""] * len(HEADER)
    for key, value in values.items():
        row[COL[ROW_KEYS[key]]] = value
    return row


ROW_KEYS = {
    "type": "Type de BAL", "address": "Adresse BAL", "idnps": "Identification nationale PP",
    "pp_type": "Type Identifiant PP", "pp": "Identifiant PP", "structure_type": "Type identifiant structure",
    "structure": "Identification Structure", "family": "Nom d'exercice", "given": "Prénom d'exercice",
    "profession": "Code Profession", "name": "Raison Sociale structure BAL", "service": "Service de rattachement",
    "demat": "Dématérialisation",
}
RPPS = add_luhn_key("1234567890")
FINESS = add_luhn_key("75000001")
BAD_FINESS = FINESS[:-1] + str((int(FINESS[-1]) + 1) % 10)


def per_row(address: str, *, rpps: str = RPPS, family: str = "MARTIN", **extra: str) -> list[str]:
    return make_row(type="PER", address=address, idnps="8" + rpps, family=family, given="Claire", profession="10", **extra)


def org_row(address: str, *, structure: str = "1" + FINESS, **extra: str) -> list[str]:
    return make_row(type="ORG", address=address, structure=structure, name="CH DE TEST", **extra)


async def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    tables = {"mailboxes": Mailbox, "professionals": Professional, "organisations": Organisation,
              "activities": ProfessionalOrganisation}
    result: dict[str, list[tuple[Any, ...]]] = {}
    async with db.session() as session:
        for name, model in tables.items():
            rows = (await session.execute(select(model.__table__).order_by(model.__table__.c.id))).all()
            result[name] = [tuple(row) for row in rows]
    return result


async def count(db: Database, model: Any) -> int:
    async with db.session() as session:
        return await session.scalar(select(func.count()).select_from(model))


# ----------------------------------------------------------------------------- the fixture file


def test_fixture_is_what_the_generator_writes(tmp_path: Path) -> None:
    written = write_synthetic_extraction(tmp_path / "x.txt", 50, domains=[LOCAL, TRUSTED], seed=7, bad_rows=True)
    assert (tmp_path / "x.txt").read_bytes() == FIXTURE.read_bytes()
    assert written.valid_rows == FIXTURE_VALID_ROWS
    assert sorted(written.duplicate_lines + [l for ls in written.bad_lines.values() for l in ls]) == sorted(FIXTURE_REJECTS)


async def test_import_counts_and_rejections(directory: Database) -> None:
    report = await import_ans_extraction(directory, FIXTURE)
    assert (report.rows, report.created, report.updated, report.unchanged, report.rejected) == (50, FIXTURE_VALID_ROWS, 0, 0, 6)
    assert report.encoding == "utf-8"
    assert {r.line: r.column for r in report.rejects} == {line: col for line, (col, _) in FIXTURE_REJECTS.items()}
    for reject in report.rejects:
        assert FIXTURE_REJECTS[reject.line][1] in reject.reason
    assert await count(directory, Mailbox) == FIXTURE_VALID_ROWS
    assert report.professionals.created == await count(directory, Professional)
    assert report.organisations.created == await count(directory, Organisation) == 2
    assert report.activities_created == await count(directory, ProfessionalOrganisation)


async def test_hosted_follows_the_domain(directory: Database) -> None:
    await import_ans_extraction(directory, FIXTURE)
    async with directory.session() as session:
        rows = (await session.execute(select(Mailbox.domain, Mailbox.hosted))).all()
    assert {domain for domain, _ in rows} == {LOCAL, TRUSTED}
    assert all(hosted == (domain == LOCAL) for domain, hosted in rows)


async def test_second_import_changes_nothing(directory: Database) -> None:
    await import_ans_extraction(directory, FIXTURE)
    before = await snapshot(directory)
    again = await import_ans_extraction(directory, FIXTURE)
    assert (again.created, again.updated, again.unchanged, again.rejected) == (0, 0, FIXTURE_VALID_ROWS, 6)
    assert (again.professionals.created, again.professionals.updated, again.organisations.updated) == (0, 0, 0)
    assert again.activities_created == 0
    assert await snapshot(directory) == before


async def test_edited_rows_are_updated(directory: Database, tmp_path: Path) -> None:
    await import_ans_extraction(directory, FIXTURE)
    rows = lines_of(FIXTURE)
    person = next(r for r in rows[1:] if len(r) == 31 and r[COL["Type de BAL"]] == "PER" and "@" in r[1])
    organisation = next(r for r in rows[1:] if len(r) == 31 and r[COL["Type de BAL"]] == "ORG")
    person[COL["Nom d'exercice"]] = "NOUVEAUNOM"
    organisation[COL["Dématérialisation"]] = "False" if organisation[COL["Dématérialisation"]] == "True" else "True"
    report = await import_ans_extraction(directory, write_lines(tmp_path / "edited.txt", rows))
    assert (report.created, report.updated, report.unchanged) == (0, 2, FIXTURE_VALID_ROWS - 2)
    assert report.professionals.updated == 1
    async with directory.session() as session:
        pro = await session.scalar(select(Professional).where(Professional.idnps == person[COL["Identification nationale PP"]]))
        box = await session.scalar(select(Mailbox).where(Mailbox.address == organisation[1]))
    assert pro is not None and pro.family_name == "NOUVEAUNOM"
    assert box is not None and box.dematerialisation == (organisation[COL["Dématérialisation"]] == "True")
    # The folded search columns follow the import, on create and on update.
    assert pro.search_name.startswith("nouveaunom") and pro.search_name == fold(f"NOUVEAUNOM {pro.given_name or ''}")
    accented = per_row(f"acc@{LOCAL}", rpps=add_luhn_key("1000000777"), family="LEFÈVRE-GARÇON")
    await import_rows(directory, tmp_path, accented)
    async with directory.session() as session:
        found = (await session.scalars(select(Professional).where(Professional.search_name.like("lefevre-garcon%")))).all()
    assert [p.family_name for p in found] == ["LEFÈVRE-GARÇON"]


async def test_changed_postal_address_of_a_structure_is_updated(directory: Database, tmp_path: Path) -> None:
    # The address is a dict column: a change in one of its keys must reach the comparison.
    street = COL["L4LIBELLEVOIE structure BAL"]
    row = org_row(f"accueil@{LOCAL}")
    row[street] = "RUE DES LILAS"
    await import_rows(directory, tmp_path, row)
    unchanged = await import_rows(directory, tmp_path, row)
    assert (unchanged.organisations.unchanged, unchanged.organisations.updated) == (1, 0)
    row[street] = "RUE DES ROSES"
    report = await import_rows(directory, tmp_path, row)
    assert (report.organisations.updated, report.updated, report.unchanged) == (1, 1, 0)
    async with directory.session() as session:
        organisation = await session.scalar(select(Organisation).where(Organisation.idnst == "1" + FINESS))
    assert organisation is not None and organisation.address["libelle_voie"] == "RUE DES ROSES"


async def test_type_of_an_existing_mailbox_never_changes(directory: Database, tmp_path: Path) -> None:
    await import_ans_extraction(directory, FIXTURE)
    rows = lines_of(FIXTURE)
    person = next(r for r in rows[1:] if len(r) == 31 and r[0] == "PER" and r[COL["Identification Structure"]] and "@" in r[1])
    person[0] = "ORG"
    report = await import_ans_extraction(directory, write_lines(tmp_path / "retyped.txt", rows))
    retyped = [r for r in report.rejects if r.address == person[1]]
    assert len(retyped) == 1 and retyped[0].column == "Type de BAL" and "type never changes" in retyped[0].reason
    async with directory.session() as session:
        assert await session.scalar(select(Mailbox.type).where(Mailbox.address == person[1])) == "PER"


# ----------------------------------------------------------------------------- encodings and file format


async def test_cp1252_file_is_detected_and_imported(directory: Database, tmp_path: Path) -> None:
    path = tmp_path / "cp1252.txt"
    path.write_bytes(FIXTURE.read_text(encoding="utf-8").encode("cp1252"))
    report = await import_ans_extraction(directory, path)
    assert report.encoding == "cp1252"
    assert (report.created, report.rejected) == (FIXTURE_VALID_ROWS, 6)
    accented = {r[COL["Nom d'exercice"]] for r in lines_of(FIXTURE)[1:] if len(r) == 31 and not r[COL["Nom d'exercice"]].isascii()}
    async with directory.session() as session:
        names = set((await session.scalars(select(Professional.family_name))).all())
    assert accented and accented <= names


async def test_utf8_bom_and_trailing_separator_are_accepted(directory: Database, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bom.txt", lines_of(FIXTURE), encoding="utf-8-sig", suffix="|")
    report = await import_ans_extraction(directory, path)
    assert report.encoding == "utf-8"
    assert (report.created, report.rejected) == (FIXTURE_VALID_ROWS, 6)


async def test_wrong_header_is_refused_naming_the_columns(directory: Database, tmp_path: Path) -> None:
    rows = lines_of(FIXTURE)
    rows[0][COL["Code Profession"]] = "Code profession"
    with pytest.raises(ExtractionFormatError) as caught:
        await import_ans_extraction(directory, write_lines(tmp_path / "bad.txt", rows))
    message = str(caught.value)
    assert "missing columns: 'Code Profession'" in message and "unexpected columns: 'Code profession'" in message
    assert caught.value.field == "header"
    assert await count(directory, Mailbox) == 0


async def test_header_in_another_order_is_refused(directory: Database, tmp_path: Path) -> None:
    rows = lines_of(FIXTURE)
    rows[0][0], rows[0][1] = rows[0][1], rows[0][0]
    with pytest.raises(ExtractionFormatError, match="not in the ANS order"):
        await import_ans_extraction(directory, write_lines(tmp_path / "order.txt", rows))


async def test_unreadable_file_is_a_user_error(directory: Database, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        await import_ans_extraction(directory, tmp_path / "missing.txt")


async def test_progress_is_reported_per_batch(directory: Database) -> None:
    calls: list[tuple[int, int]] = []
    await import_ans_extraction(directory, FIXTURE, progress=lambda done, total: calls.append((done, total)), batch_size=10)
    assert len(calls) >= 4
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (50, 50)


async def test_small_batches_give_the_same_result(directory: Database) -> None:
    report = await import_ans_extraction(directory, FIXTURE, batch_size=3)
    assert (report.created, report.rejected) == (FIXTURE_VALID_ROWS, 6)


# ----------------------------------------------------------------------------- row rules


async def import_rows(db: Database, tmp_path: Path, *rows: list[str]) -> Any:
    return await import_ans_extraction(db, write_lines(tmp_path / "rows.txt", [list(HEADER), *rows]))


async def test_closed_trust_entry_rejects_its_domain(directory: Database, tmp_path: Path) -> None:
    async with directory.session() as session:
        session.add(TrustedDomain(name="ferme.mssante.fr", source="whitelist",
                                  until=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)))
    report = await import_rows(directory, tmp_path, per_row("a.b@ferme.mssante.fr"))
    assert report.created == 0
    assert report.rejects[0].column == "Adresse BAL" and "neither ours nor on the trust list" in report.rejects[0].reason


async def test_idn_address_is_stored_in_a_label_form(directory: Database, tmp_path: Path) -> None:
    async with directory.session() as session:
        session.add(TrustedDomain(name="xn--hpital-test-2eb.mssante.fr", source="whitelist"))  # hôpital-test
    report = await import_rows(directory, tmp_path, per_row("Claire.Martin@HÔPITAL-test.mssante.fr"))
    assert report.created == 1, report.rejects
    async with directory.session() as session:
        assert await session.scalar(select(Mailbox.address)) == "claire.martin@xn--hpital-test-2eb.mssante.fr"


async def test_structure_id_as_raw_number_or_idnst(directory: Database, tmp_path: Path) -> None:
    report = await import_rows(directory, tmp_path,
                               org_row(f"a@{LOCAL}", structure_type="1", structure=FINESS),
                               org_row(f"b@{LOCAL}", structure_type="1", structure="1" + FINESS),
                               org_row(f"c@{LOCAL}", structure="1" + FINESS))
    assert report.created == 3 and report.organisations.created == 1
    async with directory.session() as session:
        assert await session.scalar(select(Organisation.idnst)) == "1" + FINESS


@pytest.mark.parametrize(("row", "column", "reason"), [
    (make_row(type="APP", address=f"logiciel@{LOCAL}", structure="1" + FINESS), "Type de BAL", "PER or ORG"),
    (org_row(f"x@{LOCAL}", structure="1" + FINESS[:-1] + str((int(FINESS[-1]) + 1) % 10)), "Identification Structure", "Luhn"),
    # A wrong check key is named as such whether the column holds the IDNST or the raw FINESS, with its type given.
    (org_row(f"x@{LOCAL}", structure_type="1", structure="1" + BAD_FINESS), "Identification Structure", "its Luhn key is wrong"),
    (org_row(f"x@{LOCAL}", structure_type="FINESS", structure="1" + BAD_FINESS), "Identification Structure", "its Luhn key is wrong"),
    (org_row(f"x@{LOCAL}", structure_type="1", structure=BAD_FINESS), "Identification Structure", "its Luhn key is wrong"),
    (org_row(f"x@{LOCAL}", structure_type="1", structure="75000"), "Identification Structure", "9 characters expected"),
    (org_row(f"x@{LOCAL}", structure_type="3", structure="3" + add_luhn_key("1234567800001")[:-1] + "9"),
     "Identification Structure", "its Luhn key is wrong"),
    (org_row(f"x@{LOCAL}", structure=""), "Identification Structure", "needs its structure id"),
    (per_row(f"x@{LOCAL}", family=""), "Nom d'exercice", "name"),
    (make_row(type="PER", address=f"x@{LOCAL}", family="X", profession="10"), "Identifiant PP", "RPPS"),
    (per_row(""), "Adresse BAL", "empty"),
    (per_row(f"x@{LOCAL}", family="N" * 129), "Nom d'exercice", "longer than 128 characters"),
    (org_row(f"x@{LOCAL}", service="S" * 257), "Service de rattachement", "longer than 256 characters"),
])
async def test_invalid_rows_are_rejected_naming_the_column(directory: Database, tmp_path: Path,
                                                           row: list[str], column: str, reason: str) -> None:
    report = await import_rows(directory, tmp_path, row)
    assert report.created == 0 and report.rejected == 1
    assert report.rejects[0].column == column and reason in report.rejects[0].reason
    assert report.rejects[0].line == 2


async def test_long_names_give_a_display_name_that_fits(directory: Database, tmp_path: Path) -> None:
    report = await import_rows(directory, tmp_path, make_row(type="PER", address=f"x@{LOCAL}", idnps="8" + RPPS,
                                                             family="N" * 128, given="G" * 128, profession="10"))
    assert report.created == 1, report.rejects
    async with directory.session() as session:
        assert len(await session.scalar(select(Mailbox.display_name))) == 256


async def test_first_row_naming_a_professional_wins(directory: Database, tmp_path: Path) -> None:
    report = await import_rows(directory, tmp_path, per_row(f"a@{LOCAL}", family="PREMIER"),
                               per_row(f"b@{TRUSTED}", family="SECOND"))
    assert report.created == 2 and report.professionals.created == 1
    async with directory.session() as session:
        assert (await session.scalars(select(Professional.family_name))).all() == ["PREMIER"]


async def test_mailbox_of_another_owner_is_rejected(directory: Database, tmp_path: Path) -> None:
    await import_rows(directory, tmp_path, per_row(f"a@{LOCAL}"))
    other = add_luhn_key("1999999999")
    report = await import_rows(directory, tmp_path, per_row(f"a@{LOCAL}", rpps=other))
    assert report.rejects[0].column == "Identification nationale PP" and "another professional" in report.rejects[0].reason


async def test_activity_link_is_created_once(directory: Database, tmp_path: Path) -> None:
    row = per_row(f"a@{LOCAL}", structure="1" + FINESS, name="CH DE TEST")
    row[COL["Raison Sociale structure BAL"]] = "CH DE TEST"
    first = await import_rows(directory, tmp_path, row)
    second = await import_rows(directory, tmp_path, row)
    assert (first.activities_created, second.activities_created, second.unchanged) == (1, 0, 1)
    assert await count(directory, ProfessionalOrganisation) == 1


# ----------------------------------------------------------------------------- profession table


def test_profession_labels() -> None:
    assert profession_label("10") == "Médecin"
    assert profession_label(" 70 ") == "Masseur-Kinésithérapeute"
    with pytest.raises(UserError) as caught:
        profession_label("07")
    assert caught.value.field == "profession_code"


def test_category_labels() -> None:
    assert set(CATEGORIES) == {"C", "E", "F", "M"}
    assert category_label("c") == "Civil"
    with pytest.raises(UserError) as caught:
        category_label("Z")
    assert caught.value.field == "category_code"


# ----------------------------------------------------------------------------- command line


def run_cli(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--data-dir", str(data_dir), *args], catch_exceptions=False)


def test_cli_imports_reports_rejects_and_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli(data_dir, "domain", "add", LOCAL).exit_code == 0
    assert run_cli(data_dir, "domain", "import-whitelist", str(DATA / "whitelist.xml"), "--json").exit_code == 0
    rejects_file = tmp_path / "rejects.csv"
    result = run_cli(data_dir, "directory", "import-ans", str(FIXTURE), "--json", "--rejects-file", str(rejects_file))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["created"], report["rejected"], len(report["rejects"])) == (FIXTURE_VALID_ROWS, 6, 6)
    with rejects_file.open(encoding="utf-8") as stream:
        assert sorted(int(row["line"]) for row in csv.DictReader(stream)) == sorted(FIXTURE_REJECTS)
    table = run_cli(data_dir, "directory", "import-ans", str(FIXTURE))
    assert table.exit_code == 0 and "unchanged" in table.stdout and "first seen on line 23" in table.stdout


def test_cli_refuses_a_wrong_header_with_exit_1(tmp_path: Path) -> None:
    rows = lines_of(FIXTURE)
    rows[0].pop()
    result = run_cli(tmp_path / "data", "directory", "import-ans", str(write_lines(tmp_path / "bad.txt", rows)))
    assert result.exit_code == 1
    assert "missing columns: 'Pays structure BAL'" in result.output


def test_cli_says_how_many_rows_an_empty_trust_list_refused_and_what_to_run(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli(data_dir, "domain", "add", LOCAL).exit_code == 0
    result = run_cli(data_dir, "directory", "import-ans", str(FIXTURE), "--json")
    report = json.loads(result.stdout)
    refused = [r for r in report["rejects"] if "neither ours nor on the trust list" in r["reason"]]
    assert report["untrusted_domain_rows"] == len(refused) > 1
    assert "import the ANS whitelist first" in report["advice"] and "import-whitelist" in report["advice"]
    table = run_cli(data_dir, "directory", "import-ans", str(FIXTURE))
    assert f"{len(refused)} rows were refused because their domain" in table.stdout
    assert "gateway domain import-whitelist" in table.stdout
    # Once the whitelist is in, the same file imports them.
    assert run_cli(data_dir, "domain", "import-whitelist", str(DATA / "whitelist.xml")).exit_code == 0
    again = json.loads(run_cli(data_dir, "directory", "import-ans", str(FIXTURE), "--json").stdout)
    assert again["untrusted_domain_rows"] == 1 and again["created"] == len(refused) - 1  # line 9: inconnu.example.org
    assert "update the trust list" in again["advice"]


def test_cli_reject_table_says_how_to_get_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.cli.imports.REJECTS_ON_SCREEN", 2)
    data_dir = tmp_path / "data"
    table = run_cli(data_dir, "directory", "import-ans", str(FIXTURE))
    assert table.exit_code == 0, table.output
    rejected = json.loads(run_cli(data_dir, "directory", "import-ans", str(FIXTURE), "--json").stdout)["rejected"]
    assert f"the first 2 of {rejected}" in table.stdout
    assert f"and {rejected - 2} more: run again with --rejects-file FILE.csv" in table.stdout
    rejects_file = tmp_path / "all.csv"
    written = run_cli(data_dir, "directory", "import-ans", str(FIXTURE), "--rejects-file", str(rejects_file))
    assert f"all {rejected} rejected rows are in {rejects_file}" in written.stdout
    with rejects_file.open(encoding="utf-8") as stream:
        assert len(list(csv.DictReader(stream))) == rejected


# ----------------------------------------------------------------------------- unchanged lines (source_digest)


async def test_unchanged_lines_are_not_validated_again(directory: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await import_ans_extraction(directory, FIXTURE)
    validated: list[int] = []
    validate = RowValidator.validate

    def counting(self: RowValidator, line: int, fields: list[str]) -> Any:
        validated.append(line)
        return validate(self, line, fields)

    monkeypatch.setattr(RowValidator, "validate", counting)
    again = await import_ans_extraction(directory, FIXTURE)
    assert (again.created, again.updated, again.unchanged) == (0, 0, FIXTURE_VALID_ROWS)
    # Only the refused lines are read again (a refused line leaves no digest), and they are refused again;
    # line 31, a copy of line 23, is recognised by its digest and refused as a duplicate without validation.
    assert sorted(validated) == sorted(line for line in FIXTURE_REJECTS if line != 31)
    assert {r.line for r in again.rejects} == set(FIXTURE_REJECTS)


async def test_an_edit_outside_the_import_is_undone_by_the_next_import(directory: Database, tmp_path: Path) -> None:
    """The file is the reference: an administrator's edit of imported values does not make its lines 'unchanged'."""
    from gateway.config import Settings
    from gateway.directory.service import DirectoryService
    from gateway.security.passwords import PasswordHasher

    settings = Settings()
    service = DirectoryService(directory, settings, PasswordHasher.from_settings(settings.auth))
    rows = (per_row(f"a@{LOCAL}", family="MARTIN", service="Cardiologie"), org_row(f"b@{LOCAL}"))
    await import_rows(directory, tmp_path, *rows)
    await service.update_mailbox(f"a@{LOCAL}", service="Autre")
    await service.update_professional("8" + RPPS, family_name="DUPONT")
    await service.update_organisation("1" + FINESS, name="AUTRE NOM")
    report = await import_rows(directory, tmp_path, *rows)
    assert (report.updated, report.professionals.updated, report.organisations.updated) == (2, 1, 1)
    async with directory.session() as session:
        assert await session.scalar(select(Mailbox.service).where(Mailbox.address == f"a@{LOCAL}")) == "Cardiologie"
        assert await session.scalar(select(Professional.family_name)) == "MARTIN"
        assert await session.scalar(select(Organisation.name)) == "CH DE TEST"
    again = await import_rows(directory, tmp_path, *rows)
    assert (again.updated, again.unchanged) == (0, 2)


async def test_first_line_naming_an_owner_wins_in_every_import_whatever_the_order(directory: Database,
                                                                                  tmp_path: Path) -> None:
    first = per_row(f"a@{LOCAL}", family="PREMIER")
    second = per_row(f"b@{TRUSTED}", family="SECOND")

    async def family_after(*rows: list[str]) -> str:
        await import_rows(directory, tmp_path, *rows)
        async with directory.session() as session:
            return str(await session.scalar(select(Professional.family_name)))

    assert await family_after(first, second) == "PREMIER"
    assert await family_after(second, first) == "SECOND"
    assert await family_after(first, second) == "PREMIER"
    assert await family_after(first, second) == "PREMIER"


async def test_unchanged_lines_follow_the_trust_list_and_the_local_domains(directory: Database, tmp_path: Path) -> None:
    rows = (per_row(f"a@{TRUSTED}"), org_row(f"b@{TRUSTED}"))
    await import_rows(directory, tmp_path, *rows)
    async with directory.session() as session:
        session.add(LocalDomain(name=TRUSTED))  # the operator now hosts that domain
    hosted = await import_rows(directory, tmp_path, *rows)
    assert hosted.updated == 2
    async with directory.session() as session:
        assert set((await session.scalars(select(Mailbox.hosted))).all()) == {True}
        await session.execute(LocalDomain.__table__.delete().where(LocalDomain.name == TRUSTED))
        await session.execute(TrustedDomain.__table__.update().where(TrustedDomain.name == TRUSTED)
                              .values(until=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)))
    refused = await import_rows(directory, tmp_path, *rows)
    assert (refused.unchanged, refused.rejected) == (0, 2)
    assert all("neither ours nor on the trust list" in r.reason for r in refused.rejects)


# ----------------------------------------------------------------------------- bulk writing through the driver


async def test_bulk_inserted_rows_read_back_as_the_orm_writes_them(directory: Database, tmp_path: Path) -> None:
    """The INSERTs run by the driver on tuples fill every column Core or the ORM would: defaults, timestamps,
    JSON, search columns."""
    street = {"L4NUMEROVOIE structure BAL": "12", "L4LIBELLEVOIE structure BAL": "RUE DES ÉCOLES"}
    organisation = org_row(f"secretariat@{LOCAL}", service="Cardiologie")
    person = per_row(f"claire.martin@{TRUSTED}", structure="1" + FINESS, family="LEFÈVRE", demat="true")
    for column, value in street.items():
        organisation[COL[column]] = person[COL[column]] = value
    organisation[COL["Raison Sociale structure BAL"]] = person[COL["Raison Sociale structure BAL"]] = "CH DE TEST"
    report = await import_rows(directory, tmp_path, organisation, person)
    assert (report.created, report.rejected, report.activities_created) == (2, 0, 1)
    async with directory.session() as session:
        pro = (await session.scalars(select(Professional))).one()
        org = (await session.scalars(select(Organisation))).one()
        boxes = {box.address: box for box in (await session.scalars(select(Mailbox))).all()}
        session.add(reference := Mailbox(address=f"orm@{LOCAL}", domain=LOCAL, type="ORG", organisation_id=org.id))
        await session.flush()
        await session.refresh(reference)
        assert (await session.execute(select(ProfessionalOrganisation.professional_id,
                                             ProfessionalOrganisation.organisation_id))).one() == (pro.id, org.id)
    assert (pro.idnps, pro.family_name, pro.given_name, pro.search_name) == ("8" + RPPS, "LEFÈVRE", "Claire", "lefevre claire")
    assert pro.state == "active" and pro.created_at is not None and pro.updated_at is not None
    assert org.address == {"numero_voie": "12", "libelle_voie": "RUE DES ÉCOLES"}
    assert (org.idnst, org.name, org.search_name) == ("1" + FINESS, "CH DE TEST", "ch de test")
    secretariat, claire = boxes[f"secretariat@{LOCAL}"], boxes[f"claire.martin@{TRUSTED}"]
    assert (secretariat.type, secretariat.hosted, secretariat.organisation_id, secretariat.display_name,
            secretariat.service) == ("ORG", True, org.id, "CH DE TEST - Cardiologie", "Cardiologie")
    assert (claire.type, claire.hosted, claire.professional_id, claire.dematerialisation) == ("PER", False, pro.id, True)
    for box in (secretariat, claire):  # the columns the import leaves to their defaults: as the ORM sets them
        assert (box.liste_rouge, box.preferred, box.quota_bytes, box.state, box.password_hash) == \
            (reference.liste_rouge, reference.preferred, reference.quota_bytes, reference.state, None)
        assert box.created_at is not None and box.updated_at is not None and box.source_digest is not None


async def test_the_import_puts_the_garbage_collector_back_as_it_was(directory: Database, tmp_path: Path) -> None:
    assert gc.isenabled()
    await import_rows(directory, tmp_path, per_row(f"a@{LOCAL}"))
    assert gc.isenabled()
    gc.disable()
    try:
        await import_rows(directory, tmp_path, per_row(f"b@{LOCAL}"))
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_the_sqlite_import_settings_are_put_back_even_after_a_failed_batch(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'settings.db'}")
    await db.migrate()

    async def pragmas(connection: Any) -> tuple[int, int]:
        return ((await connection.exec_driver_sql("PRAGMA temp_store")).scalar_one(),
                (await connection.exec_driver_sql("PRAGMA cache_size")).scalar_one())

    try:
        async with db.engine.connect() as connection:
            before = await pragmas(connection)
            with pytest.raises(RuntimeError, match="batch failed"):
                async with _import_settings(connection):
                    assert await pragmas(connection) == (2, -65536)  # MEMORY, 64 MiB
                    await connection.execute(insert(LocalDomain).values(name=LOCAL))
                    raise RuntimeError("batch failed")
            assert not connection.in_transaction()  # the failed batch's transaction was rolled back
            assert await pragmas(connection) == before
            assert (await connection.execute(select(func.count()).select_from(LocalDomain))).scalar_one() == 0
    finally:
        await db.dispose()
