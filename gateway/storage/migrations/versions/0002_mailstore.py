"""mailstore: folders, messages, expunge tombstones, deliveries, subscriptions, data keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:33:14.985967
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('data_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=True),
    sa.Column('kek_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('destroyed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_data_keys'))
    )
    op.create_index(op.f('ix_data_keys_kek_id'), 'data_keys', ['kek_id'], unique=False)
    op.create_index(op.f('ix_data_keys_owner'), 'data_keys', ['owner'], unique=False)
    op.create_table('mail_accounts',
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('last_uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mail_accounts_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('mailbox_id', name=op.f('pk_mail_accounts'))
    )
    op.create_table('mail_deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('delivery_key', sa.String(length=255), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('folder_name', sa.String(length=1024), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mail_deliveries_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_deliveries')),
    sa.UniqueConstraint('delivery_key', 'mailbox_id', name='uq_mail_deliveries_key_mailbox')
    )
    op.create_index(op.f('ix_mail_deliveries_mailbox_id'), 'mail_deliveries', ['mailbox_id'], unique=False)
    op.create_table('mail_folders',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=1024), nullable=False),
    sa.Column('special_use', sa.String(length=16), nullable=True),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('uidnext', sa.BigInteger(), nullable=False),
    sa.Column('highestmodseq', sa.BigInteger(), nullable=False),
    sa.Column('recent_uid', sa.BigInteger(), nullable=False),
    sa.Column('message_count', sa.Integer(), nullable=False),
    sa.Column('total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('keywords', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mail_folders_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_folders')),
    sa.UniqueConstraint('mailbox_id', 'name', name='uq_mail_folders_mailbox_name')
    )
    op.create_table('mail_subscriptions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=1024), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_mail_subscriptions_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_subscriptions')),
    sa.UniqueConstraint('mailbox_id', 'name', name='uq_mail_subscriptions_mailbox_name')
    )
    op.create_table('mail_expunged',
    sa.Column('folder_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('modseq', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['folder_id'], ['mail_folders.id'], name=op.f('fk_mail_expunged_folder_id_mail_folders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('folder_id', 'uid', name=op.f('pk_mail_expunged'))
    )
    op.create_index('ix_mail_expunged_folder_modseq', 'mail_expunged', ['folder_id', 'modseq'], unique=False)
    op.create_table('mail_messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('folder_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('modseq', sa.BigInteger(), nullable=False),
    sa.Column('system_flags', sa.Integer(), nullable=False),
    sa.Column('keywords', sa.Text(), nullable=False),
    sa.Column('internaldate', sa.DateTime(timezone=True), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('blob_id', sa.String(length=32), nullable=False),
    sa.Column('message_id', sa.String(length=998), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('from_addr', sa.Text(), nullable=True),
    sa.Column('to_addr', sa.Text(), nullable=True),
    sa.Column('cc_addr', sa.Text(), nullable=True),
    sa.Column('sent_date', sa.DateTime(timezone=True), nullable=True),
    sa.Column('envelope', sa.JSON(), nullable=False),
    sa.Column('saved_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.ForeignKeyConstraint(['folder_id'], ['mail_folders.id'], name=op.f('fk_mail_messages_folder_id_mail_folders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_messages')),
    sa.UniqueConstraint('folder_id', 'uid', name='uq_mail_messages_folder_uid')
    )
    op.create_index('ix_mail_messages_blob', 'mail_messages', ['blob_id'], unique=False)
    op.create_index('ix_mail_messages_folder_modseq', 'mail_messages', ['folder_id', 'modseq'], unique=False)
    op.create_index('ix_mail_messages_message_id', 'mail_messages', ['message_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_mail_messages_message_id', table_name='mail_messages')
    op.drop_index('ix_mail_messages_folder_modseq', table_name='mail_messages')
    op.drop_index('ix_mail_messages_blob', table_name='mail_messages')
    op.drop_table('mail_messages')
    op.drop_index('ix_mail_expunged_folder_modseq', table_name='mail_expunged')
    op.drop_table('mail_expunged')
    op.drop_table('mail_subscriptions')
    op.drop_table('mail_folders')
    op.drop_index(op.f('ix_mail_deliveries_mailbox_id'), table_name='mail_deliveries')
    op.drop_table('mail_deliveries')
    op.drop_table('mail_accounts')
    op.drop_index(op.f('ix_data_keys_owner'), table_name='data_keys')
    op.drop_index(op.f('ix_data_keys_kek_id'), table_name='data_keys')
    op.drop_table('data_keys')
