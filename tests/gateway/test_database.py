"""The gateway database: migrations on a fresh and on an existing database, the schema they build matches
the code's tables, and the tenant directory on a real PostgreSQL when its server binaries are installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from lorafleet_gateway.db.database import VERSION_TABLE, current_revision, migrate, open_engine
from lorafleet_gateway.db.tables import metadata
from lorafleet_gateway.errors import Conflict, NotFound
from lorafleet_gateway.tenancy.directory import TenantDirectory
from lorafleet_gateway.tenancy.keys import hash_key
from tests.gateway.gateway_harness import Stack, gateway_settings, start_gateway, stop_gateway
from tests.postgres import PostgresServer

HEAD = "0002"


def sqlite_engine(tmp_path: Path) -> Engine:
    return open_engine(f"sqlite:///{tmp_path / 'sub' / 'gateway.db'}")


def test_fresh_database_upgrades_to_head(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path)  # the folder does not exist yet either
    assert current_revision(engine) is None
    migrate(engine)
    assert current_revision(engine) == HEAD
    migrate(engine)  # idempotent
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"gateway_tenants", "gateway_api_keys", VERSION_TABLE}
        default = conn.execute(sa.text("SELECT id, disabled, rpm_limit FROM gateway_tenants")).one()
    assert tuple(default) == ("default", False, None)


def test_existing_database_upgrades_and_keeps_its_data(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path)
    migrate(engine, "0001")  # a database left by the first release
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO gateway_tenants VALUES ('acme', 'Acme', 1.0, 0)"))
        conn.execute(
            sa.text(
                "INSERT INTO gateway_api_keys (id, tenant_id, prefix, key_hash, created_at, rpm_limit) "
                "VALUES ('key_1', 'acme', 'lf-abcdefgh', :hash, 2.0, 7)"
            ),
            {"hash": hash_key("lf-old-key")},
        )
    migrate(engine)
    assert current_revision(engine) == HEAD
    directory = TenantDirectory(engine)
    owner = directory.find_key("lf-old-key")
    assert owner is not None
    assert (owner.tenant.id, owner.tenant.rpm_limit, owner.key.name, owner.key.rpm_limit) == ("acme", None, "", 7)


def test_migrations_build_exactly_the_tables_the_code_uses(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path)
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), metadata)
    assert diff == []


def exercise_directory(engine: Engine) -> None:
    """The directory's whole surface, on whichever database ``engine`` names."""
    migrate(engine)
    directory = TenantDirectory(engine)
    tenant = directory.create_tenant("acme", "Acme", 10, None)
    with pytest.raises(Conflict):
        directory.create_tenant("acme", "Again", None, None)
    key, secret = directory.create_key("acme", "ci", None, 100)
    owner = directory.find_key(secret)
    assert owner is not None and owner.key == key and owner.tenant == tenant
    assert directory.find_key(secret + "x") is None
    assert [k.id for k in directory.list_keys("acme")] == [key.id]
    assert directory.update_key(key.id, rpm_limit=5).rpm_limit == 5
    assert directory.revoke_key(key.id).revoked_at is not None
    assert directory.update_tenant("acme", disabled=True).disabled is True
    assert [t.id for t in directory.list_tenants()] == ["default", "acme"]
    with pytest.raises(NotFound):
        directory.get_tenant("nope")
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash FROM gateway_api_keys")).scalar_one()
    assert stored == hash_key(secret) and secret not in stored


def test_directory_on_sqlite(tmp_path: Path) -> None:
    exercise_directory(sqlite_engine(tmp_path))


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.database("gateway")


def test_directory_on_postgresql(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    try:
        assert current_revision(engine) is None
        exercise_directory(engine)
        assert current_revision(engine) == HEAD
        migrate(engine)  # idempotent, under the advisory lock
    finally:
        engine.dispose()


def test_gateway_on_postgresql(postgres_url: str, gw: Stack) -> None:
    """The gateway itself on PostgreSQL: a tenant key created through the admin API works."""
    settings = gateway_settings(gw.store.root, gw.targets, gw.trainer_target, database_url=postgres_url)
    gateway = gw.loop.run(start_gateway(settings, gw.store))
    try:
        tenant = gateway.new_tenant()
        key = gateway.new_key(tenant)
        with gateway.http(api_key=key["key"]) as http:
            assert http.get("/v1/models").status_code == 200
        with gateway.http() as admin:
            assert tenant in [t["id"] for t in admin.get("/v1/admin/tenants").json()["data"]]
            assert admin.delete(f"/v1/admin/keys/{key['id']}").status_code == 200
        with gateway.http(api_key=key["key"]) as http:
            assert http.get("/v1/models").status_code == 401
    finally:
        gw.loop.run(stop_gateway(gateway))
