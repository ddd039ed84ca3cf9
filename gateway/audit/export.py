"""Audit exports an auditor can re-verify offline, and their verification.

JSONL (the auditable format): a header line (what was exported, and the chain
head at that moment, with its seal), one line per entry with every hashed
field plus ``prev_hash``, ``entry_hash`` and ``seal``, then a trailer with the
entry count. An export of the whole log is checked from the genesis hash to the
head; one starting later (``--since``) is checked link by link from its first
entry to the head; one filtered by patient is sparse, so each entry's hash is
checked and links only between entries with adjacent numbers.

CSV (for spreadsheets): the same entry columns, details as canonical JSON. It
has no header record, so it is always checked like a sparse export.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from gateway.audit.chain import (
    CANONICAL_VERSION,
    Actor,
    AuditEntry,
    AuditKey,
    ChainBreak,
    ChainHead,
    ChainWalker,
    BreakKind,
    Outcome,
    Source,
    Subject,
    VerifyReport,
    canonical_json,
    format_timestamp,
    parse_timestamp,
)
from gateway.errors import UserError

ExportFormat = Literal["jsonl", "csv"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("jsonl", "csv")
FORMAT_NAME = "gateway-audit-export"
CSV_COLUMNS = (
    "seq", "at", "event", "event_name", "label_fr", "actor_kind", "actor_id", "actor_name", "actor_role",
    "patient", "subject_kind", "subject_id", "outcome", "reason", "door", "ip", "details",
    "prev_hash", "entry_hash", "seal",
)


@dataclass(frozen=True)
class ExportScope:
    """What an export holds: everything from ``from_seq`` up to ``head``, maybe one patient's only."""

    from_seq: int
    head: ChainHead | None
    patient: str | None = None
    since: dt.datetime | None = None

    @property
    def sparse(self) -> bool:
        return self.patient is not None


@dataclass(frozen=True)
class ExportSummary:
    format: ExportFormat
    entries: int
    first_seq: int | None
    last_seq: int | None
    head_seq: int

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "entries": self.entries, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "head_seq": self.head_seq}


def check_format(value: str) -> ExportFormat:
    if value not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {value!r}: use jsonl or csv", field="format")
    return value


def entry_to_record(entry: AuditEntry) -> dict[str, Any]:
    record = {"record": "entry", **entry.body(), "event_name": entry.event_name, "label_fr": entry.label_fr}
    record.update(prev_hash=entry.prev_hash, entry_hash=entry.entry_hash, seal=entry.seal)
    return record


def record_to_entry(record: dict[str, Any]) -> AuditEntry:
    """Rebuild an entry from an export line (KeyError/TypeError/ValueError on a malformed one)."""
    if record.get("v") != CANONICAL_VERSION:
        raise ValueError(f"unsupported entry version {record.get('v')!r}")
    actor, subject, outcome, source = record["actor"], record["subject"], record["outcome"], record["source"]
    return AuditEntry(
        seq=int(record["seq"]), occurred_at=parse_timestamp(record["at"]), event_code=int(record["event"]),
        actor=Actor(actor["kind"], actor["id"], actor["name"], actor["role"]),
        patient=record["patient"],
        subject=Subject(subject["kind"], subject["id"]) if subject is not None else None,
        outcome=Outcome(outcome["status"], outcome["reason"]),
        source=Source(source["door"], source["ip"]),
        details=dict(record["details"]),
        prev_hash=str(record["prev_hash"]), entry_hash=str(record["entry_hash"]), seal=record["seal"],
    )


def entry_to_csv_row(entry: AuditEntry) -> list[str]:
    values: dict[str, Any] = {
        "seq": entry.seq, "at": format_timestamp(entry.occurred_at), "event": entry.event_code,
        "event_name": entry.event_name, "label_fr": entry.label_fr,
        "actor_kind": entry.actor.kind, "actor_id": entry.actor.id, "actor_name": entry.actor.display_name,
        "actor_role": entry.actor.role, "patient": entry.patient,
        "subject_kind": entry.subject.kind if entry.subject else None,
        "subject_id": entry.subject.id if entry.subject else None,
        "outcome": entry.outcome.status, "reason": entry.outcome.reason,
        "door": entry.source.door, "ip": entry.source.ip,
        "details": canonical_json(entry.details).decode("utf-8"),
        "prev_hash": entry.prev_hash, "entry_hash": entry.entry_hash, "seal": entry.seal,
    }
    # Optional fields are never empty strings (append refuses them), so "" safely means None.
    return ["" if values[column] is None else str(values[column]) for column in CSV_COLUMNS]


def csv_row_to_entry(row: dict[str, str]) -> AuditEntry:
    def optional(column: str) -> str | None:
        return row[column] or None

    subject_kind = optional("subject_kind")
    return AuditEntry(
        seq=int(row["seq"]), occurred_at=parse_timestamp(row["at"]), event_code=int(row["event"]),
        actor=Actor(row["actor_kind"], row["actor_id"], row["actor_name"], optional("actor_role")),
        patient=optional("patient"),
        subject=Subject(subject_kind, row["subject_id"]) if subject_kind else None,
        outcome=Outcome(row["outcome"], optional("reason")),
        source=Source(row["door"], optional("ip")),
        details=dict(json.loads(row["details"])),
        prev_hash=row["prev_hash"], entry_hash=row["entry_hash"], seal=optional("seal"),
    )


