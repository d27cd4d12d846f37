"""The `lorafleet` command: global options, the command tree, and one place that turns errors into one line
on stderr and an exit code (never a traceback, unless --debug)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lorafleet_gateway.cli.adapters import adapters
from lorafleet_gateway.cli.admin import keys, tenants
from lorafleet_gateway.cli.chat import chat
from lorafleet_gateway.cli.client import CliError
from lorafleet_gateway.cli.context import DEFAULT_URL, CliContext, json_option
from lorafleet_gateway.cli.jobs import jobs
from lorafleet_gateway.cli.train import train

DEBUG_META = "lorafleet.debug"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--url", envvar="LORAFLEET_URL", default=DEFAULT_URL, show_default=True, help="The gateway [env LORAFLEET_URL]."
)
@click.option(
    "--api-key",
    envvar="LORAFLEET_API_KEY",
    help="API key [env LORAFLEET_API_KEY; default: the admin_key file `make up` writes in $LORAFLEET_HOME].",
)
@click.option(
    "--home",
    envvar="LORAFLEET_HOME",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to look for admin_key [env LORAFLEET_HOME; default ./.lorafleet, then ~/.lorafleet].",
)
@click.option(
    "--timeout",
    envvar="LORAFLEET_TIMEOUT",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the gateway.",
)
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
@json_option
@click.version_option(package_name="lorafleet-gateway", prog_name="lorafleet")
@click.pass_context
def cli(ctx: click.Context, url: str, api_key: str | None, home: Path | None, timeout: float, debug: bool) -> None:
    """LoRA Fleet from the command line: train adapters, follow jobs, manage adapters, chat, manage keys.

    Talks to a gateway's HTTP API with an API key. Exit codes: 0 ok, 1 refused or failed, 2 bad usage,
    3 missing or rejected key, 4 not found, 5 gateway unreachable, overloaded or failing (try again).
    """
    ctx.meta[DEBUG_META] = debug
    obj = CliContext(url=url, api_key=api_key, home=home, timeout_s=timeout)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


for command in (train, jobs, adapters, chat, keys, tenants):
    cli.add_command(command)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(prog_name="lorafleet", standalone_mode=False)
    except CliError as exc:
        click.echo(f"lorafleet: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("lorafleet: aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("\nlorafleet: interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:  # `lorafleet jobs list | head`
        sys.exit(0)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"lorafleet: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        sys.exit(1)
