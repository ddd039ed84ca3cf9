"""``gateway audit`` run as a real subprocess on a data directory, against SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from gateway.audit import AuditEvent, AuditLog
from gateway.storage.db import Database
from tests.audit.helpers import PATIENT_A, PATIENT_B, fill, insert_forged_after, raw, rewrite_and_rehash, swap_seq
from tests.harness import run_cli


@dataclass
class AuditSetup:
    data_dir: Path
    db: Database
    log: AuditLog

    def cli(self, *args: str) -> CompletedProcess[str]:
        env = os.environ.copy()
        env["GATEWAY_DATABASE_URL"] = self.db.url
        return run_cli(*args, data_dir=self.data_dir, env=env)


@pytest.fixture
async def setup(database: Database, tmp_path: Path) -> AuditSetup:
    """Eight entries written by the library with the data directory's key, as the gateway writes them."""
    data_dir = tmp_path / "data"
    log = AuditLog.for_data_dir(database, data_dir)
    await fill(log, 8, patients=(PATIENT_A, PATIENT_B))
    return AuditSetup(data_dir, database, log)


def assert_broken(result: CompletedProcess[str], seq: int, kind: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"broken at entry {seq}: {kind}" in lines[0]


async def test_intact_log_verifies_and_the_check_is_logged(setup: AuditSetup) -> None:
    result = setup.cli("audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "intact: 8 entries (1..8), hashes and seals verified" in result.stdout
    [newest] = await setup.log.search(limit=1)
    assert newest.event is AuditEvent.AUDIT_VERIFIED and newest.actor.kind == "admin"
    report = json.loads(setup.cli("audit", "verify", "--json").stdout)
    assert report["ok"] and report["checked"] == 9 and report["seals_checked"]


async def test_verify_catches_a_modified_entry(setup: AuditSetup) -> None:
    await raw(setup.db, "UPDATE audit_entries SET patient_ins = :other WHERE seq = 4", other=PATIENT_A)
    assert_broken(setup.cli("audit", "verify"), 4, "modified")
    report = json.loads(setup.cli("audit", "verify", "--json").stdout)
    assert (report["ok"], report["broken_seq"], report["kind"]) == (False, 4, "modified")


async def test_a_broken_chain_is_recorded_as_an_error_not_a_refusal(setup: AuditSetup) -> None:
    """Since revision 0023 ``refused`` is a decision on a request and ``error`` a failure inside the server: a
    log found tampered with is the server's integrity failing, nothing the operator asked was refused."""
    await raw(setup.db, "UPDATE audit_entries SET patient_ins = :other WHERE seq = 4", other=PATIENT_A)
    assert_broken(setup.cli("audit", "verify"), 4, "modified")
    [newest] = await setup.log.search(limit=1)
    assert newest.event is AuditEvent.AUDIT_VERIFIED
    assert (newest.outcome.status, newest.outcome.is_refused) == ("error", False)
    assert "broken at entry 4: modified" in (newest.outcome.reason or "")


async def test_verify_catches_a_deleted_entry(setup: AuditSetup) -> None:
    await raw(setup.db, "DELETE FROM audit_entries WHERE seq = 6")
    assert_broken(setup.cli("audit", "verify"), 6, "deleted")


async def test_verify_catches_a_reordered_pair(setup: AuditSetup) -> None:
    await swap_seq(setup.db, 5, 6)
    assert_broken(setup.cli("audit", "verify"), 5, "reordered")


async def test_verify_catches_an_inserted_forged_entry(setup: AuditSetup) -> None:
    await insert_forged_after(setup.db, 2)
    assert_broken(setup.cli("audit", "verify"), 3, "inserted")


async def test_verify_catches_a_chain_rehashed_without_the_key(setup: AuditSetup) -> None:
    await rewrite_and_rehash(setup.db, from_seq=2)
    assert_broken(setup.cli("audit", "verify"), 2, "forged")


async def test_export_then_verify_export(setup: AuditSetup, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    exported = setup.cli("audit", "export", str(target), "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["entries"] == 8
    checked = setup.cli("audit", "verify-export", str(target))
    assert checked.returncode == 0 and "intact: 8 entries" in checked.stdout
    key_file = setup.data_dir / "keys" / "audit-chain.key"
    sealed = setup.cli("audit", "verify-export", str(target), "--key", str(key_file), "--json")
    assert json.loads(sealed.stdout)["seals_checked"] is True
    [newest] = await setup.log.search(limit=1)
    assert newest.event is AuditEvent.AUDIT_EXPORTED


async def test_tampered_export_is_refused(setup: AuditSetup, tmp_path: Path) -> None:
    target = tmp_path / "audit.csv"
    assert setup.cli("audit", "export", str(target), "--format", "csv").returncode == 0
    target.write_text(target.read_text(encoding="utf-8").replace("Dr Marie Durand", "Dr Marie Dupont", 1))
    assert_broken(setup.cli("audit", "verify-export", str(target)), 1, "modified")


async def test_patient_export_and_listing(setup: AuditSetup, tmp_path: Path) -> None:
    target = tmp_path / "patient.jsonl"
    result = setup.cli("audit", "export", str(target), "--patient", PATIENT_B, "--since", "2000-01-01")
    assert result.returncode == 0 and "exported 4 entries" in result.stdout
    listed = setup.cli("audit", "list", "--patient", PATIENT_B, "--json")
    rows = json.loads(listed.stdout)
    assert {row["patient"] for row in rows} == {PATIENT_B}
    assert [row["event_name"] for row in rows][0] == "audit_exported"
    patient_view = await setup.log.entries_for_patient(PATIENT_B)
    assert patient_view[0].event is AuditEvent.AUDIT_CONSULTED


async def test_list_by_event_and_user_errors(setup: AuditSetup) -> None:
    rows = json.loads(setup.cli("audit", "list", "--event", "document_read", "--json").stdout)
    assert [row["seq"] for row in rows] == [7, 4, 1]
    unknown = setup.cli("audit", "list", "--event", "document_eaten")
    assert unknown.returncode == 1 and "event: unknown audit event 'document_eaten'" in unknown.stderr
    bad_ins = setup.cli("audit", "list", "--patient", "12345")
    assert bad_ins.returncode == 1 and "patient:" in bad_ins.stderr
    bad_date = setup.cli("audit", "export", "x.jsonl", "--since", "yesterday")
    assert bad_date.returncode == 1 and "since:" in bad_date.stderr
    usage = setup.cli("audit", "export", "x.jsonl", "--format", "xml")
    assert usage.returncode == 2
