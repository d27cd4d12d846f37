"""`lorafleet tenants` and `lorafleet keys` (admin key only): manage tenants and their API keys."""

from __future__ import annotations

from typing import Any

import click

from lorafleet_gateway.cli.client import path_of
from lorafleet_gateway.cli.context import CliContext, console, emit, json_option, pass_cli, print_json, table, when


def _limits(rpm: int | None, tpm: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("rpm_limit", rpm), ("tpm_limit", tpm)) if v is not None}


def _tenant_rows(tenants: list[dict[str, Any]]) -> None:
    rows = [
        (
            t["id"],
            t["name"],
            "disabled" if t["disabled"] else "active",
            t["rpm_limit"],
            t["tpm_limit"],
            when(t["created_at"]),
        )
        for t in tenants
    ]
    table(None, ("TENANT", "NAME", "STATE", "RPM", "TPM", "CREATED"), rows)


@click.group()
def tenants() -> None:
    """(admin) Tenants: each has its own adapters, files, jobs and keys."""


@tenants.command("list")
@json_option
@pass_cli
def list_tenants(cli: CliContext) -> None:
    """List every tenant, disabled ones included."""
    page = cli.client().get("/v1/admin/tenants")
    emit(cli, page, lambda: _tenant_rows(page["data"]))


@tenants.command("create")
@click.argument("name")
@click.option("--id", "tenant_id", help="Lowercase slug (default: derived from NAME).")
@click.option("--rpm", type=click.IntRange(1), help="Requests per minute per key.")
@click.option("--tpm", type=click.IntRange(1), help="Tokens per minute per key.")
@json_option
@pass_cli
def create_tenant(cli: CliContext, name: str, tenant_id: str | None, rpm: int | None, tpm: int | None) -> None:
    """Create a tenant called NAME."""
    body = {"name": name, **_limits(rpm, tpm), **({"id": tenant_id} if tenant_id else {})}
    tenant = cli.client().post("/v1/admin/tenants", body)
    emit(cli, tenant, lambda: _tenant_rows([tenant]))


@tenants.command("disable")
@click.argument("tenant_id")
@json_option
@pass_cli
def disable_tenant(cli: CliContext, tenant_id: str) -> None:
    """Disable a tenant: its keys stop working; its data is kept."""
    tenant = cli.client().request("DELETE", path_of("/v1/admin/tenants", tenant_id))
    emit(cli, tenant, lambda: _tenant_rows([tenant]))


@tenants.command("enable")
@click.argument("tenant_id")
@json_option
@pass_cli
def enable_tenant(cli: CliContext, tenant_id: str) -> None:
    """Re-enable a disabled tenant."""
    tenant = cli.client().request("PATCH", path_of("/v1/admin/tenants", tenant_id), json={"disabled": False})
    emit(cli, tenant, lambda: _tenant_rows([tenant]))


@click.group()
def keys() -> None:
    """(admin) API keys: create (the secret is shown once), list, revoke."""


def _key_rows(items: list[dict[str, Any]]) -> None:
    rows = [
        (
            k["id"],
            k["tenant_id"],
            k["name"],
            k["prefix"] + "...",
            "revoked" if k["revoked_at"] else "active",
            k["rpm_limit"],
            k["tpm_limit"],
            when(k["created_at"]),
        )
        for k in items
    ]
    table(None, ("KEY", "TENANT", "NAME", "PREFIX", "STATE", "RPM", "TPM", "CREATED"), rows)


@keys.command("create")
@click.argument("tenant_id")
@click.option("--name", default="", help="A label to tell keys apart.")
@click.option("--rpm", type=click.IntRange(1), help="Requests per minute (default: the tenant's).")
@click.option("--tpm", type=click.IntRange(1), help="Tokens per minute (default: the tenant's).")
@json_option
@pass_cli
def create_key(cli: CliContext, tenant_id: str, name: str, rpm: int | None, tpm: int | None) -> None:
    """Create an API key for TENANT_ID. The key is printed once: store it now."""
    key = cli.client().post(path_of("/v1/admin/tenants", tenant_id, "keys"), {"name": name, **_limits(rpm, tpm)})
    if cli.json:
        print_json(key)
        return
    _key_rows([key])
    console().print(f"\nkey (shown only now): [bold]{key['key']}[/]")


@keys.command("list")
@click.argument("tenant_id")
@json_option
@pass_cli
def list_keys(cli: CliContext, tenant_id: str) -> None:
    """List TENANT_ID's keys (without secrets)."""
    page = cli.client().get(path_of("/v1/admin/tenants", tenant_id, "keys"))
    emit(cli, page, lambda: _key_rows(page["data"]))


@keys.command("revoke")
@click.argument("key_id")
@json_option
@pass_cli
def revoke_key(cli: CliContext, key_id: str) -> None:
    """Revoke a key (by its id, key_...): it stops working at once."""
    key = cli.client().request("DELETE", path_of("/v1/admin/keys", key_id))
    emit(cli, key, lambda: _key_rows([key]))
