"""What every command shares: where the gateway is, the key, and how to print (tables for people, JSON for scripts)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorafleet_gateway.cli.client import EXIT_AUTH, CliError, FleetClient

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_KEY_FILE = "admin_key"
JSON_META = "lorafleet.json"
SPARKS = "▁▂▃▄▅▆▇█"


def key_file_candidates(home: Path | None) -> list[Path]:
    """Where `make up` leaves the admin key: $LORAFLEET_HOME, else ./.lorafleet (make's home), else ~/.lorafleet."""
    if home is not None:
        return [home / ADMIN_KEY_FILE]
    return [Path.cwd() / ".lorafleet" / ADMIN_KEY_FILE, Path.home() / ".lorafleet" / ADMIN_KEY_FILE]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[JSON_META] = True


def json_option(command: F) -> F:
    """`--json` on the root and on every command (so both `lorafleet --json jobs list` and `... list --json` work)."""
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_json,
        help="Print the API's JSON instead of tables (for scripts).",
    )(command)


@dataclass
class CliContext:
    url: str
    api_key: str | None
    home: Path | None
    timeout_s: float
    _client: FleetClient | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return bool(click.get_current_context().meta.get(JSON_META))

    def client(self) -> FleetClient:
        if self._client is None:
            self._client = FleetClient(self.url, self._key(), timeout_s=self.timeout_s)
        return self._client

    def _key(self) -> str:
        if self.api_key:
            return self.api_key.strip()
        for path in key_file_candidates(self.home):
            if path.is_file() and (key := path.read_text().strip()):
                return key
        tried = ", ".join(str(p) for p in key_file_candidates(self.home))
        raise CliError(
            f"no API key: pass --api-key, set LORAFLEET_API_KEY, or start the stack (tried {tried}).", EXIT_AUTH
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_cli = click.make_pass_decorator(CliContext)


def console(stderr: bool = False) -> Console:
    # Not a terminal (a pipe, a file): wide enough that ids are never cut.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200, highlight=False)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def emit(cli: CliContext, data: Any, human: Callable[[], None]) -> None:
    """The API's JSON with --json, else the human rendering."""
    if cli.json:
        print_json(data)
    else:
        human()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        right = name.endswith(("LOSS", "REQUESTS", "TOKENS", "STEPS"))
        grid.add_column(name, justify="right" if right else "left", overflow="fold")
    for row in rows:
        grid.add_row(*(Text("-" if cell is None or cell == "" else str(cell)) for cell in row))
    console().print(grid)


def fields(pairs: Iterable[tuple[str, Any]]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in pairs:
        grid.add_row(name, Text("-" if value is None or value == "" else str(value)))
    console().print(grid)


def when(seconds: float | int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """The last ``width`` values as block characters (lowest ▁ to highest █)."""
    values = list(values)[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1) + 0.5))] for v in values)
