"""Grouped access notices (SQLite and PostgreSQL): reads are counted durably and told at most once a period,
an emergency access at once; the mail is content-free and links to the webmail's access history."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.config import Settings, load_settings
from gateway.dmp_bridge.access_history import french_moment
from gateway.dmp_bridge.notice_tables import NoticeFrequency, PatientNoticeState, PatientNotificationPreferences
from gateway.dmp_bridge.notify import (
    ACCESS_SUBJECT,
    EMERGENCY_SUBJECT,
    HISTORY_PATH,
    AccessNoticeRecorder,
    AccessNoticeTask,
)
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from tests.dmp_bridge.filing_world import OTHER_INS, TEST_INS, build_world
from tests.dmp_bridge.test_worker import Bench

PUBLIC_URL = "https://mss.example.test"


@pytest.fixture
def notice_settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", environ={},
                         overrides={"webmail": {"public_url": PUBLIC_URL}})


@pytest.fixture
async def bench(database: Database, notice_settings: Settings, tmp_path: Path) -> Bench:
    return Bench(await build_world(database, notice_settings), tmp_path / "spool")


def _task(bench: Bench) -> AccessNoticeTask:
    return AccessNoticeTask(bench.world.db, bench.world.settings, bench.generated)


async def _notices(bench: Bench) -> list[str]:
    await bench.flush_generated()
    return [str(message["Subject"]) for message in await bench.inbox(bench.world.patient_address)
            if message["Auto-Submitted"] == "auto-generated"]


async def _state(bench: Bench) -> PatientNoticeState | None:
    async with bench.world.db.session() as session:
        return await session.scalar(select(PatientNoticeState).where(PatientNoticeState.patient_id == bench.world.patient_id))


async def test_five_reads_make_one_content_free_notice_linking_to_the_history(bench: Bench) -> None:
    woken: list[bool] = []
    recorder = AccessNoticeRecorder(bench.world.db, wake=lambda: woken.append(True))
    for _ in range(5):
        await recorder.notify_patient(TEST_INS, "ignored")
    assert len(woken) == 5
    assert await _task(bench).run_once() == 1
    await bench.flush_generated()
    [notice] = [m for m in await bench.inbox(bench.world.patient_address) if m["Auto-Submitted"] == "auto-generated"]
    body = notice.get_content()
    assert notice["Subject"] == ACCESS_SUBJECT
    assert "5 fois" in body
    assert f"{PUBLIC_URL}{HISTORY_PATH}" in body
    assert "MEDECIN" not in body and "biologie" not in body.lower()
    state = await _state(bench)
    assert state is not None and state.pending_reads == 0 and state.last_sent_at is not None
    assert await _task(bench).run_once() == 0, "nothing left to tell"


async def test_reads_after_a_notice_wait_for_the_period_then_go_out_together(bench: Bench) -> None:
    recorder = AccessNoticeRecorder(bench.world.db)
    task = _task(bench)
    await recorder.notify_patient(TEST_INS, "")
    sent_at = utcnow()
    assert await task.run_once(now=sent_at) == 1
    for _ in range(3):
        await recorder.notify_patient(TEST_INS, "")
    assert await task.run_once(now=sent_at + dt.timedelta(hours=23)) == 0
    assert len(await _notices(bench)) == 1
    assert await task.run_once(now=sent_at + dt.timedelta(hours=24, seconds=1)) == 1
    await bench.flush_generated()
    bodies = [m.get_content() for m in await bench.inbox(bench.world.patient_address)
              if m["Auto-Submitted"] == "auto-generated"]
    assert len(bodies) == 2 and "3 fois" in bodies[1]


async def test_an_emergency_access_is_told_at_once_even_within_the_period(bench: Bench) -> None:
    recorder = AccessNoticeRecorder(bench.world.db)
    task = _task(bench)
    await recorder.notify_patient(TEST_INS, "")
    now = utcnow()
    assert await task.run_once(now=now) == 1
    await recorder.notify_patient(TEST_INS, "", emergency=True)
    assert await task.run_once(now=now + dt.timedelta(minutes=5)) == 1
    assert await _notices(bench) == [ACCESS_SUBJECT, EMERGENCY_SUBJECT]


async def test_pending_reads_survive_a_restart(bench: Bench) -> None:
    recorder = AccessNoticeRecorder(bench.world.db)
    first = _task(bench)
    await recorder.notify_patient(TEST_INS, "")
    now = utcnow()
    await first.run_once(now=now)
    await recorder.notify_patient(TEST_INS, "")
    await first.run_once(now=now + dt.timedelta(hours=1))  # not due yet; then the gateway stops
    restarted = _task(bench)
    assert await restarted.run_once(now=now + dt.timedelta(days=1, minutes=1)) == 1
    assert len(await _notices(bench)) == 2


async def test_a_read_arriving_while_the_notice_is_sent_is_kept_for_the_next_one(bench: Bench) -> None:
    recorder = AccessNoticeRecorder(bench.world.db)
    task = _task(bench)
    await recorder.notify_patient(TEST_INS, "")
    now = utcnow()
    [due] = await task._due(now)
    await recorder.notify_patient(TEST_INS, "")  # between reading the counters and claiming them
    assert await task._send(due, now) == 0
    state = await _state(bench)
    assert state is not None and state.pending_reads == 2
    assert await task.run_once(now=now) == 1
    assert await _notices(bench) == [ACCESS_SUBJECT]


async def test_weekly_frequency_and_notification_address_are_honoured(bench: Bench) -> None:
    async with bench.world.db.session() as session:
        session.add(PatientNotificationPreferences(patient_id=bench.world.patient_id, address=bench.world.doctor_address,
                                                   frequency=NoticeFrequency.WEEKLY.value))
    recorder = AccessNoticeRecorder(bench.world.db)
    task = _task(bench)
    await recorder.notify_patient(TEST_INS, "")
    now = utcnow()
    assert await task.run_once(now=now) == 1
    await recorder.notify_patient(TEST_INS, "")
    assert await task.run_once(now=now + dt.timedelta(days=2)) == 0
    assert await task.run_once(now=now + dt.timedelta(days=7, seconds=1)) == 1
    await bench.flush_generated()
    assert len([m for m in await bench.inbox(bench.world.doctor_address) if m["Subject"] == ACCESS_SUBJECT]) == 2
    assert await _notices(bench) == [], "the chosen address replaces the patient's mailbox"


async def test_one_patients_reads_never_reach_another_patient(bench: Bench) -> None:
    recorder = AccessNoticeRecorder(bench.world.db)
    await recorder.notify_patient(OTHER_INS, "")
    await _task(bench).run_once()
    assert await _notices(bench) == []


def test_french_moment_is_paris_time() -> None:
    winter = dt.datetime(2025, 12, 3, 13, 2, tzinfo=dt.timezone.utc)
    assert french_moment(winter).startswith("3 décembre")
    assert french_moment(winter).endswith("à 14 h 02")
    assert french_moment(dt.datetime(2025, 6, 1, 6, 5, tzinfo=dt.timezone.utc)).startswith("1er juin")
