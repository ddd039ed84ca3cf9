"""The hash chain, without a database: entries, canonical form, hashes, seals, verification.

Hash: ``entry_hash = SHA-256(prev_hash || canonical JSON of the entry)``, where
``prev_hash`` is the previous entry's hash as 64 lower-case hex characters
(64 zeros for the first entry) and the canonical JSON has sorted keys, no
whitespace, UTF-8 and timestamps in RFC 3339 UTC with microseconds. The entry's
``seq`` is hashed too, so an entry cannot be moved without its hash changing.

Seal: with an audit key (32 random bytes in ``<data_dir>/keys/audit-chain.key``,
mode 0600, never in the database) each entry also stores
``HMAC-SHA-256(key, entry_hash)``, and the chain head its own HMAC. The plain
chain lets anyone, an auditor with an export included, check that nothing was
altered, removed, inserted or reordered; but someone with write access to the
database could rewrite an entry and re-hash everything after it. The seal makes
that detectable unless they also hold the key file: database access alone is
not enough to forge history.

The walker below classifies the first break it finds, so that ``verify`` can say
*what* happened, not only *where*.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.events import AuditEvent
from gateway.errors import UserError

GENESIS_HASH = "0" * 64
CANONICAL_VERSION = 1
KEY_BYTES = 32
AUDIT_KEY_FILE = Path("keys") / "audit-chain.key"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# How far from its stored seq an entry's original position is searched when its
# hash fails: enough to recognise swaps, shifts and renumbering near the break.
RENUMBER_WINDOW = 16


class ActorKind(enum.StrEnum):
    PROFESSIONAL = "professional"
    PATIENT = "patient"
    ADMIN = "admin"
    SYSTEM = "system"
    APPLICATION = "application"
    UNAUTHENTICATED = "unauthenticated"   # someone who tried to sign in and failed: the id is the login tried
    MAILBOX = "mailbox"                   # a signed-in mail account at a door (SMTP, IMAP): the id is its login


class Door(enum.StrEnum):
    """Where the action came in."""

    FHIR = "fhir"
    WEBMAIL = "webmail"
    CLI = "cli"
    SMTP = "smtp"
    IMAP = "imap"
    HTTPS = "https"      # the HTTPS listener before any request names webmail or FHIR (a refused PROXY header)
    SYSTEM = "system"


class OutcomeStatus(enum.StrEnum):
    SUCCESS = "success"
    REFUSED = "refused"    # the request was refused: a decision (policy, bad input, missing right)
    ERROR = "error"        # the request failed inside the server (a 500, a SERVERBUG): a fault, not a decision


@dataclass(frozen=True)
class Actor:
    """Who acted: a professional (IDNPS + profession code), a patient (INS), an admin, the system..."""

    kind: str
    id: str
    display_name: str
    role: str | None = None  # profession code for professionals (e.g. "10" médecin), admin role...

    @classmethod
    def professional(cls, idnps: str, display_name: str, profession_code: str | None) -> Actor:
        return cls(ActorKind.PROFESSIONAL, idnps, display_name, profession_code)

    @classmethod
    def patient(cls, ins: str, display_name: str) -> Actor:
        return cls(ActorKind.PATIENT, ins, display_name)

    @classmethod
    def admin(cls, login: str, display_name: str | None = None) -> Actor:
        return cls(ActorKind.ADMIN, login, display_name or login, "admin")

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(ActorKind.SYSTEM, component, component)

    @classmethod
    def application(cls, application_id: str, display_name: str) -> Actor:
        return cls(ActorKind.APPLICATION, application_id, display_name)

    @classmethod
    def unauthenticated(cls, login: str) -> Actor:
        return cls(ActorKind.UNAUTHENTICATED, login, login)


@dataclass(frozen=True)
class Subject:
    """What the action was about: a document, a binary, a mailbox, a professional, the record."""

    kind: str
    id: str

    @classmethod
    def document(cls, document_id: str) -> Subject:
        return cls("document", document_id)

    @classmethod
    def binary(cls, binary_id: str) -> Subject:
        return cls("binary", binary_id)

    @classmethod
    def mailbox(cls, address: str) -> Subject:
        return cls("mailbox", address)

    @classmethod
    def professional(cls, idnps: str) -> Subject:
        return cls("professional", idnps)


@dataclass(frozen=True)
class Outcome:
    status: str = OutcomeStatus.SUCCESS
    reason: str | None = None

    @classmethod
    def success(cls) -> Outcome:
        return cls(OutcomeStatus.SUCCESS)

    @classmethod
    def refused(cls, reason: str) -> Outcome:
        return cls(OutcomeStatus.REFUSED, reason)

    @classmethod
    def error(cls, reason: str) -> Outcome:
        return cls(OutcomeStatus.ERROR, reason)

    @property
    def is_refused(self) -> bool:
        return self.status == OutcomeStatus.REFUSED


@dataclass(frozen=True)
class Source:
    door: str
    ip: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One entry as stored: its fields, its link to the previous entry, its hash and seal."""

    seq: int
    occurred_at: dt.datetime
    event_code: int
    actor: Actor
    patient: str | None
    subject: Subject | None
    outcome: Outcome
    source: Source
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str
    seal: str | None = None

    @property
    def event(self) -> AuditEvent | None:
        """The event type, or None for a number this gateway does not know (a forged row)."""
        try:
            return AuditEvent(self.event_code)
        except ValueError:
            return None

    @property
    def event_name(self) -> str:
        event = self.event
        return event.event_name if event else f"unknown_{self.event_code}"

    @property
    def label_fr(self) -> str:
        event = self.event
        return event.label_fr if event else "Événement inconnu"

    def body(self) -> dict[str, Any]:
        """The hashed fields, in the shape of the canonical JSON."""
        return entry_body(self.seq, self.occurred_at, self.event_code, self.actor, self.patient,
                          self.subject, self.outcome, self.source, self.details)

    def computed_hash(self, *, seq: int | None = None) -> str:
        """The hash this entry should have (optionally as if it sat at ``seq``)."""
        body = self.body()
        if seq is not None:
            body["seq"] = seq
        return chain_hash(self.prev_hash, body)


