"""patient choices: hidden documents, blocked professionals, médecin traitant, emergency opposition, archives

Revision ID: 0007
Revises: 0003 (a branch beside the outbound, audit and record revisions; Database.migrate applies every head)
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('record_hidden_documents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('document_unique_id', sa.String(length=255), nullable=False),
    sa.Column('hidden_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'document_unique_id', name='uq_record_hidden_documents_patient_doc')
    )
    op.create_index(op.f('ix_record_hidden_documents_patient_id'), 'record_hidden_documents', ['patient_id'], unique=False)
    op.create_table('record_blocked_professionals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('professional_idnps', sa.String(length=32), nullable=False),
    sa.Column('blocked_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'professional_idnps', name='uq_record_blocked_professionals_patient_pro')
    )
    op.create_index(op.f('ix_record_blocked_professionals_patient_id'), 'record_blocked_professionals', ['patient_id'], unique=False)
    op.create_table('record_preferences',
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('treating_doctor_idnps', sa.String(length=32), nullable=True),
    sa.Column('emergency_access_opposed', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('patient_id')
    )
    op.create_table('record_document_archives',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('document_unique_id', sa.String(length=255), nullable=False),
    sa.Column('archived_by_idnps', sa.String(length=32), nullable=False),
    sa.Column('archived_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('document_unique_id')
    )


def downgrade() -> None:
    op.drop_table('record_document_archives')
    op.drop_table('record_preferences')
    op.drop_index(op.f('ix_record_blocked_professionals_patient_id'), table_name='record_blocked_professionals')
    op.drop_table('record_blocked_professionals')
    op.drop_index(op.f('ix_record_hidden_documents_patient_id'), table_name='record_hidden_documents')
    op.drop_table('record_hidden_documents')
