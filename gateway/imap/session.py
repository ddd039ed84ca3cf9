"""The IMAP session state machine (RFC 3501 3, RFC 9051 3).

States: not authenticated -> authenticated <-> selected -> logout.  One
``COMMANDS`` table maps each command class to its handler (one module per
family in ``gateway.imap.commands``), and one ``ALLOWED[state]`` table is
checked before dispatch, as in mox's ``commandsState*`` and pymap's
``do_command``.  Handlers raise ``ImapError`` (wire form included) or a mail
store error carrying its response code; the boundary here turns either into
the tagged reply, and anything else into ``NO [SERVERBUG]`` with the details
in the log only. There too, a policy refusal (``errors.refusal_reason``, or a
mailbox name reaching for another mailbox: ``base.reaching_reason``) goes to
the audit log as ``door_refused`` and a SERVERBUG as ``command_failed``
(``SessionContext.door_audit``, the gateway's one ``DoorAudit``).

After each command in the selected state the session sends the untagged
updates the selected view computes (``SelectedMailbox.updates``), with
EXPUNGE held back during FETCH, STORE and SEARCH (RFC 3501 7.4.1).
"""

from __future__ import annotations

import enum
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.directory.service import Account, DirectoryService
from gateway.imap.commands.base import Completion, reaching_reason
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.capabilities import ConnectionState, compute_capabilities
from gateway.imap.protocol.errors import (
    CANNOT, LIMIT, NONEXISTENT, SERVERBUG, TRYCREATE, BadCommand, ImapError, ImapNo, refusal_reason,
)
from gateway.imap.protocol.parser import ParserOptions, parse_command
from gateway.imap.protocol.reader import ClientDisconnected, RawCommand
from gateway.imap.selected import SelectedMailbox
from gateway.mailstore.errors import FolderNotFound, MailStoreError, UidValidityChanged
from gateway.mailstore.interface import MailStore
from gateway.mailstore.notify import ChangeHub
from gateway.security.auth_limiter import AuthLimiter
from gateway.security.door_audit import DoorAudit
from gateway.security.revocation import RevocationList

log = logging.getLogger("gateway.imap")
# A command's untagged updates are looked up in the store at least this often even when no change was published.
UPDATES_RECHECK_SECONDS = 1.0
_PARSER_OPTIONS = {utf8: ParserOptions(utf8=utf8) for utf8 in (False, True)}


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the connection id and the user, once known (mox#30: fail2ban)."""

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, MutableMapping[str, Any]]:
        extra = self.extra or {}
        user = extra.get("user")
        prefix = f"[{extra.get('connection')}{' ' + str(user) if user else ''}]"
        return f"{prefix} {msg}", kwargs


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"   # RFC 3501 3.1
    AUTHENTICATED = "authenticated"           # RFC 3501 3.2
    SELECTED = "selected"                     # RFC 3501 3.3
    LOGOUT = "logout"                         # RFC 3501 3.4


class Connection(Protocol):
    """What the session needs of its transport (``gateway.imap.server.ImapConnection``)."""

    @property
    def peer_ip(self) -> str: ...

    @property
    def is_tls(self) -> bool: ...

    @property
    def ssl_object(self) -> ssl.SSLObject | None: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def read_line(self) -> bytes: ...

    async def start_tls(self) -> None: ...

    def discard_buffered_input(self) -> int: ...


class ConnectionLimiter(Protocol):
    """Per-user connection counting (``gateway.imap.server.UserConnectionLimiter``)."""

    limit: int

    def acquire(self, user: str) -> bool: ...

    def release(self, user: str) -> None: ...

    def count(self, user: str) -> int: ...


