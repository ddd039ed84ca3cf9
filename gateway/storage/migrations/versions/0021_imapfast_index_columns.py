"""mailstore: a folder's UIDs, MODSEQs and flags readable from indexes alone (the first SELECT of a big folder)

Revision ID: 0021_imapfast_index_columns
Revises: 0020_imapsearch_blind_index

The shared per-folder index (``gateway/mailstore/index.py``) is loaded whole the first time a folder is
used after a start. Read from the message rows, that visited every wide row (sealed headers, envelope):
on 100,000 messages, most of a second. These two indexes cover it: (folder, UID, MODSEQ, system flags),
and the messages that carry keywords (partial: a single space means none).
"""
from alembic import op
import sqlalchemy as sa


revision = '0021_imapfast_index_columns'
down_revision = '0020_imapsearch_blind_index'
branch_labels = None
depends_on = None

KEYWORDED = "keywords != ' '"


def upgrade() -> None:
    op.create_index('ix_mail_messages_folder_uid_flags', 'mail_messages', ['folder_id', 'uid', 'modseq', 'system_flags'],
                    unique=False)
    op.create_index('ix_mail_messages_folder_keyworded', 'mail_messages', ['folder_id', 'uid'], unique=False,
                    sqlite_where=sa.text(KEYWORDED), postgresql_where=sa.text(KEYWORDED))


def downgrade() -> None:
    op.drop_index('ix_mail_messages_folder_keyworded', table_name='mail_messages')
    op.drop_index('ix_mail_messages_folder_uid_flags', table_name='mail_messages')
