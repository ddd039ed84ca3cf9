"""dmp record: record documents, filing jobs, per-document outcomes, idempotent notices

Revision ID: 0006
Revises: 0003 (a branch beside the outbound and audit revisions; Database.migrate applies every head)
Create Date: 2026-11-23 12:50:08.997046
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('record_documents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('unique_id', sa.String(length=255), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('patient_ins', sa.String(length=15), nullable=False),
    sa.Column('patient_ins_oid', sa.String(length=32), nullable=False),
    sa.Column('set_id', sa.String(length=255), nullable=True),
    sa.Column('version_number', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('replaces_unique_id', sa.String(length=255), nullable=True),
    sa.Column('superseded_by_unique_id', sa.String(length=255), nullable=True),
    sa.Column('superseded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('type_code', sa.String(length=64), nullable=True),
    sa.Column('type_code_system', sa.String(length=64), nullable=True),
    sa.Column('type_display', sa.String(length=256), nullable=True),
    sa.Column('class_code', sa.String(length=64), nullable=True),
    sa.Column('class_code_system', sa.String(length=64), nullable=True),
    sa.Column('class_display', sa.String(length=256), nullable=True),
    sa.Column('format_code', sa.String(length=128), nullable=True),
    sa.Column('format_code_system', sa.String(length=64), nullable=True),
    sa.Column('facility_type_code', sa.String(length=64), nullable=True),
    sa.Column('facility_type_system', sa.String(length=64), nullable=True),
    sa.Column('facility_type_display', sa.String(length=256), nullable=True),
    sa.Column('practice_setting_code', sa.String(length=64), nullable=True),
    sa.Column('practice_setting_system', sa.String(length=64), nullable=True),
    sa.Column('practice_setting_display', sa.String(length=256), nullable=True),
    sa.Column('event_codes', sa.JSON(), nullable=False),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('language_code', sa.String(length=16), nullable=True),
    sa.Column('creation_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('service_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('service_stop', sa.DateTime(timezone=True), nullable=True),
    sa.Column('author_idnps', sa.String(length=32), nullable=True),
    sa.Column('author_name', sa.String(length=256), nullable=True),
    sa.Column('author_profession_code', sa.String(length=64), nullable=True),
    sa.Column('author_profession_system', sa.String(length=64), nullable=True),
    sa.Column('author_profession_display', sa.String(length=256), nullable=True),
    sa.Column('author_organisation_idnst', sa.String(length=32), nullable=True),
    sa.Column('author_organisation_name', sa.String(length=256), nullable=True),
    sa.Column('authors', sa.JSON(), nullable=False),
    sa.Column('custodian_idnst', sa.String(length=32), nullable=True),
    sa.Column('custodian_name', sa.String(length=256), nullable=True),
    sa.Column('legal_authenticator_idnps', sa.String(length=32), nullable=True),
    sa.Column('legal_authenticator_name', sa.String(length=256), nullable=True),
    sa.Column('legal_authenticated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('confidentiality_code', sa.String(length=8), nullable=False),
    sa.Column('confidentiality', sa.JSON(), nullable=False),
    sa.Column('masked_to_professionals', sa.Boolean(), nullable=False),
    sa.Column('invisible_to_patient', sa.Boolean(), nullable=False),
    sa.Column('invisible_to_legal_representatives', sa.Boolean(), nullable=False),
    sa.Column('body_kind', sa.String(length=16), nullable=False),
    sa.Column('mime_type', sa.String(length=128), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha1', sa.String(length=40), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('blob_id', sa.String(length=32), nullable=False),
    sa.Column('source_kind', sa.String(length=8), nullable=False),
    sa.Column('source_attachment', sa.String(length=512), nullable=True),
    sa.Column('source_message_id', sa.String(length=998), nullable=True),
    sa.Column('source_delivery_key', sa.String(length=255), nullable=True),
    sa.Column('source_sender', sa.String(length=320), nullable=True),
    sa.Column('submission_set_unique_id', sa.String(length=255), nullable=True),
    sa.Column('signature_result', sa.Text(), nullable=True),
    sa.Column('filed_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_record_documents_patient_id_patients'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_record_documents')),
    sa.UniqueConstraint('set_id', 'version_number', name='uq_record_documents_set_version'),
    sa.UniqueConstraint('unique_id', name=op.f('uq_record_documents_unique_id'))
    )
    with op.batch_alter_table('record_documents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_record_documents_author_idnps'), ['author_idnps'], unique=False)
        batch_op.create_index('ix_record_documents_patient_status', ['patient_id', 'status'], unique=False)
        batch_op.create_index('ix_record_documents_patient_type', ['patient_id', 'type_code'], unique=False)
        batch_op.create_index('ix_record_documents_set_id', ['set_id'], unique=False)

    op.create_table('filing_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('delivery_id', sa.Integer(), nullable=False),
    sa.Column('delivery_key', sa.String(length=255), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('message_id', sa.String(length=998), nullable=True),
    sa.Column('sender', sa.String(length=320), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('result_code', sa.Integer(), nullable=True),
    sa.Column('documents_filed', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['delivery_id'], ['mail_deliveries.id'], name=op.f('fk_filing_jobs_delivery_id_mail_deliveries'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_filing_jobs_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_filing_jobs_patient_id_patients'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_filing_jobs')),
    sa.UniqueConstraint('delivery_id', name=op.f('uq_filing_jobs_delivery_id'))
    )
    with op.batch_alter_table('filing_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_filing_jobs_mailbox_id'), ['mailbox_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_filing_jobs_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index('ix_filing_jobs_state', ['state'], unique=False)

    op.create_table('filing_notices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('notice_key', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('queue_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['filing_jobs.id'], name=op.f('fk_filing_notices_job_id_filing_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_filing_notices')),
    sa.UniqueConstraint('notice_key', name=op.f('uq_filing_notices_notice_key'))
    )
    with op.batch_alter_table('filing_notices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_filing_notices_job_id'), ['job_id'], unique=False)

    op.create_table('filing_outcomes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('document_unique_id', sa.String(length=255), nullable=True),
    sa.Column('attachment', sa.String(length=512), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('code', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('record_document_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['filing_jobs.id'], name=op.f('fk_filing_outcomes_job_id_filing_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['record_document_id'], ['record_documents.id'], name=op.f('fk_filing_outcomes_record_document_id_record_documents'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_filing_outcomes'))
    )
    with op.batch_alter_table('filing_outcomes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_filing_outcomes_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('filing_outcomes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_filing_outcomes_job_id'))

    op.drop_table('filing_outcomes')
    with op.batch_alter_table('filing_notices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_filing_notices_job_id'))

    op.drop_table('filing_notices')
    with op.batch_alter_table('filing_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_filing_jobs_state')
        batch_op.drop_index(batch_op.f('ix_filing_jobs_patient_id'))
        batch_op.drop_index(batch_op.f('ix_filing_jobs_mailbox_id'))

    op.drop_table('filing_jobs')
    with op.batch_alter_table('record_documents', schema=None) as batch_op:
        batch_op.drop_index('ix_record_documents_set_id')
        batch_op.drop_index('ix_record_documents_patient_type')
        batch_op.drop_index('ix_record_documents_patient_status')
        batch_op.drop_index(batch_op.f('ix_record_documents_author_idnps'))

    op.drop_table('record_documents')
