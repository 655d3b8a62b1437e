"""The `fhirserver` command line."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .config import Settings, SettingsError, explicitly_set, load_settings
from .db.engine import read_connection


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), **overrides)
    except SettingsError as exc:
        raise click.ClickException(f"{exc}. Fix: correct the configuration (README, 'Configuration')") from None


def _services(settings: Settings):  # type: ignore[no-untyped-def]
    from .startup import StartupError, open_services

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


# ------------------------------------------------------------------ serve
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=lambda: min(max(os.cpu_count() or 2, 2), 8), show_default="CPU count (2-8)",
              type=int, help="gunicorn worker processes")
@click.option("--threads", default=8, show_default=True, type=int,
              help="threads per worker (concurrent writes of one worker share a commit)")
@click.option("--demo", is_flag=True, help="Load demo data and register a demo client (SQLite by default).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Override the data directory.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, workers: int, threads: int, demo: bool, data_dir: str | None) -> None:
    """Run the server under gunicorn (migrations are applied first)."""

    overrides: dict[str, Any] = {"data_dir": data_dir}
    configured = explicitly_set(ctx.obj.get("config"))
    if demo and not data_dir and "data_dir" not in configured:
        overrides["data_dir"] = "./fhirserver-demo"
    if "base_url" not in configured:
        overrides["base_url"] = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/fhir"
    settings = _settings(ctx, **overrides)
    svc = _services(settings)
    if demo:
        from .demo import DEMO_CLIENT_ID, ensure_demo_client, load_demo
        from .smart.demo import ensure_demo_smart

        loaded = load_demo(svc)
        key_path = ensure_demo_client(svc)
        passwords = ensure_demo_smart(svc)
        settings = replace(settings, demo_app=True)  # the gunicorn workers serve /demo-app/
        _print_demo(settings, DEMO_CLIENT_ID, key_path, loaded)
        _print_demo_smart(settings, passwords)
    svc.engine.dispose()

    from .wsgi import run_gunicorn

    run_gunicorn(settings, host, port, workers, threads)


def _print_demo(settings: Settings, client_id: str, key_path: Path, loaded: int) -> None:
    base = settings.fhir_base
    cfg = f"FHIRSERVER_DATA_DIR={settings.data_dir} "
    click.echo(f"""
fhirserver demo {'(loaded ' + str(loaded) + ' demo resources)' if loaded else '(demo data already present)'}
  FHIR base URL : {base}
  Capability    : curl {base}/metadata
  SMART config  : curl {base}/.well-known/smart-configuration
  Demo client   : {client_id} (SMART Backend Services, private key in {key_path})

Get an access token (signs a client assertion with the demo key and calls {settings.token_url}):
  TOKEN=$({cfg}fhirserver client token --client-id {client_id} --key-file {key_path} --scope "system/*.rs" --token-url {settings.token_url})
Then:
  curl -H "Authorization: Bearer $TOKEN" {base}/Patient
  curl -H "Authorization: Bearer $TOKEN" "{base}/Observation?subject=Patient/demo-alice&code=http://loinc.org|8867-4"
  curl -H "Authorization: Bearer $TOKEN" {base}/Patient/demo-bob/_history

Consent (docs/consent.md): demo-dev opted out of everything but treatment (and of treatment by Organization/demo-ed), demo-bob opted in to research, demo-alice
has a sensitive HIV result, demo-chloe is a minor with a guardian. The same key works for the clients
demo-research (purpose HRESCH), demo-break-glass (Organization/demo-ed) and demo-consent-office
(consent-exempt):
  RTOKEN=$({cfg}fhirserver client token --client-id demo-research --key-file {key_path} --scope "system/*.rs" --token-url {settings.token_url})
  curl -H "Authorization: Bearer $RTOKEN" "{base}/Observation?_summary=count"    # only demo-bob (opt-in)
  curl -i -H "Authorization: Bearer $RTOKEN" -H "Prefer: respond-async" "{base}/\\$export?_deidentify=safe-harbor"
                                   # research exports are de-identified (docs/exchange.md); poll Content-Location
  GTOKEN=$({cfg}fhirserver client token --client-id demo-break-glass --key-file {key_path} --scope "system/*.rs" --token-url {settings.token_url})
  curl -H "Authorization: Bearer $GTOKEN" {base}/Patient/demo-dev                 # 404: dev opted out of demo-ed
  curl -H "Authorization: Bearer $GTOKEN" -H "X-Purpose-Of-Use: ETREAT" -H "X-Break-Glass-Reason: demo" "{base}/Patient/demo-dev/\\$everything"
  {cfg}fhirserver alerts list