@dataclass(frozen=True)
class SessionSettings:
    """Knobs of one session, from configuration."""

    hostname: str = "localhost"
    disabled_capabilities: tuple[str, ...] = ()
    max_auth_failures: int = 3            # per connection, then BYE
    idle_poll_seconds: float = 30.0       # IDLE also looks for changes this often (other nodes, lost hints)
    idle_timeout_seconds: float = 30 * 60  # RFC 2177 3: clients re-issue IDLE at least every 29 minutes


@dataclass
class SessionContext:
    """The services a session talks to; built once by the listener."""

    mailstore: MailStore
    hub: ChangeHub
    directory: DirectoryService
    limiter: ConnectionLimiter
    settings: SessionSettings = field(default_factory=SessionSettings)
    auth_limiter: AuthLimiter | None = None  # the gateway's one sign-in limiter (services.auth_limiter)
    revocation: RevocationList | None = None  # the CRLs as they are now (AUTHENTICATE EXTERNAL)
    door_audit: DoorAudit | None = None       # policy refusals and SERVERBUGs into the audit log (services.door_audit)


Handler = Callable[["Session", c.Command], Awaitable[Completion]]


class Session:
    """One client connection's protocol state."""

    def __init__(self, connection: Connection, context: SessionContext, connection_id: str) -> None:
        self.connection = connection
        self.context = context
        self.connection_id = connection_id
        self.state = State.NOT_AUTHENTICATED
        self.account: Account | None = None
        self.selected: SelectedMailbox | None = None
        self.enabled: set[str] = set()
        self.auth_failures = 0
        self.delegated_ids: dict[str, int] = {}
        self._holds_connection_slot = False
        self.log = SessionLog(log, {"connection": connection_id})
        # The selected view, the change hub's version for its mailbox and the time of the last look for changes.
        self._checked: tuple[SelectedMailbox | None, int, float] = (None, 0, 0.0)
        self._version_before: int | None = None   # the hub's version for the selected mailbox as a command began

    # --- facts the handlers use ----------------------------------------------------------

    @property
    def store(self) -> MailStore:
        return self.context.mailstore

    @property
    def utf8(self) -> bool:
        return "UTF8=ACCEPT" in self.enabled      # RFC 6855 3

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.enabled        # RFC 7162 3.1

    def enable_condstore(self) -> None:
        """RFC 7162 3.1: a CONDSTORE-enabling command turns CONDSTORE on for the rest of the connection; the
        first one issued while a mailbox is selected is preceded by ``* OK [HIGHESTMODSEQ n]`` (3.1.2.1), n
        being the mod-sequence up to which this session has reported changes."""
        if self.selected is not None:
            if not self.condstore:
                self.write(response.untagged_ok("Highest", f"HIGHESTMODSEQ {self.selected.modseq}"))
            self.selected.condstore = True
        self.enabled.add("CONDSTORE")

    def capabilities(self) -> tuple[str, ...]:
        state = ConnectionState(tls=self.connection.is_tls, authenticated=self.account is not None,
                                client_certificate=self._has_client_certificate())
        return compute_capabilities(state, self.context.settings.disabled_capabilities)

    def _has_client_certificate(self) -> bool:
        ssl_object = self.connection.ssl_object
        return ssl_object is not None and ssl_object.getpeercert(binary_form=True) is not None

    def require_account(self) -> Account:
        if self.account is None:
            raise BadCommand("Not authenticated")
        return self.account

    def require_selected(self) -> SelectedMailbox:
        if self.selected is None:
            raise BadCommand("No mailbox selected")
        return self.selected

    def write(self, data: bytes) -> None:
        self.connection.write(data)

    def write_all(self, lines: list[bytes]) -> None:
        for line in lines:
            self.connection.write(line)

    # --- state changes -------------------------------------------------------------------

    def log_in(self, account: Account) -> None:
        """Enter the authenticated state; a per-user limit is said as a limit (RFC 5530 [LIMIT])."""
        if not self.context.limiter.acquire(account.address):
            self.log.warning("user %s: connection limit (%d) reached", account.address, self.context.limiter.limit)
            raise ImapNo(f"Too many connections for this account (limit {self.context.limiter.limit})", LIMIT)
        self._holds_connection_slot = True
        self.account = account
        self.state = State.AUTHENTICATED
        self.log = SessionLog(log, {"connection": self.connection_id, "user": account.address})
        self.log.info("user %s logged in", account.address)

    def select(self, mailbox: SelectedMailbox) -> None:
        self.selected = mailbox
        self.state = State.SELECTED

    def deselect(self) -> None:
        self.selected = None
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    def close(self) -> None:
        """Release what the session holds; called once when the connection ends."""
        if self._holds_connection_slot and self.account is not None:
            self.context.limiter.release(self.account.address)
            self._holds_connection_slot = False
        self.selected = None
        self.state = State.LOGOUT

    # --- one command ---------------------------------------------------------------------

    async def execute(self, raw: RawCommand) -> None:
        """Parse, check the state, dispatch, send untagged updates and the tagged reply."""
        try:
            command = parse_command(raw, _PARSER_OPTIONS[self.utf8])
        except ImapError as error:
            self.write(error.response())
            await self.audit_refusal(error, raw_verb(raw))
            return
        self.log.debug("command %s %s", command.tag, command.name)
        if command.name not in ALLOWED[self.state]:
            # A command that needs a login, sent before one, is refused for lack of authentication (audited);
            # one sent in the wrong authenticated state (FETCH with nothing selected) is the client's error.
            needs_login = self.state is State.NOT_AUTHENTICATED and command.name in _AFTER_LOGIN
            refusal = BadCommand(f"{command.name} not allowed now ({self.state.value})",
                                 policy="not-authenticated" if needs_login else None)
            self.write(refusal.response(command.tag))
            await self.audit_refusal(refusal, command.name)
            return
        await self._dispatch(command)

    async def audit_refusal(self, error: ImapError, verb: str, command: c.Command | None = None) -> None:
        """``door_refused`` for a policy refusal just answered; nothing for an ordinary client error."""
        audit = self.context.door_audit
        reason = refusal_reason(error.policy, error.code)
        names = mailbox_names(command) if command is not None else []
        if reason is None and error.code in (NONEXISTENT, TRYCREATE, CANNOT) and self.account is not None:
            reason = next(filter(None, (reaching_reason(name, self.account.address) for name in names)), None)
        if audit is None or reason is None:
            return
        detail = " ".join([verb, *(f'"{name[:200]}"' for name in names)])
        await audit.refused("imap", self.connection.peer_ip, self.account.address if self.account else None,
                            error.reply, detail, reason=reason, command=verb)

    async def _dispatch(self, command: c.Command) -> None:
        handler = COMMANDS[type(command)]
        self._version_before = self._hub_version()
        try:
            completion = await handler(self, command)
        except ImapError as error:
            if await self._send_updates(command):
                self.write(error.response(command.tag))
                self._enforce_auth_failure_limit()
            await self.audit_refusal(error, command.name, command)
            return
        except (ClientDisconnected, ConnectionError):
            raise       # the client went away mid-command: nothing to answer, the server closes
        except UidValidityChanged:
            self._selected_folder_gone()
            return
        except MailStoreError as error:
            self.log.info("%s refused: %s", command.name, error)
            refusal = ImapNo(str(error), response_code_for(error, command))
            if await self._send_updates(command):
                self.write(refusal.response(command.tag))
            await self.audit_refusal(refusal, command.name, command)
            return
        except Exception as error:
            self.log.exception("%s failed", command.name)
            self.write(response.no(command.tag, "Internal server error", SERVERBUG))
            await self._audit_failure(command.name, error)
            return
        if type(command) in NO_REPLY:
            return
        if self.state is State.LOGOUT:
            self.write(response.ok(command.tag, completion.text, completion.code))
            return
        if await self._send_updates(command, completion.own_events):
            self.write(response.ok(command.tag, completion.text, completion.code))

    async def _audit_failure(self, verb: str, error: BaseException) -> None:
        if self.context.door_audit is not None:
            await self.context.door_audit.failed("imap", self.connection.peer_ip,
                                                 self.account.address if self.account else None,
                                                 verb, error.__class__.__name__)

    def _hub_version(self) -> int | None:
        return None if self.selected is None else self.context.hub.version(self.selected.ref.mailbox_id)

    def _enforce_auth_failure_limit(self) -> None:
        if self.auth_failures >= self.context.settings.max_auth_failures:
            self.write(response.bye("Too many authentication failures"))
            self.state = State.LOGOUT

    async def _send_updates(self, command: c.Command, own_events: int = 0) -> bool:
        """The untagged updates of the selected folder; False when the session must end (folder gone)."""
        selected = self.selected
        if selected is None or self.state is not State.SELECTED:
            return True
        allow_expunge = expunge_allowed_after(command)
        if own_events and not (allow_expunge and selected.pending_expunges) \
                and self._only_own_changes(selected, own_events):
            return True
        if not self._may_have_changed(selected, command, allow_expunge):
            return True
        version = self.context.hub.version(selected.ref.mailbox_id)   # before asking: a later change counts
        known = self.store.changes_known(selected.ref, selected.modseq) \
            if self._may_trust_memory(selected, command) else None
        try:
            lines = await selected.updates(self.store, allow_expunge=allow_expunge, known=known)
        except (FolderNotFound, UidValidityChanged):
            self._selected_folder_gone()
            return False
        # An answer from memory is not a look: the recheck interval still runs from the last real one.
        self._checked = (selected, version, time.monotonic() if known is None else self._checked[2])
        self.write_all(lines)
        return True

    def _may_trust_memory(self, selected: SelectedMailbox, command: c.Command) -> bool:
        """Whether the store may answer the changes from its shared index (``MailStore.changes_known``) rather
        than the database: only while this process's hub sees every change, not for NOOP or CHECK (RFC 3501
        6.1.2: the client's poll) and within ``UPDATES_RECHECK_SECONDS`` of this view's last real look (a writer in
        another process publishes nowhere here), as ``_may_have_changed`` trusts the hub."""
        return not isinstance(command, c.Noop | c.Check) and self.trusts_memory(selected)

    def trusts_memory(self, selected: SelectedMailbox) -> bool:
        """Whether answers from the store's shared index (``changes_known``, ``flags_known``) may stand for the
        database's now: this process's hub sees every change and this view looked less than
        ``UPDATES_RECHECK_SECONDS`` ago (what another process wrote since is seen at the next look)."""
        view, _, when = self._checked
        return (view is selected and self.context.hub.sees_every_change
                and time.monotonic() - when < UPDATES_RECHECK_SECONDS)

    def _only_own_changes(self, selected: SelectedMailbox, own_events: int) -> bool:
        """True when the last look was current as the command began and the only events since are the
        command's own (its STORE's new flags or its EXPUNGEs, already sent): nothing else to report.  A later
        look still finds those changes; the view knows it reported them (``note_reported``, ``remove``)."""
        view, version, when = self._checked
        now = self.context.hub.version(selected.ref.mailbox_id)
        if (view is not selected or version != self._version_before or now != version + own_events
                or not self.context.hub.sees_every_change or time.monotonic() - when >= UPDATES_RECHECK_SECONDS):
            return False
        self._checked = (view, now, when)   # the recheck interval still runs from the last real look
        return True

    def _may_have_changed(self, selected: SelectedMailbox, command: c.Command, allow_expunge: bool) -> bool:
        """Whether the store must be asked for changes after ``command``.  Not when this process's change
        hub has published nothing for the mailbox since the last look, a moment ago: that look is still
        current.  NOOP and CHECK always ask (RFC 3501 6.1.2: the client's poll), as does any command once
        ``UPDATES_RECHECK_SECONDS`` have passed (a writer in another process, say ``gateway mailbox import``,
        publishes nowhere here), or when changes of other nodes come through a bridge."""
        if isinstance(command, c.Noop | c.Check) or not self.context.hub.sees_every_change:
            return True
        if allow_expunge and selected.pending_expunges:
            return True     # expunges held back earlier (RFC 3501 7.4.1) may be sent now
        view, version, when = self._checked
        return (view is not selected or version != self.context.hub.version(selected.ref.mailbox_id)
                or time.monotonic() - when >= UPDATES_RECHECK_SECONDS)

    def _selected_folder_gone(self) -> None:
        """The selected folder was deleted, renamed or re-created elsewhere: its numbers and UIDs
        mean nothing any more, so the connection ends (RFC 3501 7.1.5 BYE), as Dovecot does."""
        self.log.info("selected folder %r is gone", self.selected.name if self.selected else "?")
        self.write(response.bye("Selected mailbox was deleted or renamed"))
        self.selected = None
        self.state = State.LOGOUT