def format_timestamp(value: dt.datetime) -> str:
    """RFC 3339, UTC, always with microseconds: one spelling per instant."""
    return value.astimezone(dt.timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=dt.timezone.utc)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: the same bytes for the same value, everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_body(seq: int, occurred_at: dt.datetime, event_code: int, actor: Actor, patient: str | None,
               subject: Subject | None, outcome: Outcome, source: Source, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": CANONICAL_VERSION,
        "seq": seq,
        "at": format_timestamp(occurred_at),
        "event": event_code,
        "actor": {"kind": str(actor.kind), "id": actor.id, "name": actor.display_name, "role": actor.role},
        "patient": patient,
        "subject": {"kind": subject.kind, "id": subject.id} if subject else None,
        "outcome": {"status": str(outcome.status), "reason": outcome.reason},
        "source": {"door": str(source.door), "ip": source.ip},
        "details": details,
    }


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("utf-8") + canonical_json(body)).hexdigest()


class AuditKey:
    """The HMAC key that seals entries; it lives in a 0600 file, never in the database."""

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError(f"an audit key has {KEY_BYTES} bytes, not {len(material)}")
        self._material = material

    @classmethod
    def load(cls, path: Path) -> AuditKey | None:
        """The key in ``path``; None when there is none; UserError when it is unsafe or damaged."""
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            return None
        if mode & 0o077:
            raise UserError(f"{path} is readable by other users: chmod 600 it", field="audit key")
        material = path.read_bytes()
        if len(material) != KEY_BYTES:
            raise UserError(f"{path} is damaged: {len(material)} bytes instead of {KEY_BYTES}", field="audit key")
        return cls(material)

    @classmethod
    def load_or_create(cls, path: Path) -> AuditKey:
        """The key in ``path``, created on first use (atomically: concurrent starters share one key)."""
        existing = cls.load(path)
        if existing is not None:
            return existing
        _create_secret_file(path, secrets.token_bytes(KEY_BYTES))
        created = cls.load(path)
        assert created is not None  # written just above, by us or by a concurrent starter
        return created

    def seal_entry(self, entry_hash: str) -> str:
        return self._mac(b"gateway-audit-entry\x00" + entry_hash.encode("utf-8"))

    def seal_head(self, seq: int, entry_hash: str) -> str:
        return self._mac(b"gateway-audit-head\x00" + f"{seq}:{entry_hash}".encode("utf-8"))

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._material, message, hashlib.sha256).hexdigest()


