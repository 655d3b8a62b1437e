"""Bulk import of FHIR files (`fhirserver load`): Bundles (.json) and NDJSON (.ndjson), optionally
gzip-compressed, from files or directories.

Every resource goes through the write path of the REST API: validation, `repo.prepare` (consent
labels, search indexes, data key of its patient) and encryption at `create`/`update`. Only the
types the server stores are kept (the type registry, minus the server-written AuditEvent); the
others are counted and skipped. An invalid resource is reported and counted, never stored.

Resumable: each batch commits its resources together with the file's checkpoint row
(`import_file`: file identity = absolute path + size + SHA-256, items consumed, counts) in one
transaction, so data and checkpoint cannot disagree. A re-run skips finished files and continues
interrupted ones after the last committed item. The patients touched so far are kept in
`import_patient` (ids only, like the compartment table) so the file's AuditEvent names all of
them, and are removed when the file completes. No validation message is stored: diagnostics can
quote data values, and the database holds no clear-text data.

Audit: exactly one AuditEvent per file, appended in the transaction of the file's final batch
(fail closed: the file is not marked done without it). Resources committed by an interrupted run
are audited by the run that completes the file; until then the unfinished `import_file` row is
the record of the partial import.

Speed: the CPU-heavy part (JSON parsing, validation, labelling, indexing) runs in worker
processes (`workers`); the main process is the single writer: it assigns the data keys, encrypts,
and batches the "does this id exist" lookups into one query per type and batch. On two cores one
worker is best (~2,000 resources/s): the writer needs a core of its own, and a third busy process
only takes turns with it.
"""

from __future__ import annotations

import getpass
import hashlib
import multiprocessing
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import (
    Connection,
    delete,
    insert,
    select,
    update,
)

from ..audit.events import ENTITY_TYPE, AuditRecord
from ..clock import now_us
from ..db.engine import read_connection
from ..db.schema import import_file, import_patient, resource
from ..services import Services
from ..storage.repository import PreparedWrite, key_scope_for
from .load_prepare import Outcome, _init_worker, _started, _worker_chunk, kept_types, prepare_items
from .load_report import MAX_REPORTED_INVALID, FileReport, LoadReport
from .sources import discover, file_sha256, iter_items
from .statistics import analyze

MIN_PARALLEL_BYTES = 4 << 20  # below this, starting worker processes costs more than they save

if TYPE_CHECKING:
    from tqdm import tqdm


Echo = Callable[[str], None]
BatchHook = Callable[[Path, int], None]


# ---------------------------------------------------------------- reports
@dataclass
class _FileState:
    report: FileReport
    key: str
    sha: str
    size: int
    position: int = 0
    patients: set[str] = field(default_factory=set)
    recorded_patients: set[str] = field(default_factory=set)


