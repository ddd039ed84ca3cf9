"""queue_messages.content: a small accepted message's sealed spool octets, committed with its queue rows in
the acceptance group commit instead of a spool file created, fsynced, renamed and unlinked of its own
(gateway.queue.spool)

Revision ID: 0024_smtpaccept_spool_in_row
Revises: 0004 (the queue's tables)
"""
import sqlalchemy as sa
from alembic import op

revision = '0024_smtpaccept_spool_in_row'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('queue_messages', sa.Column('content', sa.LargeBinary(), nullable=True))   # no table rebuild


def downgrade() -> None:
    with op.batch_alter_table('queue_messages') as batch_op:
        batch_op.drop_column('content')