def audit_key_path(data_path: Path) -> Path:
    return data_path / AUDIT_KEY_FILE


def _create_secret_file(path: Path, material: bytes) -> None:
    """Write a complete file under a temporary name, then link it into place unless one exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, material)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # fails if a concurrent starter won: its key is the key
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


class BreakKind(enum.StrEnum):
    MODIFIED = "modified"    # an entry's content no longer matches its hash
    DELETED = "deleted"      # entries are missing (a gap, a cut tail, a renumbered rest)
    INSERTED = "inserted"    # entries the gateway did not write sit inside or after the chain
    REORDERED = "reordered"  # authentic entries moved to other positions
    FORGED = "forged"        # hashes agree but the seal does not: rewritten without the audit key


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    kind: BreakKind
    problem: str


@dataclass(frozen=True)
class ChainHead:
    """The newest entry according to the head row (or an export's header)."""

    seq: int
    entry_hash: str
    seal: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    seals_checked: bool
    complete: bool = True  # False for filtered exports: only hashes and adjacent links were checked
    head: ChainHead | None = None
    broken: ChainBreak | None = None

    def summary(self) -> str:
        if self.broken is not None:
            return f"broken at entry {self.broken.seq}: {self.broken.kind} ({self.broken.problem})"
        entries = f"{self.checked} entries ({self.first_seq}..{self.last_seq})" if self.checked else "no entries"
        seals = "hashes and seals verified" if self.seals_checked else "hashes verified (no audit key: seals not checked)"
        scope = "" if self.complete else "; partial export: links checked between adjacent entries only"
        return f"intact: {entries}, {seals}{scope}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "seals_checked": self.seals_checked,
            "complete": self.complete,
            "head": {"seq": self.head.seq, "entry_hash": self.head.entry_hash} if self.head else None,
            "broken_seq": self.broken.seq if self.broken else None,
            "kind": str(self.broken.kind) if self.broken else None,
            "problem": self.broken.problem if self.broken else None,
        }


HashLookup = Callable[[str], Awaitable[bool]]


