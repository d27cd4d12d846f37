"""`lorafleet adapters`: list, show, delete, and (admin) load/unload on the inference replicas."""

from __future__ import annotations

import sys
from typing import Any

import click

from lorafleet_gateway.cli.client import CliError, path_of
from lorafleet_gateway.cli.context import CliContext, fields, json_option, loss, pass_cli, print_json, table, when

ADAPTERS = "/v1/lorafleet/adapters"


def placement(adapter: dict[str, Any]) -> str:
    places = adapter.get("loaded_on") or []
    return ", ".join(_place(p) for p in places) or "not loaded"


def _place(place: dict[str, Any]) -> str:
    merged = f"; merged {place['merged_version']}" if place.get("merged_version") else ""
    return f"{place['replica']} ({','.join(place['versions'])}{merged})"


def tokens(traffic: dict[str, Any]) -> str:
    return f"{traffic.get('prompt_tokens', 0)}/{traffic.get('completion_tokens', 0)}"


@click.group()
def adapters() -> None:
    """Adapters: versions, metadata, where they are loaded, their traffic; delete; load/unload (admin)."""


@adapters.command("list")
@json_option
@pass_cli
def list_adapters(cli: CliContext) -> None:
    """List your adapters with their latest version, where they are loaded and their traffic on this gateway."""
    page = cli.client().get(ADAPTERS)
    if cli.json:
        print_json(page)
        return
    rows = [
        (
            a["id"],
            a["latest_version"],
            len(a["versions"]),
            f"r={a['rank']} a={a['alpha']:g}",
            loss(a.get("final_loss")),
            placement(a),
            a["traffic"]["requests"],
            tokens(a["traffic"]),
            when(a.get("created_at")),
        )
        for a in page["data"]
    ]
    columns = ("MODEL", "LATEST", "VERSIONS", "LORA", "FINAL LOSS", "LOADED ON", "REQUESTS", "TOKENS", "CREATED")
    table(None, columns, rows)


@adapters.command("show")
@click.argument("model")
@json_option
@pass_cli
def show(cli: CliContext, model: str) -> None:
    """Show one adapter: metadata, versions, placement on the replicas and traffic."""
    a = cli.client().get(path_of(ADAPTERS, model))
    if cli.json:
        print_json(a)
        return
    t = a["traffic"]
    fields(
        [
            ("id", a["id"]),
            ("base model", a["base_model"]),
            ("latest version", a["latest_version"]),
            ("created", when(a.get("created_at"))),
            ("lora", f"rank {a['rank']}, alpha {a['alpha']:g}, modules {','.join(a['target_modules'])}"),
            ("system prompt", a.get("system_prompt")),
            ("final loss", loss(a.get("final_loss"))),
            ("trained by job", a.get("job_id")),
            ("hyperparameters", ", ".join(f"{k}={v}" for k, v in (a.get("hyperparameters") or {}).items())),
            ("sha256", a.get("sha256")),
            ("loaded on", placement(a)),
            ("traffic", f"{t['requests']} requests ({t['errors']} failed), tokens in/out {tokens(t)}"),
        ]
    )
    rows = [
        (
            v["version"] + (" (latest)" if v.get("latest") else ""),
            when(v.get("created_at")),
            v.get("job_id"),
            loss(v.get("final_loss")),
        )
        for v in a["versions"]
    ]
    table("versions", ("VERSION", "CREATED", "JOB", "FINAL LOSS"), rows)


@adapters.command("delete")
@click.argument("model")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli
def delete(cli: CliContext, model: str, yes: bool) -> None:
    """Delete an adapter (every version) and unload it from the replicas."""
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"not deleting {model} without confirmation: pass --yes")
        click.confirm(f"Delete {model} and every version of it?", abort=True)
    result = cli.client().request("DELETE", path_of("/v1/models", model))
    if cli.json:
        print_json(result)
    else:
        click.echo(f"deleted {result['id']}")


def _placement_report(cli: CliContext, result: dict[str, Any]) -> None:
    if cli.json:
        print_json(result)
        return
    rows = [(r["replica"], "ok" if r["ok"] else "failed", r.get("version"), r.get("error")) for r in result["replicas"]]
    table(f"{result['action']} {result['adapter']}", ("REPLICA", "RESULT", "VERSION", "ERROR"), rows)


@adapters.command("load")
@click.argument("model")
@click.option("--tenant", default="default", show_default=True, help="Whose model id it is.")
@click.option("--pin", is_flag=True, help="Keep it loaded regardless of eviction pressure.")
@json_option
@pass_cli
def load(cli: CliContext, model: str, tenant: str, pin: bool) -> None:
    """(admin) Load an adapter on every inference replica now, rather than on its first request."""
    result = cli.client().post(path_of("/v1/admin/adapters", model, "load"), {"tenant": tenant, "pin": pin})
    _placement_report(cli, result)


@adapters.command("unload")
@click.argument("model")
@click.option("--tenant", default="default", show_default=True, help="Whose model id it is.")
@json_option
@pass_cli
def unload(cli: CliContext, model: str, tenant: str) -> None:
    """(admin) Unload an adapter from every inference replica (MODEL@VERSION: only that version)."""
    result = cli.client().post(path_of("/v1/admin/adapters", model, "unload"), {"tenant": tenant})
    _placement_report(cli, result)
