"""`fhirserver ig install|list|remove`: implementation guide packages (docs/profiles.md).

Installing reads the package (an NPM-layout `.tgz`), loads its profiles beside the shipped ones
(a profile the checker cannot apply stops the install, naming it), validates the package's own
examples against the profiles they claim as a self-test, and keeps the file in the database.
Servers load installed packages when they start: restart them after an install."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from .root import _database, _settings, main


@main.group()
def ig() -> None:
    """Implementation guide packages: profiles, value sets and code systems."""


@ig.command("install")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def ig_install(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Install (or replace) the IG package at PATH."""
    from ..fhir.errors import FhirError
    from ..fhir.packages import PackageError, read_package
    from ..fhir.profile_model import ProfileError
    from ..fhir.validation import Validator
    from ..storage import ig_packages

    settings = _settings(ctx)
    data = path.read_bytes()
    try:
        package = read_package(data)
    except PackageError as exc:
        raise click.ClickException(f"{path.name}: {exc}") from None
    engine = _database(settings)  # not the services: their configuration may need this very package
    others = [p for p in ig_packages.installed(engine) if p.name != package.name]
    try:
        validator = Validator(settings.profiles_dir, settings.max_json_depth, "", [*others, package])
    except ProfileError as exc:
        raise click.ClickException(f"{path.name}: {exc}; nothing was installed") from None
    failed: list[dict[str, str]] = []
    checked = 0
    for name, doc in package.examples:
        resources = _resources(doc)
        for i, resource in enumerate(resources):
            checked += 1
            try:
                validator.validate(resource)
            except FhirError as exc:
                first = next((x for x in exc.issues if x.severity in ("error", "fatal")), None)
                failed.append({"example": name if len(resources) == 1 else f"{name} entry {i}",
                               "status": str(exc.status), "issue": first.diagnostics if first else str(exc),
                               "expression": ", ".join(first.expression) if first else ""})
    not_enforced = sorted(f"{p.url}: {note}" for p in validator.profiles for note in p.unenforced)
    replaced = ig_packages.install(engine, data, package)
    replaced_label = f"{replaced.name}#{replaced.version}" if replaced else None
    if as_json:
        click.echo(json.dumps({"package": package.label, "licence": package.licence, "counts": package.counts(),
                               "examples": {"checked": checked, "valid": checked - len(failed), "invalid": failed},
                               "not_enforced": not_enforced, "replaced": replaced_label}, indent=1))
        return
    counts = ", ".join(f"{n} {k}" for k, n in package.counts().items())
    click.echo(f"installed {package.label} ({counts})" + (f", replacing {replaced_label}" if replaced_label else ""))
    click.echo(f"examples: {checked - len(failed)} of {checked} valid against the profiles they claim")
    for f in failed:
        click.echo(f"  invalid: {f['example']}: {f['issue']} at {f['expression']}")
    for note in not_enforced:
        click.echo(f"  not enforced: {note}")
    click.echo("restart the server to use it")


def _resources(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """An example, or a Bundle example's entries."""
    if doc.get("resourceType") != "Bundle":
        return [doc]
    return [e["resource"] for e in doc.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


@ig.command("list")
@click.pass_context
def ig_list(ctx: click.Context) -> None:
    """The installed packages."""
    from ..storage import ig_packages

    for p in ig_packages.listing(_database(_settings(ctx))):
        when = datetime.fromtimestamp(p.installed_us / 1e6, UTC).isoformat(timespec="seconds")
        click.echo(f"{p.name}#{p.version}\tsha256 {p.sha256}\tinstalled {when}")


@ig.command("remove")
@click.argument("name")
@click.pass_context
def ig_remove(ctx: click.Context, name: str) -> None:
    """Remove an installed package (restart the server to stop using it)."""
    from ..storage import ig_packages

    if not ig_packages.remove(_database(_settings(ctx)), name):
        raise click.ClickException(f"no package {name} is installed")
    click.echo(f"removed {name}")
