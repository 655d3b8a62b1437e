"""Scheduled privacy jobs (issue 15): snooping detection over each finished day, then penalties
for the accounts it named; retention runs once a day. Run by a background thread of every
server process (`privacy_jobs`, on by default) and by `fhirserver audit snoop` /
`fhirserver retention run`. A job of one period is claimed by a row of `job_run`, so two
processes never both run it, and one that died mid-way is taken over after JOB_TIMEOUT_US.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select, update

from .audit.events import AuditRecord
from .audit.retention import Dropped
from .clock import now_us
from .consent.alerts import raise_alert
from .db.schema import job_run
from .oversight.snooping import DAY_US, Finding, NotReady, SnoopRules, day_label, detect
from .services import Services

log = logging.getLogger("fhirserver.schedule")
JOB_TIMEOUT_US = 3600 * 1_000_000


def claim(conn: Connection, name: str, period: str, force: bool = False) -> bool:
    """Take the job of `period` (False: done, or running elsewhere and not stale)."""
    row = conn.execute(select(job_run).where(job_run.c.name == name, job_run.c.period == period)).first()
    now = now_us()
    if row is None:
        conn.execute(job_run.insert().values(name=name, period=period, started_us=now))
        return True
    if force or (row.finished_us is None and now - row.started_us > JOB_TIMEOUT_US):
        conn.execute(update(job_run).where(job_run.c.name == name, job_run.c.period == period)
                     .values(started_us=now, finished_us=None))
        return True
    return False


def finish(conn: Connection, name: str, period: str, progress: str) -> None:
    conn.execute(update(job_run).where(job_run.c.name == name, job_run.c.period == period)
                 .values(finished_us=now_us(), progress=progress[:2000]))


def job_audit(svc: Services, conn: Connection, code: str, text: str) -> None:
    """Every job run is an AuditEvent (subtype `code`) in the job's own transaction."""
    rec = AuditRecord(interaction="operation", request_id=f"{code}-{now_us()}", network_address="localhost",
                      recorded_us=now_us(), status=200, outcome_desc=text[:1000])
    rec.subtype_code = ("urn:fhirserver:privacy-job", code, code)
    svc.audit.append(conn, rec)


def run_snooping(svc: Services, day_us: int, force: bool = False) -> list[Finding] | None:
    """Detect over the day starting at `day_us` (UTC midnight); raise one `snooping` alert per
    finding and reassess the accounts named. None when the day was already done (or is claimed)."""
    period = day_label(day_us)
    with svc.engine.begin() as conn:
        if not claim(conn, "snooping", period, force):
            return None
    try:
        with svc.engine.begin() as conn:
            findings = detect(conn, day_us, SnoopRules.from_settings(svc.settings), svc.repo, svc.blind)
            for f in findings:
                is_client = f.account.startswith("Device/")
                raise_alert(conn, "snooping", f.account.split("/", 1)[1] if is_client else None, None,
                            {**f.to_json(), "day": period})
            for account in sorted({f.account for f in findings}):
                kind = "client" if account.startswith("Device/") else "user"
                svc.penalties.assess(conn, kind, account.split("/", 1)[1] if kind == "client" else account)
            summary = f"snooping detection over {period}: {len(findings)} finding(s)" + (
                " (" + ", ".join(sorted({f"{f.rule}: {f.account}" for f in findings}))[:800] + ")" if findings else "")
            job_audit(svc, conn, "snooping-run", summary)
            finish(conn, "snooping", period, summary)
    except NotReady:
        with svc.engine.begin() as conn:  # release the claim: the next pass tries again
            conn.execute(job_run.delete().where(job_run.c.name == "snooping", job_run.c.period == period))
        raise
    return findings


def due_days(now: int, days_back: int = 3) -> list[int]:
    """The finished days a pass considers (yesterday and a few before, in case the server was down)."""
    today = now // DAY_US * DAY_US
    return [today - d * DAY_US for d in range(days_back, 0, -1)]


class PrivacyJobs:
    """The background thread: every `interval` seconds, snooping for finished days not yet done
    (once an hour has passed after midnight, so late records are sequenced) and, once a day,
    retention (see `tasks`)."""

    def __init__(self, svc: Services, tasks: list[Callable[[Services], Any]] | None = None) -> None:
        self.svc = svc
        self.tasks = tasks if tasks is not None else [snoop_due, retention_due]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float = 300.0) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="privacy-jobs", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for task in self.tasks:
                try:
                    task(self.svc)
                except Exception:  # noqa: BLE001 - the next pass retries
                    log.exception("privacy job failed")

    def stop(self) -> None:
        self._stop.set()


def snoop_due(svc: Services) -> None:
    now = now_us()
    for day in due_days(now):
        if now - (day + DAY_US) < 3600 * 1_000_000:
            continue
        try:
            run_snooping(svc, day)
        except NotReady as exc:
            log.info("snooping of %s postponed: %s", day_label(day), exc)


def drop_expired_access_records(svc: Services) -> Dropped | None:
    """Access-record retention (`audit_retention_days`), under the sequencer's hold on the log."""
    from .audit.retention import drop_before

    days = svc.settings.audit_retention_days
    if days <= 0:
        return None
    svc.sequencer.run_once(checkpoint=False)
    with svc.engine.begin() as conn:
        if not svc.sequencer.hold(conn):
            return None
        return drop_before(svc.audit, conn, now_us() - days * DAY_US)


def retention_due(svc: Services) -> None:
    """Once a day: the retention policies and the access records' own (docs/operations.md)."""
    from .exchange.retention import parse_policies, run

    period = day_label(now_us())
    with svc.engine.begin() as conn:
        if not claim(conn, "retention", period):
            return
    results = run(svc, parse_policies(svc.settings.retention_policy, svc.types, svc.params))
    dropped = drop_expired_access_records(svc)
    with svc.engine.begin() as conn:
        finish(conn, "retention", period, "; ".join(f"{r.policy}: {r.done}" for r in results)
               + (f"; access records below {dropped.horizon} dropped" if dropped else ""))
