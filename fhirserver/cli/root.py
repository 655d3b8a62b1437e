"""The `fhirserver` command group and what every command shares: loading the settings and opening
the data directory (operator errors become one line, see startup.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.engine import Engine

from ..config import Settings, SettingsError, load_settings


def _settings(ctx: click.Context, **overrides: object) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), **overrides)
    except SettingsError as exc:
        raise click.ClickException(f"{exc}. Fix: correct the configuration (README, 'Configuration')") from None


def _services(settings: Settings):  # type: ignore[no-untyped-def]
    from ..startup import StartupError, open_services

    try:
        return open_services(settings)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None


def _database(settings: Settings) -> Engine:
    """The migrated database alone (see startup.open_database)."""
    from ..startup import StartupError, open_database

    try:
        return open_database(settings)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), envvar="FHIRSERVER_CONFIG",
              help="TOML configuration file (environment variables override it).")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """fhirserver: a FHIR R4 server with SMART auth, encryption at rest and hash-chained audit."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


def add_enable_disable(group: click.Group, argument: str, change: Callable[[Any, str, bool], str],
                       disable_help: str, enable_help: str) -> None:
    """`disable ARG` and `enable ARG` on `group`; `change(services, value, disabled)` applies it
    (raising click.ClickException when it cannot) and returns the name to print."""
    for disabled, help_text in ((True, disable_help), (False, enable_help)):
        def command(ctx: click.Context, /, disabled: bool = disabled, **kw: str) -> None:
            label = change(_services(_settings(ctx)), kw[argument], disabled)
            click.echo(f"{'disabled' if disabled else 'enabled'} {label}")

        group.command("disable" if disabled else "enable", help=help_text)(
            click.argument(argument)(click.pass_context(command)))
