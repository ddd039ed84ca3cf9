"""patient access notices (grouped, durable) and notification preferences

Revision ID: 0019
Revises: 0007 (the patient choices branch; Database.migrate applies every head)
"""
from alembic import op
import sqlalchemy as sa


revision = '0019'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('patient_notice_state',
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('pending_reads', sa.Integer(), nullable=False),
    sa.Column('pending_emergencies', sa.Integer(), nullable=False),
    sa.Column('pending_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('patient_id')
    )
    op.create_table('patient_notification_preferences',
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=True),
    sa.Column('frequency', sa.String(length=16), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('patient_id')
    )


def downgrade() -> None:
    op.drop_table('patient_notification_preferences')
    op.drop_table('patient_notice_state')
