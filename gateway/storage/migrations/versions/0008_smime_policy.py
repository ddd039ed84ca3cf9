"""smime policy: per mailbox/domain policies, certificate publication, held keys, inbound results

Revision ID: 0008
Revises: 0003 (a branch beside the outbound, audit and record revisions; Database.migrate applies every head)
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('smime_policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('target', sa.String(length=320), nullable=False),
    sa.Column('sign', sa.String(length=16), nullable=True),
    sa.Column('encrypt', sa.String(length=16), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scope', 'target', name='uq_smime_policies_scope_target')
    )
    op.create_table('smime_certificates',
    sa.Column('certificate_id', sa.Integer(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revocation_reason', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['certificate_id'], ['certificates.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('certificate_id')
    )
    op.create_table('smime_held_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('certificate_id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('sealed_key', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['certificate_id'], ['certificates.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('certificate_id')
    )
    op.create_index('ix_smime_held_keys_mailbox_id', 'smime_held_keys', ['mailbox_id'], unique=False)
    op.create_table('smime_inbound_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('queue_id', sa.String(length=32), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('encrypted', sa.Boolean(), nullable=False),
    sa.Column('signer', sa.String(length=320), nullable=True),
    sa.Column('decrypted_blob_id', sa.String(length=32), nullable=True),
    sa.Column('decrypted_size', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('queue_id', 'mailbox_id', name='uq_smime_inbound_results_queue_mailbox')
    )
    op.create_index('ix_smime_inbound_results_mailbox', 'smime_inbound_results', ['mailbox_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_smime_inbound_results_mailbox', table_name='smime_inbound_results')
    op.drop_table('smime_inbound_results')
    op.drop_index('ix_smime_held_keys_mailbox_id', table_name='smime_held_keys')
    op.drop_table('smime_held_keys')
    op.drop_table('smime_certificates')
    op.drop_table('smime_policies')
