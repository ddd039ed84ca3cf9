"""Mail store tables: folders, messages, expunge tombstones, deliveries, subscriptions, data keys.

Bodies are not here: a message row points at an encrypted blob (``blob_id``)
and holds only what IMAP needs without opening it (UID, MODSEQ, flags, size,
dates, the cached header fields that SEARCH and ENVELOPE read).

Flags are split in two columns. The five system flags of RFC 3501 2.3.2 are an
integer bit mask (``system_flags``): the hot queries (UNSEEN count at SELECT,
EXPUNGE of ``\\Deleted``, SEARCH UNSEEN/FLAGGED) become one bit test on the row
already read through the (folder_id, uid) index, with no join. Keywords are rare
and free-form, so they live in one text column holding a space-separated set
framed by spaces (`` $Forwarded NonJunk ``): ``keywords LIKE '% NonJunk %'`` is
an exact SEARCH KEYWORD match on both databases, and a STORE rewrites one column.
An association table would cost a join on every FETCH FLAGS for little gain.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow

KEYWORDED = "keywords != ' '"    # flags.keywords_column of no keyword is a single space


class MailAccount(Base):
    """Per hosted mailbox state that outlives any folder: the last UIDVALIDITY handed out.

    RFC 3501 2.3.1.1: a folder deleted and re-created under the same name must get a
    new UIDVALIDITY. Keeping the last value per mailbox (instead of per folder)
    guarantees that even when both happen within the same second.
    """

    __tablename__ = "mail_accounts"

    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True)
    last_uidvalidity: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class Folder(Base):
    """An IMAP mailbox ("folder" here, to keep "mailbox" for the directory's address)."""

    __tablename__ = "mail_folders"
    __table_args__ = (UniqueConstraint("mailbox_id", "name", name="uq_mail_folders_mailbox_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))  # UTF-8, NFC, hierarchy separator "/"
    special_use: Mapped[str | None] = mapped_column(String(16))  # RFC 6154: \Sent, \Trash...
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=1)
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=1)
    # RFC 3501 2.3.2 \Recent: UIDs above this mark have not been seen by any session yet.
    recent_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Keywords ever set in this folder (space-framed set), for the FLAGS response at SELECT.
    keywords: Mapped[str] = mapped_column(Text, default=" ")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class Subscription(Base):
    """A subscribed folder name.

    Separate from folders because RFC 3501 6.3.6 forbids dropping a subscription
    when its folder disappears, and allows subscribing to a name that does not exist.
    """

    __tablename__ = "mail_subscriptions"
    __table_args__ = (UniqueConstraint("mailbox_id", "name", name="uq_mail_subscriptions_mailbox_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))


class Message(Base):
    """One message in one folder. A COPY makes a new row sharing the same blob."""

    __tablename__ = "mail_messages"
    __table_args__ = (
        UniqueConstraint("folder_id", "uid", name="uq_mail_messages_folder_uid"),
        Index("ix_mail_messages_folder_modseq", "folder_id", "modseq"),  # CONDSTORE CHANGEDSINCE
        Index("ix_mail_messages_blob", "blob_id"),  # is this blob still referenced?
        Index("ix_mail_messages_message_id", "message_id"),  # webmail threads, duplicates
        # A folder's shared index (mailstore/index.py) read whole from these two alone, never from the wide
        # rows: UIDs, MODSEQs and system flags of every message, and the few messages that have keywords.
        Index("ix_mail_messages_folder_uid_flags", "folder_id", "uid", "modseq", "system_flags"),
        Index("ix_mail_messages_folder_keyworded", "folder_id", "uid", sqlite_where=text(KEYWORDED),
              postgresql_where=text(KEYWORDED)),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("mail_folders.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    system_flags: Mapped[int] = mapped_column(Integer, default=0)
    keywords: Mapped[str] = mapped_column(Text, default=" ")
    internaldate: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    size: Mapped[int] = mapped_column(BigInteger)
    blob_id: Mapped[str] = mapped_column(String(32))
    # Cached header fields (decoded to Unicode) for SEARCH and the webmail list.
    message_id: Mapped[str | None] = mapped_column(String(998))
    subject: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(Text)
    to_addr: Mapped[str | None] = mapped_column(Text)
    cc_addr: Mapped[str | None] = mapped_column(Text)
    sent_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())  # Date: wall clock, own zone dropped
    # RFC 3501 7.4.2 ENVELOPE, parsed once at delivery (header-only, cheap).
    envelope: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The same ENVELOPE sealed as IMAP sends it, raw octets (``mailstore/envelopes.py``); ``envelope`` is then {}.
    envelope_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    saved_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class MessageTokens(Base):
    """The keyed blind index tokens of one message's sealed header columns (``mailstore/blind_index.py``), packed.

    Written with the message (one row, appended: message ids grow), so that a delivery writes one row
    instead of one per token. ``posted``: its tokens are in the mailbox's posting lists too
    (``TokenPostings``); until a fold puts them there, SEARCH reads the mailbox's few unposted rows
    themselves. A row says the message is indexed; it goes with its message (ON DELETE CASCADE).
    """

    __tablename__ = "mail_message_tokens"
    __table_args__ = (Index("ix_mail_message_tokens_mailbox", "mailbox_id", "posted", "message_id"),)

    message_id: Mapped[int] = mapped_column(ForeignKey("mail_messages.id", ondelete="CASCADE"), primary_key=True,
                                            autoincrement=False)
    mailbox_id: Mapped[int] = mapped_column(Integer)
    posted: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens: Mapped[bytes] = mapped_column(LargeBinary)


class TokenPostings(Base):
    """One segment of a token's posting list in one mailbox: message ids packed (``blind_index.pack``),
    ascending within the segment (SEARCH bisects them).

    A fold appends one segment per token of the messages it posts (new rows, no rewrite); a compaction
    merges a token's segments. Ids of expunged messages linger until a sweep (``blind_index.sweep``, due once
    they are a quarter of the posted ones): SEARCH loads candidates by primary key, so an id that is gone (or
    taken again by another message) only costs a lookup meanwhile.
    """

    __tablename__ = "mail_token_postings"
    # The index holds each segment's size: a list's length is read without its ids.
    __table_args__ = (Index("ix_mail_token_postings_token", "mailbox_id", "token", "size"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    token: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer)          # ids in the segment
    ids: Mapped[bytes] = mapped_column(LargeBinary)


class ExpungedMessage(Base):
    """A tombstone: UID expunged at MODSEQ, for QRESYNC VANISHED and changes-since (RFC 7162 3.2.5)."""

    __tablename__ = "mail_expunged"
    __table_args__ = (Index("ix_mail_expunged_folder_modseq", "folder_id", "modseq"),)

    folder_id: Mapped[int] = mapped_column(ForeignKey("mail_folders.id", ondelete="CASCADE"), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    modseq: Mapped[int] = mapped_column(BigInteger)


class Delivery(Base):
    """Records that a delivery key reached a mailbox, so a redelivery after a crash is a no-op."""

    __tablename__ = "mail_deliveries"
    __table_args__ = (UniqueConstraint("delivery_key", "mailbox_id", name="uq_mail_deliveries_key_mailbox"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_key: Mapped[str] = mapped_column(String(255))
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    folder_name: Mapped[str] = mapped_column(String(1024))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class DataKey(Base):
    """A data key of one owner (``mailbox:<id>``, later ``patient:<id>``), wrapped by a KEK.

    Crypto-shredding clears ``wrapped_key`` and sets ``destroyed_at``: every blob
    under this key becomes unreadable, whatever copies of the files exist.
    """

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    kek_id: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    destroyed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
