"""Alembic migrations of the gateway database (run by db.database.migrate at start-up)."""
