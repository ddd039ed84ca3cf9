"""Exports carry their hashes; ``verify_export`` re-checks them offline and catches tampering."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditKey, AuditLog, BreakKind, verify_export
from gateway.audit.chain import canonical_json, chain_hash
from gateway.audit.export import record_to_entry
from gateway.errors import UserError
from gateway.storage.db import Database
from tests.audit.helpers import PATIENT_A, PATIENT_B, fill

KEY = AuditKey(b"k" * 32)


@pytest.fixture
async def log(database: Database) -> AuditLog:
    audit_log = AuditLog(database, KEY)
    await fill(audit_log, 12, patients=(PATIENT_A, PATIENT_B))
    return audit_log


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical_json(record).decode() + "\n" for record in records), encoding="utf-8")


async def test_jsonl_round_trip(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    summary = await log.export(target)
    assert (summary.entries, summary.first_seq, summary.last_seq) == (12, 1, 12)
    assert target.stat().st_mode & 0o777 == 0o600
    report = await verify_export(target)
    assert report.ok and report.complete and report.checked == 12 and not report.seals_checked
    sealed = await verify_export(target, key=KEY)
    assert sealed.ok and sealed.seals_checked


async def test_csv_round_trip(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.csv"
    await log.export(target, format="csv")
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert len(rows) == 12 and rows[0]["event_name"] == "document_read"
    report = await verify_export(target, key=KEY)
    assert report.ok and report.checked == 12 and not report.complete


async def test_export_to_a_stream(log: AuditLog) -> None:
    stream = io.StringIO()
    summary = await log.export(stream)
    lines = stream.getvalue().splitlines()
    assert summary.entries == 12 and len(lines) == 14
    assert json.loads(lines[0])["record"] == "header" and json.loads(lines[-1])["entries"] == 12


async def test_patient_export_holds_only_that_patient_and_verifies(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "a.jsonl"
    summary = await log.export(target, patient=PATIENT_A)
    entries = [record for record in read_lines(target) if record["record"] == "entry"]
    assert summary.entries == 6 and {record["patient"] for record in entries} == {PATIENT_A}
    report = await verify_export(target, key=KEY)
    assert report.ok and not report.complete


async def test_since_export_is_a_verifiable_suffix(log: AuditLog, tmp_path: Path) -> None:
    [seventh] = [entry for entry in await log.search(limit=12) if entry.seq == 7]
    target = tmp_path / "since.jsonl"
    summary = await log.export(target, since=seventh.occurred_at)
    assert (summary.first_seq, summary.last_seq) == (7, 12)
    assert (await verify_export(target)).ok
    empty = await log.export(tmp_path / "none.jsonl", since=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    assert empty.entries == 0 and (await verify_export(tmp_path / "none.jsonl")).ok


async def test_modified_line_is_found(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    await log.export(target)
    records = read_lines(target)
    records[5]["actor"]["name"] = "Dr Nobody"  # line 6 = entry 5
    write_lines(target, records)
    report = await verify_export(target)
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (5, BreakKind.MODIFIED)


@pytest.mark.parametrize(("drop_seq", "kind"), [(4, BreakKind.DELETED), (12, BreakKind.DELETED)])
async def test_removed_line_is_found(log: AuditLog, tmp_path: Path, drop_seq: int, kind: BreakKind) -> None:
    target = tmp_path / "audit.jsonl"
    await log.export(target)
    records = [record for record in read_lines(target) if record.get("seq") != drop_seq]
    write_lines(target, records)
    report = await verify_export(target)
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (drop_seq, kind)


async def test_cut_tail_with_matching_trailer_is_found_against_the_head(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    await log.export(target)
    records = read_lines(target)
    kept = [record for record in records if record.get("seq", 0) <= 10]
    kept[-1] = {"record": "trailer", "entries": 10, "last_seq": 10}
    write_lines(target, kept)
    report = await verify_export(target)
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (11, BreakKind.DELETED)


async def test_tampered_csv_is_found(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.csv"
    await log.export(target, format="csv")
    target.write_text(target.read_text(encoding="utf-8").replace("192.0.2.10", "192.0.2.99", 1), encoding="utf-8")
    report = await verify_export(target)
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (1, BreakKind.MODIFIED)


async def test_export_rehashed_without_the_key_is_caught_with_it(log: AuditLog, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    await log.export(target)
    records = read_lines(target)
    records[3]["details"]["type"] = "forged"
    prev_hash = records[3]["prev_hash"]
    for record in records[3:-1]:
        record["prev_hash"] = prev_hash
        record["entry_hash"] = prev_hash = chain_hash(prev_hash, record_to_entry(record).body())
    records[0]["head"]["entry_hash"] = prev_hash
    write_lines(target, records)
    assert (await verify_export(target)).ok, "without the key a consistent rewrite is undetectable"
    report = await verify_export(target, key=KEY)
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (3, BreakKind.FORGED)


async def test_not_an_export_is_a_user_error(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl"
    target.write_text('{"hello": 1}\n')
    with pytest.raises(UserError, match="header"):
        await verify_export(target)
    target.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="neither"):
        await verify_export(target)


async def test_unknown_format_names_the_field(log: AuditLog, tmp_path: Path) -> None:
    with pytest.raises(UserError) as refused:
        await log.export(tmp_path / "x.xml", format="xml")
    assert refused.value.field == "format"
