"""The admin API: tenants and their API keys. Only the admin key may call it (see auth.require_admin).

POST   /v1/admin/tenants                 create a tenant
GET    /v1/admin/tenants                 list tenants
GET    /v1/admin/tenants/{id}            one tenant
PATCH  /v1/admin/tenants/{id}            rename, change limits, disable / re-enable
DELETE /v1/admin/tenants/{id}            disable (its keys stop working; its data stays)
POST   /v1/admin/tenants/{id}/keys       create a key: the secret is in this response only
GET    /v1/admin/tenants/{id}/keys       list keys, without secrets
PATCH  /v1/admin/keys/{key_id}           change a key's limits
DELETE /v1/admin/keys/{key_id}           revoke a key
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from lorafleet_gateway.auth import Authenticator, require_admin
from lorafleet_gateway.errors import InvalidRequest
from lorafleet_gateway.tenancy.directory import UNCHANGED, TenantDirectory
from lorafleet_gateway.tenancy.keys import slugify
from lorafleet_gateway.tenancy.schemas import (
    KeyCreate,
    KeyList,
    KeyObject,
    KeyUpdate,
    TenantCreate,
    TenantList,
    TenantObject,
    TenantUpdate,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


async def _directory(request: Request) -> TenantDirectory:
    directory: TenantDirectory = request.app.state.services.directory
    return directory


async def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


DirectoryDep = Annotated[TenantDirectory, Depends(_directory)]
AuthenticatorDep = Annotated[Authenticator, Depends(_authenticator)]


def _given(body: TenantUpdate | KeyUpdate, field: str) -> object:
    return getattr(body, field) if field in body.model_fields_set else UNCHANGED


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, directory: DirectoryDep) -> TenantObject:
    """Create a tenant. Its id names its namespace in object storage and appears in its fine-tuned model ids."""
    tenant_id = body.id or slugify(body.name)
    if not tenant_id:
        raise InvalidRequest("Give the tenant an id: its name has no letters or digits to derive one", param="id")
    tenant = await asyncio.to_thread(directory.create_tenant, tenant_id, body.name, body.rpm_limit, body.tpm_limit)
    logger.info("tenant %s created", tenant.id)
    return TenantObject.of(tenant)


@router.get("/tenants")
async def list_tenants(directory: DirectoryDep) -> TenantList:
    """Every tenant, oldest first, disabled ones included."""
    return TenantList(data=[TenantObject.of(t) for t in await asyncio.to_thread(directory.list_tenants)])


@router.get("/tenants/{tenant_id}")
async def retrieve_tenant(tenant_id: str, directory: DirectoryDep) -> TenantObject:
    return TenantObject.of(await asyncio.to_thread(directory.get_tenant, tenant_id))


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: str, body: TenantUpdate, directory: DirectoryDep, authenticator: AuthenticatorDep
) -> TenantObject:
    """Change a tenant's name, limits or disabled flag; only the fields sent change."""
    if "name" in body.model_fields_set and body.name is None:
        raise InvalidRequest("name cannot be null", param="name")
    if "disabled" in body.model_fields_set and body.disabled is None:
        raise InvalidRequest("disabled cannot be null", param="disabled")
    tenant = await asyncio.to_thread(
        lambda: directory.update_tenant(
            tenant_id,
            name=_given(body, "name"),
            disabled=_given(body, "disabled"),
            rpm_limit=_given(body, "rpm_limit"),
            tpm_limit=_given(body, "tpm_limit"),
        )
    )
    authenticator.forget(tenant=tenant_id)
    return TenantObject.of(tenant)


@router.delete("/tenants/{tenant_id}")
async def disable_tenant(tenant_id: str, directory: DirectoryDep, authenticator: AuthenticatorDep) -> TenantObject:
    """Disable a tenant: its keys stop working at once; its adapters, files and jobs are kept."""
    tenant = await asyncio.to_thread(lambda: directory.update_tenant(tenant_id, disabled=True))
    authenticator.forget(tenant=tenant_id)
    logger.info("tenant %s disabled", tenant_id)
    return TenantObject.of(tenant)


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, body: KeyCreate, directory: DirectoryDep) -> KeyObject:
    """Create an API key for the tenant. The response holds the key; it cannot be shown again."""
    key, secret = await asyncio.to_thread(directory.create_key, tenant_id, body.name, body.rpm_limit, body.tpm_limit)
    logger.info("API key %s (%s...) created for tenant %s", key.id, key.prefix, tenant_id)
    return KeyObject.of(key, secret)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, directory: DirectoryDep) -> KeyList:
    """The tenant's keys (revoked ones included), without secrets."""
    return KeyList(data=[KeyObject.of(k) for k in await asyncio.to_thread(directory.list_keys, tenant_id)])


@router.patch("/keys/{key_id}")
async def update_key(
    key_id: str, body: KeyUpdate, directory: DirectoryDep, authenticator: AuthenticatorDep
) -> KeyObject:
    """Change a key's limits; only the fields sent change."""
    await asyncio.to_thread(directory.get_key, key_id)
    key = await asyncio.to_thread(
        lambda: directory.update_key(key_id, rpm_limit=_given(body, "rpm_limit"), tpm_limit=_given(body, "tpm_limit"))
    )
    authenticator.forget(key_id=key_id)
    return KeyObject.of(key)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, directory: DirectoryDep, authenticator: AuthenticatorDep) -> KeyObject:
    """Revoke a key: it stops working at once on this gateway (within auth_cache_s on others)."""
    key = await asyncio.to_thread(directory.revoke_key, key_id)
    authenticator.forget(key_id=key_id)
    logger.info("API key %s revoked", key_id)
    return KeyObject.of(key)