def response_code_for(error: MailStoreError, command: c.Command) -> str | None:
    """RFC 3501 7.1: [TRYCREATE] only where creating the folder helps (APPEND, COPY, MOVE);
    a missing folder elsewhere is RFC 5530 [NONEXISTENT]."""
    if error.imap_code == TRYCREATE and not isinstance(command, c.Append | c.Copy | c.Move):
        return NONEXISTENT
    return error.imap_code


def mailbox_names(command: c.Command) -> list[str]:
    """The mailbox names a command carries, as the client wrote them."""
    if isinstance(command, c.Rename):
        return [command.source, command.destination]
    name = getattr(command, "mailbox", None)
    return [name] if isinstance(name, str) and name else []


def raw_verb(raw: RawCommand) -> str:
    """The command word of a command that could not be parsed (for the audit; "?" when there is none)."""
    words = raw.data.split(None, 2)
    verb = words[1].decode("ascii", "replace").upper() if len(words) >= 2 else "?"
    return verb[:32] if verb.isalpha() else "?"


def expunge_allowed_after(command: c.Command) -> bool:
    """RFC 3501 7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (their UID forms may)."""
    if isinstance(command, c.Fetch | c.Store | c.Search):
        return command.uid
    return True


# --- the two tables ---------------------------------------------------------------------

