"""The database (SQLAlchemy, Alembic migrations) and the encrypted blob store."""
