"""The restore drill: a backup of a serving gateway with mail, a filed medical document and audit entries,
restored into an empty data directory on a fresh database, serves everything back (IMAP, the record, the
audit chain intact); the key-encryption keys are never inside the backup, and a tampered backup is refused."""

from __future__ import annotations

import imaplib
import json
import shutil
import smtplib
import sqlite3
import ssl
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.dmp_bridge.record import RecordStore
from gateway.app import open_services
from tests.dmp_bridge.filing_world import SAMPLES, TEST_INS, message_with, sample
from tests.harness import GatewayProcess, run_cli, wait_until

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

DOCUMENT = "BIO-CR-BIO_2021.01_Microbiologie_V1.xml"
BODY = "Bilan du patient: contrôle dans trois mois, merci confrère."


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _send(gateway: GatewayProcess, account: dict[str, str], recipients: list[str], message: object) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=30) as client:
        client.starttls(context=_tls(gateway))
        client.login(account["address"], account["password"])
        if isinstance(message, bytes):
            client.sendmail(account["address"], recipients, message)
        else:
            client.send_message(message, from_addr=account["address"], to_addrs=recipients)  # type: ignore[arg-type]


def _scalar(database: Path, sql: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro{'&immutable=1' if database.parent.name == 'backup' else ''}",
                         uri=True) as connection:
        return int(connection.execute(sql).fetchone()[0])


def _bodies(gateway: GatewayProcess, account: dict[str, str]) -> list[bytes]:
    with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap:
        imap.login(account["address"], account["password"])
        if imap.select("INBOX", readonly=True)[0] != "OK":
            return []
        _, found = imap.uid("SEARCH", "ALL")
        bodies = []
        for uid in found[0].split():
            _, data = imap.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
            bodies += [part[1] for part in data if isinstance(part, tuple)]
        return bodies


async def _record_documents(data_dir: Path, env: dict[str, str]) -> list[bytes]:
    async with open_services(load_settings(data_dir=data_dir, environ=env), migrate=False) as services:
        store = RecordStore(services.db, services.blobs)
        return [await store.read_content(document) for document in await store.list_for_patient(TEST_INS)]


