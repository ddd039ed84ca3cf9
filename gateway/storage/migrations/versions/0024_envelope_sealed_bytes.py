"""mailstore: the sealed ENVELOPE rendering as raw octets (a binary column), not a base64 token in JSON

Revision ID: 0024_envelope_sealed_bytes
Revises: 0022_blindindex_postings

A FETCH of 1,000 ENVELOPEs spent more time taking ``{"imap1": "gw1:<base64url>"}`` apart (JSON form,
base64) than decrypting it. ``envelope_sealed`` holds ``version | key id | nonce | ciphertext || tag``
(``gateway/mailstore/envelopes.py``); ``envelope`` is then ``{}``. Rows stored before keep their JSON form
(still read) until ``gateway mailbox reindex`` moves them, resumably (no decryption: the same sealed octets).
A downgrade drops the column: the ENVELOPEs stored there are then parsed from the messages' headers per FETCH
(the code before reads `{}` so), until a reindex by that code.
"""
from alembic import op
import sqlalchemy as sa


revision = '0024_envelope_sealed_bytes'
down_revision = '0022_blindindex_postings'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('mail_messages', sa.Column('envelope_sealed', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # Not a batch copy on SQLite: dropping the old table would cascade to the messages' blind index rows.
    op.drop_column('mail_messages', 'envelope_sealed')
