"""IMAP errors that carry their own wire form.

Every refusal raised by the protocol layer (and, later, by command handlers) is
an ``ImapError``; the session turns it into bytes with ``response(tag)`` at the
command boundary, the way mox maps userError/syntaxError and pymap's
``ResponseError.get_response``.  The text on the wire is short and generic;
details belong in the log.

- ``BadCommand`` / ``ParseError``: RFC 3501 7.1.3 BAD, tagged when a tag could be
  read, untagged ``* BAD`` otherwise.
- ``ImapNo``: RFC 3501 7.1.2 NO with an optional response code (RFC 5530 codes).
- ``LiteralTooLarge``: RFC 7888 4 / RFC 4469 5 ``[TOOBIG]``.
- ``ServerFault``: NO [SERVERBUG] (RFC 5530 3) for our own bugs.

Which refusals the audit log keeps (``door_refused``, security/door_audit.py)
is decided here too, by ``refusal_reason``: a refusal is a *policy* refusal
when the server said no to protect someone, not because the client erred. An
error raised with ``policy=`` names its rule (a mailbox name reaching for
another user's mailbox, a command before login); otherwise the response code
decides (``POLICY_CODES``: no TLS, no permission, over a size limit or a
quota, a per-user limit, acting as another user). Syntax errors, bad sequence
sets, a folder of one's own that does not exist and the server's own state
([UNAVAILABLE], [SERVERBUG]) are the log's only, and sign-in failures
([AUTHENTICATIONFAILED], throttled logins) are the sign-in limiter's, audited
there once.
"""

from __future__ import annotations

from typing import Final

# RFC 5530 3 (and the RFCs that define them): response codes a NO/BAD may carry.
TRYCREATE: Final = "TRYCREATE"              # RFC 3501 7.1
NONEXISTENT: Final = "NONEXISTENT"          # RFC 5530 3
ALREADYEXISTS: Final = "ALREADYEXISTS"      # RFC 5530 3
CANNOT: Final = "CANNOT"                    # RFC 5530 3
LIMIT: Final = "LIMIT"                      # RFC 5530 3
OVERQUOTA: Final = "OVERQUOTA"              # RFC 5530 3 / RFC 9208 4
NOPERM: Final = "NOPERM"                    # RFC 5530 3
AUTHENTICATIONFAILED: Final = "AUTHENTICATIONFAILED"  # RFC 5530 3
AUTHORIZATIONFAILED: Final = "AUTHORIZATIONFAILED"    # RFC 5530 3
UNAVAILABLE: Final = "UNAVAILABLE"          # RFC 5530 3
INUSE: Final = "INUSE"                      # RFC 5530 3
PRIVACYREQUIRED: Final = "PRIVACYREQUIRED"  # RFC 5530 3
SERVERBUG: Final = "SERVERBUG"              # RFC 5530 3
CLIENTBUG: Final = "CLIENTBUG"              # RFC 5530 3
EXPUNGEISSUED: Final = "EXPUNGEISSUED"      # RFC 5530 3
CONTACTADMIN: Final = "CONTACTADMIN"        # RFC 5530 3
TOOBIG: Final = "TOOBIG"                    # RFC 4469 5, reused by RFC 7888 4
BADCHARSET: Final = "BADCHARSET"            # RFC 3501 7.1
UNKNOWN_CTE: Final = "UNKNOWN-CTE"          # RFC 3516 4.3
MODIFIED: Final = "MODIFIED"                # RFC 7162 3.1.3 (carries a set)
USEATTR: Final = "USEATTR"                  # RFC 6154 3: CREATE (USE ...) cannot be honoured

_MAX_TEXT = 200

# RFC 5530 3 codes that always mean a policy refusal, and the word the audit entry gives as its reason.
POLICY_CODES: Final = {
    PRIVACYREQUIRED: "cleartext",       # LOGIN / AUTHENTICATE before STARTTLS (RFC 3501 6.2.3 LOGINDISABLED)
    NOPERM: "no-permission",            # writing into a delegated (read-only) mailbox, setting a quota
    TOOBIG: "too-big",                  # a literal over the limit (RFC 7888 4), 8 KiB before login
    OVERQUOTA: "over-quota",            # as SMTP's 552 5.2.2
    LIMIT: "limit",                     # the per-user connection limit
    AUTHORIZATIONFAILED: "authorization",   # SASL authzid of another user (RFC 4422 3.4.1)
}