async def test_backup_restores_mail_documents_and_audit_into_an_empty_data_directory(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    gateway.start()
    doctor, pharmacist, lab, patient = (gateway.account("PER", 0), gateway.account("PER", 1),
                                        gateway.account("APP"), gateway.account("PAT"))
    database = gateway.data_dir / "gateway.db"
    backup = tmp_path / "backup"
    try:
        _send(gateway, doctor, [pharmacist["address"]],
              f"From: {doctor['address']}\r\nTo: {pharmacist['address']}\r\nSubject: suivi\r\n\r\n{BODY}\r\n".encode())
        document = message_with(("CR.xml", sample(DOCUMENT), "text/xml"), sender=lab["address"],
                                to=patient["address"])
        del document["Return-Path"]
        _send(gateway, lab, [patient["address"]], document)
        wait_until(lambda: True if _scalar(database, "SELECT count(*) FROM filing_jobs WHERE state = 'filed'") >= 1
                   and any(BODY.encode() in body for body in _bodies(gateway, pharmacist)) else None,
                   timeout=120, what="the message delivered and the document filed", interval=0.5)

        created = gateway.cli("backup", "create", str(backup), "--json")          # online, while serving
        assert created.returncode == 0, created.stderr
        audit_entries = _scalar(backup / "database.sqlite", "SELECT count(*) FROM audit_entries")
        assert audit_entries > 0
    finally:
        gateway.stop()

    # The key-encryption keys are nowhere in the backup, not even as bytes inside another file.
    keys = gateway.data_dir / "keys"
    kek_bytes = [path.read_bytes() for path in keys.glob("kek-*.key")]
    assert kek_bytes
    files = [path for path in backup.rglob("*") if path.is_file()]
    assert not [path for path in files if path.name.startswith("kek-") or "keys" in path.relative_to(backup).parts]
    assert not [path for path in files if any(kek in path.read_bytes() for kek in kek_bytes)]

    verified = run_cli("backup", "verify", str(backup), "--keys", str(keys), "--json")
    assert verified.returncode == 0, verified.stderr
    blob = next(path for path in files if path.relative_to(backup).parts[:2] == ("files", "blobs"))
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    tampered = run_cli("backup", "verify", str(backup))
    assert tampered.returncode == 1 and "altered" in tampered.stderr
    blob.write_bytes(original)

    # The drill: an empty data directory, a fresh database, the keys brought back from where they are kept.
    restored = GatewayProcess(tmp_path / "restored", ports=dict(gateway.ports))
    result = run_cli("backup", "restore", str(backup), "--keys", str(keys), "--json", data_dir=restored.data_dir,
                     env=restored.env)
    assert result.returncode == 0, result.stderr
    refused = run_cli("backup", "restore", str(backup), data_dir=restored.data_dir, env=restored.env)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    shutil.copyfile(gateway.data_dir / "demo.json", restored.data_dir / "demo.json")   # the test's account list
    assert _scalar(restored.data_dir / "gateway.db", "SELECT count(*) FROM audit_entries") == audit_entries

    assert [sample(DOCUMENT)] == await _record_documents(restored.data_dir, restored.env)
    restored.start()
    try:
        assert any(BODY.encode() in body for body in _bodies(restored, pharmacist))
        audit = restored.cli("audit", "verify", "--json")
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert json.loads(audit.stdout)["ok"] is True
    finally:
        restored.stop()


@pytest.mark.postgres
async def test_postgresql_backup_restores_into_a_fresh_database(tmp_path: Path, pg_cluster: object) -> None:
    source_url = await pg_cluster.create_database()              # type: ignore[attr-defined]
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_DATABASE_URL": source_url})
    gateway.start()
    doctor, pharmacist = gateway.account("PER", 0), gateway.account("PER", 1)
    backup = tmp_path / "backup"
    try:
        _send(gateway, doctor, [pharmacist["address"]],
              f"From: {doctor['address']}\r\nTo: {pharmacist['address']}\r\nSubject: suivi\r\n\r\n{BODY}\r\n".encode())
        wait_until(lambda: True if any(BODY.encode() in body for body in _bodies(gateway, pharmacist)) else None,
                   timeout=120, what="the message delivered", interval=0.5)
        created = gateway.cli("backup", "create", str(backup), "--json")
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["database"] == "postgresql"
    finally:
        gateway.stop()
    keys = gateway.data_dir / "keys"
    assert run_cli("backup", "verify", str(backup), "--json").returncode == 0

    fresh_url = await pg_cluster.create_database()               # type: ignore[attr-defined]
    restored = GatewayProcess(tmp_path / "restored", ports=dict(gateway.ports),
                              extra_env={"GATEWAY_DATABASE_URL": fresh_url})
    result = run_cli("backup", "restore", str(backup), "--keys", str(keys), data_dir=restored.data_dir,
                     env=restored.env)
    assert result.returncode == 0, result.stderr
    shutil.copyfile(gateway.data_dir / "demo.json", restored.data_dir / "demo.json")
    restored.start()
    try:
        assert any(BODY.encode() in body for body in _bodies(restored, pharmacist))
        audit = restored.cli("audit", "verify", "--json")
        assert audit.returncode == 0 and json.loads(audit.stdout)["ok"] is True, audit.stdout + audit.stderr
    finally:
        restored.stop()
        await pg_cluster.drop_database(source_url)              # type: ignore[attr-defined]
        await pg_cluster.drop_database(fresh_url)               # type: ignore[attr-defined]


@pytest.mark.parametrize(("manifest", "field"), [
    ("[1, 2]", "backup"),
    ('{"format": "other/1"}', "backup"),
    ('{"format": "mss-gateway-backup/1", "files": [], "database": {}}', "manifest.files"),
    ('{"format": "mss-gateway-backup/1", "files": {"../../etc/passwd": {"sha256": "0"}}, "database": {}}',
     "manifest.files"),
    ('{"format": "mss-gateway-backup/1", "files": {"/etc/passwd": {"sha256": "0"}}, "database": {}}', "manifest.files"),
    ('{"format": "mss-gateway-backup/1", "files": {}, "database": {"kind": "sqlite", "file": "../gateway.db"}}',
     "manifest.database"),
    ('{"format": "mss-gateway-backup/1", "files": {}, "database": {"kind": "oracle", "file": "x"}}',
     "manifest.database"),
])
def test_a_hostile_manifest_is_refused_naming_the_field(tmp_path: Path, manifest: str, field: str) -> None:
    from gateway.errors import UserError
    from gateway.ops.backup import read_manifest

    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(UserError) as refused:
        read_manifest(tmp_path)
    assert refused.value.field == field
