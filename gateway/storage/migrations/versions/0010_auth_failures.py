"""auth failures: the authentication limiter's remembered failures, per (login, source) and per source

Revision ID: 0010_auth
Revises: 0001 (a branch of its own; Database.migrate applies every head)

gateway.security.auth_limiter writes a row on every failed sign-in (SMTP,
IMAP, FHIR, webmail) and reads them back at start, so growing delays survive
a restart. ``login`` is empty for a source address's budget across logins.
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_auth'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('auth_failures',
    sa.Column('login', sa.String(length=320), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failure_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('login', 'source')
    )


def downgrade() -> None:
    op.drop_table('auth_failures')
