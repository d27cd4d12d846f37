"""Admin API bodies and objects (a LoRA Fleet extension: strict, so typos are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lorafleet_gateway.schemas import InternalModel
from lorafleet_gateway.tenancy.directory import ApiKey, Tenant

Limit = Field(default=None, ge=1, le=10**9)


class TenantCreate(InternalModel):
    id: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$",
        description="Lowercase slug (letters, digits, '-'); derived from name when omitted.",
    )
    name: str = Field(min_length=1, max_length=200)
    rpm_limit: int | None = Limit
    tpm_limit: int | None = Limit


class TenantUpdate(InternalModel):
    """Fields left out stay as they are; an explicit null limit means "the gateway's default"."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    disabled: bool | None = None
    rpm_limit: int | None = Limit
    tpm_limit: int | None = Limit


class KeyCreate(InternalModel):
    name: str = Field(default="", max_length=200)
    rpm_limit: int | None = Limit
    tpm_limit: int | None = Limit


class KeyUpdate(InternalModel):
    """Fields left out stay as they are; an explicit null limit means "the tenant's limit"."""

    rpm_limit: int | None = Limit
    tpm_limit: int | None = Limit


class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int
    disabled: bool
    rpm_limit: int | None
    tpm_limit: int | None

    @classmethod
    def of(cls, tenant: Tenant) -> TenantObject:
        return cls(
            id=tenant.id,
            name=tenant.name,
            created_at=int(tenant.created_at),
            disabled=tenant.disabled,
            rpm_limit=tenant.rpm_limit,
            tpm_limit=tenant.tpm_limit,
        )


class KeyObject(BaseModel):
    """An API key without its secret; ``key`` is set only in the response that created it."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None
    rpm_limit: int | None
    tpm_limit: int | None
    key: str | None = None

    @classmethod
    def of(cls, key: ApiKey, secret: str | None = None) -> KeyObject:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            created_at=int(key.created_at),
            revoked_at=int(key.revoked_at) if key.revoked_at is not None else None,
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            key=secret,
        )


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantObject]


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyObject]
