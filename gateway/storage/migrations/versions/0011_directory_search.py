"""directory search: folded, indexed search columns on organisations, professionals and patients

Revision ID: 0011_directory_search
Revises: 0001 (a branch beside the others; Database.migrate applies every head)

``search_name`` (indexed; "C" collation on PostgreSQL so that a name prefix is an
index range) and ``search_text`` hold the names folded by
gateway.directory.search.fold (accents and case removed), the same function
that folds the query, so search behaves the same on SQLite and PostgreSQL.
Existing rows are backfilled here, in batches, with that function.
"""
from collections.abc import Callable
from typing import Any

from alembic import op
import sqlalchemy as sa

from gateway.directory.search import SEARCH_NAME_LENGTH, organisation_search, patient_search, professional_search


revision = '0011_directory_search'
down_revision = '0001'
branch_labels = None
depends_on = None

_BATCH = 5000

# table -> (columns read, function giving the search columns from them)
_TABLES: dict[str, tuple[tuple[str, ...], Callable[..., dict[str, str]]]] = {
    'organisations': (('name', 'trade_name', 'idnst'), organisation_search),
    'professionals': (('family_name', 'given_name', 'idnps', 'profession_label'), professional_search),
    'patients': (('birth_family_name', 'first_given_name', 'used_family_name', 'given_names', 'ins'), patient_search),
}


def _name_type() -> Any:
    return sa.String(length=SEARCH_NAME_LENGTH).with_variant(sa.String(length=SEARCH_NAME_LENGTH, collation='C'), 'postgresql')


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('search_name', _name_type(), server_default='', nullable=False))
            batch.add_column(sa.Column('search_text', sa.Text(), server_default='', nullable=False))
        _backfill(table)
        op.create_index(op.f(f'ix_{table}_search_name'), table, ['search_name'], unique=False)


def _backfill(table_name: str) -> None:
    columns, compute = _TABLES[table_name]
    table = sa.table(table_name, sa.column('id'), sa.column('search_name'), sa.column('search_text'),
                     *(sa.column(name) for name in columns))
    bind = op.get_bind()
    last_id = 0
    while True:
        rows = bind.execute(sa.select(table.c.id, *(table.c[name] for name in columns))
                            .where(table.c.id > last_id).order_by(table.c.id).limit(_BATCH)).all()
        if not rows:
            return
        updates = [{'b_id': row[0], **compute(*row[1:])} for row in rows]
        bind.execute(sa.update(table).where(table.c.id == sa.bindparam('b_id'))
                     .values(search_name=sa.bindparam('search_name'), search_text=sa.bindparam('search_text')), updates)
        last_id = rows[-1][0]


def downgrade() -> None:
    for table in reversed(list(_TABLES)):
        op.drop_index(op.f(f'ix_{table}_search_name'), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column('search_text')
            batch.drop_column('search_name')