def _build_commands() -> dict[type[c.Command], Handler]:
    from gateway.imap.commands import auth, idle, mailboxes, messages, fetch, search

    table: dict[type[c.Command], Handler] = {}
    for module in (auth, mailboxes, messages, fetch, search, idle):
        table.update(module.HANDLERS)
    return table


_ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})                       # RFC 3501 6.1
_NOT_AUTHENTICATED = _ANY | {"STARTTLS", "AUTHENTICATE", "LOGIN"}              # RFC 3501 6.2
_AUTHENTICATED = _ANY | {                                                       # RFC 3501 6.3
    "ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
    "LSUB", "STATUS", "APPEND", "IDLE", "NAMESPACE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA",
}
# RFC 3501 6.4; RFC 5161 3.1: ENABLE only in the authenticated state.
_SELECTED = (_AUTHENTICATED - {"ENABLE"}) | {
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
}

ALLOWED: dict[State, frozenset[str]] = {
    State.NOT_AUTHENTICATED: _NOT_AUTHENTICATED,
    State.AUTHENTICATED: _AUTHENTICATED,
    State.SELECTED: _SELECTED,
    State.LOGOUT: frozenset(),
}

_AFTER_LOGIN = (_AUTHENTICATED | _SELECTED) - _ANY
COMMANDS: dict[type[c.Command], Handler] = _build_commands()
NO_REPLY: frozenset[type[c.Command]] = frozenset({c.StartTls})   # answered before the TLS handshake
