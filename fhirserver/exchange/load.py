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
import gzip
import hashlib
import json
import multiprocessing
import re
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    insert,
    select,
    update,
)

from ..audit.events import ENTITY_TYPE, AuditRecord
from ..clock import now_us
from ..config import Settings
from ..db.engine import read_connection
from ..db.schema import import_file, import_patient, resource
from ..fhir.errors import FhirError
from ..fhir.references import rewrite_references
from ..services import Services
from ..storage.codec import DuplicateKeyError, parse_json
from ..storage.repository import PreparedWrite, key_scope_for
from .bulk_load import analyze

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
NO_RESOURCE = "(entry without resource)"
MAX_REPORTED_INVALID = 100
MIN_PARALLEL_BYTES = 4 << 20  # below this, starting worker processes costs more than they save
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ID_NAMESPACE = uuid.UUID("5d0f7c84-8a0b-4c55-9f39-5b7cbe5e0b1a")
Echo = Callable[[str], None]
BatchHook = Callable[[Path, int], None]


class LoadError(Exception):
    """A path that cannot be loaded at all (unsupported file name)."""


def kept_types(svc: Services) -> frozenset[str]:
    """Types a load stores: the server's registry minus what only the server writes (AuditEvent)."""
    return frozenset(t.name for t in svc.types if not t.server_written
                     and (t.supports("create") or t.supports("update")))


# ---------------------------------------------------------------- reports
@dataclass
class FileReport:
    path: Path
    status: str = "loaded"  # loaded | resumed | restarted (changed since the interrupted run) | already loaded
    resumed_at: int = 0
    loaded: Counter[str] = field(default_factory=Counter)
    updated: int = 0  # of `loaded`, resources that existed already (a new version)
    skipped: Counter[str] = field(default_factory=Counter)
    invalid: int = 0

    def counts_json(self) -> str:
        return json.dumps({"loaded": dict(self.loaded), "updated": self.updated, "skipped": dict(self.skipped),
                           "invalid": self.invalid}, sort_keys=True)

    def restore(self, text: str) -> None:
        data = json.loads(text or "{}")
        self.loaded = Counter(data.get("loaded", {}))
        self.updated = int(data.get("updated", 0))
        self.skipped = Counter(data.get("skipped", {}))
        self.invalid = int(data.get("invalid", 0))

    def describe(self) -> str:
        parts = [f"loaded {_counts(self.loaded)}"]
        if self.updated:
            parts.append(f"{self.updated} updated")
        if self.skipped:
            parts.append(f"skipped {_counts(self.skipped)}")
        if self.invalid:
            parts.append(f"invalid {self.invalid}")
        return "; ".join(parts)


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)
    elapsed: float = 0.0
    invalid_messages: list[str] = field(default_factory=list)

    def total(self, name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for f in self.files:
            if f.status != "already loaded":
                out.update(getattr(f, name))
        return out

    @property
    def invalid(self) -> int:
        return sum(f.invalid for f in self.files if f.status != "already loaded")

    @property
    def loaded_total(self) -> int:
        return sum(self.total("loaded").values())

    @property
    def rate(self) -> float:
        return self.loaded_total / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        done = [f for f in self.files if f.status != "already loaded"]
        already = [f for f in self.files if f.status == "already loaded"]
        lines = [f"files: {len(done)} loaded" + (f", {len(already)} already loaded (skipped; --force reloads)"
                                                 if already else "")]
        for f in done:
            if f.status == "resumed":
                lines.append(f"resumed: {f.path} at item {f.resumed_at}")
            elif f.status == "restarted":
                lines.append(f"restarted: {f.path} changed since the interrupted run; loaded from the start")
        for f in already:
            lines.append(f"already loaded: {f.path}")
        loaded = self.total("loaded")
        updated = sum(f.updated for f in done)
        lines.append(f"loaded: {_counts(loaded)} (total {sum(loaded.values())}"
                     + (f", {updated} as new versions of existing resources)" if updated else ")"))
        skipped = self.total("skipped")
        lines.append(f"skipped (type not stored): {_counts(skipped) if skipped else 'none'}")
        lines.append(f"invalid: {self.invalid}")
        lines.append(f"elapsed: {self.elapsed:.1f} s, {self.rate:.0f} resources/s")
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


# ---------------------------------------------------------------- reading files
def discover(paths: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Files to load: given files, and files with a supported suffix under given directories
    (recursively, in sorted order), except those under `exclude` (the server's data directory:
    its key files are JSON too)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                              and not (exclude and p.is_relative_to(exclude))))
        elif _kind(path):
            out.append(path)
        else:
            raise LoadError(f"{path}: not a .json, .ndjson or .jsonl file (optionally .gz)")
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# An item is one candidate resource: (index in the file, payload, bytes of the file it accounts
# for). The payload is an NDJSON line (parsed by a worker), a resource from a Bundle (parsed and
# reference-rewritten here), or an error message (str) for an unusable entry.
Item = tuple[int, Any, int]


