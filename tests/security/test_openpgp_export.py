"""``--encrypt-to KEYFILE.asc``: audit and mailbox exports encrypted to an OpenPGP key with python-gnupg.

The recipient's keys live in a throwaway GNUPGHOME of the test (real gpg); the exports are made by the
real CLI as a subprocess, decrypted with ``gpg --decrypt`` and compared with what the gateway holds.
"""

from __future__ import annotations

import imaplib
import json
import mailbox
import os
import secrets
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.storage.db import Database
from tests.audit.helpers import PATIENT_A, PATIENT_B, fill
from tests.harness import GatewayProcess, run_cli

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")

PATIENCE = 60.0  # a bound on a hang, not a timing assertion


@dataclass(frozen=True)
class Keyring:
    """The recipient's side: a GNUPGHOME holding their secret keys, and public keys exported to files."""

    home: Path

    def gpg(self, *arguments: str | Path, check: bool = True, faked_time: str | None = None) -> CompletedProcess[bytes]:
        command = ["gpg", "--homedir", str(self.home), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
                   *(["--faked-system-time", faked_time] if faked_time else []), *map(str, arguments)]
        completed = subprocess.run(command, capture_output=True, check=False, timeout=120)
        if check:
            assert completed.returncode == 0, completed.stderr.decode(errors="replace")
        return completed

    def new_key(self, uid: str, algorithm: str, usage: str, expire: str = "1y", faked_time: str | None = None) -> str:
        self.gpg("--quick-gen-key", uid, algorithm, usage, expire, faked_time=faked_time)
        return self.fingerprint(uid)

    def fingerprint(self, uid: str) -> str:
        listing = self.gpg("--with-colons", "--list-keys", uid).stdout.decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def export(self, fingerprint: str, path: Path) -> Path:
        path.write_bytes(self.gpg("--armor", "--export", fingerprint).stdout)
        return path

    def decrypt(self, path: Path) -> bytes:
        return self.gpg("--decrypt", path).stdout


@dataclass(frozen=True)
class Keys:
    auditor: Path       # RSA primary (sign, certify) with an RSA encryption subkey
    ed25519: Path       # Ed25519 primary with a Curve25519 encryption subkey
    sign_only: Path
    expired: Path
    keyring: Keyring
    fingerprints: dict[str, str]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    directory = tmp_path_factory.mktemp("openpgp")
    keyring = Keyring(directory / "gnupg")
    keyring.home.mkdir(mode=0o700)
    try:
        auditor = keyring.new_key("Auditor <auditor@example.org>", "rsa3072", "sign,cert")
        keyring.gpg("--quick-add-key", auditor, "rsa3072", "encr", "1y")
        modern = keyring.new_key("Admin <admin@example.org>", "ed25519", "sign,cert")
        keyring.gpg("--quick-add-key", modern, "cv25519", "encr", "1y")
        sign_only = keyring.new_key("Signer <signer@example.org>", "ed25519", "sign")
        expired = keyring.new_key("Former <former@example.org>", "default", "default", "1d", faked_time="20200101T000000")
        yield Keys(keyring.export(auditor, directory / "auditor.asc"), keyring.export(modern, directory / "admin.asc"),
                   keyring.export(sign_only, directory / "signer.asc"), keyring.export(expired, directory / "former.asc"),
                   keyring, {"auditor": auditor, "ed25519": modern})
    finally:
        subprocess.run(["gpgconf", "--homedir", str(keyring.home), "--kill", "all"], capture_output=True, check=False)


