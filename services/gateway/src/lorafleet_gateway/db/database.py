"""Opening the database and bringing its schema to the newest migration."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine, make_url

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# Our own version table, so the gateway can share a database with other Alembic users.
VERSION_TABLE = "gateway_alembic_version"
# Any fixed number: gateway replicas starting together on one PostgreSQL migrate one at a time.
_PG_MIGRATION_LOCK = 0x6C66_6777  # "lfgw"


def open_engine(url: str, *, timeout_s: float = 10.0) -> Engine:
    """An Engine for ``url``; SQLite gets its folder created, foreign keys on and a busy timeout."""
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": timeout_s}
    elif parsed.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": max(1, int(timeout_s))}
    # hide_parameters: SQLAlchemy's errors and statement logs would otherwise carry bound values, and the
    # key lookup binds a key's sha256 (a leaked log then lists the hashes the database authenticates by).
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, hide_parameters=True)
    if parsed.get_backend_name() == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` in one transaction (a no-op when it is already there)."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    logger.info("gateway database at migration %s", current_revision(engine))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table(VERSION_TABLE):
            return None
        return connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