def _read_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Lines of an NDJSON file, streamed, with the bytes of the (compressed) file each advanced."""
    with path.open("rb") as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as gz:
                last = 0
                for line in gz:
                    pos = raw.tell()
                    yield line, pos - last
                    last = pos
        else:
            for line in raw:
                yield line, len(line)


def _read_json(path: Path) -> Any:
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        return parse_json(fh.read())


def derived_id(sha: str, index: int) -> str:
    """A stable id for a resource that has none: the same file loaded again (--force) updates
    these resources instead of creating duplicates."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{sha}:{index}"))


def _id_from_full_url(full_url: str, rtype: str) -> str | None:
    if full_url.startswith(("urn:uuid:", "urn:oid:")):
        candidate = full_url.split(":", 2)[2]
        return candidate if _ID.fullmatch(candidate) else None
    parts = full_url.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype and _ID.fullmatch(parts[-1]):
        return parts[-1]
    return None


def bundle_items(doc: Any, sha: str, size: int, kept: frozenset[str]) -> list[Item]:
    """A Bundle of any type: its entries' resources with ids assigned where missing (the
    urn:uuid of the fullUrl, else the id of an absolute fullUrl, else a derived id) and references
    to other entries' fullUrls rewritten to Type/id. A single resource: one item."""
    if not isinstance(doc, dict):
        return [(0, "the file is not a JSON object", size)]
    if doc.get("resourceType") != "Bundle":
        return [(0, doc, size)]
    entries = doc.get("entry") or []
    if not isinstance(entries, list):
        return [(0, "Bundle.entry is not a list", size)]
    mapping: dict[str, str] = {}
    resources: list[Any] = []
    for index, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        resources.append(res)
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            continue
        rtype = res["resourceType"]
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if not isinstance(res.get("id"), str):
            res["id"] = (_id_from_full_url(full_url, rtype) if full_url else None) or derived_id(sha, index)
        if full_url:
            mapping[full_url] = f"{rtype}/{res['id']}"
    share = size // max(len(entries), 1)
    items: list[Item] = []
    for index, res in enumerate(resources):
        nbytes = share + (size - share * len(entries) if index == len(entries) - 1 else 0)
        if res is None:
            items.append((index, None, nbytes))
            continue
        if isinstance(res, dict) and res.get("resourceType") in kept and mapping:
            res = rewrite_references(res, mapping)
        items.append((index, res, nbytes))
    return items or [(0, None, size)]


def iter_items(path: Path, sha: str, size: int, kept: frozenset[str], unit: list[str]) -> Iterator[Item]:
    """The file's items in order; `unit[0]` is set to what an index counts (for messages)."""
    if _kind(path) == "ndjson":
        unit[0] = "line"
        for index, (line, nbytes) in enumerate(_read_lines(path)):
            yield index, line, nbytes
        return
    unit[0] = "file"
    try:
        doc = _read_json(path)
    except DuplicateKeyError as exc:
        yield 0, f"the file repeats a property: {exc}", size
        return
    except (ValueError, UnicodeDecodeError, RecursionError, OSError, EOFError):
        yield 0, "the file is not valid JSON", size
        return
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" and isinstance(doc.get("entry"), list):
        unit[0] = "entry"
    yield from bundle_items(doc, sha, size, kept)


