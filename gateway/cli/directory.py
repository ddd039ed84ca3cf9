"""``gateway directory``: organisations, professionals and patients.

Each kind is named by its national key: an organisation by its IDNST, a
professional by its IDNPS, a patient by its INS.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from gateway.cli.common import emit_record, emit_rows, json_option, with_services
from gateway.cli.imports import import_ans_command

KINDS = ("organisation", "professional", "patient")
COLUMNS = {
    "organisation": ["idnst", "name", "id_type", "postal_code", "state"],
    "professional": ["idnps", "family_name", "given_name", "profession_label", "state"],
    "patient": ["ins", "birth_family_name", "first_given_name", "birth_date", "sex", "state"],
}


@click.group()
def directory() -> None:
    """Organisations, professionals and patients."""


directory.add_command(import_ans_command, "import-ans")


# ----------------------------------------------------------------------------- add


@directory.group()
def add() -> None:
    """Add an organisation, a professional or a patient."""


@add.command("organisation")
@click.option("--idnst", help="national structure id (1+FINESS, 2+SIREN, 3+SIRET, 4+RPPS rang, 0+ADELI rang)")
@click.option("--id-type", type=click.Choice(["FINESS", "SIREN", "SIRET", "RPPS_RANG", "ADELI_RANG"], case_sensitive=False),
              help="with --id-value, instead of --idnst")
@click.option("--id-value", help="the raw FINESS/SIREN/SIRET number")
@click.option("--name", required=True, help="raison sociale")
@click.option("--trade-name", help="enseigne commerciale")
@click.option("--postal-code")
@click.option("--address", "address_parts", multiple=True, metavar="KEY=VALUE",
              help="address line, e.g. --address street='1 rue X' --address city=Paris (repeatable)")
@json_option
def add_organisation(idnst: str | None, id_type: str | None, id_value: str | None, name: str, trade_name: str | None,
                     postal_code: str | None, address_parts: tuple[str, ...], as_json: bool) -> None:
    """Add an organisation (hospital, laboratory, practice...)."""
    address = _key_values(address_parts, "address")
    record = with_services(lambda s: s.directory.add_organisation(
        idnst=idnst, id_type=id_type, id_value=id_value, name=name, trade_name=trade_name,
        postal_code=postal_code, address=address))
    emit_record(record, as_json=as_json)


@add.command("professional")
@click.option("--idnps", help="national id: 8+RPPS or 0+ADELI")
@click.option("--id-type", type=click.Choice(["RPPS", "ADELI"], case_sensitive=False), help="with --id-value, instead of --idnps")
@click.option("--id-value", help="the raw RPPS (11 digits) or ADELI (9) number")
@click.option("--family-name", required=True)
@click.option("--given-name")
@click.option("--civility", help="civilité d'exercice, e.g. DR, M, MME")
@click.option("--profession", "profession_code", required=True, help="profession code (TRE_G15), e.g. 10 médecin, 21 pharmacien, 60 infirmier")
@click.option("--category", "category_code", help="profession category (C civil, M militaire, E étudiant)")
@click.option("--savoir-faire", "savoir_faire_code", help="specialty code")
@click.option("--savoir-faire-label")
@click.option("--organisation", "organisations", multiple=True, help="IDNST of an organisation where they practise (repeatable)")
@json_option
def add_professional(idnps: str | None, id_type: str | None, id_value: str | None, family_name: str, given_name: str | None,
                     civility: str | None, profession_code: str, category_code: str | None, savoir_faire_code: str | None,
                     savoir_faire_label: str | None, organisations: tuple[str, ...], as_json: bool) -> None:
    """Add a health professional."""
    record = with_services(lambda s: s.directory.add_professional(
        idnps=idnps, id_type=id_type, id_value=id_value, family_name=family_name, given_name=given_name,
        civility=civility, profession_code=profession_code, category_code=category_code,
        savoir_faire_code=savoir_faire_code, savoir_faire_label=savoir_faire_label, organisations=organisations))
    emit_record(record, as_json=as_json)


@add.command("patient")
@click.option("--ins", required=True, help="matricule INS: the 15-character NIR or NIA with its key")
@click.option("--ins-oid", default="1.2.250.1.213.1.4.10", show_default=True,
              help="INS OID: .8 NIR, .9 NIA, .10 test, .11 demonstration (under 1.2.250.1.213.1.4)")
@click.option("--birth-family-name", required=True, help="nom de naissance")
@click.option("--first-given-name", required=True, help="premier prénom de l'acte de naissance")
@click.option("--given-names", help="all given names, space-separated")
@click.option("--used-family-name", help="nom utilisé")
@click.option("--birth-date", required=True, help="YYYY-MM-DD")
@click.option("--sex", required=True, type=click.Choice(["M", "F", "I"], case_sensitive=False))
@click.option("--birthplace", "birthplace_code", help="INSEE place code of birth (5 characters)")
@click.option("--no-mailbox", is_flag=True, help="do not open the patient's Mon espace santé mailbox")
@click.option("--password-prompt", is_flag=True, help="set the mailbox password now, asked on the terminal")
@click.option("--password-stdin", is_flag=True,
              help="read the mailbox password from the first line of standard input (never on the command line, "
                   "where `ps` and the shell history would show it)")
@json_option
def add_patient(ins: str, ins_oid: str, birth_family_name: str, first_given_name: str, given_names: str | None,
                used_family_name: str | None, birth_date: str, sex: str, birthplace_code: str | None,
                no_mailbox: bool, password_prompt: bool, password_stdin: bool, as_json: bool) -> None:
    """Add a patient (and open their mailbox <INS>@<patient domain>)."""
    password = _new_password(prompt=password_prompt, stdin=password_stdin, no_mailbox=no_mailbox)
    record = with_services(lambda s: s.directory.add_patient(
        ins=ins, ins_oid=ins_oid, birth_family_name=birth_family_name, first_given_name=first_given_name,
        given_names=given_names, used_family_name=used_family_name, birth_date=birth_date, sex=sex,
        birthplace_code=birthplace_code, with_mailbox=not no_mailbox, password=password))
    emit_record(record, as_json=as_json)


# ----------------------------------------------------------------------------- update


@directory.group()
def update() -> None:
    """Change an organisation, a professional or a patient (national ids are fixed)."""


@update.command("organisation")
@click.argument("idnst")
@click.option("--name")
@click.option("--trade-name")
@click.option("--postal-code")
@click.option("--address", "address_parts", multiple=True, metavar="KEY=VALUE", help="replaces the address (repeatable)")
@click.option("--state", type=click.Choice(["active", "disabled"]))
@json_option
def update_organisation(idnst: str, name: str | None, trade_name: str | None, postal_code: str | None,
                        address_parts: tuple[str, ...], state: str | None, as_json: bool) -> None:
    """Change an organisation."""
    address = _key_values(address_parts, "address") if address_parts else None
    record = with_services(lambda s: s.directory.update_organisation(
        idnst, name=name, trade_name=trade_name, postal_code=postal_code, address=address, state=state))
    emit_record(record, as_json=as_json)


@update.command("professional")
@click.argument("idnps")
@click.option("--family-name")
@click.option("--given-name")
@click.option("--civility")
@click.option("--profession", "profession_code")
@click.option("--category", "category_code")
@click.option("--savoir-faire", "savoir_faire_code")
@click.option("--savoir-faire-label")
@click.option("--add-organisation", help="IDNST of an organisation to link")
@click.option("--remove-organisation", help="IDNST of an organisation to unlink")
@click.option("--state", type=click.Choice(["active", "disabled"]))
@json_option
def update_professional(idnps: str, as_json: bool, **changes: Any) -> None:
    """Change a professional."""
    record = with_services(lambda s: s.directory.update_professional(idnps, **changes))
    emit_record(record, as_json=as_json)


@update.command("patient")
@click.argument("ins")
@click.option("--birth-family-name")
@click.option("--first-given-name")
@click.option("--given-names")
@click.option("--used-family-name")
@click.option("--birth-date")
@click.option("--sex", type=click.Choice(["M", "F", "I"], case_sensitive=False))
@click.option("--birthplace", "birthplace_code")
@click.option("--state", type=click.Choice(["active", "opposed", "closed"]),
              help="opposed or closed: the patient's mailbox receives nothing any more")
@json_option
def update_patient(ins: str, as_json: bool, **changes: Any) -> None:
    """Change a patient's traits or state."""
    record = with_services(lambda s: s.directory.update_patient(ins, **changes))
    emit_record(record, as_json=as_json)


