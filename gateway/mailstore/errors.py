"""Mail store refusals, each carrying the IMAP response code a session answers with.

Codes are those of RFC 5530 (IMAP response codes) and RFC 3501 7.1 (TRYCREATE);
SMTP delivery maps ``QuotaExceeded`` to 552 5.2.2 and ``StoreBusy`` to 451 4.3.0.
"""

from __future__ import annotations

from gateway.errors import UserError


class MailStoreError(UserError):
    """A refusal of the mail store; ``imap_code`` is the bracketed code for the NO reply."""

    imap_code: str | None = None


class FolderNotFound(MailStoreError):
    imap_code = "TRYCREATE"  # RFC 3501 6.3.11: the client may CREATE it and retry


class FolderExists(MailStoreError):
    imap_code = "ALREADYEXISTS"  # RFC 5530 3


class FolderHasChildren(MailStoreError):
    imap_code = "INUSE"  # refused rather than leaving a \Noselect parent (Outlook loses mail filed there)


class InvalidFolderName(MailStoreError):
    imap_code = "CANNOT"  # RFC 5530 3


class CannotDeleteInbox(MailStoreError):
    imap_code = "CANNOT"  # RFC 3501 6.3.4: deleting INBOX is an error


class UidValidityChanged(MailStoreError):
    """The folder was deleted and re-created since the session selected it."""

    imap_code = "NONEXISTENT"


class MessageNotFound(MailStoreError):
    imap_code = "NONEXISTENT"


class QuotaExceeded(MailStoreError):
    imap_code = "OVERQUOTA"  # RFC 9208 4.3 (RFC 5530)


class MailboxNotHosted(MailStoreError):
    imap_code = "NONEXISTENT"


class StoreBusy(MailStoreError):
    """The database stayed locked through every retry: answer 451 / NO [UNAVAILABLE] and let the client retry."""

    imap_code = "UNAVAILABLE"  # RFC 5530 3
