"""The Alembic migrations and the models describe the same schema, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.storage.db import Database, head_revision
from gateway.schema import metadata


async def test_migrated_schema_matches_models(database: Database) -> None:
    async with database.engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), metadata))
    assert diff == [], f"models and migrations differ: write a migration for {diff}"


async def test_database_is_at_head(database: Database) -> None:
    assert await database.current_revision() == head_revision()


async def test_migrate_twice_is_harmless(database: Database) -> None:
    await database.migrate()
    assert await database.current_revision() == head_revision()
