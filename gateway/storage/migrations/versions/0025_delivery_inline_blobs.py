"""mailstore: small message bodies sealed in the database row of ``inline_blobs`` instead of a file

Revision ID: 0025_delivery_inline_blobs
Revises: 0024_envelope_sealed_bytes

A delivered message of a few KB was written to a blob file of its own: a file created, written, fsynced,
renamed, and its directory fsynced, about half the CPU and most of the system calls of a local delivery.
A message whose sealed form fits ``storage.blobs.INLINE_MAX`` is now the same sealed bytes in a row of
``inline_blobs`` (blob ids ``i`` + 31 hex digits), inserted in the delivery's transaction: durable with the
one WAL commit of the delivery batch. Existing blob files stay where they are.
"""
from alembic import op
import sqlalchemy as sa


revision = '0025_delivery_inline_blobs'
down_revision = '0024_envelope_sealed_bytes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inline_blobs',
                    sa.Column('blob_id', sa.String(length=32), nullable=False),
                    sa.Column('sealed', sa.LargeBinary(), nullable=False),
                    sa.PrimaryKeyConstraint('blob_id'))


def downgrade() -> None:
    op.drop_table('inline_blobs')