class ExportWriter:
    """Writes one export to a text stream: header, entries, trailer."""

    def __init__(self, stream: IO[str], fmt: ExportFormat, scope: ExportScope) -> None:
        self.stream = stream
        self.format = fmt
        self.scope = scope
        self.count = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self._csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None

    def header(self, exported_at: dt.datetime) -> None:
        if self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)
            return
        head = self.scope.head
        self._json_line({
            "record": "header", "format": FORMAT_NAME, "version": CANONICAL_VERSION,
            "exported_at": format_timestamp(exported_at), "from_seq": self.scope.from_seq,
            "patient": self.scope.patient,
            "since": format_timestamp(self.scope.since) if self.scope.since else None,
            "head": {"seq": head.seq, "entry_hash": head.entry_hash, "seal": head.seal} if head else None,
        })

    def entry(self, entry: AuditEntry) -> None:
        if self._csv is not None:
            self._csv.writerow(entry_to_csv_row(entry))
        else:
            self._json_line(entry_to_record(entry))
        self.count += 1
        self.first_seq = entry.seq if self.first_seq is None else self.first_seq
        self.last_seq = entry.seq

    def trailer(self) -> ExportSummary:
        if self._csv is None:
            self._json_line({"record": "trailer", "entries": self.count, "last_seq": self.last_seq})
        head_seq = self.scope.head.seq if self.scope.head else 0
        return ExportSummary(self.format, self.count, self.first_seq, self.last_seq, head_seq)

    def _json_line(self, value: dict[str, Any]) -> None:
        self.stream.write(canonical_json(value).decode("utf-8") + "\n")


@dataclass
class _ParsedExport:
    scope: ExportScope
    trailer: dict[str, Any] | None
    is_csv: bool


async def verify_export(path: Path, *, key: AuditKey | None = None) -> VerifyReport:
    """Re-verify an export offline: every hash, every link it can check, the head, the seals if given a key."""
    parsed = _read_layout(path)
    known = {entry.entry_hash for entry in _entries(path, parsed.is_csv)}

    async def hash_known(value: str) -> bool:
        return value in known

    walker = ChainWalker(key=key, hash_known=hash_known, expected_seq=parsed.scope.from_seq,
                         sparse=parsed.scope.sparse or parsed.is_csv)
    anchored = parsed.scope.from_seq == 1
    for entry in _entries(path, parsed.is_csv):
        if not anchored:  # an export starting later cannot check its first link: take it as given
            walker.expected_prev, anchored = entry.prev_hash, True
        broken = await walker.feed(entry)
        if broken is not None:
            return walker.report(broken, parsed.scope.head, complete=False)
    if not anchored and parsed.scope.head is not None:  # nothing after from_seq: the head is the anchor
        walker.expected_prev = parsed.scope.head.entry_hash
    broken = _check_trailer(walker, parsed) or walker.finish(None if walker.sparse else parsed.scope.head)
    complete = not walker.sparse and parsed.scope.from_seq == 1
    return walker.report(broken, parsed.scope.head, complete=complete)


def _read_layout(path: Path) -> _ParsedExport:
    """Header and trailer of a JSONL export; a CSV export has neither."""
    try:
        with path.open(encoding="utf-8", newline="") as stream:
            first_line = stream.readline()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", field="file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", field="file") from None
    if not first_line.startswith("{"):
        if first_line.strip() != ",".join(CSV_COLUMNS):
            raise UserError(f"{path} is neither a JSONL nor a CSV audit export", field="file")
        return _ParsedExport(ExportScope(from_seq=1, head=None), None, is_csv=True)
    header = _json_record(first_line, 1)
    if header.get("record") != "header" or header.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: line 1 is not an audit export header", field="file")
    return _ParsedExport(_scope_from_header(header), _last_trailer(path), is_csv=False)


def _scope_from_header(header: dict[str, Any]) -> ExportScope:
    head = header.get("head")
    return ExportScope(
        from_seq=int(header.get("from_seq") or 1),
        head=ChainHead(int(head["seq"]), str(head["entry_hash"]), head.get("seal")) if head else None,
        patient=header.get("patient"),
        since=parse_timestamp(header["since"]) if header.get("since") else None,
    )


def _last_trailer(path: Path) -> dict[str, Any] | None:
    last: dict[str, Any] | None = None
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            record = _json_record(line, number) if line.strip() else {}
            last = record if record.get("record") == "trailer" else last
    return last


def _check_trailer(walker: ChainWalker, parsed: _ParsedExport) -> ChainBreak | None:
    if parsed.is_csv:
        return None
    next_seq = (walker.last_seq or parsed.scope.from_seq - 1) + 1
    if parsed.trailer is None:
        return ChainBreak(next_seq, BreakKind.DELETED, "the export is truncated: its trailer is missing")
    announced = int(parsed.trailer.get("entries", -1))
    if announced != walker.checked:
        kind = BreakKind.DELETED if walker.checked < announced else BreakKind.INSERTED
        return ChainBreak(next_seq, kind, f"the trailer announces {announced} entries, the file holds {walker.checked}")
    return None


def _entries(path: Path, is_csv: bool) -> Iterator[AuditEntry]:
    with path.open(encoding="utf-8", newline="") as stream:
        if is_csv:
            yield from _csv_entries(stream)
            return
        for number, line in enumerate(stream, start=1):
            record = _json_record(line, number) if line.strip() else {}
            if record.get("record") == "entry":
                yield _entry_or_error(record, number)


def _csv_entries(stream: IO[str]) -> Iterator[AuditEntry]:
    for number, row in enumerate(csv.DictReader(stream), start=2):
        try:
            yield csv_row_to_entry(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"line {number} is not an audit entry ({exc})", field="file") from None


def _entry_or_error(record: dict[str, Any], number: int) -> AuditEntry:
    try:
        return record_to_entry(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"line {number} is not an audit entry ({exc})", field="file") from None


def _json_record(line: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"line {number} is not JSON ({exc.msg})", field="file") from None
    if not isinstance(value, dict):
        raise UserError(f"line {number} is not a JSON object", field="file")
    return value