def _clean_text(text: str) -> str:
    """RFC 3501 9 ``text = 1*TEXT-CHAR``: 7-bit, no CR, LF or NUL, never empty, kept short."""
    cleaned = "".join(ch if " " <= ch <= "~" else ("?" if ord(ch) > 127 else " ") for ch in text).strip()
    return (cleaned or "Error")[:_MAX_TEXT]


def status_line(tag: str | None, status: str, text: str, code: str | None = None) -> bytes:
    """``tag SP status SP ["[" code "]" SP] text CRLF`` (RFC 3501 7.1, resp-cond-state)."""
    prefix = tag if tag else "*"
    bracket = f"[{code}] " if code else ""
    return f"{prefix} {status} {bracket}{_clean_text(text)}\r\n".encode("utf-8", "replace")


class ImapError(Exception):
    """A refusal that knows how it looks on the wire.

    ``fatal`` tells the session that the byte stream cannot be trusted any more
    (for example a non-synchronising literal we refused to read): it must send
    ``* BYE`` and close after this response.
    """

    status: str = "BAD"

    def __init__(self, text: str, code: str | None = None, *, tag: str | None = None,
                 fatal: bool = False, policy: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.tag = tag
        self.fatal = fatal
        self.policy = policy        # the rule refused by, when the audit log keeps it (``refusal_reason``)
        self.verb: str | None = None   # the command word, when the reader refused the command before parsing

    def response(self, tag: str | None = None) -> bytes:
        """The full response line, tagged with ``tag`` (or the tag read with the command)."""
        return status_line(tag if tag is not None else self.tag, self.status, self.text, self.code)

    @property
    def reply(self) -> str:
        """The response without its tag (``NO [NOPERM] text``), as the audit log records it."""
        return self.response("*").decode("ascii", "replace")[2:].rstrip()


def refusal_reason(policy: str | None, code: str | None) -> str | None:
    """Why a refusal is a policy refusal the audit log keeps, or None for an ordinary client error."""
    return policy or (POLICY_CODES.get(code) if code else None)


class BadCommand(ImapError):
    """RFC 3501 7.1.3: the command is not valid here or is malformed (→ BAD)."""

    status = "BAD"


class ParseError(BadCommand):
    """The bytes do not follow the RFC 3501 9 grammar; ``reason`` says where."""


class ImapNo(ImapError):
    """RFC 3501 7.1.2: a well-formed command that failed (→ NO [CODE] text)."""

    status = "NO"


class ServerFault(ImapNo):
    """Our own failure, reported as RFC 5530 [SERVERBUG]; details go to the log only."""

    def __init__(self, text: str = "Internal server error", *, tag: str | None = None) -> None:
        super().__init__(text, SERVERBUG, tag=tag)


class LiteralTooLarge(ImapError):
    """A literal announcement beyond our limit.

    RFC 7888 4 / RFC 4469 5: for a synchronising literal we refuse before the
    client sends a byte, with NO [TOOBIG] (the client waits for ``+`` and so
    sends nothing more).  A non-synchronising literal (LITERAL+) is already on
    its way: answer BAD [TOOBIG]; ``fatal`` is set when the reader cannot skip
    the announced bytes safely and the connection must be closed.
    """

    def __init__(self, size: int | None, limit: int, *, synchronising: bool,
                 tag: str | None = None, fatal: bool = False) -> None:
        shown = "too many digits" if size is None else f"{size} octets"
        super().__init__(f"Literal too large ({shown}, limit {limit})", TOOBIG, tag=tag, fatal=fatal)
        self.size = size
        self.limit = limit
        self.synchronising = synchronising
        self.status = "NO" if synchronising else "BAD"