The audit trail is an auditor's to read (docs/security.md): only demo-auditor may, with an explicit scope:
  ATOKEN=$({cfg}fhirserver client token --client-id demo-auditor --key-file {key_path} --scope "system/AuditEvent.rs" --token-url {settings.token_url})
  curl -H "Authorization: Bearer $ATOKEN" "{base}/AuditEvent?_count=5&_sort=-date"
""")


def _print_demo_smart(settings: Settings, passwords: dict[str, str]) -> None:
    root = settings.public_root
    click.echo(f"""SMART App Launch (open in a browser):
  Demo app      : {root}/demo-app/   (public client demo-smart-app, PKCE S256)
  Demo users    : {', '.join(passwords)}
                  passwords are generated at first start and kept only in (mode 0600):
                  cat {settings.data_dir / 'demo-users.txt'}
    alice is Patient/demo-alice; dr-demo a practitioner (chooses a patient); guardian-chen is
    the guardian of the minor Patient/demo-chloe.
  EHR launch    : fhirserver launch create --client demo-smart-app --patient Patient/demo-bob --user dr-demo
  Discovery     : curl {root}/.well-known/openid-configuration
""")


# ------------------------------------------------------------------ db
@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply Alembic migrations (SQLite or PostgreSQL)."""
    from .db.migrations import current_revision, upgrade

    settings = _settings(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, revision)
    click.echo(f"database at revision {current_revision(settings.effective_database_url)}")


@db.command("reindex")
@click.pass_context
def db_reindex(ctx: click.Context) -> None:
    """Rebuild all search indexes from the stored resources (after adding SearchParameters)."""
    from .exchange.reindex import reindex_all

    svc = _services(_settings(ctx))
    count = reindex_all(svc)
    click.echo(f"re-indexed {count} resources")


# ------------------------------------------------------------------ load
@main.command("load")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10_000),
              help="Items per transaction; each commits its checkpoint with it.")
@click.option("--workers", default=lambda: max((os.cpu_count() or 2) - 1, 1), show_default="CPU count - 1",
              type=click.IntRange(0, 64),
              help="Processes that parse, validate and index, beside this one, the writer (0: none).")
