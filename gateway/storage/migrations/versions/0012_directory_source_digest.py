"""directory import: the digest of the extraction line each mailbox was last imported from

Revision ID: 0012_directory_source_digest
Revises: 0011_directory_search

``mailboxes.source_digest`` (64-bit BLAKE2b of the raw line, signed to fit BIGINT) lets a
re-import recognise an unchanged line without validating it again. It is NULL for
mailboxes not written by an import, for rows whose owner data differs from the stored
owner's, and after any change to the mailbox or its owners outside the import; a NULL
only means "validate this line again". No backfill: the next import writes it.
"""
from alembic import op
import sqlalchemy as sa


revision = '0012_directory_source_digest'
down_revision = '0011_directory_search'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('mailboxes') as batch:
        batch.add_column(sa.Column('source_digest', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('mailboxes') as batch:
        batch.drop_column('source_digest')
