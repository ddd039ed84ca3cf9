"""smtp queue: queued messages, recipients, conversations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:34:05.401587
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('queue_messages',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('door', sa.String(length=16), nullable=False),
    sa.Column('sender', sa.String(length=320), nullable=False),
    sa.Column('envid', sa.String(length=200), nullable=True),
    sa.Column('ret', sa.String(length=4), nullable=True),
    sa.Column('body_type', sa.String(length=8), nullable=False),
    sa.Column('smtputf8', sa.Boolean(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('message_id_header', sa.Text(), nullable=True),
    sa.Column('trace_headers', sa.Text(), nullable=False),
    sa.Column('authenticated_as', sa.String(length=320), nullable=True),
    sa.Column('client_address', sa.String(length=64), nullable=False),
    sa.Column('client_helo', sa.String(length=255), nullable=True),
    sa.Column('tls', sa.String(length=128), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_messages'))
    )
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.create_index('ix_queue_messages_state', ['state'], unique=False)

    op.create_table('conversations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('professional_address', sa.String(length=320), nullable=False),
    sa.Column('patient_mailbox_id', sa.Integer(), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('last_message_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['patient_mailbox_id'], ['mailboxes.id'], name=op.f('fk_conversations_patient_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations')),
    sa.UniqueConstraint('professional_address', 'patient_mailbox_id', name='pair')
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversations_patient_mailbox_id'), ['patient_mailbox_id'], unique=False)

    op.create_table('queue_recipients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('orcpt', sa.String(length=500), nullable=True),
    sa.Column('notify', sa.String(length=32), nullable=True),
    sa.Column('route', sa.String(length=8), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=True),
    sa.Column('domain', sa.String(length=253), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_queue_recipients_mailbox_id_mailboxes'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['message_id'], ['queue_messages.id'], name=op.f('fk_queue_recipients_message_id_queue_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_recipients')),
    sa.UniqueConstraint('message_id', 'address', name='message_address')
    )
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queue_recipients_message_id'), ['message_id'], unique=False)
        batch_op.create_index('ix_queue_recipients_work', ['route', 'state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_recipients_work')
        batch_op.drop_index(batch_op.f('ix_queue_recipients_message_id'))

    op.drop_table('queue_recipients')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversations_patient_mailbox_id'))

    op.drop_table('conversations')
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_messages_state')

    op.drop_table('queue_messages')
