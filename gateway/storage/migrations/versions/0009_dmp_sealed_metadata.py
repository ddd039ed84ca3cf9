"""dmp sealed metadata: free-text record and filing columns hold sealed values (longer than their plaintext)

Revision ID: 0009
Revises: 0006 (the record branch; Database.migrate applies every head)

The display names, the title and the attachment names of ``record_documents``,
and the attachment names of ``filing_outcomes``, are sealed at rest
(gateway.dmp_bridge.record.RecordSealer): a sealed value is about 4/3 of its
plaintext plus 50 characters, so the bounded columns become TEXT. Rows written
before keep their plaintext and are read as is.
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0006'
branch_labels = None
depends_on = None

_RECORD_COLUMNS = {
    'type_display': sa.String(length=256),
    'class_display': sa.String(length=256),
    'facility_type_display': sa.String(length=256),
    'practice_setting_display': sa.String(length=256),
    'source_attachment': sa.String(length=512),
}


def upgrade() -> None:
    with op.batch_alter_table('record_documents') as batch:
        for column, old_type in _RECORD_COLUMNS.items():
            batch.alter_column(column, existing_type=old_type, type_=sa.Text(), existing_nullable=True)
    with op.batch_alter_table('filing_outcomes') as batch:
        batch.alter_column('attachment', existing_type=sa.String(length=512), type_=sa.Text(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table('filing_outcomes') as batch:
        batch.alter_column('attachment', existing_type=sa.Text(), type_=sa.String(length=512), existing_nullable=True)
    with op.batch_alter_table('record_documents') as batch:
        for column, old_type in _RECORD_COLUMNS.items():
            batch.alter_column(column, existing_type=sa.Text(), type_=old_type, existing_nullable=True)
