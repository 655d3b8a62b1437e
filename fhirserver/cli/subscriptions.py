"""`fhirserver subscription list|pause|resume`: the operators' view of subscriptions
(docs/subscriptions.md). Listing shows the dispatcher's state, never a subscription's endpoint
headers; pausing keeps numbering events (nothing is lost) and holds delivery; resuming restarts
delivery from the last acknowledged event (a subscription in error starts over with a handshake)."""

from __future__ import annotations

import json

import click

from .root import _services, _settings, main


@main.group()
def subscription() -> None:
    """Subscriptions and their delivery state."""


@subscription.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def subscription_list(ctx: click.Context, as_json: bool) -> None:
    """Every subscription: owner, status, events numbered / delivered / withheld, the last error."""
    from ..db.engine import read_connection
    from ..subscriptions import state

    svc = _services(_settings(ctx))
    with read_connection(svc.engine) as conn:
        subs = state.listing(conn)
    rows = [{"id": s.id, "client_id": s.client_id, "status": s.status, "paused": s.paused, "topic": s.topic,
             "events": s.events_since_start, "delivered_through": s.delivered_through, "withheld": s.withheld,
             "attempts": s.attempts, "last_error": s.last_error} for s in subs]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['id']}\t{r['client_id']}\t{r['status']}{' (paused)' if r['paused'] else ''}\t"
                   f"events {r['events']}, delivered {r['delivered_through']}, withheld {r['withheld']}\t"
                   f"{r['topic']}\t{r['last_error'] or ''}")


def _pause(ctx: click.Context, subscription_id: str, paused: bool) -> None:
    from ..db.engine import transaction
    from ..subscriptions import state

    svc = _services(_settings(ctx))
    with transaction(svc.engine) as conn:
        if not state.set_paused(conn, subscription_id, paused):
            raise click.ClickException(f"no subscription {subscription_id}")
    click.echo(f"{subscription_id} {'paused' if paused else 'resumed'}")


@subscription.command("pause")
@click.argument("subscription_id")
@click.pass_context
def subscription_pause(ctx: click.Context, subscription_id: str) -> None:
    """Hold delivery (events are still numbered and kept)."""
    _pause(ctx, subscription_id, True)


@subscription.command("resume")
@click.argument("subscription_id")
@click.pass_context
def subscription_resume(ctx: click.Context, subscription_id: str) -> None:
    """Deliver again, from the last acknowledged event (after a pause or an error)."""
    _pause(ctx, subscription_id, False)


@subscription.command("dispatch")
@click.pass_context
def subscription_dispatch(ctx: click.Context) -> None:
    """Match and deliver notifications in the foreground until SIGTERM or Ctrl-C: for deployments
    that start gunicorn themselves (`gunicorn 'fhirserver.wsgi:app()'` with
    FHIRSERVER_SUBSCRIPTION_DISPATCHER=0). `fhirserver serve` runs one of these on its own."""
    from ..dispatcher_process import run

    run(_settings(ctx))