def _path_key(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()


def _begin_file(svc: Services, path: Path, force: bool) -> _FileState:
    """Read the file's checkpoint (finished: status "already loaded"; interrupted: resume), or
    start it afresh (new file, changed file, --force)."""
    size = path.stat().st_size
    sha = file_sha256(path)
    key = _path_key(path)
    report = FileReport(path)
    with read_connection(svc.engine) as conn:
        row = conn.execute(select(import_file).where(import_file.c.key == key)).first()
        if row is not None and row.sha256 == sha and row.size == size and not force:
            if row.done:
                report.status = "already loaded"
                report.restore(row.counts)
                return _FileState(report, key, sha, size, position=row.position)
            state = _FileState(report, key, sha, size, position=int(row.position))
            report.restore(row.counts)
            report.status, report.resumed_at = "resumed", state.position
            state.recorded_patients = set(conn.execute(
                select(import_patient.c.patient_id).where(import_patient.c.file_key == key)).scalars())
            state.patients = set(state.recorded_patients)
            return state
    if row is not None and not row.done and row.sha256 != sha and not force:
        report.status = "restarted"
    when = now_us()
    with svc.engine.begin() as conn:
        conn.execute(delete(import_patient).where(import_patient.c.file_key == key))
        conn.execute(delete(import_file).where(import_file.c.key == key))
        conn.execute(insert(import_file).values(key=key, path=str(path), sha256=sha, size=size, position=0,
                                                counts=report.counts_json(), done=False, started_us=when,
                                                updated_us=when, completed_us=None))
    return _FileState(report, key, sha, size)


def _existing(conn: Connection, prepared: list[PreparedWrite]) -> set[tuple[str, str]]:
    """Which (type, id) of a batch exist already: one query per type instead of one per resource."""
    by_type: dict[str, list[str]] = {}
    for p in prepared:
        by_type.setdefault(p.type, []).append(p.id)
    found: set[tuple[str, str]] = set()
    for rtype, ids in by_type.items():
        rows = conn.execute(select(resource.c.id).where(resource.c.type == rtype, resource.c.id.in_(ids)))
        found.update((rtype, rid) for rid in rows.scalars())
    return found


def _audit_record(state: _FileState) -> AuditRecord:
    report = state.report
    rec = AuditRecord(interaction="create", request_id=f"import-{uuid.uuid4().hex}", network_address="localhost",
                      recorded_us=now_us(), status=400 if report.invalid else 201)
    rec.subtype_code = ("http://hl7.org/fhir/restful-interaction", "create", "import")
    rec.outcome_desc = f"import of {report.path.name}: {report.describe()}"
    rec.patients = sorted(state.patients)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    rec.extra_entities = [{
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "name": report.path.name,
        "description": "imported file",
        "detail": [{"type": "path", "valueString": str(report.path)},
                   {"type": "sha256", "valueString": state.sha},
                   {"type": "os-user", "valueString": user}],
    }]
    return rec


def _commit(svc: Services, state: _FileState, batch: list[PreparedWrite], position: int, final: bool,
            on_batch: BatchHook | None) -> None:
    """One transaction: the batch's resources, the checkpoint and (final batch) the AuditEvent."""
    report = state.report
    for p in batch:
        if not p.key:  # prepared by a worker: the key of the same scope `repo.prepare` uses
            p.key_id, p.key = svc.keys.ensure(key_scope_for(p.type, p.index.patients))
        state.patients.update(p.index.patients)
    new_patients = sorted(state.patients - state.recorded_patients)
    if final:
        svc.keys.ensure("audit")  # the AuditEvent's key exists before the write lock is taken
    rec = None
    with svc.engine.begin() as conn:
        exists = _existing(conn, batch)
        updated = 0
        creates: list[PreparedWrite] = []  # new ids, inserted set-wise until one must be updated
        for p in batch:
            if (p.type, p.id) in exists:
                svc.repo.create_many(conn, creates)
                creates = []
                svc.repo.update(conn, p)
                updated += 1
            else:
                creates.append(p)
                exists.add((p.type, p.id))
            report.loaded[p.type] += 1
        svc.repo.create_many(conn, creates)
        report.updated += updated
        if final:
            rec = _audit_record(state)
            conn.execute(delete(import_patient).where(import_patient.c.file_key == state.key))
        elif new_patients:
            conn.execute(insert(import_patient), [{"file_key": state.key, "patient_id": pid} for pid in new_patients])
        when = now_us()
        conn.execute(update(import_file).where(import_file.c.key == state.key).values(
            position=position, counts=report.counts_json(), updated_us=when, done=final,
            completed_us=when if final else None))
        if rec is not None:
            svc.audit.append(conn, rec)
        if on_batch is not None:
            on_batch(report.path, position)
    if not final:
        state.recorded_patients.update(new_patients)
    state.position = position


# ---------------------------------------------------------------- driver
def load_paths(svc: Services, paths: Iterable[Path | str], *, batch: int = 500, workers: int = 0,
               force: bool = False, progress: bool | None = None, echo: Echo | None = None,
               on_batch: BatchHook | None = None, min_parallel_bytes: int = MIN_PARALLEL_BYTES) -> LoadReport:
    """Load files and directories; see the module docstring.

    `workers` >= 1 prepares resources in that many processes when the input has at least
    `min_parallel_bytes` (starting them costs more than small inputs gain); 0: in this process. `progress`: None shows
    the bar on a terminal only. `echo` receives the invalid-resource messages (default: stderr).
    `on_batch(path, position)` runs inside each batch's transaction just before its commit."""
    from tqdm import tqdm

    started = time.perf_counter()
    files = discover((Path(p).resolve() for p in paths), svc.settings.data_dir.resolve())
    kept = kept_types(svc)
    report = LoadReport()
    bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, unit_divisor=1024,
               desc="load", dynamic_ncols=True, disable=True if progress is False else None)
    say = echo or (lambda message: tqdm.write(message, file=sys.stderr))
    pool: ProcessPoolExecutor | None = None
    if workers >= 1 and bar.total >= min_parallel_bytes:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(svc.settings,))
        for _ in range(workers):  # start them now: they build their services while we hash the files
            pool.submit(_started)
    try:
        for path in files:
            state = _begin_file(svc, path, force)
            report.files.append(state.report)
            if state.report.status == "already loaded":
                bar.update(state.size)
                continue
            _load_file(svc, kept, state, _Run(batch, pool, workers, bar, say, report, on_batch))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if report.loaded_total:
        analyze(svc.engine)
    report.elapsed = time.perf_counter() - started
    return report