# ---------------------------------------------------------------- the CPU-heavy part
# An outcome: (index, kind, resource type or message, prepared write). kind: ok | skip | invalid | blank.
Outcome = tuple[int, str, str, PreparedWrite | None]


def prepare_items(svc: Services, kept: frozenset[str], sha: str, items: list[tuple[int, Any]]) -> list[Outcome]:
    """Parse, validate and prepare (labels, indexes, data key) one chunk of items."""
    out: list[Outcome] = []
    for index, payload in items:
        if payload is None:
            out.append((index, "skip", NO_RESOURCE, None))
            continue
        if isinstance(payload, str):
            out.append((index, "invalid", payload, None))
            continue
        res = payload
        if isinstance(payload, bytes):
            if not payload.strip():
                out.append((index, "blank", "", None))
                continue
            try:
                res = parse_json(payload)
            except DuplicateKeyError as exc:
                out.append((index, "invalid", f"the line repeats a property: {exc}", None))
                continue
            except (ValueError, UnicodeDecodeError, RecursionError):
                out.append((index, "invalid", "not valid JSON", None))
                continue
        if not isinstance(res, dict):
            out.append((index, "invalid", "not a JSON object", None))
            continue
        rtype = res.get("resourceType")
        if not isinstance(rtype, str):
            out.append((index, "invalid", "resourceType is missing", None))
            continue
        if rtype not in kept:
            out.append((index, "skip", rtype, None))
            continue
        if "id" not in res:
            res["id"] = derived_id(sha, index)
        try:
            svc.validator.validate(res, rtype)
            prepared = svc.repo.prepare(rtype, res)
        except FhirError as exc:
            issue = exc.issues[0]
            where = f" ({', '.join(issue.expression)})" if issue.expression else ""
            out.append((index, "invalid", f"{rtype}: {issue.diagnostics}{where}", None))
            continue
        out.append((index, "ok", rtype, prepared))
    return out


_WORKER: tuple[Services, frozenset[str]] | None = None


class _DeferredKeys:
    """Data keys as a worker's repository sees them: patient keys are left to the writer.

    A worker creating a new patient's key would need the database write lock, which the writer
    holds most of the time (on SQLite that serialized the workers behind every batch); the
    writer assigns them before its transaction instead (`_commit`). Other keys (the blind-index
    key of the indexer, the shared key) come from the real store."""

    def __init__(self, keys: Any) -> None:
        self._keys = keys

    def ensure(self, scope: str) -> tuple[int, bytes]:
        if scope.startswith("patient:"):
            return 0, b""
        return self._keys.ensure(scope)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._keys, name)


def _init_worker(settings: Settings) -> None:
    """Worker process: its own services (engine, validator, indexer); Ctrl-C is the main process's."""
    global _WORKER
    from ..services import build_services

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    svc = build_services(settings)
    svc.repo.keys = _DeferredKeys(svc.keys)  # type: ignore[assignment]
    _WORKER = (svc, kept_types(svc))


def _started() -> None:
    """A no-op task: submitting it starts a worker process (and its initializer) right away."""


def _worker_chunk(sha: str, items: list[tuple[int, Any]]) -> list[Outcome]:
    assert _WORKER is not None
    svc, kept = _WORKER
    out = prepare_items(svc, kept, sha, items)
    for outcome in out:
        prepared = outcome[3]
        if prepared is not None:
            prepared.key_id, prepared.key = 0, b""  # keys do not cross the pipe; the writer assigns them
    return out


# ---------------------------------------------------------------- writing
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
    bar: Any
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
