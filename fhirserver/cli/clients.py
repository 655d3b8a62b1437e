"""`fhirserver client ...` (the OAuth client registry) and `fhirserver launch create` (EHR launch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..services import Services
from .root import _services, _settings, add_enable_disable, main


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
@click.option("--jurisdiction", "jurisdiction", metavar="CODE",
              help="Where the client's operator is (ISO 3166 code or EU); outside the deployment's jurisdiction, "
                   "it sees a patient's data only with the patient's consent to that transfer (default: domestic).")
@click.option("--subscription-endpoint", "subscription_endpoints", multiple=True, metavar="URL",
              help="A URL prefix its Subscriptions may deliver to (repeatable; https, docs/subscriptions.md).")
@click.option("--stable-pseudonyms", "stable_pseudonyms", is_flag=True,
              help="De-identified exports reuse one pseudonym key for this client (linkable across its exports).")
@click.pass_context
def client_register(ctx: click.Context, /, name: str, jwks_file: str | None, jwks_url: str | None, scopes: str,
                    organization: str | None, client_id: str | None, redirect_uris: tuple[str, ...],
                    launch_url: str | None, public: bool, with_secret: bool, admin: bool, introspect_any: bool,
                    **extra_settings: object) -> None:
    """Register a client; prints its client_id (and, for --secret apps, the secret once).

    Without --redirect-uri: a SMART Backend Services client (private_key_jwt). With it: a SMART
    App Launch app, public (--public), with a secret (--secret) or with a JWKS (--jwks-*)."""
    from ..auth.clients import ClientError, register_app_client, register_backend_client

    svc = _services(_settings(ctx))
    try:
        jwks = json.loads(Path(jwks_file).read_text()) if jwks_file else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"the JWKS file is not valid JSON: {exc}") from exc
    settings: dict[str, object] = {k: v for k, v in extra_settings.items() if v not in (None, (), False)}
    if isinstance(settings.get("jurisdiction"), str):
        place = str(settings["jurisdiction"]).strip().upper()
        if not place.isascii() or not place.isalpha() or not 2 <= len(place) <= 3:
            raise click.ClickException("--jurisdiction takes an ISO 3166 alpha-2/alpha-3 code or EU")
        settings["jurisdiction"] = place
    endpoints = settings.get("subscription_endpoints")
    if isinstance(endpoints, tuple):
        if not all(str(e).startswith(("https://", "http://")) for e in endpoints):
            raise click.ClickException("--subscription-endpoint takes https:// URLs")
        settings["subscription_endpoints"] = list(endpoints)
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
    from ..auth.clients import list_clients

    svc = _services(_settings(ctx))
    rows = list_clients(svc.engine)
    if as_json:
        click.echo(json.dumps([{"client_id": r.client_id, "name": r.name, "kind": r.kind, "scopes": r.scopes,
                                "organization": r.organization, "disabled": r.disabled,
                                "jurisdiction": (r.settings or {}).get("jurisdiction")} for r in rows], indent=1))
        return
    for r in rows:
        click.echo(f"{r.client_id}\t{r.name}\t{r.kind}\t{'disabled' if r.disabled else 'enabled'}\t{r.scopes}")


def _set_client_state(svc: Services, client_id: str, disabled: bool) -> str:
    from ..auth.clients import set_disabled

    if not set_disabled(svc.engine, client_id, disabled):
        raise click.ClickException(f"no client {client_id}")
    return client_id


add_enable_disable(client, "client_id", _set_client_state,
                   "Disable a client: its tokens are revoked and stop working immediately.",
                   "Re-enable a disabled client (its old tokens stay revoked).")


@client.command("keygen")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True)
@click.option("--private-key-out", required=True, type=click.Path(dir_okay=False), help="Where to write the private JWK (0600).")
@click.option("--jwks-out", required=True, type=click.Path(dir_okay=False), help="Where to write the public JWKS.")
def client_keygen(alg: str, private_key_out: str, jwks_out: str) -> None:
    """Generate a client key pair for SMART Backend Services."""
    from ..auth.assertion import generate_key, public_jwks, save_private_key

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

    from ..auth.assertion import load_private_key, token_request_form

    url = token_url or _settings(ctx).token_url
    form = token_request_form(load_private_key(Path(key_file)), client_id, url, scope)
    resp = requests.post(url, data=form, timeout=30)
    if resp.status_code != 200:
        raise click.ClickException(f"token request failed ({resp.status_code}): {resp.text[:300]}")
    click.echo(resp.json()["access_token"])


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
    from ..smart.launch import LaunchError, new_launch

    svc = _services(_settings(ctx))
    try:
        made = new_launch(svc, client_id, patient, encounter, username)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(made.url or made.launch)
