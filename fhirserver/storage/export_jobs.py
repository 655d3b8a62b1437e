"""Export job lifecycle in the database: queued -> running -> complete | failed | cancelled.

Every state change is one conditional UPDATE, so any number of worker threads (in any number of
server processes) can poll the same table: only one wins a job. On PostgreSQL the claim first
locks its candidate with `FOR UPDATE SKIP LOCKED`, so instances polling together each take a
different job instead of queueing on one row (no queue library: exports are rare, long jobs whose
state must sit in the same database, and transactions, as their data; see docs/scaling.md). A
running job whose heartbeat stopped (its server died) is queued again and redone from the start.

A run owns its job by the job's `heartbeat_us` (a fencing token, as a lease holder's epoch): the
claim sets it, each heartbeat moves it on from the value the run last wrote, and a file or the
end is written only while it still holds that value. A run that was taken for dead (paused past
STALE_HEARTBEAT_US, or cut off from the database) and whose job another run has claimed since
therefore writes nothing more: without that, its files would land beside the new run's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, delete, insert, select, update

from ..clock import now_us
from ..crypto.cipher import open_sealed, seal
from ..crypto.datakeys import DataKeyStore
from ..db.engine import read_connection, transaction
from ..db.rows import AnyRow
from ..db.schema import data_key, export_file, export_job

STALE_HEARTBEAT_US = 30 * 1_000_000


class NotOwner(Exception):
    """The job was cancelled, deleted or claimed by another run since this run last wrote it."""


@dataclass
class Job:
    id: str
    client_id: str
    status: str
    request: str
    spec: dict[str, Any]
    principal: dict[str, Any]
    progress: str | None
    error: str | None
    transaction_us: int
    expires_us: int | None
    beat: int | None = None  # heartbeat_us as this run last wrote it: its claim on the job

    @classmethod
    def from_row(cls, row: AnyRow) -> Job:
        return cls(row.id, row.client_id, row.status, row.request, json.loads(row.spec), json.loads(row.principal),
                   row.progress, row.error, row.transaction_us, row.expires_us, row.heartbeat_us)

    @property
    def key_scope(self) -> str:
        return f"export:{self.id}"


def create_job(conn: Connection, client_id: str, request: str, spec: dict[str, Any],
               principal: dict[str, Any]) -> str:
    job_id = secrets.token_urlsafe(18)
    now = now_us()
    conn.execute(insert(export_job).values(
        id=job_id, client_id=client_id, status="queued", request=request, spec=json.dumps(spec),
        principal=json.dumps(principal), transaction_us=now, created_us=now))
    return job_id


def get_job(conn: Connection, job_id: str) -> Job | None:
    row = conn.execute(select(export_job).where(export_job.c.id == job_id)).first()
    return Job.from_row(row) if row else None


def claim_next(engine: Engine) -> Job | None:
    """Take one queued job (or one whose worker stopped beating), atomically."""
    now = now_us()
    with read_connection(engine) as conn:
        rows = conn.execute(select(export_job.c.id, export_job.c.status).where(
            (export_job.c.status == "queued")
            | ((export_job.c.status == "running") & (export_job.c.heartbeat_us < now - STALE_HEARTBEAT_US))
        ).order_by(export_job.c.created_us).limit(5)).all()
    for row in rows:
        with transaction(engine) as conn:
            cond = export_job.c.status == row.status
            if row.status == "running":
                cond = cond & (export_job.c.heartbeat_us < now - STALE_HEARTBEAT_US)
            if conn.dialect.name == "postgresql":
                mine = conn.execute(select(export_job.c.id).where(export_job.c.id == row.id, cond)
                                    .with_for_update(skip_locked=True)).first()
                if mine is None:
                    continue  # another instance holds or took it
            res = conn.execute(update(export_job).where(export_job.c.id == row.id, cond)
                               .values(status="running", heartbeat_us=now, progress="starting"))
            if res.rowcount == 1:
                conn.execute(delete(export_file).where(export_file.c.job_id == row.id))  # a restart redoes it all
                return get_job(conn, row.id)
    return None


def heartbeat(engine: Engine, job: Job, progress: str, beat: int) -> bool:
    """Record progress and move the job's beat on to `beat`; False when the job was cancelled,
    deleted or claimed by another run meanwhile. Retrying after a commit that got no answer,
    pass the same `beat`: a beat already moved there was this run's own."""
    with transaction(engine) as conn:
        res = conn.execute(update(export_job).where(export_job.c.id == job.id, export_job.c.status == "running",
                                                    export_job.c.heartbeat_us.in_((job.beat, beat)))
                           .values(heartbeat_us=beat, progress=progress[:200]))
    if res.rowcount != 1:
        return False
    job.beat = beat
    return True


