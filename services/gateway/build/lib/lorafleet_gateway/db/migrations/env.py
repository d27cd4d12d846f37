"""Alembic environment: migrate the connection db.database.migrate hands in (or the configured URL)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from lorafleet_gateway.db.database import VERSION_TABLE
from lorafleet_gateway.db.tables import metadata

config = context.config


def run() -> None:
    if context.is_offline_mode():  # `alembic upgrade --sql`: print the DDL for a DBA
        context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is None:
        engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as owned:
            _migrate(owned)
        return
    _migrate(connection)


def _migrate(connection: sa.Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
    context.configure(
        connection=connection, target_metadata=metadata, version_table=VERSION_TABLE, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


run()
