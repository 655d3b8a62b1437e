"""The `fhirserver` command group and what every command shares: loading the settings and opening
the data directory (operator errors become one line, see startup.py)."""

from __future__ import annotations

from typing import Any

import click

from ..config import Settings, SettingsError, load_settings


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
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


@click.group()
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), envvar="FHIRSERVER_CONFIG",
              help="TOML configuration file (environment variables override it).")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """fhirserver: a FHIR R4 server with SMART auth, encryption at rest and hash-chained audit."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