@click.option("--force", is_flag=True, help="Load again files that were loaded completely before.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def load(ctx: click.Context, paths: tuple[Path, ...], batch: int, workers: int, force: bool, quiet: bool) -> None:
    """Import FHIR Bundles (.json) and NDJSON (.ndjson) files, also gzipped, or directories of them.

    Resources of the stored types are validated, indexed and encrypted like REST writes (ids
    kept; Bundle urn:uuid references rewritten to Type/id); other types are skipped and counted.
    Interrupted? Run the same command again: it continues where it stopped. One AuditEvent per
    file. Exit status 1 if any resource was invalid (those are reported and not stored), 130 if
    interrupted.
    """
    from .exchange.load import LoadError, load_paths

    svc = _services(_settings(ctx))
    try:
        report = load_paths(svc, paths, batch=batch, workers=workers, force=force, progress=False if quiet else None)
    except LoadError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted: committed batches are kept; run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(report.summary())
    if report.invalid:
        sys.exit(1)


# ------------------------------------------------------------------ clients
@main.group()
def client() -> None:
    """OAuth client registry."""


@client.command("register")
@click.option("--name", required=True)
@click.option("--jwks-file", type=click.Path(exists=True, dir_okay=False), help="JSON Web Key Set (public keys).")
@click.option("--jwks-url", help="URL where the client publishes its JWKS.")
@click.option("--scopes", required=True, help='Allowed scopes, e.g. "system/*.rs system/Observation.c".')
@click.option("--organization", help="Organization reference the client acts for, e.g. Organization/123.")
@click.option("--client-id", help="Choose the client_id (default: random).")
@click.option("--redirect-uri", "redirect_uris", multiple=True,
              help="Register a SMART App Launch app with this redirect URI (exact match; repeatable).")
@click.option("--launch-url", help="The app's launch URL (EHR launch).")
@click.option("--public", "public", is_flag=True, help="A public app (no secret; PKCE is always required).")
@click.option("--secret", "with_secret", is_flag=True, help="A confidential app with a client secret (printed once).")
@click.option("--admin", is_flag=True, help="May call the admin APIs (/api/...) with its backend token.")
@click.option("--introspect-any", is_flag=True, help="A resource server that may introspect any token.")
@click.option("--purpose", "purposes", multiple=True, default=("TREAT",), show_default=True,
              help="A purpose of use (v3 ActReason) the client may claim (repeatable; the first is its default).")
@click.option("--consent-exempt", "consent_exempt", is_flag=True,
              help="Not filtered by patients' consents (consent back office); every access is audited and alerted.")
@click.option("--break-glass", "break_glass", is_flag=True,
              help="May override consent denies with X-Purpose-Of-Use: ETREAT and X-Break-Glass-Reason.")
@click.option("--auditor", "auditor", is_flag=True,
              help="May read AuditEvents (with an explicit system/AuditEvent.rs scope; purpose HOPERAT by default).")
@click.option("--audit-query-values", "audit_query_values", is_flag=True,
              help="An auditor that also sees the values inside audited queries and details (redacted otherwise).")
@click.option("--stable-pseudonyms", "stable_pseudonyms", is_flag=True,
              help="De-identified exports reuse one pseudonym key for this client (linkable across its exports).")
@click.pass_context
def client_register(ctx: click.Context, name: str, jwks_file: str | None, jwks_url: str | None, scopes: str,
                    organization: str | None, client_id: str | None, redirect_uris: tuple[str, ...],
                    launch_url: str | None, public: bool, with_secret: bool, admin: bool, introspect_any: bool,
                    **extra_settings: object) -> None:
    """Register a client; prints its client_id (and, for --secret apps, the secret once).

    Without --redirect-uri: a SMART Backend Services client (private_key_jwt). With it: a SMART
    App Launch app, public (--public), with a secret (--secret) or with a JWKS (--jwks-*)."""
    from .auth.clients import ClientError, register_app_client, register_backend_client

    svc = _services(_settings(ctx))
    try:
        jwks = json.loads(Path(jwks_file).read_text()) if jwks_file else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"the JWKS file is not valid JSON: {exc}") from exc
    settings: dict[str, object] = {k: v for k, v in extra_settings.items() if v not in (None, (), False)}
    if settings.get("audit_query_values") and not settings.get("auditor"):
        raise click.ClickException("--audit-query-values needs --auditor")
    if settings.get("auditor") and ctx.get_parameter_source("purposes") == click.core.ParameterSource.DEFAULT:
        settings["purposes"] = ("HOPERAT",)  # reading the audit trail is a healthcare-operations act
    if admin:
        settings["admin"] = True
    if introspect_any:
        settings["introspect_any"] = True
    try:
        if redirect_uris:
            if sum([public, with_secret, bool(jwks or jwks_url)]) != 1:
                raise ClientError("an app is exactly one of --public, --secret or --jwks-file/--jwks-url")
            method = "none" if public else "client_secret_basic" if with_secret else "private_key_jwt"
            rec, secret = register_app_client(
                svc.engine, name, scopes, list(redirect_uris), method, jwks=jwks, jwks_uri=jwks_url,
                launch_url=launch_url, organization=organization, client_id=client_id, settings=settings)
            click.echo(rec.client_id)
            if secret:
                click.echo(f"client_secret: {secret}")
            return
        if public or with_secret or launch_url:
            raise ClientError("--public, --secret and --launch-url need --redirect-uri")
        rec = register_backend_client(svc.engine, name, scopes, jwks=jwks, jwks_uri=jwks_url,
                                      organization=organization, client_id=client_id, settings=settings)
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(rec.client_id)


@client.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def client_list(ctx: click.Context, as_json: bool) -> None:
    """List registered clients."""
    from .auth.clients import list_clients

    svc = _services(_settings(ctx))
    rows = list_clients(svc.engine)
    if as_json:
        click.echo(json.dumps([{"client_id": r.client_id, "name": r.name, "kind": r.kind, "scopes": r.scopes,
                                "organization": r.organization, "disabled": r.disabled} for r in rows], indent=1))
        return
    for r in rows:
        click.echo(f"{r.client_id}\t{r.name}\t{r.kind}\t{'disabled' if r.disabled else 'enabled'}\t{r.scopes}")


