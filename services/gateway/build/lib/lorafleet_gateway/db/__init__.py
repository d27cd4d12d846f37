"""The gateway's own database: tenants and API keys (SQLAlchemy Core, migrated with Alembic)."""
