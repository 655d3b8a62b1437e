"""Running one export job: the same row predicates as a search by the same caller (scopes,
patient compartment, consent), evaluated when the job runs, written as NDJSON files per type.

The caller's identity is a snapshot taken at kick-off (`principal_snapshot`), so a job that
outlives its access token (or a server restart) still exports exactly what that caller could
see, and consent withdrawn in the meantime is honoured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import func, select

from ..access import Access
from ..audit.events import AuditRecord
from ..audit.redact import redact_body
from ..auth.principal import principal_from
from ..clock import now_us
from ..db.engine import database_unavailable, read_connection
from ..fhir.subsetting import apply_subsetting
from ..search.sources import source_of
from ..services import Services
from ..storage import export_jobs as jobs
from ..storage.codec import dump_json, parse_json
from ..storage.repository import Stored

log = logging.getLogger("fhirserver.bulk")
T = TypeVar("T")
BATCH = 500
OUTAGE_SECONDS = 60.0  # a database outage (a failover takes ~10-30 s) an export waits out, then fails
RETRY_PAUSE_SECONDS = 1.0
# A Group's members (or the patients a kick-off named) are exported this many at a time: every
# batch's statement asks "in one of these patients' compartments", and over the whole list that
# was re-evaluated per batch -- work growing with the square of the export (docs/performance.md).
MEMBER_CHUNK = 200


# ... unless they are at least this share of the stored patients: then one scan of the type in pk
# order, keeping the rows of members' compartments, costs about what a system export does.
SCAN_SHARE = 0.25


def _parts(svc: Services, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's spec once per chunk of its listed patients, or once as a scan kept to the
    members (many of them), or the spec itself (few or none)."""
    pids = spec.get("patients")
    if pids is None or len(pids) <= MEMBER_CHUNK:
        return [spec]
    res = source_of("Patient").res
    with read_connection(svc.engine) as conn:
        stored = conn.execute(select(func.count()).select_from(res).where(
            res.c.type == "Patient", res.c.deleted.is_(False))).scalar_one()
    if len(pids) >= SCAN_SHARE * stored:
        return [{**spec, "member_set": frozenset(pids)}]
    return [{**spec, "patients": pids[i:i + MEMBER_CHUNK]} for i in range(0, len(pids), MEMBER_CHUNK)]


def run_export(svc: Services, job: jobs.Job, stop: threading.Event | None = None) -> str:
    """Export one claimed job; returns how this run ended: "complete", "failed", "interrupted"
    (the server is stopping: the job is requeued once its heartbeat is stale) or "stopped" (the
    job was cancelled or taken over by another run meanwhile: this run writes nothing more)."""
    run = _Run(svc, job, stop)
    try:
        run.parts = run.retrying(lambda: _parts(svc, job.spec))  # the same for every type
        for n, rtype in enumerate(job.spec["types"], 1):
            ended = run.export_type(rtype, f"({n} of {len(job.spec['types'])} types)")
            if ended is not None:
                return ended
        desc = "export complete: " + (", ".join(f"{t} {c}" for t, c in sorted(run.counts.items())) or "no resources") \
            + ("; de-identified (safe-harbor)" if run.deidentify is not None else "")
        return "complete" if run.end("complete", 200, desc) else "stopped"
    except jobs.NotOwner:
        log.info("export %s was cancelled or taken over by another run; this run stops", job.id)
        return "stopped"
    except Exception as exc:  # noqa: BLE001 - any failure ends the job as failed, audited
        log.exception("export %s failed", job.id)
        run.end("failed", 500, f"export failed: {type(exc).__name__}", "The export failed; see the server log")
        return "failed"