def _set_client_state(ctx: click.Context, client_id: str, disabled: bool) -> None:
    from .auth.clients import set_disabled

    svc = _services(_settings(ctx))
    if not set_disabled(svc.engine, client_id, disabled):
        raise click.ClickException(f"no client {client_id}")
    click.echo(f"{'disabled' if disabled else 'enabled'} {client_id}")


@client.command("disable")
@click.argument("client_id")
@click.pass_context
def client_disable(ctx: click.Context, client_id: str) -> None:
    """Disable a client: its tokens are revoked and stop working immediately."""
    _set_client_state(ctx, client_id, True)


@client.command("enable")
@click.argument("client_id")
@click.pass_context
def client_enable(ctx: click.Context, client_id: str) -> None:
    """Re-enable a disabled client (its old tokens stay revoked)."""
    _set_client_state(ctx, client_id, False)


@client.command("keygen")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True)
@click.option("--private-key-out", required=True, type=click.Path(dir_okay=False), help="Where to write the private JWK (0600).")
@click.option("--jwks-out", required=True, type=click.Path(dir_okay=False), help="Where to write the public JWKS.")
def client_keygen(alg: str, private_key_out: str, jwks_out: str) -> None:
    """Generate a client key pair for SMART Backend Services."""
    from .auth.assertion import generate_key, public_jwks, save_private_key

    key = generate_key(alg)
    save_private_key(key, Path(private_key_out))
    Path(jwks_out).write_text(json.dumps(public_jwks(key), indent=1))
    click.echo(f"private key: {private_key_out}\npublic JWKS: {jwks_out}")


@client.command("token")
@click.option("--client-id", required=True)
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--scope", required=True)
@click.option("--token-url", help="Token endpoint (default: from configuration).")
@click.pass_context
def client_token(ctx: click.Context, client_id: str, key_file: str, scope: str, token_url: str | None) -> None:
    """Obtain an access token as a backend client (prints the token)."""
    import requests

    from .auth.assertion import load_private_key, token_request_form

    url = token_url or _settings(ctx).token_url
    form = token_request_form(load_private_key(Path(key_file)), client_id, url, scope)
    resp = requests.post(url, data=form, timeout=30)
    if resp.status_code != 200:
        raise click.ClickException(f"token request failed ({resp.status_code}): {resp.text[:300]}")
    click.echo(resp.json()["access_token"])


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
    from .users import provisioning_uri

    return provisioning_uri(secret, username, settings.totp_issuer)


@user.command("add")
@click.option("--username", required=True)
@click.option("--fhir-user", required=True, help="Who the user is: Practitioner/ID, Patient/ID or RelatedPerson/ID.")
@click.option("--totp", is_flag=True, help="Require a TOTP code at login; prints the otpauth:// URI once.")
@click.pass_context
def user_add(ctx: click.Context, username: str, fhir_user: str, totp: bool) -> None:
    """Create a user; the password is read from standard input."""
    from .users import UserError, create_user

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


def _set_user_state(ctx: click.Context, username: str, disabled: bool) -> None:
    from .users import UserError, set_disabled

    svc = _services(_settings(ctx))
    try:
        record = set_disabled(svc.engine, username, disabled)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{'disabled' if disabled else 'enabled'} {record.username}")


@user.command("disable")
@click.argument("username")
@click.pass_context
def user_disable(ctx: click.Context, username: str) -> None:
    """Disable a user: no login succeeds until re-enabled."""
    _set_user_state(ctx, username, True)


@user.command("enable")
@click.argument("username")
@click.pass_context
def user_enable(ctx: click.Context, username: str) -> None:
    """Re-enable a user (also lifts a lockout after failed logins)."""
    _set_user_state(ctx, username, False)


@user.command("reset-mfa")
@click.argument("username")
@click.pass_context
def user_reset_mfa(ctx: click.Context, username: str) -> None:
    """Give a user a new TOTP secret (prints the otpauth:// URI once); the old one stops working."""
    from .users import UserError, reset_mfa

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
    from .users import UserError, link_patient

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
    from .users import UserError, unlink_patient

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
    from .fhir.dates import instant_text
    from .users import list_users

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


