"""TenantDirectory: tenants and API keys in the gateway database (synchronous; callers use to_thread)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from lorafleet_gateway.db.tables import api_keys, tenants
from lorafleet_gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT, display_prefix, hash_key, new_key_id, new_secret

logger = logging.getLogger(__name__)

# Sentinel for "leave this field as it is" in updates (None means "inherit the default").
UNCHANGED: Any = object()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: float
    disabled: bool
    rpm_limit: int | None
    tpm_limit: int | None


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None
    rpm_limit: int | None
    tpm_limit: int | None


@dataclass(frozen=True)
class KeyOwner:
    """A key found by its hash, with its tenant."""

    key: ApiKey
    tenant: Tenant


_KEY_COLUMNS = [c for c in api_keys.c if c.name != "key_hash"]


def _tenant(row: Any) -> Tenant:
    return Tenant(row.id, row.name, row.created_at, bool(row.disabled), row.rpm_limit, row.tpm_limit)


def _key(row: Any) -> ApiKey:
    return ApiKey(
        row.id, row.tenant_id, row.name, row.prefix, row.created_at, row.revoked_at, row.rpm_limit, row.tpm_limit
    )


def tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(f"No tenant {tenant_id!r}", param="tenant_id")


def key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key {key_id!r}", param="key_id")


class TenantDirectory:
    """CRUD over gateway_tenants and gateway_api_keys; raises the gateway's domain errors."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            logger.warning("gateway database error: %s", exc)
            raise ServiceUnavailable("the gateway database is unavailable") from exc

    def create_tenant(self, tenant_id: str, name: str, rpm_limit: int | None, tpm_limit: int | None) -> Tenant:
        tenant = Tenant(tenant_id, name, time.time(), False, rpm_limit, tpm_limit)
        try:
            with self._tx() as conn:
                conn.execute(tenants.insert().values(**tenant.__dict__))
        except IntegrityError as exc:
            raise Conflict(f"Tenant {tenant_id!r} already exists", param="id") from exc
        return tenant

    def list_tenants(self) -> list[Tenant]:
        with self._tx() as conn:
            return [_tenant(r) for r in conn.execute(tenants.select().order_by(tenants.c.created_at, tenants.c.id))]

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self._tx() as conn:
            row = conn.execute(tenants.select().where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise tenant_not_found(tenant_id)
        return _tenant(row)

    def update_tenant(
        self,
        tenant_id: str,
        *,
        name: Any = UNCHANGED,
        disabled: Any = UNCHANGED,
        rpm_limit: Any = UNCHANGED,
        tpm_limit: Any = UNCHANGED,
    ) -> Tenant:
        if tenant_id == DEFAULT_TENANT and disabled is True:
            raise InvalidRequest("The default tenant cannot be disabled: the admin key acts as it", param="tenant_id")
        changes = {
            k: v
            for k, v in {"name": name, "disabled": disabled, "rpm_limit": rpm_limit, "tpm_limit": tpm_limit}.items()
            if v is not UNCHANGED
        }
        with self._tx() as conn:
            if changes:
                conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(**changes))
            row = conn.execute(tenants.select().where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise tenant_not_found(tenant_id)
        return _tenant(row)

    def create_key(self, tenant_id: str, name: str, rpm_limit: int | None, tpm_limit: int | None) -> tuple[ApiKey, str]:
        """A new key for the tenant: the record and the secret (returned this once, never stored)."""
        secret = new_secret()
        key = ApiKey(new_key_id(), tenant_id, name, display_prefix(secret), time.time(), None, rpm_limit, tpm_limit)
        with self._tx() as conn:
            tenant = conn.execute(tenants.select().where(tenants.c.id == tenant_id)).first()
            if tenant is None:
                raise tenant_not_found(tenant_id)
            if tenant.disabled:
                raise InvalidRequest(f"Tenant {tenant_id!r} is disabled", param="tenant_id")
            conn.execute(api_keys.insert().values(**key.__dict__, key_hash=hash_key(secret)))
        return key, secret

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        self.get_tenant(tenant_id)
        query = sa.select(*_KEY_COLUMNS).where(api_keys.c.tenant_id == tenant_id).order_by(api_keys.c.created_at)
        with self._tx() as conn:
            return [_key(r) for r in conn.execute(query)]

    def get_key(self, key_id: str) -> ApiKey:
        with self._tx() as conn:
            row = conn.execute(sa.select(*_KEY_COLUMNS).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise key_not_found(key_id)
        return _key(row)

    def update_key(self, key_id: str, *, rpm_limit: Any = UNCHANGED, tpm_limit: Any = UNCHANGED) -> ApiKey:
        changes = {k: v for k, v in {"rpm_limit": rpm_limit, "tpm_limit": tpm_limit}.items() if v is not UNCHANGED}
        if changes:
            with self._tx() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**changes))
        return self.get_key(key_id)

    def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent: revoking twice keeps the first time)."""
        with self._tx() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return self.get_key(key_id)

    def find_key(self, secret: str) -> KeyOwner | None:
        """The key whose hash matches ``secret``, with its tenant; None if there is none."""
        query = (
            sa.select(*_KEY_COLUMNS, *[c.label(f"t_{c.name}") for c in tenants.c])
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.key_hash == hash_key(secret))
        )
        with self._tx() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        m = row._mapping
        tenant = Tenant(
            m["t_id"], m["t_name"], m["t_created_at"], bool(m["t_disabled"]), m["t_rpm_limit"], m["t_tpm_limit"]
        )
        return KeyOwner(_key(row), tenant)
