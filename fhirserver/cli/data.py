"""Commands over the stored data: `db upgrade|reindex`, `load`, `keys rotate|status`, `alerts list`,
`audit verify`, `backup`, `restore`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from ..consent.alerts import KINDS as ALERT_KINDS
from ..db.engine import read_connection
from .root import _services, _settings, main


# ------------------------------------------------------------------ db
@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply Alembic migrations (SQLite or PostgreSQL)."""
    from ..db.migrations import current_revision, upgrade

    settings = _settings(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, revision)
    click.echo(f"database at revision {current_revision(settings.effective_database_url)}")


@db.command("reindex")
@click.pass_context
def db_reindex(ctx: click.Context) -> None:
    """Rebuild all search indexes from the stored resources (after adding SearchParameters)."""
    from ..exchange.reindex import reindex_all

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
    from ..exchange.load import load_paths
    from ..exchange.sources import LoadError

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
            from ..crypto.keyring import decode_key

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

    from ..db.schema import data_key

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
@click.option("--kind", type=click.Choice(list(ALERT_KINDS)))
@click.option("--client", "client_id", help="Only alerts about this client_id.")
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def alerts_list(ctx: click.Context, kind: str | None, client_id: str | None, limit: int, as_json: bool) -> None:
    """List alerts, newest first."""
    from ..consent.alerts import list_alerts

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
    """Verify every access record, the Merkle tree and every signed checkpoint (the database's
    and the checkpoint file's); exits 1 and names the first bad record if anything is wrong.
    Pending records are sequenced first (no checkpoint is signed)."""
    from ..audit.verify import verify_log

    svc = _services(_settings(ctx))
    svc.sequencer.run_once(checkpoint=False)
    result = verify_log(svc.audit, svc.sequencer.signer, svc.settings.checkpoint_path)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.ok:
        dropped = f" (the first {result.dropped} dropped by retention)" if result.dropped else ""
        click.echo(f"OK: {result.checked} audit records verified{dropped}; tree root {result.root}; "
                   f"{result.checkpoints} checkpoints in the database and {result.file_checkpoints} in the file verified")
        return
    click.echo(f"FAILED after {result.checked} good records: first bad record seq={result.first_bad_seq} "
               f"event={result.first_bad_event}: {result.reason}", err=True)
    sys.exit(1)


@audit.command("report")
@click.option("--client", "client_id", help="The client (OAuth client id) whose accesses to report.")
@click.option("--user", "username", help="The user (sign-in name) whose accesses to report.")
@click.option("--patient", "patient", help="The patient (Patient/ID or ID): every account that accessed their data.")
@click.option("--since", default="1970", show_default=True, help="From this date or dateTime (inclusive).")
@click.option("--until", default=None, help="Up to this date or dateTime (inclusive; default: now).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.pass_context
def audit_report(ctx: click.Context, client_id: str | None, username: str | None, patient: str | None, since: str,
                 until: str | None, fmt: str) -> None:
    """Breach report: every patient whose data the account read, searched, exported or changed,
    with counts per action (R C U D E), denied attempts and the first and last access, from the
    access records' index (docs/operations.md, incident response). With --patient, the other way
    round: every account that touched that patient's data (what to tell the patient)."""
    import csv

    from sqlalchemy import select

    from ..audit.report import ACTIONS, accessors, touched_patients
    from ..clock import now_us
    from ..db.engine import read_connection
    from ..db.schema import app_user
    from ..fhir.dates import parse_range

    if sum(x is not None for x in (client_id, username, patient)) != 1:
        raise click.UsageError("name exactly one account (--client ID or --user NAME) or one --patient ID")
    try:
        since_us = parse_range(since)[0]
        until_us = parse_range(until)[1] + 1 if until else now_us() + 1
    except ValueError as exc:
        raise click.UsageError(f"--since/--until: {exc}") from None
    svc = _services(_settings(ctx))
    key = "patient"
    with read_connection(svc.engine) as conn:
        if patient is not None:
            subject = f"Patient/{patient.removeprefix('Patient/')}"
            rows, key = accessors(conn, subject.split("/", 1)[1], since_us, until_us), "account"
        elif username is not None:
            found = conn.execute(select(app_user.c.fhir_user).where(app_user.c.username == username)).scalar()
            if found is None:
                raise click.ClickException(f"no user {username!r}")
            subject = str(found)
            rows = touched_patients(conn, subject, since_us, until_us)
        else:
            subject = f"Device/{client_id}"
            rows = touched_patients(conn, subject, since_us, until_us)
    if fmt == "json":
        listed = [r.to_json(key) for r in rows]
        out = {"patient": subject, "accounts": listed} if key == "account" else {"account": subject, "patients": listed}
        click.echo(json.dumps(out, indent=2))
        return
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([key, *ACTIONS, "denied", "first", "last"])
    for r in rows:
        j = r.to_json(key)
        writer.writerow([j[key], *(j[a] for a in ACTIONS), j["denied"], j["first"], j["last"]])


@audit.command("checkpoint")
@click.pass_context
def audit_checkpoint(ctx: click.Context) -> None:
    """Sequence pending access records and sign a checkpoint now (stored, appended to the
    checkpoint file and logged)."""
    svc = _services(_settings(ctx))
    for _attempt in range(50):
        done = svc.sequencer.run_once(force_checkpoint=True)
        if done is not None and done.checkpoint is not None:
            cp = done.checkpoint
            click.echo(f"checkpoint: {cp.tree_size} records, root {cp.root}, key {cp.key_id}")
            return
        time.sleep(0.1)
    raise click.ClickException("another server process holds the audit log; try again")


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------ backup
@main.command("backup")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="An empty or new directory for the backup.")
@click.pass_context
def backup_cmd(ctx: click.Context, out: Path) -> None:
    """Online backup of the SQLite database (SQLite's backup API) and its side files, without the
    master key: keep that in your key backup (docs/operations.md)."""
    from ..backup import BackupError, backup
    from ..startup import StartupError

    try:
        report = backup(_settings(ctx), out)
    except (BackupError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backup written to {report.path} (database sha256 {report.sha256}); the master key "
               f"({', '.join(report.master_kids)}) is NOT in it: keep it in your key backup")


@main.command("restore")
@click.option("--from", "src", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A directory written by `fhirserver backup`.")
@click.pass_context
def restore_cmd(ctx: click.Context, src: Path) -> None:
    """Restore a backup into a new data directory; needs the same master key (environment or key file)."""
    from ..backup import BackupError, restore
    from ..startup import StartupError

    try:
        report = restore(_settings(ctx), src)
    except (BackupError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"restored {report.path}; run `fhirserver audit verify` to check the audit chain")