# ------------------------------------------------------------------ keys
@main.group()
def keys() -> None:
    """Master key management."""


@keys.command("rotate")
@click.option("--new-key-stdin", is_flag=True,
              help="Read the new base64 master key from stdin (when keys come from FHIRSERVER_MASTER_KEY).")
@click.pass_context
def keys_rotate(ctx: click.Context, new_key_stdin: bool) -> None:
    """Re-wrap every data key under a new master key, online.

    File-backed key ring: a new key is generated and made active; old keys are removed once no
    data key uses them. Environment-provided keys: put the new key first in FHIRSERVER_MASTER_KEY
    (new,old) and run this to re-wrap; then drop the old key from the variable.
    """
    settings = _settings(ctx)
    svc = _services(settings)
    if svc.ring.file_backed:
        raw = None
        if new_key_stdin:
            from .crypto.keyring import decode_key

            raw = decode_key(sys.stdin.read())
        kid = svc.ring.add_new_active_key(raw)
    else:
        if new_key_stdin:
            raise click.ClickException("with FHIRSERVER_MASTER_KEY set, put the new key first in that variable")
        kid = svc.ring.active_kid
    count, unused = svc.keys.rewrap_all()
    svc.ring.retire(unused)
    click.echo(f"active master key {kid}; re-wrapped {count} data keys; retired {len(unused)} old master key(s)")


@keys.command("status")
@click.pass_context
def keys_status(ctx: click.Context) -> None:
    """Show which master keys wrap how many data keys."""
    from sqlalchemy import func, select

    from .db.schema import data_key

    svc = _services(_settings(ctx))
    with read_connection(svc.engine) as conn:
        rows = conn.execute(select(data_key.c.master_kid, func.count()).group_by(data_key.c.master_kid)).all()
    click.echo(f"active master key: {svc.ring.active_kid} ({'file' if svc.ring.file_backed else 'environment'})")
    for kid, n in rows:
        click.echo(f"  {kid}: {n} data keys")


# ------------------------------------------------------------------ audit
@main.group()
def alerts() -> None:
    """The privacy alert feed (break-the-glass, consent-exempt access, denial bursts)."""


@alerts.command("list")
@click.option("--kind", type=click.Choice(["break-glass", "consent-exempt", "denial-burst", "client-suspended"]))
@click.option("--client", "client_id", help="Only alerts about this client_id.")
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def alerts_list(ctx: click.Context, kind: str | None, client_id: str | None, limit: int, as_json: bool) -> None:
    """List alerts, newest first."""
    from .consent.alerts import list_alerts

    svc = _services(_settings(ctx))
    rows = list_alerts(svc.engine, kind, client_id, None, limit)
    if as_json:
        click.echo(json.dumps([a.to_json() for a in rows], indent=2))
        return
    for a in rows:
        click.echo(f"{a.id}\t{a.created}\t{a.kind}\t{a.client_id or '-'}\t{json.dumps(a.detail, sort_keys=True)}")


@main.group()
def audit() -> None:
    """Audit trail tools."""


@audit.command("verify")
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Verify the AuditEvent hash chain; exits 1 and names the first bad record if broken."""
    from .audit.chain import verify_chain

    svc = _services(_settings(ctx))
    result = verify_chain(svc.engine, svc.repo)
    if result.ok:
        click.echo(f"OK: {result.checked} audit records verified; head hash {result.head_hash}")
        return
    click.echo(f"FAILED after {result.checked} good records: first bad record seq={result.first_bad_seq} "
               f"event={result.first_bad_event}: {result.reason}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()


@main.group()
def launch() -> None:
    """SMART EHR launch contexts."""


@launch.command("create")
@click.option("--client", "client_id", required=True, help="The app's client_id.")
@click.option("--patient", required=True, help="Patient/ID in context.")
@click.option("--encounter", help="Encounter/ID in context.")
@click.option("--user", "username", help="The user the launch is for (must be the one who signs in).")
@click.pass_context
def launch_create(ctx: click.Context, client_id: str, patient: str, encounter: str | None,
                  username: str | None) -> None:
    """Create a single-use launch; prints the app's launch URL (or the launch id)."""
    from .smart.launch import LaunchError, new_launch

    svc = _services(_settings(ctx))
    try:
        made = new_launch(svc, client_id, patient, encounter, username)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(made.url or made.launch)
