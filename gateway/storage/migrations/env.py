"""Alembic environment: runs on the connection handed in by gateway.storage.db.

The target metadata is ``Base.metadata``, storage's own: its naming convention names
the constraints that migrations leave unnamed, as the models name them. Each area's
tables extend it when their module is imported; ``gateway.schema`` imports them all
(import it before autogenerating), so storage imports no area.
"""

from typing import Any, Literal

from alembic import context

from gateway.storage.models import Base, UTCDateTime


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Migrations are frozen: render our custom types as plain SQLAlchemy types."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `gateway db upgrade` (gateway.storage.db.Database.migrate)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