@dataclass
class ChainWalker:
    """Checks entries fed in seq order; remembers the first seal failure, stops at a structural break.

    ``sparse`` is for filtered exports: gaps are expected, so links are only
    checked between entries with adjacent numbers.
    """

    key: AuditKey | None
    hash_known: HashLookup
    expected_seq: int = 1
    expected_prev: str = GENESIS_HASH
    sparse: bool = False
    checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    seal_failure: ChainBreak | None = field(default=None, repr=False)

    async def feed(self, entry: AuditEntry) -> ChainBreak | None:
        """Check one entry; a break ends the walk."""
        broken = self._position(entry) or await self._content(entry)
        if broken is not None:
            return broken
        self._check_seal(entry)
        self._advance(entry)
        return None

    def finish(self, head: ChainHead | None, *, newest_seq: int | None = None) -> ChainBreak | None:
        """After the last entry: compare with the head; else report a seal failure, if any."""
        broken = self._against_head(head, newest_seq) if head is not None else None
        if broken is not None:
            return broken
        if self.seal_failure is not None:
            return self.seal_failure
        if head is not None and self.key is not None and not _head_sealed(self.key, head):
            return ChainBreak(head.seq, BreakKind.FORGED, "the chain head has no valid seal: written without the audit key")
        return None

    def report(self, broken: ChainBreak | None, head: ChainHead | None, *, complete: bool = True) -> VerifyReport:
        return VerifyReport(ok=broken is None, checked=self.checked, first_seq=self.first_seq,
                            last_seq=self.last_seq, seals_checked=self.key is not None,
                            complete=complete, head=head, broken=broken)

    def _position(self, entry: AuditEntry) -> ChainBreak | None:
        if self.sparse:
            if self.last_seq is not None and entry.seq <= self.last_seq:
                return ChainBreak(entry.seq, BreakKind.REORDERED, f"entry {entry.seq} comes after entry {self.last_seq}")
            return None
        if entry.seq > self.expected_seq:
            missing = _span(self.expected_seq, entry.seq - 1)
            return ChainBreak(self.expected_seq, BreakKind.DELETED, f"{missing} missing")
        if entry.seq < self.expected_seq:
            return ChainBreak(entry.seq, BreakKind.REORDERED, f"entry {entry.seq} comes after entry {self.expected_seq - 1}")
        return None

    def _links_checked(self, entry: AuditEntry) -> bool:
        if not self.sparse:
            return True
        return entry.seq == 1 or (self.last_seq is not None and entry.seq == self.last_seq + 1)

    async def _content(self, entry: AuditEntry) -> ChainBreak | None:
        if entry.computed_hash() != entry.entry_hash:
            return await self._explain_hash_mismatch(entry)
        if self._links_checked(entry) and entry.prev_hash != self._expected_prev_for(entry):
            return await self._explain_link_mismatch(entry)
        return None

    def _expected_prev_for(self, entry: AuditEntry) -> str:
        return GENESIS_HASH if entry.seq == 1 else self.expected_prev

    async def _explain_hash_mismatch(self, entry: AuditEntry) -> ChainBreak:
        original = _original_seq(entry)
        if original is None:
            return ChainBreak(entry.seq, BreakKind.MODIFIED, f"entry {entry.seq} does not match its hash")
        moved = f"entry {entry.seq} was written as entry {original}"
        if original < entry.seq:
            inserted = entry.seq - original
            return ChainBreak(original, BreakKind.INSERTED,
                              f"{moved}: {inserted} entr{'y' if inserted == 1 else 'ies'} inserted before it")
        if await self.hash_known(entry.prev_hash):
            return ChainBreak(entry.seq, BreakKind.REORDERED, moved)
        return ChainBreak(entry.seq, BreakKind.DELETED, f"{moved}: entries before it were removed and the rest renumbered")

    async def _explain_link_mismatch(self, entry: AuditEntry) -> ChainBreak:
        if await self.hash_known(entry.prev_hash):
            return ChainBreak(entry.seq, BreakKind.REORDERED, f"entry {entry.seq} is chained after another entry than {entry.seq - 1}")
        return ChainBreak(entry.seq - 1, BreakKind.MODIFIED,
                          f"entry {entry.seq - 1} was rewritten: entry {entry.seq} is chained to another version of it")

    def _check_seal(self, entry: AuditEntry) -> None:
        if self.key is None or self.seal_failure is not None:
            return
        expected = self.key.seal_entry(entry.entry_hash)
        if entry.seal is None or not hmac.compare_digest(entry.seal, expected):
            self.seal_failure = ChainBreak(entry.seq, BreakKind.FORGED,
                                           f"entry {entry.seq} has a consistent hash but no valid seal: "
                                           "written or re-hashed without the audit key (or the key file is not the log's)")

    def _advance(self, entry: AuditEntry) -> None:
        self.checked += 1
        self.first_seq = entry.seq if self.first_seq is None else self.first_seq
        self.last_seq = entry.seq
        self.expected_seq = entry.seq + 1
        self.expected_prev = entry.entry_hash

    def _against_head(self, head: ChainHead, newest_seq: int | None) -> ChainBreak | None:
        last_seq, last_hash = self.expected_seq - 1, self.expected_prev
        if head.seq > last_seq:
            return ChainBreak(last_seq + 1, BreakKind.DELETED, f"{_span(last_seq + 1, head.seq)} missing from the end")
        if newest_seq is not None and newest_seq > head.seq:
            return ChainBreak(head.seq + 1, BreakKind.INSERTED,
                              f"{_span(head.seq + 1, newest_seq)} after the chain head, not written by the gateway")
        if head.entry_hash != last_hash:
            return ChainBreak(head.seq, BreakKind.MODIFIED, f"entry {head.seq} does not match the chain head")
        return None


def _head_sealed(key: AuditKey, head: ChainHead) -> bool:
    return head.seal is not None and hmac.compare_digest(head.seal, key.seal_head(head.seq, head.entry_hash))


def _original_seq(entry: AuditEntry) -> int | None:
    """The seq at which this entry's hash holds, if it was only moved (searched near its position)."""
    for distance in range(1, RENUMBER_WINDOW + 1):
        for candidate in (entry.seq - distance, entry.seq + distance):
            if candidate >= 1 and entry.computed_hash(seq=candidate) == entry.entry_hash:
                return candidate
    return None


def _span(first: int, last: int) -> str:
    return f"entry {first} is" if first == last else f"entries {first}..{last} are"
