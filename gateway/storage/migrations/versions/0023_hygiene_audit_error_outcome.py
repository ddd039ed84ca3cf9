"""audit log: an ``error`` outcome beside ``success`` and ``refused``

Revision ID: 0023_hygiene_audit_error_outcome
Revises: 0005 (the audit area's branch; Database.migrate applies every head)

A request that failed inside the server (a FHIR 500, an IMAP SERVERBUG, an SMTP local error, a webmail
500) was recorded as ``refused``; it is now ``error``, so an auditor tells the server's faults from its
decisions. Only the CHECK constraint on ``audit_entries.outcome`` changes: no row is touched. PostgreSQL
swaps the constraint in place. SQLite cannot alter a constraint, so the table is copied into one with the
new constraint (rows, byte for byte, in ``seq`` order) and its indexes and append-only triggers re-created.
"""
from alembic import op


revision = '0023_hygiene_audit_error_outcome'
down_revision = '0005'
branch_labels = None
depends_on = None

CONSTRAINT = 'ck_audit_entries_outcome_known'
WITH_ERROR = "outcome IN ('success', 'refused', 'error')"
WITHOUT_ERROR = "outcome IN ('success', 'refused')"
REFUSAL = "audit_entries is append-only"
COLUMNS = ("seq, occurred_at, event, actor_kind, actor_id, actor_name, actor_role, patient_ins, subject_kind, "
           "subject_id, outcome, reason, door, source_ip, details, prev_hash, entry_hash, seal")


def upgrade() -> None:
    _set_outcomes(WITH_ERROR)


def downgrade() -> None:
    """Refused by either database while an ``error`` entry exists (the log is append-only: none is rewritten)."""
    _set_outcomes(WITHOUT_ERROR)


def _set_outcomes(check: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE audit_entries DROP CONSTRAINT {CONSTRAINT}")
        op.execute(f"ALTER TABLE audit_entries ADD CONSTRAINT {CONSTRAINT} CHECK ({check})")
        return
    _copy_sqlite_table(check)


def _copy_sqlite_table(check: str) -> None:
    """The same table under a new CHECK (the column types of 0005_audit), filled from the old one."""
    op.execute("CREATE TABLE audit_entries_new ("
               "seq BIGINT NOT NULL, occurred_at DATETIME NOT NULL, event INTEGER NOT NULL, "
               "actor_kind VARCHAR(16) NOT NULL, actor_id VARCHAR(128) NOT NULL, actor_name VARCHAR(256) NOT NULL, "
               "actor_role VARCHAR(64), patient_ins VARCHAR(15), subject_kind VARCHAR(32), subject_id VARCHAR(512), "
               "outcome VARCHAR(8) NOT NULL, reason TEXT, door VARCHAR(16) NOT NULL, source_ip VARCHAR(45), "
               "details TEXT NOT NULL, prev_hash VARCHAR(64) NOT NULL, entry_hash VARCHAR(64) NOT NULL, "
               "seal VARCHAR(64), "
               f"CONSTRAINT {CONSTRAINT} CHECK ({check}), "
               "CONSTRAINT pk_audit_entries PRIMARY KEY (seq), "
               "CONSTRAINT uq_audit_entries_entry_hash UNIQUE (entry_hash))")
    op.execute(f"INSERT INTO audit_entries_new ({COLUMNS}) SELECT {COLUMNS} FROM audit_entries ORDER BY seq")
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS audit_entries_no_{action}")
    op.execute("DROP TABLE audit_entries")
    op.execute("ALTER TABLE audit_entries_new RENAME TO audit_entries")
    op.create_index('ix_audit_entries_event_seq', 'audit_entries', ['event', 'seq'], unique=False)
    op.create_index('ix_audit_entries_occurred_at', 'audit_entries', ['occurred_at'], unique=False)
    op.create_index('ix_audit_entries_patient_seq', 'audit_entries', ['patient_ins', 'seq'], unique=False)
    for action in ("UPDATE", "DELETE"):
        op.execute(f"CREATE TRIGGER audit_entries_no_{action.lower()} BEFORE {action} ON audit_entries "
                   f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END")
