"""Any-state and not-authenticated commands: CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN,
AUTHENTICATE (PLAIN with SASL-IR, EXTERNAL), ENABLE.

Passwords only travel inside TLS: before STARTTLS the server announces
LOGINDISABLED (RFC 3501 6.2.3) and refuses LOGIN and AUTHENTICATE with
[PRIVACYREQUIRED] (RFC 5530 3).  A wrong password is
[AUTHENTICATIONFAILED]; a per-user connection limit is [LIMIT], never a
credential error (stalwart#190).
"""

from __future__ import annotations

import contextlib
import platform
from typing import TYPE_CHECKING

from gateway.directory.service import Account
from gateway.imap.commands.base import Completion
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.capabilities import ENABLEABLE
from gateway.imap.protocol.errors import (
    AUTHENTICATIONFAILED, AUTHORIZATIONFAILED, CANNOT, PRIVACYREQUIRED, UNAVAILABLE, BadCommand, ImapNo,
)
from gateway.imap.protocol.parser import parse_sasl_response
from gateway.mailstore.delivery import STANDARD_FOLDERS
from gateway.mailstore.errors import FolderExists
from gateway.mailstore.interface import INBOX
from gateway.security import sasl
from gateway.security.auth_limiter import AuthThrottled
from gateway.security.tls import peer_certificate_info

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session

SERVER_ID = {"name": "MSSante gateway", "vendor": "open-source", "os": platform.system() or None}


# --- any state (RFC 3501 6.1) -------------------------------------------------------------

