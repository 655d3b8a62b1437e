"""`fhirserver user ...`: user accounts (passwords from stdin, TOTP, guardian/proxy links)."""

from __future__ import annotations

import json
import sys

import click

from ..config import Settings
from ..services import Services
from .root import _services, _settings, add_enable_disable, main


# ------------------------------------------------------------------ users
@main.group()
def user() -> None:
    """User accounts for SMART App Launch (people who sign in to apps)."""


def _read_password() -> str:
    """The new password from stdin — never from an argument, which would land in shell history and
    in every process listing. At a terminal it is prompted for twice, hidden."""
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.ClickException("give the password on standard input")
    return password


def _totp_uri(settings: Settings, username: str, secret: str) -> str:
    from ..users import provisioning_uri

    return provisioning_uri(secret, username, settings.totp_issuer)


@user.command("add")
@click.option("--username", required=True)
@click.option("--fhir-user", required=True, help="Who the user is: Practitioner/ID, Patient/ID or RelatedPerson/ID.")
@click.option("--totp", is_flag=True, help="Require a TOTP code at login; prints the otpauth:// URI once.")
@click.pass_context
def user_add(ctx: click.Context, username: str, fhir_user: str, totp: bool) -> None:
    """Create a user; the password is read from standard input."""
    from ..users import UserError, create_user

    settings = _settings(ctx)
    svc = _services(settings)
    password = _read_password()
    try:
        record, secret = create_user(svc.engine, svc.keys, username, password, fhir_user, totp=totp)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created user {record.username} ({record.fhir_user})")
    if secret:
        click.echo("TOTP enabled; add this to an authenticator app now, it is not shown again:")
        click.echo(_totp_uri(settings, record.username, secret))


def _set_user_state(svc: Services, username: str, disabled: bool) -> str:
    from ..users import UserError, set_disabled

    try:
        return set_disabled(svc.engine, username, disabled).username
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc


add_enable_disable(user, "username", _set_user_state, "Disable a user: no login succeeds until re-enabled.",
                   "Re-enable a user (also lifts a lockout after failed logins).")


@user.command("reset-mfa")
@click.argument("username")
@click.pass_context
def user_reset_mfa(ctx: click.Context, username: str) -> None:
    """Give a user a new TOTP secret (prints the otpauth:// URI once); the old one stops working."""
    from ..users import UserError, reset_mfa

    settings = _settings(ctx)
    svc = _services(settings)
    try:
        secret = reset_mfa(svc.engine, svc.keys, username)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"new TOTP secret for {username.strip().lower()}; add this to an authenticator app now, "
               "it is not shown again:")
    click.echo(_totp_uri(settings, username.strip().lower(), secret))


@user.command("link")
@click.argument("username")
@click.option("--patient", required=True, help="Patient/ID the user may act for.")
@click.option("--relationship", required=True, type=click.Choice(["guardian", "proxy"]))
@click.pass_context
def user_link(ctx: click.Context, username: str, patient: str, relationship: str) -> None:
    """Let a user act for a patient (a guardian for a minor, or a proxy)."""
    from ..users import UserError, link_patient

    svc = _services(_settings(ctx))
    try:
        link = link_patient(svc.engine, username, patient, relationship)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"linked {username.strip().lower()} to {link.reference} as {link.relationship}")


@user.command("unlink")
@click.argument("username")
@click.option("--patient", required=True, help="Patient/ID to remove from the user's links.")
@click.pass_context
def user_unlink(ctx: click.Context, username: str, patient: str) -> None:
    """Remove a user's link to a patient."""
    from ..users import UserError, unlink_patient

    svc = _services(_settings(ctx))
    try:
        removed = unlink_patient(svc.engine, username, patient)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    if not removed:
        raise click.ClickException(f"{username} is not linked to {patient}")
    click.echo(f"unlinked {username.strip().lower()} from {patient}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def user_list(ctx: click.Context, as_json: bool) -> None:
    """List users (never their password hashes or TOTP secrets)."""
    from ..fhir.dates import instant_text
    from ..users import list_users

    svc = _services(_settings(ctx))
    rows = list_users(svc.engine)

    def when(us: int | None) -> str | None:
        return instant_text(us) if us is not None else None

    if as_json:
        click.echo(json.dumps([{
            "username": r.username, "fhir_user": r.fhir_user, "totp": r.totp, "disabled": r.disabled,
            "locked": r.locked(), "locked_until": when(r.locked_until_us) if r.locked() else None,
            "failed_logins": r.failed_logins, "last_login": when(r.last_login_us), "created": when(r.created_us),
            "links": [{"patient": link.reference, "relationship": link.relationship} for link in r.links],
        } for r in rows], indent=1))
        return
    for r in rows:
        state = "disabled" if r.disabled else "locked" if r.locked() else "enabled"
        links = " ".join(f"{link.reference}({link.relationship})" for link in r.links)
        click.echo(f"{r.username}\t{r.fhir_user}\t{'totp' if r.totp else 'no-totp'}\t{state}\t{links}".rstrip())
