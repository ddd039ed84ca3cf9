"""auth failures shared by every node: the last success, the audited waiting period, an index for the purge

Revision ID: 0022_limiter_shared_counts
Revises: 0010_auth (the security area's branch; Database.migrate applies every head)

gateway.security.auth_limiter now reads ``auth_failures`` on every attempt and increments it in the database
on every failure (gateway/security/failure_counts.py), so several nodes and a restarted one see the same
counts. ``last_success_at`` lets a success on one node exempt the login from its source's budget on the
others; ``throttle_reported_for`` names the waiting period already audited, so it is audited once whichever
node refuses; the index on ``last_failure_at`` serves the periodic purge of expired windows.
"""
from alembic import op
import sqlalchemy as sa


revision = '0022_limiter_shared_counts'
down_revision = '0010_auth'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('auth_failures') as batch:
        batch.add_column(sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('throttle_reported_for', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_auth_failures_last_failure_at', 'auth_failures', ['last_failure_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_auth_failures_last_failure_at', table_name='auth_failures')
    with op.batch_alter_table('auth_failures') as batch:
        batch.drop_column('throttle_reported_for')
        batch.drop_column('last_success_at')
