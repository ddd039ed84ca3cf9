"""mailstore: the keyed blind index of the sealed header columns (SEARCH without unsealing every row)

Revision ID: 0020_imapsearch_blind_index
Revises: 0002

Existing messages get no rows here (a migration cannot unseal): SEARCH unseals the messages that have
none, and ``gateway mailbox reindex`` fills them in, resumably.
"""
from alembic import op
import sqlalchemy as sa


revision = '0020_imapsearch_blind_index'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mail_search_tokens',
    sa.Column('token', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('message_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], name=op.f('fk_mail_search_tokens_message_id_mail_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token', 'message_id', name=op.f('pk_mail_search_tokens')),
    sqlite_with_rowid=False
    )
    op.create_index('ix_mail_search_tokens_message', 'mail_search_tokens', ['message_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_mail_search_tokens_message', table_name='mail_search_tokens')
    op.drop_table('mail_search_tokens')
