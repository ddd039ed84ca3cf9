"""webmail: patient sessions, TOTP secrets, recovery codes

Revision ID: 0010_webmail
Revises: 0003 (a branch beside the other areas; Database.migrate applies every head)
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_webmail'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('webmail_sessions',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('source_ip', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token_hash')
    )
    op.create_index(op.f('ix_webmail_sessions_mailbox_id'), 'webmail_sessions', ['mailbox_id'], unique=False)
    op.create_table('webmail_totp',
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('secret_sealed', sa.Text(), nullable=False),
    sa.Column('confirmed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_step', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('mailbox_id')
    )
    op.create_table('webmail_recovery_codes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('code_hash', sa.String(length=64), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_webmail_recovery_codes_mailbox_id'), 'webmail_recovery_codes', ['mailbox_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_webmail_recovery_codes_mailbox_id'), table_name='webmail_recovery_codes')
    op.drop_table('webmail_recovery_codes')
    op.drop_table('webmail_totp')
    op.drop_index(op.f('ix_webmail_sessions_mailbox_id'), table_name='webmail_sessions')
    op.drop_table('webmail_sessions')