def _held(job: Job, status: str = "running") -> ColumnElement[bool]:
    """`job`'s row in `status` under this run's beat (the fencing token it last wrote)."""
    return and_(export_job.c.id == job.id, export_job.c.status == status, export_job.c.heartbeat_us == job.beat)


def _owned(conn: Connection, job: Job) -> bool:
    """Whether `job` is still running under this run's beat. The row stays share-locked
    (PostgreSQL) until the transaction ends: a claim, which updates it, waits for this write to
    commit and then deletes its file with the others; it cannot slip in between check and write."""
    return conn.execute(select(export_job.c.id).where(_held(job)).with_for_update(read=True)).first() is not None


def add_file(engine: Engine, job: Job, key: tuple[int, bytes], name: str, rtype: str, lines: list[bytes]) -> None:
    """Store one output file. NotOwner when the job was cancelled (by its client, or by a
    patient's erasure) or claimed by another run: it gets no more files from this one. A file of
    this name already there is this run's own (a retry after a commit that got no answer: a
    claim deletes every earlier run's files)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key_id, raw = key
    body = seal(AESGCM(raw), b"".join(lines), f"export/{job.id}/{name}".encode())
    with transaction(engine) as conn:
        if not _owned(conn, job):
            raise NotOwner(job.id)
        there = conn.execute(select(export_file.c.name).where(export_file.c.job_id == job.id,
                                                              export_file.c.name == name)).first()
        if there is None:
            conn.execute(insert(export_file).values(job_id=job.id, name=name, type=rtype, count=len(lines),
                                                    key_id=key_id, body=body))


def read_file(conn: Connection, keys: DataKeyStore, job_id: str, name: str) -> bytes | None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    row = conn.execute(select(export_file).where(export_file.c.job_id == job_id, export_file.c.name == name)).first()
    if row is None:
        return None
    return open_sealed(AESGCM(keys.by_id(row.key_id, conn)), row.body, f"export/{job_id}/{name}".encode())


def files_of(conn: Connection, job_id: str) -> list[Any]:
    return list(conn.execute(select(export_file.c.name, export_file.c.type, export_file.c.count)
                             .where(export_file.c.job_id == job_id).order_by(export_file.c.name)).all())


def finish(conn: Connection, job: Job, status: str, error: str | None = None, keep_seconds: int = 3600) -> bool:
    """End the job as `status` in `conn`'s transaction (the caller writes its audit record there
    too); False when it is not this run's any more (nothing is changed). A retry after a commit
    that got no answer finds the job ended by this run and is told so by `ended_by`."""
    now = now_us()
    res = conn.execute(update(export_job).where(_held(job)).values(
        status=status, error=error, completed_us=now, progress=None, expires_us=now + keep_seconds * 1_000_000))
    return res.rowcount == 1


def ended_by(conn: Connection, job: Job, status: str) -> bool:
    """Whether this run (its beat) already ended `job` as `status`."""
    return conn.execute(select(export_job.c.id).where(_held(job, status))).first() is not None


def cancel(conn: Connection, job_id: str) -> None:
    """Cancel a job and shred its output now (a running worker notices at its next heartbeat)."""
    conn.execute(update(export_job).where(export_job.c.id == job_id).values(status="cancelled", expires_us=now_us()))
    _shred(conn, job_id)


def _shred(conn: Connection, job_id: str) -> None:
    conn.execute(delete(export_file).where(export_file.c.job_id == job_id))
    # the output key, and the pseudonym key of a de-identified export: once it is gone, not even
    # this server can link that export's pseudonyms back to patients
    conn.execute(delete(data_key).where(data_key.c.scope.in_((f"export:{job_id}", f"pseudonym:export:{job_id}"))))


def expire(engine: Engine) -> int:
    """Delete finished jobs past their expiry time with their files and key; returns how many."""
    now = now_us()
    with read_connection(engine) as conn:
        ids = conn.execute(select(export_job.c.id).where(export_job.c.expires_us < now,
                                                         export_job.c.status != "running")).scalars().all()
    for job_id in ids:
        with transaction(engine) as conn:
            _shred(conn, job_id)
            conn.execute(delete(export_job).where(export_job.c.id == job_id))
    return len(ids)