@dataclass
class _Run:
    batch: int
    pool: ProcessPoolExecutor | None
    workers: int
    bar: tqdm[NoReturn]  # progress in bytes (shown on a terminal only)
    say: Echo
    report: LoadReport
    on_batch: BatchHook | None


def _load_file(svc: Services, kept: frozenset[str], state: _FileState, run: _Run) -> None:
    """Stream one file's items through the preparers (in order) and commit them in batches."""
    path, sha, bar, rep = state.report.path, state.sha, run.bar, state.report
    chunk_size = run.batch // -(-run.batch // 100)  # at most 100 items, dividing the batch evenly
    unit = ["item"]
    items = iter_items(path, sha, state.size, kept, unit)

    def chunks() -> Iterator[tuple[list[tuple[int, Any]], int]]:
        chunk: list[tuple[int, Any]] = []
        nbytes = 0
        for index, payload, size in items:
            if index < state.position:  # committed by an earlier run
                bar.update(size)
                continue
            if isinstance(payload, dict) and isinstance(payload.get("resourceType"), str) \
                    and payload["resourceType"] not in kept:
                payload = {"resourceType": payload["resourceType"]}  # skipped anyway: ship no more
            chunk.append((index, payload))
            nbytes += size
            if len(chunk) >= chunk_size:
                yield chunk, nbytes
                chunk, nbytes = [], 0
        if chunk:
            yield chunk, nbytes

    source = chunks()
    in_flight: deque[tuple[Future[list[Outcome]] | list[Outcome], int]] = deque()

    def submit() -> bool:
        nxt = next(source, None)
        if nxt is None:
            return False
        chunk, nbytes = nxt
        if run.pool is None:
            in_flight.append((prepare_items(svc, kept, sha, chunk), nbytes))
        else:
            in_flight.append((run.pool.submit(_worker_chunk, sha, chunk), nbytes))
        return True

    depth = 1 if run.pool is None else 2 * (run.workers + 1)  # keep every worker busy while we write
    while len(in_flight) < depth and submit():
        pass
    pending: list[PreparedWrite] = []
    consumed = 0  # items since the last commit
    position = state.position
    while in_flight:
        head, nbytes = in_flight.popleft()
        outcomes = head.result() if isinstance(head, Future) else head
        submit()
        for index, kind, what, prepared in outcomes:
            position = index + 1
            consumed += 1
            if kind == "ok":
                assert prepared is not None
                pending.append(prepared)
            elif kind == "skip":
                rep.skipped[what] += 1
            elif kind == "invalid":
                rep.invalid += 1
                where = "file" if unit[0] == "file" else f"{unit[0]} {index + 1 if unit[0] == 'line' else index}"
                messages = run.report.invalid_messages
                messages.append(f"invalid: {path}: {where}: {what}")
                if len(messages) <= MAX_REPORTED_INVALID:
                    run.say(messages[-1])
                elif len(messages) == MAX_REPORTED_INVALID + 1:
                    run.say("invalid: (more invalid resources are counted but not listed)")
        bar.update(nbytes)
        if consumed >= run.batch and in_flight:
            _commit(svc, state, pending, position, False, run.on_batch)
            pending, consumed = [], 0
            bar.set_postfix_str(f"{run.report.loaded_total} resources", refresh=False)
    _commit(svc, state, pending, position, True, run.on_batch)
    bar.set_postfix_str(f"{run.report.loaded_total} resources", refresh=False)
