"""mailstore: the blind index as one packed row per message and posting lists in segments

Revision ID: 0022_blindindex_postings
Revises: 0021_imapfast_index_columns

``mail_search_tokens`` held one row per (token, message): a delivery wrote about 140 rows at random
places of a B-tree (0.7-1.35 ms and 160-380 KB of pages per message), and SEARCH probed them one by one.
Now a delivery writes one row of packed tokens (``mail_message_tokens``) and the store folds those into
per-mailbox posting lists (``mail_token_postings``: message ids packed, a segment per row) in batches.

The existing rows are converted here, without any key (the tokens are already computed): each message's
tokens become its packed row (posted), each (mailbox, token)'s messages its posting list, in segments of
at most 65,536 ids. Messages without rows stay without (SEARCH unseals them; ``gateway mailbox reindex``).
"""
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from alembic import op
import sqlalchemy as sa


revision = '0022_blindindex_postings'
down_revision = '0021_imapfast_index_columns'
branch_labels = None
depends_on = None

SEGMENT_IDS = 65536
ROWS_PER_INSERT = 2000
READ_BATCH = 50000

old_tokens = sa.table('mail_search_tokens', sa.column('token', sa.BigInteger), sa.column('message_id', sa.Integer))
message_tokens = sa.table('mail_message_tokens', sa.column('message_id', sa.Integer), sa.column('mailbox_id', sa.Integer),
                          sa.column('posted', sa.Boolean), sa.column('tokens', sa.LargeBinary))
postings = sa.table('mail_token_postings', sa.column('mailbox_id', sa.Integer), sa.column('token', sa.BigInteger),
                    sa.column('size', sa.Integer), sa.column('ids', sa.LargeBinary))
messages = sa.table('mail_messages', sa.column('id', sa.Integer), sa.column('folder_id', sa.Integer))
folders = sa.table('mail_folders', sa.column('id', sa.Integer), sa.column('mailbox_id', sa.Integer))


def pack(values: Iterable[int]) -> bytes:
    """As ``gateway.mailstore.blind_index.pack``: signed 64-bit little-endian integers."""
    packed = array('q', values)
    if sys.byteorder == 'big':
        packed.byteswap()
    return packed.tobytes()


def unpack(blob: bytes) -> "array[int]":
    values = array('q')
    values.frombytes(blob)
    if sys.byteorder == 'big':
        values.byteswap()
    return values


def upgrade() -> None:
    op.create_table('mail_message_tokens',
    sa.Column('message_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('posted', sa.Boolean(), nullable=False),
    sa.Column('tokens', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], name=op.f('fk_mail_message_tokens_message_id_mail_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('message_id', name=op.f('pk_mail_message_tokens'))
    )
    op.create_index('ix_mail_message_tokens_mailbox', 'mail_message_tokens', ['mailbox_id', 'posted', 'message_id'], unique=False)
    op.create_table('mail_token_postings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('token', sa.BigInteger(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('ids', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mail_token_postings_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_token_postings'))
    )
    op.create_index('ix_mail_token_postings_token', 'mail_token_postings', ['mailbox_id', 'token', 'size'], unique=False)
    _convert(op.get_bind())
    op.drop_index('ix_mail_search_tokens_message', table_name='mail_search_tokens')
    op.drop_table('mail_search_tokens')


def _sliced(connection: sa.Connection, by: Any, then: Any, low: int, high: int,
            count: int) -> Iterator[tuple[int, int]]:
    """(by, then) of every old row, in that order, read in slices of ``by``'s range [low, high) of about
    ``READ_BATCH`` rows each (no server-side cursor: PostgreSQL would not drop a table one still reads)."""
    slices = max(1, count // READ_BATCH + 1)
    step = max(1, -(-(high - low) // slices))
    for start in range(low, high, step):
        bounded = [by < start + step] if start + step < high else []   # 2 ** 63 itself is no BIGINT
        yield from connection.execute(sa.select(by, then).where(by >= start, *bounded).order_by(by, then)).all()


def _convert(connection: sa.Connection) -> None:
    count = connection.execute(sa.select(sa.func.count()).select_from(old_tokens)).scalar() or 0
    if not count:
        return
    mailbox_of = dict(connection.execute(
        sa.select(messages.c.id, folders.c.mailbox_id).join(folders, folders.c.id == messages.c.folder_id)).all())
    rows: list[dict[str, Any]] = []

    def flush(table: Any, final: bool = False) -> None:
        if rows and (final or len(rows) >= ROWS_PER_INSERT):
            connection.execute(sa.insert(table), rows)
            rows.clear()

    current, held = None, array('q')
    lowest, highest = connection.execute(sa.select(sa.func.min(old_tokens.c.message_id),
                                                   sa.func.max(old_tokens.c.message_id))).one()
    for message_id, token in _sliced(connection, old_tokens.c.message_id, old_tokens.c.token, lowest, highest + 1,
                                     count):
        if message_id != current:
            if current is not None and current in mailbox_of:
                rows.append({'message_id': current, 'mailbox_id': mailbox_of[current], 'posted': True,
                             'tokens': pack(held)})
                flush(message_tokens)
            current, held = message_id, array('q')
        held.append(token)
    if current is not None and current in mailbox_of:
        rows.append({'message_id': current, 'mailbox_id': mailbox_of[current], 'posted': True, 'tokens': pack(held)})
    flush(message_tokens, final=True)

    def emit(token: int, by_mailbox: dict[int, list[int]]) -> None:
        for mailbox_id, ids in by_mailbox.items():
            for start in range(0, len(ids), SEGMENT_IDS):
                part = ids[start:start + SEGMENT_IDS]
                rows.append({'mailbox_id': mailbox_id, 'token': token, 'size': len(part), 'ids': pack(part)})
                flush(postings)

    current_token: int | None = None
    by_mailbox: dict[int, list[int]] = {}
    for token, message_id in _sliced(connection, old_tokens.c.token, old_tokens.c.message_id, -2 ** 63, 2 ** 63,
                                     count):
        if token != current_token:
            if current_token is not None:
                emit(current_token, by_mailbox)
            current_token, by_mailbox = token, {}
        mailbox_id = mailbox_of.get(message_id)
        if mailbox_id is not None:
            by_mailbox.setdefault(mailbox_id, []).append(message_id)
    if current_token is not None:
        emit(current_token, by_mailbox)
    flush(postings, final=True)


def downgrade() -> None:
    op.create_table('mail_search_tokens',
    sa.Column('token', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('message_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], name=op.f('fk_mail_search_tokens_message_id_mail_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token', 'message_id', name=op.f('pk_mail_search_tokens')),
    sqlite_with_rowid=False
    )
    op.create_index('ix_mail_search_tokens_message', 'mail_search_tokens', ['message_id'], unique=False)
    connection = op.get_bind()
    rows: list[dict[str, int]] = []
    for message_id, blob in connection.execute(sa.select(message_tokens.c.message_id, message_tokens.c.tokens)).all():
        rows.extend({'token': token, 'message_id': message_id} for token in unpack(bytes(blob)))
        if len(rows) >= ROWS_PER_INSERT * 10:
            connection.execute(sa.insert(old_tokens), rows)
            rows.clear()
    if rows:
        connection.execute(sa.insert(old_tokens), rows)
    op.drop_index('ix_mail_token_postings_token', table_name='mail_token_postings')
    op.drop_table('mail_token_postings')
    op.drop_index('ix_mail_message_tokens_mailbox', table_name='mail_message_tokens')
    op.drop_table('mail_message_tokens')
