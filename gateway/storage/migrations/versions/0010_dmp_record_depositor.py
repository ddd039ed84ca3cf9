"""dmp record depositor: who deposited each document, apart from the author it claims

Revision ID: 0010_dmp_depositor
Revises: 0009 (the record branch; Database.migrate applies every head)

``record_documents`` gains the depositor (IHE XDS distinguishes the document
source from its author): the owner of the mailbox the document came from
(IDNPS for PER/CAB, IDNST for ORG/APP), the organisations it belonged to, the
login that submitted it when a delegate sent as the owner, and the door.
Replacement and metadata updates are decided against the depositor
(gateway.dmp_bridge.depositor).

Rows filed before get their depositor from ``source_sender``, the envelope
sender the pipeline accepted (owned or delegated on submission, the peer's on
relay), when that mailbox is in the directory; otherwise it stays empty, and
an empty depositor never matches anyone: such a document can no longer be
replaced or updated by mail or through the API.
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_dmp_depositor'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('record_documents') as batch:
        batch.add_column(sa.Column('source_door', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('depositor_kind', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('depositor_id', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('depositor_organisations', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('submitted_by', sa.String(length=320), nullable=True))
        batch.create_index(batch.f('ix_record_documents_depositor_id'), ['depositor_id'], unique=False)
    _backfill()


def downgrade() -> None:
    with op.batch_alter_table('record_documents') as batch:
        batch.drop_index(batch.f('ix_record_documents_depositor_id'))
        for column in ('submitted_by', 'depositor_organisations', 'depositor_id', 'depositor_kind', 'source_door'):
            batch.drop_column(column)


def _backfill() -> None:
    bind = op.get_bind()
    record = sa.table('record_documents', sa.column('id', sa.Integer()), sa.column('source_sender', sa.String()),
                      sa.column('depositor_kind', sa.String()), sa.column('depositor_id', sa.String()),
                      sa.column('depositor_organisations', sa.JSON()))
    senders = [row[0] for row in bind.execute(sa.select(record.c.source_sender).distinct()
                                               .where(record.c.source_sender.is_not(None)))]
    for sender in senders:
        owner = _owner(bind, sender.strip().lower())
        if owner is not None:
            kind, owner_id, organisations = owner
            bind.execute(record.update().where(record.c.source_sender == sender)
                         .values(depositor_kind=kind, depositor_id=owner_id, depositor_organisations=organisations))


def _owner(bind: sa.engine.Connection, address: str) -> tuple[str, str, list[str]] | None:
    box = bind.execute(sa.text("SELECT type, professional_id, organisation_id FROM mailboxes WHERE address = :a"),
                       {"a": address}).first()
    if box is None:
        return None
    box_type, professional_id, organisation_id = box
    if box_type in ('PER', 'CAB') and professional_id is not None:
        idnps = bind.execute(sa.text("SELECT idnps FROM professionals WHERE id = :p"), {"p": professional_id}).scalar()
        organisations = [row[0] for row in bind.execute(sa.text(
            "SELECT o.idnst FROM organisations o JOIN professional_organisations po ON po.organisation_id = o.id "
            "WHERE po.professional_id = :p ORDER BY o.idnst"), {"p": professional_id})]
        return ('professional', idnps, organisations) if idnps else None
    if box_type in ('ORG', 'APP') and organisation_id is not None:
        idnst = bind.execute(sa.text("SELECT idnst FROM organisations WHERE id = :o"), {"o": organisation_id}).scalar()
        return ('organisation', idnst, [idnst]) if idnst else None
    return None