async def capability(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.1.1."""
    session.write(response.capability(session.capabilities()))
    return Completion("CAPABILITY completed")


async def noop(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.1.2: the untagged updates the session sends after every command are the point."""
    return Completion("NOOP completed")


async def logout(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.1.3: BYE, then the tagged OK, then the server closes the connection."""
    session.write(response.bye(f"{session.context.settings.hostname} logging out"))
    session.log.info("logout")
    session.close()
    return Completion("LOGOUT completed")


async def ident(session: Session, command: c.Command) -> Completion:
    """RFC 2971 3.1: the client's identity goes to the log; ours is answered."""
    assert isinstance(command, c.Id)
    if command.parameters:
        session.log.info("client id: %s", ", ".join(f"{key}={value}" for key, value in command.parameters[:10]))
    session.write(response.id_response(SERVER_ID))
    return Completion("ID completed")


# --- not authenticated (RFC 3501 6.2) ---------------------------------------------------

async def starttls(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.2.1: answer OK, then negotiate; anything the client pipelined is dropped."""
    if session.connection.is_tls:
        raise BadCommand("TLS is already active")
    # RFC 3501 6.2.1 / CVE-2011-0411: bytes sent before the handshake must not be taken as commands.
    dropped = session.connection.discard_buffered_input()
    if dropped:
        session.log.warning("dropped %d octets pipelined after STARTTLS", dropped)
    session.write(response.ok(command.tag, "Begin TLS negotiation now"))
    await session.connection.drain()
    await session.connection.start_tls()
    session.log.info("TLS established")
    return Completion("Begin TLS negotiation now")   # already sent before the handshake (NO_REPLY)


def _require_tls(session: Session) -> None:
    if not session.connection.is_tls:
        raise ImapNo("Use STARTTLS first: passwords only travel encrypted", PRIVACYREQUIRED)


async def login(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.2.3 (LOGINDISABLED before TLS)."""
    assert isinstance(command, c.Login)
    _require_tls(session)
    await _refuse_if_throttled(session, command.username)
    account = await session.context.directory.authenticate(command.username, command.password)
    return await _authenticated(session, account, command.username)


async def _refuse_if_throttled(session: Session, login_name: str) -> None:
    """Too many recent failures for this login from this address, or from this address at all: a
    temporary refusal, said as such (RFC 5530 [UNAVAILABLE]), before the password is even looked at."""
    limiter = session.context.auth_limiter
    if limiter is None:
        return
    try:
        await limiter.check("imap", login_name, session.connection.peer_ip)
    except AuthThrottled as throttled:
        session.log.warning("login %r refused: throttled for %d s after repeated failures", login_name[:100],
                            throttled.retry_after)
        raise ImapNo(f"Too many failed logins; try again in {throttled.retry_after} seconds", UNAVAILABLE) from None


async def _authenticated(session: Session, account: Account | None, login_name: str) -> Completion:
    limiter = session.context.auth_limiter
    if account is None:
        session.auth_failures += 1
        session.log.warning("authentication failed for %r", login_name[:100])
        if limiter is not None:
            await limiter.failed("imap", login_name, session.connection.peer_ip)
        raise ImapNo("Authentication failed", AUTHENTICATIONFAILED)
    if limiter is not None:
        await limiter.succeeded("imap", login_name, session.connection.peer_ip)
    session.log_in(account)
    await _ensure_standard_folders(session, account)
    return Completion("Logged in", "CAPABILITY " + " ".join(session.capabilities()))


async def _ensure_standard_folders(session: Session, account: Account) -> None:
    """RFC 3501 5.1: INBOX always exists.  A mailbox that never received mail gets its standard
    folders, special use and subscriptions included (mox#66, stalwart#1342), at its first login."""
    existing = {info.name for info in await session.store.list_folders(account.mailbox_id)}
    if INBOX in existing:
        return
    for name, special_use in STANDARD_FOLDERS:
        if name not in existing:
            with contextlib.suppress(FolderExists):     # a concurrent first login made it
                await session.store.create_folder(account.mailbox_id, name, special_use=special_use,
                                                  subscribe=True)
    session.log.info("standard folders created at first login")


async def authenticate(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.2.2 with SASL-IR (RFC 4959): PLAIN (RFC 4616) and EXTERNAL (RFC 4422 A)."""
    assert isinstance(command, c.Authenticate)
    _require_tls(session)
    if command.mechanism == "PLAIN":
        return await _plain(session, await _initial_response(session, command))
    if command.mechanism == "EXTERNAL":
        return await _external(session, await _initial_response(session, command))
    raise ImapNo("Unsupported authentication mechanism", CANNOT)


async def _initial_response(session: Session, command: c.Authenticate) -> bytes:
    """RFC 4959 3: the initial response, or ask for it with an empty challenge (RFC 3501 6.2.2)."""
    if command.initial_response is not None:
        return command.initial_response
    session.write(response.continuation_base64(b""))
    await session.connection.drain()
    answer = parse_sasl_response(await session.connection.read_line())
    if answer is None:
        raise BadCommand("Authentication cancelled")        # RFC 3501 6.2.2: "*" cancels with BAD
    return answer


async def _plain(session: Session, message: bytes) -> Completion:
    """RFC 4616 2: [authzid] NUL authcid NUL passwd; an authzid other than the login is refused."""
    try:
        plain = sasl.decode_plain(message)
    except sasl.SaslMalformed:
        raise BadCommand("Malformed PLAIN response") from None
    await _refuse_if_throttled(session, plain.authcid)
    account = await session.context.directory.authenticate(plain.authcid, plain.password)
    if account is not None and plain.authzid and plain.authzid.lower() != account.address:
        raise ImapNo("Not authorised to act as that user", AUTHORIZATIONFAILED)
    return await _authenticated(session, account, plain.authcid)


async def _external(session: Session, message: bytes) -> Completion:
    """RFC 4422 A: the identity is the verified TLS client certificate; the authzid, if any, must match it."""
    info = peer_certificate_info(session.connection.ssl_object)
    if info is None:
        raise ImapNo("No client certificate presented", AUTHENTICATIONFAILED)
    login_name = f"certificate {info['fingerprint_sha256'][:16]}"
    await _refuse_if_throttled(session, login_name)
    revocation = session.context.revocation
    if revocation is not None and revocation.peer_is_revoked(session.connection.ssl_object):
        # The connection may predate the revocation: the CRLs as they are now decide (RFC 5280 6.3).
        session.log.warning("EXTERNAL refused: %s is revoked", login_name)
        return await _authenticated(session, None, login_name)
    account = await session.context.directory.account_for_certificate(info["fingerprint_sha256"])
    authzid = sasl.decode_external(message).lower()                  # RFC 4422 A.1
    if account is not None and authzid and authzid != account.address:
        raise ImapNo("Not authorised to act as that user", AUTHORIZATIONFAILED)
    return await _authenticated(session, account, login_name)


# --- authenticated ------------------------------------------------------------------------

async def enable(session: Session, command: c.Command) -> Completion:
    """RFC 5161 3.1: enable what we know, answer ``* ENABLED`` with what changed (possibly nothing)."""
    assert isinstance(command, c.Enable)
    newly = [name for name in command.capabilities if name in ENABLEABLE and name not in session.enabled
             and name in session.capabilities()]
    session.enabled.update(newly)
    session.write(response.enabled(newly))
    return Completion("ENABLE completed")


HANDLERS: dict[type[c.Command], Handler] = {
    c.Capability: capability,
    c.Noop: noop,
    c.Logout: logout,
    c.Id: ident,
    c.StartTls: starttls,
    c.Login: login,
    c.Authenticate: authenticate,
    c.Enable: enable,
}