def one_line_error(result: CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def records(text: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.decode().splitlines() if line.strip()]


# --------------------------------------------------------------------------- audit export


@dataclass
class AuditSetup:
    data_dir: Path
    scratch: Path       # TMPDIR of the CLI: where the throwaway GNUPGHOME is made, empty afterwards
    db: Database

    def cli(self, *args: str) -> CompletedProcess[str]:
        env = {**os.environ, "GATEWAY_DATABASE_URL": self.db.url, "TMPDIR": str(self.scratch)}
        return run_cli(*args, data_dir=self.data_dir, env=env)


@pytest.fixture
async def audit(database: Database, tmp_path: Path) -> AuditSetup:
    data_dir, scratch = tmp_path / "data", tmp_path / "scratch"
    scratch.mkdir()
    await fill(AuditLog.for_data_dir(database, data_dir), 8, patients=(PATIENT_A, PATIENT_B))
    return AuditSetup(data_dir, scratch, database)


@pytest.mark.parametrize("key", ["auditor", "ed25519"])
async def test_encrypted_audit_export_decrypts_to_a_verifiable_export(audit: AuditSetup, keys: Keys,
                                                                      tmp_path: Path, key: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sealed = out / "audit.jsonl.asc"
    result = audit.cli("audit", "export", str(sealed), "--encrypt-to", str(getattr(keys, key)), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["entries"] == 8 and summary["encrypted_to"] == keys.fingerprints[key]

    assert sorted(path.name for path in out.iterdir()) == ["audit.jsonl.asc"]   # no plaintext beside it
    assert list(audit.scratch.iterdir()) == []                                     # the GNUPGHOME is gone
    assert sealed.stat().st_mode & 0o077 == 0
    armoured = sealed.read_bytes()
    assert armoured.startswith(b"-----BEGIN PGP MESSAGE-----") and b"entry_hash" not in armoured

    plain = tmp_path / "decrypted.jsonl"
    plain.write_bytes(keys.keyring.decrypt(sealed))
    verified = audit.cli("audit", "verify-export", str(plain), "--key", str(audit.data_dir / "keys" / "audit-chain.key"))
    assert verified.returncode == 0, verified.stderr
    assert "intact: 8 entries" in verified.stdout and "seals verified" in verified.stdout

    # The same entries as a plain export made afterwards (which also holds the first export's own entry).
    later = audit.cli("audit", "export", str(tmp_path / "plain.jsonl"))
    assert later.returncode == 0, later.stderr
    decrypted = [r for r in records(plain.read_bytes()) if r["record"] == "entry"]
    clear = [r for r in records((tmp_path / "plain.jsonl").read_bytes()) if r["record"] == "entry"]
    assert decrypted == clear[:8] and clear[8]["event_name"] == "audit_exported"
    assert clear[8]["details"]["encrypted_to"] == summary["encrypted_to"]


@pytest.mark.parametrize("key,message", [
    ("sign_only", "cannot encrypt"),
    ("expired", "expired on 2020-01-02"),
])
async def test_audit_export_refuses_a_key_that_cannot_encrypt(audit: AuditSetup, keys: Keys, tmp_path: Path,
                                                              key: str, message: str) -> None:
    target = tmp_path / "refused.asc"
    error = one_line_error(audit.cli("audit", "export", str(target), "--encrypt-to", str(getattr(keys, key))))
    assert error.startswith("Error: --encrypt-to: key ") and message in error
    assert not target.exists() and list(tmp_path.glob(".refused*")) == [] and list(audit.scratch.iterdir()) == []
    listed = json.loads(audit.cli("audit", "list", "--event", "audit_exported", "--json").stdout)
    assert listed == []                                                             # nothing was exported


async def test_audit_export_refuses_a_file_that_is_not_a_key(audit: AuditSetup, tmp_path: Path) -> None:
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello\n")
    error = one_line_error(audit.cli("audit", "export", str(tmp_path / "x.asc"), "--encrypt-to", str(not_a_key)))
    assert error.startswith("Error: --encrypt-to: ") and "no OpenPGP public key" in error
    missing = one_line_error(audit.cli("audit", "export", str(tmp_path / "x.asc"),
                                       "--encrypt-to", str(tmp_path / "absent.asc")))
    assert "--encrypt-to: " in missing and "does not exist" in missing


async def test_audit_export_refuses_a_file_with_several_keys(audit: AuditSetup, keys: Keys, tmp_path: Path) -> None:
    both = tmp_path / "both.asc"
    both.write_bytes(keys.auditor.read_bytes() + keys.ed25519.read_bytes())
    error = one_line_error(audit.cli("audit", "export", str(tmp_path / "x.asc"), "--encrypt-to", str(both)))
    assert "--encrypt-to: " in error and "holds 2 OpenPGP keys" in error


# --------------------------------------------------------------------------- mailbox export


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _send(gateway: GatewayProcess, sender: dict[str, str], to: str, subject: str, body: str) -> None:
    raw = (f"From: {sender['address']}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
           f"Message-ID: <{secrets.token_hex(8)}@demo.test>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           f"{body}").encode()
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=30) as smtp:
        smtp.starttls(context=_tls(gateway))
        smtp.login(sender["address"], sender["password"])
        smtp.sendmail(sender["address"], [to], raw)


def _inbox(gateway: GatewayProcess, account: dict[str, str], expected: int) -> list[bytes]:
    """The INBOX's messages as IMAP serves them, once ``expected`` have arrived."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        with imaplib.IMAP4("127.0.0.1", gateway.ports["imap_port"], timeout=30) as imap:
            imap.starttls(ssl_context=_tls(gateway))
            imap.login(account["address"], account["password"])
            imap.select("INBOX", readonly=True)
            _, found = imap.uid("SEARCH", "ALL")
            uids = found[0].split()
            if len(uids) >= expected:
                return [next(p[1] for p in imap.uid("FETCH", uid, "(BODY.PEEK[])")[1] if isinstance(p, tuple))
                        for uid in uids]
        time.sleep(0.2)
    raise AssertionError(f"{expected} messages never reached {account['address']}:\n{gateway.log_text()}")


def _as_exported(raw: bytes) -> bytes:
    """What a message becomes in an mbox once our fields are removed and mboxrd quoting undone: LF line ends."""
    return raw.replace(b"\r\n", b"\n")


def _messages(path: Path) -> list[tuple[mailbox.mboxMessage, bytes]]:
    """Each message with its bytes as stored between separator lines (no re-serialisation)."""
    box = mailbox.mbox(path)
    return [(box[key], box.get_bytes(key)) for key in box.keys()]


def _unquoted(raw: bytes) -> bytes:
    lines = raw.split(b"\n")
    lines = [line for line in lines if not line.startswith((b"X-Gateway-Folder: ", b"Status: ", b"X-Status: "))]
    return b"\n".join(line[1:] if line.lstrip(b">").startswith(b"From ") and line.startswith(b">") else line
                      for line in lines)


def test_mailbox_export_encrypted_to_an_administrator(gateway: GatewayProcess, keys: Keys, tmp_path: Path) -> None:
    claire, marc = gateway.account("PER", 0), gateway.account("PER", 1)
    marker = "EXP" + secrets.token_hex(5)
    _send(gateway, marc, claire["address"], f"Bilan {marker}", "Creatinine 82 umol/L\r\nFrom the lab: normal\r\n")
    _send(gateway, marc, claire["address"], f"Suivi {marker}", "INR 2.4\r\n>From a quoted line\r\n")
    served = _inbox(gateway, claire, 2)

    sealed = tmp_path / "claire.mbox.asc"
    env = {**gateway.env, "TMPDIR": str(tmp_path)}
    result = run_cli("mailbox", "export", claire["address"], str(sealed), "--encrypt-to", str(keys.auditor), "--json",
                     data_dir=gateway.data_dir, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["messages"] == len(served) and summary["folders"]["INBOX"] == len(served)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("claire", ".claire", "gateway-gpg"))) \
        == ["claire.mbox.asc"]
    assert marker.encode() not in sealed.read_bytes()

    (tmp_path / "claire.mbox").write_bytes(keys.keyring.decrypt(sealed))
    inbox = [(m, raw) for m, raw in _messages(tmp_path / "claire.mbox") if m["X-Gateway-Folder"] == "INBOX"]
    assert [_unquoted(raw) for _m, raw in inbox] == [_as_exported(raw) for raw in served]
    assert all(m.get_from().startswith(marc["address"] + " ") and m["Status"] == "O" for m, _raw in inbox)
    text = (tmp_path / "claire.mbox").read_bytes()
    assert b"\n>From the lab: normal\n" in text and b"\n>>From a quoted line\n" in text   # mboxrd quoting

    access = json.loads(gateway.cli("audit", "list", "--event", "admin_mailbox_access", "--json").stdout)
    assert access[0]["subject"] == {"kind": "mailbox", "id": claire["address"]}
    assert access[0]["details"]["encrypted_to"] == summary["encrypted_to"]
    assert access[0]["details"]["messages"] == len(served)


def test_mailbox_export_in_clear_and_its_refusals(gateway: GatewayProcess, keys: Keys, tmp_path: Path) -> None:
    claire, marc = gateway.account("PER", 0), gateway.account("PER", 1)
    _send(gateway, claire, marc["address"], "Clair", "Compte rendu\r\n")
    served = _inbox(gateway, marc, 1)
    target = tmp_path / "marc.mbox"
    result = gateway.cli("mailbox", "export", marc["address"], str(target), "--folder", "inbox")
    assert result.returncode == 0, result.stderr
    assert f"exported {len(served)} messages of {marc['address']} (1 folders)" in result.stdout
    assert target.stat().st_mode & 0o077 == 0
    assert [_unquoted(raw) for _m, raw in _messages(target)] == [_as_exported(raw) for raw in served]

    refused = one_line_error(gateway.cli("mailbox", "export", marc["address"], str(tmp_path / "x.asc"),
                                         "--encrypt-to", str(keys.sign_only)))
    assert refused.startswith("Error: --encrypt-to: key ") and "cannot encrypt" in refused
    assert not (tmp_path / "x.asc").exists()
    unknown = one_line_error(gateway.cli("mailbox", "export", "nobody@demo.mssante.localhost", str(tmp_path / "y")))
    assert "address: no mailbox nobody@demo.mssante.localhost" in unknown
    folder = one_line_error(gateway.cli("mailbox", "export", marc["address"], str(tmp_path / "z"), "--folder", "Nope"))
    assert "folder: no folder 'Nope'" in folder and not (tmp_path / "z").exists()