# ----------------------------------------------------------------------------- disable, show, list, search


@directory.command()
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("key")
def disable(kind: str, key: str) -> None:
    """Disable an organisation or professional; close a patient's space."""
    if kind == "organisation":
        with_services(lambda s: s.directory.update_organisation(key, state="disabled"))
    elif kind == "professional":
        with_services(lambda s: s.directory.update_professional(key, state="disabled"))
    else:
        with_services(lambda s: s.directory.update_patient(key, state="closed"))
    click.echo(f"{kind} {key} {'closed' if kind == 'patient' else 'disabled'}")


@directory.command()
@click.argument("words", nargs=-1, required=True, metavar="[KIND] KEY")
@json_option
def show(words: tuple[str, ...], as_json: bool) -> None:
    """Show one organisation (IDNST), professional (IDNPS) or patient (INS).

    KIND (organisation, professional or patient) may be left out: the key is then looked up in every kind.
    """
    kind, key = _kind_and_text(words, "KEY")
    getters = {"organisation": "show_organisation", "professional": "show_professional", "patient": "show_patient"}
    if kind is None:
        record = with_services(lambda s: s.directory.show_any(key))
    else:
        record = with_services(lambda s: getattr(s.directory, getters[kind])(key))
    emit_record(record, as_json=as_json)


