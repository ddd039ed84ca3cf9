"""Every reply the gateway gives about mail, by name, with the RFC that defines it.

A ``Reply`` is a basic code (RFC 5321 4.2), an enhanced status code (RFC 3463,
announced by ENHANCEDSTATUSCODES, RFC 2034) and a text. Code deep in the
pipeline, the queue or S/MIME raises ``MailRefusal(reply)``, which names no
protocol: the SMTP server turns it into the wire line at the command boundary,
the webmail into a page, the queue into a DSN's Status and Diagnostic-Code
(RFC 3464 2.3.4, 2.3.6), so no reply is spelled twice. The text stays short and
useful to the sender; details go to the log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``code enhanced text`` (RFC 5321 4.2, RFC 3463 2)."""

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        # RFC 3463 2: the class digit of the enhanced code matches the basic code's.
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def with_text(self, text: str) -> "Reply":
        """The same codes with a more precise text (e.g. naming the domain)."""
        return replace(self, text=text)

    def format(self, **values: object) -> "Reply":
        return Reply(self.code, self.enhanced, self.text.format(**values))

    def lines(self) -> list[str]:
        """Wire lines; a multi-line text becomes ``code-`` continuation lines (RFC 5321 4.2.1)."""
        parts = self.text.split("\n") or [""]
        prefix = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
        cont = f"{self.code}-{self.enhanced} " if self.enhanced else f"{self.code}-"
        return [cont + part for part in parts[:-1]] + [prefix + parts[-1]]

    def __str__(self) -> str:
        return self._wire

    @functools.cached_property
    def _wire(self) -> str:
        """The wire lines, joined once per reply (the constant replies are sent for every message)."""
        return "\r\n".join(self.lines())


class MailRefusal(Exception):
    """A refusal that carries its reply; raised anywhere, answered at the boundary (SMTP, webmail, DSN)."""

    def __init__(self, reply: Reply, detail: str | None = None) -> None:
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail


# --------------------------------------------------------------------------- success (RFC 5321 4.2.2)

GREETING = Reply(220, "", "{hostname} ESMTP MSSante gateway ready")              # RFC 5321 4.3.1
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")                           # RFC 3207 4
CLOSING = Reply(221, "2.0.0", "Bye")                                            # RFC 5321 4.1.1.10
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")                      # RFC 4954 6
OK = Reply(250, "2.0.0", "OK")                                                  # RFC 5321 4.1.1.9 (NOOP/RSET)
SENDER_OK = Reply(250, "2.1.0", "Sender OK")                                    # RFC 3463 3.2 (X.1.0)
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")                              # RFC 3463 3.2 (X.1.5)
QUEUED = Reply(250, "2.0.0", "OK queued as {queue_id}")                         # RFC 5321 4.1.1.4
CANNOT_VRFY = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message for delivery")  # RFC 5321 3.5.3
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")                  # RFC 5321 4.1.1.4
HELP = Reply(214, "2.0.0", "Commands: {commands}")                              # RFC 5321 4.1.1.8

# --------------------------------------------------------------------------- transient failures (4yz)

SERVICE_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")       # RFC 3463 3.4 (X.3.2)
TIMEOUT = Reply(421, "4.4.2", "Idle too long, closing connection")                          # RFC 5321 4.5.3.2
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from {who} (limit {limit}); try again later")  # RFC 3463 3.8
TOO_MANY_SESSIONS = Reply(
    421, "4.7.0",
    "Too many simultaneous sessions for {who} (limit {limit}); close another session and retry. "
    "This is a connection limit, your password is fine.")                                   # RFC 3463 3.8
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection")  # RFC 4954 4
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")                # RFC 5321 4.2.5
LOCAL_ERROR = Reply(451, "4.3.0", "Local error, message not accepted; try again later")     # RFC 3463 3.4 (X.3.0)
DATABASE_BUSY = Reply(451, "4.3.0", "Storage busy, message not accepted; try again later")  # RFC 3463 3.4
RATE_LIMITED = Reply(450, "4.7.1", "Too many messages from {who} (limit {limit} per {window}s); try again later")  # RFC 3463 3.8
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients (limit {limit})")           # RFC 5321 4.5.3.1.10, RFC 3463 3.6
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed authentication attempts; try again in {seconds} s")  # RFC 4954 6
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")                   # RFC 4954 6
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")                                  # RFC 3207 4
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")                           # RFC 3463 3.4 (X.3.1)
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox {address} is over quota")                       # RFC 3463 3.3 (X.2.2)

# --------------------------------------------------------------------------- permanent failures: syntax (5yz)

LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")                                       # RFC 5321 4.5.3.1.4/.5, RFC 3463 3.6
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Message line longer than {limit} octets (RFC 5321 4.5.3.1.6); message refused")
# RFC 5321 2.3.8: CR and LF only ever travel together as CRLF. A bare one in DATA is how SMTP smuggling
# (CVE-2023-51764 family) hides an end of data; the message is refused whole, as Postfix 3.9 does with
# smtpd_forbid_bare_newline = reject ("550 5.5.2 Error: bare <LF> received"); RFC 3463 3.6: X.5.2 syntax error.
BARE_LF = Reply(550, "5.5.2", "Message refused: bare <LF> received (RFC 5321 2.3.8: lines end with <CR><LF>)")
BARE_CR = Reply(550, "5.5.2", "Message refused: bare <CR> received (RFC 5321 2.3.8: <CR> only before <LF>)")
BAD_SYNTAX = Reply(500, "5.5.2", "Syntax error")                                            # RFC 5321 4.2.2
NON_ASCII_COMMAND = Reply(500, "5.5.2", "Non-ASCII characters in command")                  # RFC 5321 2.4
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized: {command}")                  # RFC 3463 3.6 (X.5.1)
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")                            # RFC 5321 4.2.4
SYNTAX_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters: {detail}")                 # RFC 3463 3.6 (X.5.4)
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands: {detail}")                    # RFC 5321 4.1.4
SEND_HELO_FIRST = Reply(503, "5.5.1", "Send EHLO first")                                    # RFC 5321 4.1.4
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")                        # RFC 4954 4
AUTH_NOT_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")  # RFC 4954 4
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")            # RFC 4954 6
PARAM_NOT_SUPPORTED = Reply(555, "5.5.4", "Parameter not recognized or not implemented: {param}")  # RFC 5321 4.1.1.11
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")                                # RFC 4954 4
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")                      # RFC 4954 4
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Malformed authentication response")               # RFC 4616 2
SMTPUTF8_NOT_ANNOUNCED = Reply(553, "5.6.7", "Non-ASCII address needs MAIL FROM ... SMTPUTF8")  # RFC 6531 3.7.4.1

# --------------------------------------------------------------------------- permanent failures: security (5.7.x)

TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")                  # RFC 3207 4
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")                              # RFC 4954 6
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")  # RFC 4954 6
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")                    # RFC 4954 6
AUTH_NO_CERTIFICATE = Reply(535, "5.7.8", "No verified client certificate bound to an account")  # RFC 4422 A (EXTERNAL)
AUTHZID_REFUSED = Reply(535, "5.7.8", "Authorization identity differs from authentication identity")  # RFC 4616 2
CLIENT_CERT_REQUIRED = Reply(
    530, "5.7.0", "Client certificate required: this relay door accepts operators whose certificate chains to the "
    "trust anchors of the MSSanté space; present your MX certificate in the TLS handshake (RFC 3207 4.1)")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")                              # RFC 3207 4
TLS_HANDSHAKE_FAILED = Reply(554, "5.7.0", "TLS handshake failed")                          # RFC 3207 4.1
NOT_OWNER = Reply(553, "5.7.1", "Sender address {address} is not owned by or delegated to {login}")  # RFC 3463 3.8
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "An authenticated user cannot send with a null reverse-path")  # RFC 6409 6.1
DOMAIN_NOT_TRUSTED = Reply(550, "5.7.1", "Domain {domain} is not in the MSSanté trust space")  # RFC 3463 3.8
SENDER_DOMAIN_IS_LOCAL = Reply(550, "5.7.1", "Domain {domain} is hosted here: submit on the submission port")  # RFC 6409 4
CERTIFICATE_DOMAIN_MISMATCH = Reply(550, "5.7.1", "Client certificate ({names}) does not speak for domain {domain}")  # RFC 3463 3.8
CERTIFICATE_NAMES_NO_SERVER = Reply(
    550, "5.7.1", "Client certificate ({names}) names no mail server of a trusted operator: the relay door takes "
    "an operator's MX certificate; a mailbox certificate authenticates on the submission port")  # RFC 3463 3.8
# The author (RFC 5322 3.6.2 From, Sender) must be who is sending: RFC 3463 3.8 X.7.1, message refused by policy.
FROM_MISSING = Reply(550, "5.7.1", "Message has no From: header field; RFC 5322 3.6 requires one naming the author")
FROM_REPEATED = Reply(550, "5.7.1", "Message has {count} From: header fields; RFC 5322 3.6 allows exactly one")
FROM_GROUP = Reply(550, "5.7.1", "From: header uses group syntax; it must list the author's own mailboxes "
                   "(RFC 5322 3.6.2)")
FROM_NO_MAILBOX = Reply(550, "5.7.1", "From: header names no mailbox ({detail})")
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: header address {address} is not owned by or delegated to {login}")
SENDER_REPEATED = Reply(550, "5.7.1", "Message has {count} Sender: header fields; RFC 5322 3.6 allows at most one")
SENDER_NOT_LOGIN = Reply(550, "5.7.1", "Sender: header address {address} is not {login}, the authenticated sender "
                         "(RFC 5322 3.6.2)")
FROM_DOMAIN_IS_LOCAL = Reply(550, "5.7.1", "From: header domain {domain} is hosted here: a peer operator cannot "
                             "send as our users")
