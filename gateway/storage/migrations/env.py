"""Alembic environment: runs on the connection handed in by gateway.storage.db.

Upgrades need no models. Autogenerate compares against the metadata handed in as
``config.attributes["target_metadata"]`` (``gateway.schema.metadata``: every area's tables),
so storage imports no area.
"""

from typing import Any, Literal

from alembic import context

from gateway.storage.models import UTCDateTime


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
    target_metadata=context.config.attributes.get("target_metadata"),
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
