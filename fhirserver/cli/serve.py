"""`fhirserver serve`: migrations, then gunicorn; `--demo` loads demo data and prints how to use it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..config import Settings, explicitly_set
from ..services import key_beside_data
from .root import _services, _settings, main


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
    beside = key_beside_data(svc)
    if beside:
        click.echo(f"warning: {beside}", err=True)
    if demo:
        from ..demo import DEMO_CLIENT_ID, ensure_demo_client, load_demo
        from ..smart.demo import ensure_demo_smart

        loaded = load_demo(svc)
        key_path = ensure_demo_client(svc)
        passwords = ensure_demo_smart(svc)
        settings = replace(settings, demo_app=True, portal=True)  # the gunicorn workers serve /demo-app/, /portal/
        _print_demo(settings, DEMO_CLIENT_ID, key_path, loaded)
        _print_demo_smart(settings, passwords)
    if settings.portal:  # registered once, here, before the workers start (each would race to insert it)
        from ..portal import ensure_client

        ensure_client(svc)
    svc.engine.dispose()

    from ..wsgi import run_gunicorn

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
  Patient portal: {root}/portal/     (sign in as alice or guardian-chen: record, accesses, sharing, download)
  Demo users    : {', '.join(passwords)}
                  passwords are generated at first start and kept only in (mode 0600):
                  cat {settings.data_dir / 'demo-users.txt'}
    alice is Patient/demo-alice; dr-demo a practitioner (chooses a patient); guardian-chen is
    the guardian of the minor Patient/demo-chloe.
  EHR launch    : fhirserver launch create --client demo-smart-app --patient Patient/demo-bob --user dr-demo
  Discovery     : curl {root}/.well-known/openid-configuration
""")