@directory.command("list")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1))
@json_option
def list_(kind: str, limit: int, as_json: bool) -> None:
    """List organisations, professionals or patients."""
    _listing(kind, None, limit, as_json)


@directory.command()
@click.argument("words", nargs=-1, required=True, metavar="[KIND] QUERY")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="at most this many of each kind")
@json_option
def search(words: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Search by name or national id, ignoring accents and case ("lefevre" finds LEFÈVRE).

    Names starting with QUERY come first, then those containing it. KIND (organisation,
    professional or patient) may be left out: every kind is searched.
    """
    kind, query = _kind_and_text(words, "QUERY")
    if kind is not None:
        _listing(kind, query, limit, as_json)
        return
    rows = with_services(lambda s: s.directory.search_everything(query, limit=limit))
    if as_json:
        emit_rows(rows, [], as_json=True)
        return
    emit_rows([_summary_row(row) for row in rows], ["kind", "key", "name", "detail", "state"], as_json=False)


def _kind_and_text(words: tuple[str, ...], name: str) -> tuple[str | None, str]:
    """(kind or None, the rest): the kind is the first word when it is one of KINDS."""
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2 and words[0] in KINDS:
        return words[0], words[1]
    if len(words) == 2:
        raise click.BadParameter(f"{words[0]!r} is not one of {', '.join(KINDS)}; quote a {name} of several words",
                                 param_hint="KIND")
    raise click.UsageError(f"expected [KIND] {name}; quote a {name} of several words")


def _summary_row(record: dict[str, Any]) -> dict[str, Any]:
    """One line of a search over every kind: its key, name, a detail and state."""
    kind = record["kind"]
    if kind == "organisation":
        return {"kind": kind, "key": record["idnst"], "name": record["name"],
                "detail": record.get("postal_code") or "", "state": record["state"]}
    if kind == "professional":
        name = " ".join(part for part in (record.get("given_name"), record["family_name"]) if part)
        return {"kind": kind, "key": record["idnps"], "name": name, "detail": record["profession_label"],
                "state": record["state"]}
    return {"kind": kind, "key": record["ins"], "name": f"{record['first_given_name']} {record['birth_family_name']}",
            "detail": str(record["birth_date"]), "state": record["state"]}


def _listing(kind: str, query: str | None, limit: int, as_json: bool) -> None:
    listers = {"organisation": "list_organisations", "professional": "list_professionals", "patient": "list_patients"}
    rows = with_services(lambda s: getattr(s.directory, listers[kind])(query=query, limit=limit))
    emit_rows(rows, COLUMNS[kind], as_json=as_json)


def _new_password(*, prompt: bool, stdin: bool, no_mailbox: bool) -> str | None:
    """The mailbox password from the terminal or standard input; None when neither was asked for."""
    if (prompt or stdin) and no_mailbox:
        raise click.UsageError("--no-mailbox opens no mailbox: a password has nowhere to go")
    if prompt and stdin:
        raise click.UsageError("--password-prompt and --password-stdin exclude each other")
    if stdin:
        password = str(sys.stdin.readline()).rstrip("\r\n")
        if not password:
            raise click.BadParameter("standard input gave an empty first line", param_hint="--password-stdin")
        return password
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True)) if prompt else None


def _key_values(parts: tuple[str, ...], field: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{part!r}: expected KEY=VALUE", param_hint=f"--{field}")
        values[key.strip()] = value.strip()
    return values
