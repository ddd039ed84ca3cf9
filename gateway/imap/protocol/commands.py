"""Typed IMAP commands: what the session layer dispatches on.

One frozen dataclass per command (RFC 3501 6 and the extensions we speak).
``name`` is the command as the client named it, upper-case, without "UID";
``uid`` on FETCH/STORE/COPY/MOVE/SEARCH/EXPUNGE marks the UID form (RFC 3501
6.4.8, RFC 4315 2.1, RFC 6851 3.2).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from gateway.imap.protocol.fetch import FetchAttribute
from gateway.imap.protocol.search import SearchKey
from gateway.imap.protocol.sequence import SequenceSet


@dataclass(frozen=True)
class Command:
    tag: str
    name: ClassVar[str] = ""


# --- any state (RFC 3501 6.1) -----------------------------------------------

@dataclass(frozen=True)
class Capability(Command):
    name: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True)
class Noop(Command):
    name: ClassVar[str] = "NOOP"


@dataclass(frozen=True)
class Logout(Command):
    name: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True)
class Id(Command):
    """RFC 2971 3.1: ``ID ("name" "value" ...)`` or ``ID NIL``; pairs kept in order."""

    name: ClassVar[str] = "ID"
    parameters: tuple[tuple[str, str | None], ...] | None = None


# --- not authenticated (RFC 3501 6.2) ---------------------------------------

@dataclass(frozen=True)
class StartTls(Command):
    name: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True)
class Authenticate(Command):
    """RFC 3501 6.2.2; ``initial_response`` per RFC 4959 (SASL-IR): None absent, b"" for "="."""

    name: ClassVar[str] = "AUTHENTICATE"
    mechanism: str = ""
    initial_response: bytes | None = field(default=None, repr=False)   # may hold a password (PLAIN)


@dataclass(frozen=True)
class Login(Command):
    name: ClassVar[str] = "LOGIN"
    username: str = ""
    password: str = field(default="", repr=False)


# --- authenticated (RFC 3501 6.3) -------------------------------------------

@dataclass(frozen=True)
class QResyncParameters:
    """RFC 7162 3.2.5: (QRESYNC (uidvalidity modseq [known-uids [seq-match-data]]))."""

    uid_validity: int
    modseq: int
    known_uids: SequenceSet | None = None
    sequence_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True)
class Select(Command):
    """RFC 3501 6.3.1, with CONDSTORE (RFC 7162 3.1.8) and QRESYNC (RFC 7162 3.2.5) parameters."""

    name: ClassVar[str] = "SELECT"
    mailbox: str = ""
    condstore: bool = False
    qresync: QResyncParameters | None = None

    @property
    def read_only(self) -> bool:
        return False


@dataclass(frozen=True)
class Examine(Select):
    """RFC 3501 6.3.2: SELECT, read-only."""

    name: ClassVar[str] = "EXAMINE"

    @property
    def read_only(self) -> bool:
        return True


@dataclass(frozen=True)
class Create(Command):
    """RFC 3501 6.3.3; ``special_use`` from RFC 6154 3 ``USE (\\Sent ...)``."""

    name: ClassVar[str] = "CREATE"
    mailbox: str = ""
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delete(Command):
    name: ClassVar[str] = "DELETE"
    mailbox: str = ""


@dataclass(frozen=True)
class Rename(Command):
    name: ClassVar[str] = "RENAME"
    source: str = ""
    destination: str = ""


@dataclass(frozen=True)
class Subscribe(Command):
    name: ClassVar[str] = "SUBSCRIBE"
    mailbox: str = ""


@dataclass(frozen=True)
class Unsubscribe(Command):
    name: ClassVar[str] = "UNSUBSCRIBE"
    mailbox: str = ""


@dataclass(frozen=True)
class ListReturn:
    """RFC 5258 6 return options; ``status`` from RFC 5819 (None when not asked)."""

    subscribed: bool = False
    children: bool = False
    special_use: bool = False
    status: tuple[str, ...] | None = None


@dataclass(frozen=True)
class List(Command):
    """RFC 3501 6.3.8 and LIST-EXTENDED (RFC 5258 3): selection options, patterns, return options.

    ``extended`` is true when the client used any RFC 5258 syntax, which
    changes the response rules (RFC 5258 3: e.g. CHILDINFO is only sent to an extended LIST).
    """

    name: ClassVar[str] = "LIST"
    reference: str = ""
    patterns: tuple[str, ...] = ()
    selection: frozenset[str] = frozenset()
    returns: ListReturn = ListReturn()
    extended: bool = False


@dataclass(frozen=True)
class Lsub(Command):
    name: ClassVar[str] = "LSUB"
    reference: str = ""
    pattern: str = ""


@dataclass(frozen=True)
class Status(Command):
    """RFC 3501 6.3.10; items upper-case (HIGHESTMODSEQ from RFC 7162 3.1.6, SIZE from RFC 8438)."""

    name: ClassVar[str] = "STATUS"
    mailbox: str = ""
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Append(Command):
    """RFC 3501 6.3.11; ``binary`` for a literal8 (RFC 3516 4.4), ``utf8`` for RFC 6855 4 UTF8 (~{n})."""

    name: ClassVar[str] = "APPEND"
    mailbox: str = ""
    flags: tuple[str, ...] = ()
    internal_date: dt.datetime | None = None
    message: bytes = field(default=b"", repr=False)
    binary: bool = False
    utf8: bool = False


@dataclass(frozen=True)
class Idle(Command):
    """RFC 2177: the session answers "+ idling" and waits for a ``DONE`` line."""

    name: ClassVar[str] = "IDLE"


@dataclass(frozen=True)
class Namespace(Command):
    name: ClassVar[str] = "NAMESPACE"       # RFC 2342 5


@dataclass(frozen=True)
class Enable(Command):
    """RFC 5161 3.1: capability names upper-case, in the order given."""

    name: ClassVar[str] = "ENABLE"
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class GetQuota(Command):
    name: ClassVar[str] = "GETQUOTA"        # RFC 9208 4.2
    root: str = ""


@dataclass(frozen=True)
class GetQuotaRoot(Command):
    name: ClassVar[str] = "GETQUOTAROOT"    # RFC 9208 4.3
    mailbox: str = ""


@dataclass(frozen=True)
class SetQuota(Command):
    """RFC 9208 4.1: resource names upper-case with their limits."""

    name: ClassVar[str] = "SETQUOTA"
    root: str = ""
    limits: tuple[tuple[str, int], ...] = ()


# --- selected (RFC 3501 6.4) ------------------------------------------------

@dataclass(frozen=True)
class Check(Command):
    name: ClassVar[str] = "CHECK"


@dataclass(frozen=True)
class Close(Command):
    name: ClassVar[str] = "CLOSE"


@dataclass(frozen=True)
class Unselect(Command):
    name: ClassVar[str] = "UNSELECT"        # RFC 3691 2


@dataclass(frozen=True)
class Expunge(Command):
    """RFC 3501 6.4.3; ``UID EXPUNGE set`` (RFC 4315 2.1) when ``uid_set`` is given."""

    name: ClassVar[str] = "EXPUNGE"
    uid_set: SequenceSet | None = None

    @property
    def uid(self) -> bool:
        return self.uid_set is not None


@dataclass(frozen=True)
class Search(Command):
    """RFC 3501 6.4.4; ``return_options`` is None for plain SEARCH, else ESEARCH (RFC 4731 3.1)."""

    name: ClassVar[str] = "SEARCH"
    criteria: SearchKey | None = None
    charset: str | None = None
    return_options: tuple[str, ...] | None = None
    uid: bool = False


@dataclass(frozen=True)
class Fetch(Command):
    """RFC 3501 6.4.5, modifiers CHANGEDSINCE / VANISHED (RFC 7162 3.1.4.1, 3.2.6)."""

    name: ClassVar[str] = "FETCH"
    sequence_set: SequenceSet = SequenceSet()
    attributes: tuple[FetchAttribute, ...] = ()
    uid: bool = False
    changed_since: int | None = None
    vanished: bool = False


class StoreMode(Enum):
    """RFC 3501 6.4.6: FLAGS replaces, +FLAGS adds, -FLAGS removes."""

    REPLACE = ""
    ADD = "+"
    REMOVE = "-"


@dataclass(frozen=True)
class Store(Command):
    """RFC 3501 6.4.6, with UNCHANGEDSINCE (RFC 7162 3.1.3)."""

    name: ClassVar[str] = "STORE"
    sequence_set: SequenceSet = SequenceSet()
    mode: StoreMode = StoreMode.REPLACE
    silent: bool = False
    flags: tuple[str, ...] = ()
    uid: bool = False
    unchanged_since: int | None = None


@dataclass(frozen=True)
class Copy(Command):
    name: ClassVar[str] = "COPY"            # RFC 3501 6.4.7
    sequence_set: SequenceSet = SequenceSet()
    mailbox: str = ""
    uid: bool = False


@dataclass(frozen=True)
class Move(Command):
    name: ClassVar[str] = "MOVE"            # RFC 6851 3.1
    sequence_set: SequenceSet = SequenceSet()
    mailbox: str = ""
    uid: bool = False
