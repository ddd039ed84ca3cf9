"""directory generation: one counter bumped by triggers on every change to the tables routes and S/MIME
policy derive from (gateway.directory.generation), so the SMTP acceptance path may cache their answers

Revision ID: 0020_smtpaccept_dirgen
Revises: 0008 (S/MIME tables, after the directory's 0001)
"""
import sqlalchemy as sa
from alembic import op

revision = '0020_smtpaccept_dirgen'
down_revision = '0008'
branch_labels = None
depends_on = None

WATCHED_TABLES = ("local_domains", "trusted_domains", "mailboxes", "patients", "delegations", "certificates",
                  "smime_policies", "smime_certificates", "smime_held_keys")
OPERATIONS = ("INSERT", "UPDATE", "DELETE")
# Updates that change nothing a route or a policy answer reads (a display name, a password, the ANS import's
# digests) leave the generation alone: only these columns count on these two tables (every column elsewhere).
UPDATED_COLUMNS = {"mailboxes": "address, state, type, patient_id, hosted", "patients": "state"}
BUMP = "UPDATE directory_generation SET value = value + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table('directory_generation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.execute("INSERT INTO directory_generation (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION bump_directory_generation() RETURNS trigger AS $$ BEGIN "
                   f"{BUMP}; RETURN NULL; END; $$ LANGUAGE plpgsql")
        for table in WATCHED_TABLES:
            op.execute(f"CREATE TRIGGER {table}_directory_generation AFTER INSERT OR {_update(table)} OR DELETE "
                       f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION bump_directory_generation()")
        return
    for table in WATCHED_TABLES:
        for operation in OPERATIONS:
            event = _update(table) if operation == "UPDATE" else operation
            op.execute(f"CREATE TRIGGER {table}_{operation.lower()}_directory_generation AFTER {event} ON {table} "
                       f"BEGIN {BUMP}; END")


def _update(table: str) -> str:
    return f"UPDATE OF {UPDATED_COLUMNS[table]}" if table in UPDATED_COLUMNS else "UPDATE"


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_directory_generation ON {table}")
        op.execute("DROP FUNCTION IF EXISTS bump_directory_generation()")
    else:
        for table in WATCHED_TABLES:
            for operation in OPERATIONS:
                op.execute(f"DROP TRIGGER IF EXISTS {table}_{operation.lower()}_directory_generation")
    op.drop_table('directory_generation')