FROM_NOT_ALIGNED = Reply(550, "5.7.1", "From: header domain {domain} is not aligned with the envelope sender's "
                         "organisation {organisation} (From and MAIL FROM must be in the same trusted domain)")
FROM_NOT_SPOKEN_FOR = Reply(550, "5.7.1", "From: header domain {domain} is not spoken for by the client certificate "
                            "({names})")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied: {address} is not hosted here")    # RFC 5321 3.6.2, RFC 3463 3.8
SOURCE_ROUTE_REFUSED = Reply(550, "5.7.1", "Source routes are not accepted (RFC 5321 4.1.1.3); no relaying")
PERCENT_HACK_REFUSED = Reply(550, "5.7.1", "Percent-hack addresses are not accepted; no relaying")  # RFC 5321 3.6.2
BANG_PATH_REFUSED = Reply(550, "5.7.1", "Bang-path (UUCP) addresses are not accepted; no relaying")  # RFC 5321 3.6.2
QUOTED_LOCAL_PART_REFUSED = Reply(553, "5.1.3", "Quoted local parts are not accepted here")  # RFC 5321 4.1.2, RFC 3463 3.2
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Malformed address: {detail}")                      # RFC 3463 3.2 (X.1.3)
PATIENT_CANNOT_INITIATE = Reply(
    550, "5.7.1",
    "A patient may only write to a professional who wrote to them first ({address} has not, or ended the conversation)")
PATIENT_TO_PATIENT = Reply(550, "5.7.1", "Patients cannot write to other patients")
MESSAGE_REFUSED_POLICY = Reply(554, "5.7.1", "Message refused: {detail}")                   # RFC 3463 3.8

# --------------------------------------------------------------------------- permanent failures: mailbox and content

UNKNOWN_MAILBOX = Reply(550, "5.1.1", "No mailbox {address} here")                          # RFC 3463 3.2 (X.1.1)
POSTMASTER_NOT_CONFIGURED = Reply(
    550, "5.1.1",
    "No mailbox {address} here: this gateway's postmaster is not configured (the administrator sets [smtp] "
    "postmaster to a hosted mailbox, RFC 5321 4.5.1)")
MAILBOX_DISABLED = Reply(550, "5.2.1", "Mailbox {address} is disabled")                     # RFC 3463 3.3 (X.2.1)
PATIENT_CLOSED = Reply(550, "5.2.1", "Mailbox {address} is closed: this patient has closed their Mon espace santé space")
PATIENT_OPPOSED = Reply(550, "5.1.1", "No mailbox {address}: this patient has opposed Mon espace santé messaging")
MAILBOX_CLOSED = PATIENT_CLOSED
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size ({limit} octets)")  # RFC 1870 6.1, RFC 3463 3.4
TOO_MANY_HEADERS = Reply(554, "5.6.0", "Message has more than {limit} header fields")       # RFC 3463 3.5 (X.6.0)
MIME_TOO_DEEP = Reply(554, "5.6.0", "MIME structure nested deeper than {limit} levels")    # RFC 3463 3.5
HEADER_TOO_LARGE = Reply(554, "5.6.0", "Message header section larger than {limit} octets")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")                            # RFC 5321 3.3
EIGHT_BIT_NOT_DECLARED = Reply(554, "5.6.1", "8-bit data needs BODY=8BITMIME")              # RFC 6152 3


# --------------------------------------------------------------------------- what the audit log records

# Sign-in outcomes are audited by the authentication limiter, once per attempt; these are its replies.
_SIGN_IN_REPLIES = frozenset({(r.code, r.enhanced, r.text) for r in (AUTH_ABORTED, TOO_MANY_AUTH_FAILURES)})
_SMUGGLING_REPLIES = frozenset({(r.code, r.enhanced, r.text) for r in (BARE_LF, BARE_CR)})


def is_policy_refusal(reply: Reply) -> bool:
    """Whether a refusal is a policy decision the audit log keeps (``security/door_audit.py``).

    RFC 3463 3: the enhanced code's subject says what was refused: addressing
    (X.1: an unknown or malformed recipient, a relay attempt), the mailbox
    (X.2), the content (X.6) or security and policy (X.7: a spoofed sender, a
    domain outside the trust space, a rate limit). Syntax and sequence errors
    (X.5) and the system's own state (X.3, X.4) are the log's, except a bare CR
    or LF in DATA, which is how SMTP smuggling is tried. Sign-in replies
    (X.7.8, a lock-out, too many failures) are left to the limiter.
    """
    key = (reply.code, reply.enhanced, reply.text)
    if reply.is_success or not reply.enhanced or key in _SIGN_IN_REPLIES:
        return False
    if key in _SMUGGLING_REPLIES:
        return True
    subject, detail = reply.enhanced.split(".")[1:3]
    if subject == "7" and (detail == "8" or (reply.code, reply.enhanced) == (454, "4.7.0")):
        return False
    return subject in {"1", "2", "6", "7"}
