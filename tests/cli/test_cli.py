"""The administrator's CLI, run as a subprocess as an administrator would: output, --json, exit codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway.directory.identifiers import add_luhn_key
from tests.harness import run_cli

RPPS = add_luhn_key("1000000044")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "data"
    result = run_cli("init", "--demo", data_dir=path)
    assert result.returncode == 0, result.stderr
    return path


def gw(data_dir: Path, *args: str, input: str | None = None):
    return run_cli(*args, data_dir=data_dir, input=input)


def test_init_demo_writes_demo_json(data_dir: Path) -> None:
    demo = json.loads((data_dir / "demo.json").read_text())
    assert stat.S_IMODE(os.stat(data_dir / "demo.json").st_mode) == 0o600
    types = {account["type"] for account in demo["accounts"]}
    assert {"PER", "ORG", "APP", "PAT"} <= types
    for account in demo["accounts"]:
        assert account["address"] and len(account["password"]) >= 12
    assert set(demo["listeners"]) >= {"smtp_submission", "smtp_submissions", "smtp_relay", "imap", "imaps"}
    assert all(listener["port"] > 1024 for listener in demo["listeners"].values())
    assert Path(demo["ca_certificate"]).is_file()


def test_init_demo_twice_is_refused_with_one_line(data_dir: Path) -> None:
    result = gw(data_dir, "init", "--demo")
    assert result.returncode == 1
    assert "demo.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_init_without_demo_is_idempotent(data_dir: Path) -> None:
    assert gw(data_dir, "init").returncode == 0


def test_demo_accounts_authenticate_through_the_directory(data_dir: Path) -> None:
    listed = json.loads(gw(data_dir, "mailbox", "list", "--json").stdout)
    demo = json.loads((data_dir / "demo.json").read_text())
    assert {a["address"] for a in demo["accounts"]} <= {m["address"] for m in listed}


def test_listing_json_and_table(data_dir: Path) -> None:
    as_json = gw(data_dir, "directory", "list", "professional", "--json")
    assert as_json.returncode == 0
    rows = json.loads(as_json.stdout)
    assert any(row["family_name"] == "MEDECIN" for row in rows)
    table = gw(data_dir, "directory", "list", "professional")
    assert "MEDECIN" in table.stdout and "idnps" in table.stdout


def test_add_show_update_professional(data_dir: Path) -> None:
    added = gw(data_dir, "directory", "add", "professional", "--id-type", "RPPS", "--id-value", RPPS,
               "--family-name", "DURAND", "--given-name", "Anne", "--profession", "10", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["idnps"] == "8" + RPPS
    updated = gw(data_dir, "directory", "update", "professional", "8" + RPPS, "--given-name", "Anna", "--json")
    assert json.loads(updated.stdout)["given_name"] == "Anna"
    shown = json.loads(gw(data_dir, "directory", "show", "professional", "8" + RPPS, "--json").stdout)
    assert shown["given_name"] == "Anna"
    found = json.loads(gw(data_dir, "directory", "search", "professional", "durand", "--json").stdout)
    assert [row["idnps"] for row in found] == ["8" + RPPS]


@pytest.mark.parametrize("args, field", [
    (["directory", "add", "professional", "--id-type", "RPPS", "--id-value", "10000000040", "--family-name", "X", "--profession", "10"], "idnps"),
    (["directory", "add", "professional", "--id-type", "RPPS", "--id-value", add_luhn_key("1000000045"), "--family-name", "X", "--profession", "999"], "profession_code"),
    (["directory", "add", "patient", "--ins", "279035121518988", "--birth-family-name", "X", "--first-given-name", "Y", "--birth-date", "1979-03-28", "--sex", "F"], "ins"),
    (["mailbox", "create", "x@gmail.com", "--type", "PER", "--owner", "8" + add_luhn_key("1000000001")], "address"),
    (["mailbox", "create", "claire.medecin@demo.mssante.localhost", "--type", "PER", "--owner", "8" + add_luhn_key("1000000001")], "address"),
    (["directory", "show", "professional", "899999999999"], "idnps"),
    (["domain", "trust", "add", "demo.mssante.localhost"], "name"),
])
def test_user_errors_exit_1_with_one_line_naming_the_field(data_dir: Path, args: list[str], field: str) -> None:
    result = gw(data_dir, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"{field}:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(data_dir: Path) -> None:
    assert gw(data_dir, "directory", "add", "professional").returncode == 2  # missing required options
    assert gw(data_dir, "mailbox", "create", "--type", "XYZ", "--owner", "1").returncode == 2
    assert gw(data_dir, "no-such-command").returncode == 2


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    env = os.environ | {"GATEWAY_LISTEN_IMAP_PORT": "99999"}
    result = run_cli("domain", "list", data_dir=tmp_path / "d", env=env)
    assert result.returncode == 1
    assert "listen.imap_port" in result.stderr and "GATEWAY_LISTEN_IMAP_PORT" in result.stderr


def test_mailbox_password_delegate_disable(data_dir: Path) -> None:
    box = "secretariat.cardiologie@demo.mssante.localhost"
    result = gw(data_dir, "mailbox", "set-password", box, "--password-stdin", input="a long enough password\n")
    assert result.returncode == 0, result.stderr
    weak = gw(data_dir, "mailbox", "set-password", box, "--password-stdin", input="short\n")
    assert weak.returncode == 1 and "password:" in weak.stderr
    delegated = gw(data_dir, "mailbox", "delegate", box, "sophie.infirmier@demo.mssante.localhost", "--rights", "read", "--json")
    assert json.loads(delegated.stdout)["rights"] == ["read"]
    shown = json.loads(gw(data_dir, "mailbox", "show", box, "--json").stdout)
    assert {"delegate": "sophie.infirmier@demo.mssante.localhost", "rights": "read"} in shown["delegates"]
    assert gw(data_dir, "mailbox", "disable", "marc.pharmacien@demo.mssante.localhost").returncode == 0
    state = json.loads(gw(data_dir, "mailbox", "show", "marc.pharmacien@demo.mssante.localhost", "--json").stdout)["state"]
    assert state == "disabled"


def test_patient_state_and_domains(data_dir: Path) -> None:
    patients = json.loads(gw(data_dir, "directory", "list", "patient", "--json").stdout)
    ins = patients[0]["ins"]
    assert gw(data_dir, "directory", "update", "patient", ins, "--state", "opposed").returncode == 0
    assert json.loads(gw(data_dir, "directory", "show", "patient", ins, "--json").stdout)["state"] == "opposed"
    domains = json.loads(gw(data_dir, "domain", "list", "--json").stdout)
    assert {d["name"] for d in domains} == {"demo.mssante.localhost", "patient.mssante.localhost"}
    trusted = json.loads(gw(data_dir, "domain", "trust", "list", "--json").stdout)
    assert any(d["active"] for d in trusted)
