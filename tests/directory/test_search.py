"""Directory search ignores accents and case, the same on SQLite and PostgreSQL, through the CLI.

SQLite's lower() folds ASCII only and neither database ignores accents: the
search columns are folded in Python (gateway.directory.search.fold) when rows are
written and the query is folded by the same function.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.config import load_settings
from gateway.directory.identifiers import add_luhn_key, add_nir_key
from gateway.directory.search import fold, prefix_upper_bound
from gateway.directory.service import DirectoryService
from gateway.security.passwords import PasswordHasher
from gateway.storage.db import Database
from tests.harness import run_cli
from tests.pg import PgCluster

LEFEVRE = "8" + add_luhn_key("1000000101")
GARCON = "8" + add_luhn_key("1000000102")
DUPONT = "8" + add_luhn_key("1000000103")
FINESS = add_luhn_key("75000011")
INS = add_nir_key("1850575123456")


def test_fold_removes_accents_case_and_ligatures() -> None:
    assert fold("LEFÈVRE") == fold("Lefèvre") == fold("lefevre") == "lefevre"
    assert fold("GARÇON") == "garcon"
    assert fold("Hélène") == fold("HELENE") == "helene"
    assert fold("CŒUR  Straße") == "coeur strasse"
    assert fold("") == fold(None) == ""
    # ASCII text takes a shorter path: same case folding and space collapsing.
    assert fold("  Jean\tPIERRE  de LA  Tour ") == fold("  Jéan\tPIERRE  de LA  Tour ") == "jean pierre de la tour"


def test_prefix_upper_bound_is_just_above_every_extension() -> None:
    bound = prefix_upper_bound("lefevre")
    assert "lefevre" < "lefevre zz" < "lefevrezzz" < bound and not "lefevrf".startswith("lefevre")
    assert bound <= "lefevrf"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def cli_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Path, dict[str, str]]]:
    """A data directory and the environment of a CLI on SQLite (the default) or on PostgreSQL."""
    env = os.environ.copy()
    if request.param == "sqlite":
        yield tmp_path / "data", env
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    url = await cluster.create_database()
    yield tmp_path / "data", env | {"GATEWAY_DATABASE_URL": url}
    await cluster.drop_database(url)


def _cli(cli_env: tuple[Path, dict[str, str]], *args: str, input: str | None = None) -> str:
    data_dir, env = cli_env
    result = run_cli(*args, data_dir=data_dir, env=env, input=input)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _keys(rows: list[dict[str, str]], key: str = "idnps") -> list[str]:
    return [row[key] for row in rows]


def test_search_is_accent_and_case_insensitive_through_the_cli(cli_env: tuple[Path, dict[str, str]]) -> None:
    _cli(cli_env, "directory", "add", "professional", "--idnps", LEFEVRE, "--family-name", "LEFÈVRE",
         "--given-name", "Hélène", "--profession", "10")
    _cli(cli_env, "directory", "add", "professional", "--idnps", GARCON, "--family-name", "GARÇON",
         "--given-name", "Léo", "--profession", "21")
    _cli(cli_env, "directory", "add", "professional", "--idnps", DUPONT, "--family-name", "DUPONT",
         "--given-name", "Anne", "--profession", "10")
    _cli(cli_env, "directory", "add", "organisation", "--id-type", "FINESS", "--id-value", FINESS,
         "--name", "Clinique Sainte-Hélène")

    def search(*words: str) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = json.loads(_cli(cli_env, "directory", "search", *words, "--json"))
        return rows

    assert _keys(search("professional", "LEFÈVRE")) == [LEFEVRE]  # exactly as stored
    assert _keys(search("professional", "Lefèvre")) == [LEFEVRE]
    assert _keys(search("professional", "lefevre h")) == [LEFEVRE]  # name then given name, as a prefix
    assert _keys(search("professional", "GARÇON")) == [GARCON]
    assert _keys(search("professional", "garcon")) == [GARCON]
    assert _keys(search("professional", "HELENE")) == [LEFEVRE]  # a given name, inside the name
    assert _keys(search("professional", "pharmacien")) == [GARCON]  # the profession label
    # Without a kind every kind is searched; each record says which kind it is.
    everywhere = search("HELENE")
    assert sorted((row["kind"], row.get("idnps") or row.get("idnst")) for row in everywhere) == [
        ("organisation", "1" + FINESS), ("professional", LEFEVRE)]
    table = _cli(cli_env, "directory", "search", "hélène")
    assert "organisation" in table and "professional" in table and "LEFÈVRE" in table
    # Show without a kind finds the key in whichever kind has it.
    shown = json.loads(_cli(cli_env, "directory", "show", LEFEVRE, "--json"))
    assert shown["kind"] == "professional" and shown["family_name"] == "LEFÈVRE"


def test_search_without_match_and_wildcards_in_the_query(cli_env: tuple[Path, dict[str, str]]) -> None:
    _cli(cli_env, "directory", "add", "professional", "--idnps", DUPONT, "--family-name", "DUPONT",
         "--given-name", "Anne", "--profession", "10")
    assert json.loads(_cli(cli_env, "directory", "search", "professional", "%", "--json")) == []
    assert json.loads(_cli(cli_env, "directory", "search", "professional", "d_pont", "--json")) == []
    assert _keys(json.loads(_cli(cli_env, "directory", "search", "professional", "dup", "--json"))) == [DUPONT]


def test_show_without_kind_names_what_was_looked_for(tmp_path: Path) -> None:
    result = run_cli("directory", "show", "899999999999", data_dir=tmp_path / "data")
    assert result.returncode == 1
    assert "key:" in result.stderr and "professional (IDNPS)" in result.stderr
    unknown_kind = run_cli("directory", "search", "dentist", "lefevre", data_dir=tmp_path / "data")
    assert unknown_kind.returncode == 2 and "'dentist' is not one of organisation" in unknown_kind.stderr


def test_add_patient_reads_the_password_from_stdin_never_the_command_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run_cli("init", data_dir=data_dir, check=True)  # the local domains, the patients' one included
    args = ["directory", "add", "patient", "--ins", INS, "--birth-family-name", "Bérard", "--first-given-name",
            "Élodie", "--birth-date", "1979-03-28", "--sex", "F"]
    assert run_cli(*args, "--password", "secret on the command line", data_dir=data_dir).returncode == 2
    added = run_cli(*args, "--password-stdin", "--json", data_dir=data_dir, input="a long enough password\n")
    assert added.returncode == 0, added.stderr
    address = json.loads(added.stdout)["mailbox"]

    async def login() -> bool:
        settings = load_settings(data_dir=data_dir, environ={})
        db = Database(settings.database_url)
        try:
            service = DirectoryService(db, settings, PasswordHasher.from_settings(settings.auth))
            return await service.authenticate(address, "a long enough password") is not None
        finally:
            await db.dispose()

    import asyncio
    assert asyncio.run(login())
    found = json.loads(run_cli("directory", "search", "patient", "ELODIE", "--json", data_dir=data_dir).stdout)
    assert [row["ins"] for row in found] == [INS]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_migration_backfills_rows_written_before_it(backend: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    cluster: PgCluster | None = None
    if backend == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        url = await cluster.create_database()
    db = Database(url)
    try:
        await db.migrate("0001")  # the directory as it was before the search columns
        async with db.engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO professionals (idnps, id_type, id_value, family_name, given_name, profession_code,"
                " profession_label, state) VALUES (:idnps, 'RPPS', :value, 'LEFÈVRE', 'Hélène', '10', 'Médecin', 'active')"),
                {"idnps": LEFEVRE, "value": LEFEVRE[1:]})
        await db.migrate()
        settings = load_settings(data_dir=tmp_path / "data", environ={})
        service = DirectoryService(db, settings, PasswordHasher.from_settings(settings.auth))
        assert _keys(await service.list_professionals(query="lefevre")) == [LEFEVRE]
        assert _keys(await service.list_professionals(query="HELENE")) == [LEFEVRE]
    finally:
        await db.dispose()
        if cluster is not None:
            await cluster.drop_database(url)
