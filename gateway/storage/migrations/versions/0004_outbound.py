"""outbound queue: holds, DKIM signatures, delivery attempts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbound_messages',
    sa.Column('message_id', sa.String(length=32), nullable=False),
    sa.Column('held_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dkim_signature', sa.Text(), nullable=True),
    sa.Column('delay_reported_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['queue_messages.id'], name=op.f('fk_outbound_messages_message_id_queue_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('message_id', name=op.f('pk_outbound_messages'))
    )
    op.create_table('outbound_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('recipient_id', sa.Integer(), nullable=False),
    sa.Column('attempted_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('mx_host', sa.String(length=255), nullable=True),
    sa.Column('ip', sa.String(length=64), nullable=True),
    sa.Column('reply_code', sa.Integer(), nullable=True),
    sa.Column('enhanced_code', sa.String(length=16), nullable=True),
    sa.Column('reply', sa.Text(), nullable=False),
    sa.Column('tls_version', sa.String(length=16), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['recipient_id'], ['queue_recipients.id'], name=op.f('fk_outbound_attempts_recipient_id_queue_recipients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbound_attempts'))
    )
    with op.batch_alter_table('outbound_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbound_attempts_recipient_id'), ['recipient_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outbound_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbound_attempts_recipient_id'))
    op.drop_table('outbound_attempts')
    op.drop_table('outbound_messages')
