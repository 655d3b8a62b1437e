"""Privacy operations on the command line (docs/operations.md): `audit snoop`, `penalties list`,
`client reinstate`, `user reinstate`, `retention plan|run`."""

from __future__ import annotations

import json

import click

from .clients import client
from .data import audit
from .root import _services, _settings, main
from .users import user


@audit.command("snoop")
@click.option("--day", help="The UTC day to examine, YYYY-MM-DD (default: yesterday).")
@click.option("--force", is_flag=True, help="Run again a day that was already examined (alerts are raised again).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit_snoop(ctx: click.Context, day: str | None, force: bool, as_json: bool) -> None:
    """Snooping detection over one finished day: prints the findings, raises their alerts and
    applies the penalty policy (the server does this by itself an hour after each day ends)."""
    from ..clock import now_us
    from ..fhir.dates import parse_range
    from ..oversight.snooping import DAY_US, NotReady
    from ..schedule import run_snooping

    svc = _services(_settings(ctx))
    try:
        day_us = parse_range(day)[0] if day else (now_us() // DAY_US - 1) * DAY_US
    except ValueError as exc:
        raise click.UsageError(f"--day: {exc}") from None
    svc.sequencer.run_once(checkpoint=False)  # sequence and roll up what is pending
    try:
        findings = run_snooping(svc, day_us, force)
    except NotReady as exc:
        raise click.ClickException(str(exc)) from None
    if findings is None:
        raise click.ClickException("that day was examined already (or is being examined); --force runs it again")
    if as_json:
        click.echo(json.dumps([f.to_json() for f in findings], indent=1))
        return
    for f in findings:
        click.echo(f"{f.severity}\t{f.rule}\t{f.account}\t{json.dumps(f.evidence)[:300]}")
    click.echo(f"{len(findings)} finding(s)")


@main.group()
def penalties() -> None:
    """Graded penalties in force (warn, limit, suspend)."""


@penalties.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def penalties_list(ctx: click.Context, as_json: bool) -> None:
    rows = _services(_settings(ctx)).penalties.listing()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['kind']}\t{r['account']}\t{r['level']}\t{r['since']}\t{r['reason']}")


def _reinstate(ctx: click.Context, kind: str, subject: str) -> None:
    svc = _services(_settings(ctx))
    with svc.engine.begin() as conn:
        previous = svc.penalties.reinstate(conn, kind, subject, "fhirserver CLI")
    click.echo(f"{kind} {subject}: {previous} lifted")


@client.command("reinstate")
@click.argument("client_id")
@click.pass_context
def client_reinstate(ctx: click.Context, client_id: str) -> None:
    """Lift a client's penalty (and enable it again if it was suspended)."""
    from ..auth.clients import get_client

    if get_client(_services(_settings(ctx)).engine, client_id) is None:
        raise click.ClickException(f"no client {client_id!r}")
    _reinstate(ctx, "client", client_id)


@user.command("reinstate")
@click.argument("username")
@click.pass_context
def user_reinstate(ctx: click.Context, username: str) -> None:
    """Lift the penalty of the person behind a user account (by their fhirUser), and enable them."""
    from ..users.registry import get_user

    record = get_user(_services(_settings(ctx)).engine, username)
    if record is None:
        raise click.ClickException(f"no user {username!r}")
    _reinstate(ctx, "user", record.fhir_user)


@main.group()
def retention() -> None:
    """Retention policies (retention_policy): what is due, and applying them."""


def _policies(ctx: click.Context):  # type: ignore[no-untyped-def]
    from ..exchange.retention import PolicyError, parse_policies
    from ..fhir.errors import FhirError

    svc = _services(_settings(ctx))
    try:
        policies = parse_policies(svc.settings.retention_policy, svc.types, svc.params)
    except (PolicyError, FhirError) as exc:
        raise click.ClickException(str(exc)) from None
    return svc, policies


@retention.command("plan")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retention_plan(ctx: click.Context, as_json: bool) -> None:
    """Dry run: per policy, how many resources are due now, and some of them."""
    from ..exchange.retention import plan

    svc, policies = _policies(ctx)
    results = plan(svc, policies)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
        return
    for r in results:
        click.echo(f"{r.policy}\t{r.due} due\t{' '.join(r.sample)}")


@retention.command("run")
@click.option("--limit", type=click.IntRange(1), help="Stop after this many resources (resume with another run).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retention_run(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """Apply the policies now (each batch audited); safe to interrupt and run again."""
    from ..exchange.retention import run
    from ..schedule import drop_expired_access_records

    svc, policies = _policies(ctx)
    results = run(svc, policies, limit=limit)
    dropped = drop_expired_access_records(svc)
    audit = {"horizon": dropped.horizon, "records": dropped.records, "partitions": dropped.partitions} \
        if dropped else None
    if as_json:
        click.echo(json.dumps({"policies": [r.to_json() for r in results], "access_records": audit}, indent=1))
        return
    for r in results:
        click.echo(f"{r.policy}\t{r.done} done")
    click.echo(f"access records: {dropped.records} older than {svc.settings.audit_retention_days} days dropped"
               if dropped else "access records: none due")


@main.group()
def erasure() -> None:
    """Erasure requests patients filed (Patient/[id]/$erasure-request): list, approve, refuse."""


@erasure.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "refused"]))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def erasure_list(ctx: click.Context, status: str | None, as_json: bool) -> None:
    from ..exchange.erasure_requests import requests_of

    svc = _services(_settings(ctx))
    with svc.engine.connect() as conn:
        rows = requests_of(svc, conn, status=status)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=1))
        return
    for r in rows:
        click.echo(f"{r.id}\tPatient/{r.patient}\t{r.status}\t{r.created}\t{r.requested_by}\t{r.reason[:80]}")


def _decide(ctx: click.Context, request_id: str, approve: bool, note: str) -> None:
    from ..exchange.erasure_requests import RequestError, decide

    svc = _services(_settings(ctx))
    try:
        done, report = decide(svc, request_id, approve, "fhirserver CLI", note)
    except RequestError as exc:
        raise click.ClickException(str(exc)) from None
    extra = f"; {report.resources} resources erased, now Patient/{report.pseudonym}" if report else ""
    click.echo(f"{done.id} {done.status}{extra}")


@erasure.command("approve")
@click.argument("request_id")
@click.option("--note", default="", help="What the patient is told.")
@click.pass_context
def erasure_approve(ctx: click.Context, request_id: str, note: str) -> None:
    """Approve: the patient is erased at once, as with $erase (crypto-shredding)."""
    _decide(ctx, request_id, True, note)


@erasure.command("refuse")
@click.argument("request_id")
@click.option("--note", required=True, help="Why (the patient sees it), e.g. a legal duty to keep the record.")
@click.pass_context
def erasure_refuse(ctx: click.Context, request_id: str, note: str) -> None:
    _decide(ctx, request_id, False, note)