class _Run:
    """One job's run: its caller bound to a gate as a search of theirs would be (per type: scopes,
    consent), and what it has written so far (files per type, the patients it disclosed)."""

    def __init__(self, svc: Services, job: jobs.Job, stop: threading.Event | None) -> None:
        from ..pipeline.pipeline import Pipeline

        self.svc, self.job, self.stop = svc, job, stop
        self.principal = principal = principal_from(job.principal)
        principal.consent = svc.consent.export_decision(principal, bool(job.spec.get("deidentify")))
        transfer, refusal = svc.consent.transfer_rule(principal)
        self.gate = svc.gate(Access(others=Pipeline(svc).access_fn(principal), transfer=transfer,
                                    transfer_refusal=refusal))
        self.deidentify = _deidentifier(svc, job)
        self.key = svc.keys.ensure(job.key_scope)  # before any transaction (it may create the key)
        self.counts: dict[str, int] = {}
        self.patients: set[str] = set()
        self.parts: list[dict[str, Any]] = []  # the spec's parts (`_parts`), set by run_export

    def export_type(self, rtype: str, progress: str) -> str | None:
        """Write one type's files; the job's final status when it ends early, else None."""
        files = _Files(self, rtype)
        elements = elements_for(rtype, self.job.spec.get("elements"))
        written: set[int] = set()  # with several parts: a row in two parts' compartments goes out once
        for part in self.parts:
            last_pk = 0
            while True:
                if self.stop is not None and self.stop.is_set():
                    return "interrupted"  # requeued by the next server (stale heartbeat)
                stored, scanned_to = self.retrying(partial(self._batch, rtype, part, last_pk))
                if len(self.parts) > 1:
                    stored = [st for st in stored if st.pk not in written]
                    written.update(st.pk for st in stored)
                self.patients.update(p for st in stored for p in st.patients)
                for item in stored:
                    files.add(self._line(item.body, rtype, elements))
                if rtype == "Patient":
                    self.patients.update(i.id for i in stored)
                if not scanned_to:
                    break
                last_pk = scanned_to
                beat = now_us()  # the same on a retry: a beat that got no answer may have landed
                if not self.retrying(partial(jobs.heartbeat, self.svc.engine, self.job, f"exporting {rtype} {progress}",
                                             beat)):
                    return "stopped"
        files.flush()
        return None

    def _batch(self, rtype: str, part: dict[str, Any], after_pk: int) -> tuple[list[Stored], int]:
        with read_connection(self.svc.engine) as conn:
            return self.gate.export_batch(conn, rtype, part, after_pk, BATCH)

    def retrying(self, call: Callable[[], T]) -> T:
        """`call()`, called again after a pause while the database is unavailable (a failover, a
        restart), for up to OUTAGE_SECONDS: the export goes on where it was instead of failing.
        Past STALE_HEARTBEAT_US another run may take the job over; this run's writes are fenced
        then (storage/export_jobs.py), so waiting longer cannot mix two runs' files."""
        deadline = time.monotonic() + OUTAGE_SECONDS
        noticed = False
        while True:
            try:
                return call()
            except Exception as exc:
                if (not database_unavailable(exc, self.svc.engine) or time.monotonic() >= deadline
                        or (self.stop is not None and self.stop.is_set())):
                    raise
                if not noticed:
                    log.warning("export %s: the database is unavailable (%s); waiting for it", self.job.id,
                                type(exc).__name__)
                    noticed = True
            time.sleep(RETRY_PAUSE_SECONDS)

    def end(self, status: str, code: int, desc: str, error: str | None = None) -> bool:
        """End the job as `status` with this run's audit record, in one transaction: the job is
        never complete without its record. False when the job is not this run's any more."""
        keep = self.svc.settings.export_expiry_seconds

        def once() -> bool:
            with self.svc.engine.begin() as conn:
                if jobs.finish(conn, self.job, status, error, keep):
                    self.svc.audit.append(conn, _record(self.job, code, self.counts, self.patients, desc))
                    return True
                return jobs.ended_by(conn, self.job, status)  # a retry: the first commit landed

        return self.retrying(once)

    def _line(self, body: bytes | None, rtype: str, elements: list[str] | None) -> bytes:
        """One NDJSON line: the resource as this caller may see it (an AuditEvent's values
        redacted unless they may see them, de-identified, cut to `_elements`), on one line."""
        body = body or b"{}"
        if rtype == "AuditEvent" and not self.principal.sees_audit_values:
            body = redact_body(body)
        if self.deidentify is not None or elements is not None:
            resource = parse_json(body)
            resource = self.deidentify(resource) if self.deidentify is not None else resource
            if elements is not None:  # mandatory elements kept, tagged SUBSETTED
                resource = apply_subsetting(resource, None, elements, self.svc.summary_elements)
            body = dump_json(resource)
        elif b"\n" in body:
            body = dump_json(parse_json(body))
        return body + b"\n"


class _Files:
    """A type's NDJSON lines, stored as files of at most `export_file_max_resources` lines."""

    def __init__(self, run: _Run, rtype: str) -> None:
        self.run, self.rtype = run, rtype
        self.per_file = run.svc.settings.export_file_max_resources
        self.lines: list[bytes] = []
        self.file_no = 0

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        if len(self.lines) >= self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        run = self.run
        self.file_no += 1
        name, lines = f"{self.rtype}-{self.file_no}.ndjson", self.lines
        run.retrying(lambda: jobs.add_file(run.svc.engine, run.job, run.key, name, self.rtype, lines))
        run.counts[self.rtype] = run.counts.get(self.rtype, 0) + len(self.lines)
        self.lines = []


def elements_for(rtype: str, elements: list[str] | None) -> list[str] | None:
    """The `_elements` of a kick-off that apply to `rtype`: `Type.element` for that type and bare
    `element` for every type (Bulk Data 2.0); None when the kick-off named none."""
    if not elements:
        return None
    return [e.split(".", 1)[1] if "." in e else e for e in elements
            if "." not in e or e.split(".", 1)[0] == rtype]


def _deidentifier(svc: Services, job: jobs.Job) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Safe Harbor transform with this export's pseudonym key (created before any transaction)."""
    if not job.spec.get("deidentify"):
        return None
    from ..exchange.deidentify import Deidentifier

    return Deidentifier.for_export(svc, job.id, job.client_id).apply


def _record(job: jobs.Job, status: int, counts: dict[str, int], patients: set[str], desc: str) -> AuditRecord:
    rec = AuditRecord(interaction="operation", request_id=f"export-{job.id}"[:64], network_address="",
                      recorded_us=now_us(), status=status, outcome_desc=desc[:500], client_id=job.client_id,
                      client_name=str(job.principal.get("client_name", "")), user=job.principal.get("fhir_user"))
    rec.subtype_code = ("http://hl7.org/fhir/restful-interaction", "operation", "bulk export run")
    rec.query = job.request
    rec.patients = sorted(patients)
    rec.purpose = list(job.principal.get("purpose") or [])
    return rec
