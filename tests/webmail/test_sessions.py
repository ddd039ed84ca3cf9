"""Webmail sessions and the TOTP second factor on the database (SQLite and PostgreSQL): timeouts, rotation,
sign-out everywhere, single use of codes, recovery codes."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from gateway.config import Settings, load_settings
from gateway.directory.identifiers import add_nir_key
from gateway.directory.service import DirectoryService
from gateway.security.at_rest import FieldSealer
from gateway.security.keys import KeyManager
from gateway.security.passwords import PasswordHasher
from gateway.storage.db import Database
from gateway.storage.models import Mailbox
from gateway.webmail.sessions import SessionStore, Stage, token_digest
from gateway.webmail.tables import WebmailRecoveryCode, WebmailSession, WebmailTotp
from gateway.webmail.totp import TotpService


async def patient_mailbox(db: Database, settings: Settings) -> int:
    directory = DirectoryService(db, settings, PasswordHasher.from_settings(settings.auth))
    await directory.add_local_domain(settings.directory.patient_domain, kind="patient")
    patient = await directory.add_patient(ins=add_nir_key("2790351215189"), ins_oid="1.2.250.1.213.1.4.10",
                                          birth_family_name="PAT-TROIS", first_given_name="DOMINIQUE",
                                          birth_date="1979-03-28", sex="F")
    async with db.session() as s:
        return int(await s.scalar(select(Mailbox.id).where(Mailbox.address == patient["mailbox"])) or 0)


@pytest.fixture
def webmail_settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", environ={
        "GATEWAY_WEBMAIL_SESSION_IDLE_MINUTES": "15", "GATEWAY_WEBMAIL_SESSION_ABSOLUTE_HOURS": "8"})


async def test_idle_and_absolute_timeouts(database: Database, webmail_settings: Settings) -> None:
    mailbox_id = await patient_mailbox(database, webmail_settings)
    store = SessionStore(database, webmail_settings.webmail)
    idle_token = await store.open(mailbox_id, Stage.SIGNED_IN, "password+totp", "127.0.0.1")
    session = await store.lookup(idle_token)
    assert session is not None and session.stage is Stage.SIGNED_IN
    await store.age(session, dt.timedelta(minutes=16))
    assert await store.lookup(idle_token) is None                       # idle for longer than 15 min
    async with database.session() as s:
        assert await s.get(WebmailSession, token_digest(idle_token)) is None   # and deleted

    busy_token = await store.open(mailbox_id, Stage.SIGNED_IN, "password+totp", None)
    busy = await store.lookup(busy_token)
    assert busy is not None
    async with database.session() as s:                                   # active a minute ago, opened 9 h ago
        row = await s.get(WebmailSession, token_digest(busy_token))
        assert row is not None
        row.created_at = row.created_at - dt.timedelta(hours=9)
    assert await store.lookup(busy_token) is None

    pending = await store.open(mailbox_id, Stage.SECOND_FACTOR, "password", None)
    half = await store.lookup(pending)
    assert half is not None
    await store.age(half, dt.timedelta(minutes=6))                        # sign_in_pending_minutes = 5
    assert await store.lookup(pending) is None

    forgotten = await store.open(mailbox_id, Stage.SIGNED_IN, "password+totp", None)   # never presented again
    stale = await store.lookup(forgotten)
    assert stale is not None
    await store.age(stale, dt.timedelta(hours=1))
    await store.open(mailbox_id, Stage.SIGNED_IN, "password+totp", None)
    async with database.session() as s:                                   # purged when the mailbox signs in again
        assert await s.get(WebmailSession, token_digest(forgotten)) is None


async def test_rotation_and_sign_out_everywhere(database: Database, webmail_settings: Settings) -> None:
    mailbox_id = await patient_mailbox(database, webmail_settings)
    store = SessionStore(database, webmail_settings.webmail)
    first = await store.open(mailbox_id, Stage.SECOND_FACTOR, "password", None)
    session = await store.lookup(first)
    assert session is not None
    second = await store.advance(session, Stage.SIGNED_IN, "password+totp", None)
    assert second != first and await store.lookup(first) is None       # the pre-2FA id no longer works
    other = await store.open(mailbox_id, Stage.SIGNED_IN, "password+totp", None)
    assert await store.close_all(mailbox_id) == 2
    assert await store.lookup(second) is None and await store.lookup(other) is None
    async with database.session() as s:                                   # only digests are stored
        assert (await s.scalars(select(WebmailSession.token_hash))).all() == []


async def test_totp_codes_are_single_use_and_recovery_codes_work_once(database: Database,
                                                                        webmail_settings: Settings) -> None:
    mailbox_id = await patient_mailbox(database, webmail_settings)
    totp = TotpService(database, FieldSealer(KeyManager(database, webmail_settings.data_path / "keys")),
                       "test", window=1)
    enrolment = await totp.begin(mailbox_id, "patient@example")
    assert enrolment.uri.startswith("otpauth://totp/") and "<svg" in enrolment.qr_svg
    assert not await totp.enrolled(mailbox_id)
    assert await totp.confirm(mailbox_id, "000000" if pyotp.TOTP(enrolment.secret).now() != "000000" else "111111") is None
    step = int(time.time()) // 30
    codes = await totp.confirm(mailbox_id, pyotp.TOTP(enrolment.secret).at(step * 30))
    assert codes is not None and len(set(codes)) == 10 and await totp.enrolled(mailbox_id)
    async with database.session() as s:
        row = await s.get(WebmailTotp, mailbox_id)
        assert row is not None and enrolment.secret not in row.secret_sealed          # sealed at rest
        stored = (await s.scalars(select(WebmailRecoveryCode.code_hash))).all()
        assert not set(codes) & set(stored)                                           # digests only
    assert not await totp.verify(mailbox_id, pyotp.TOTP(enrolment.secret).at(step * 30))   # used at enrolment
    following = pyotp.TOTP(enrolment.secret).at((step + 1) * 30)
    assert await totp.verify(mailbox_id, following)
    assert not await totp.verify(mailbox_id, following)                                # RFC 6238 5.2: once
    assert await totp.use_recovery_code(mailbox_id, codes[0].lower().replace("-", " "))
    assert not await totp.use_recovery_code(mailbox_id, codes[0])
    assert await totp.recovery_codes_left(mailbox_id) == 9
