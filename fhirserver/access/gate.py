"""The access gate: the repository bound to one caller's access (docs/architecture.md).

The authorize and consent stages turn a caller into `Access` -- SQL predicates per permission --
and the pipeline gives each request one `AccessGate` over it. Every read a handler makes goes
through a method here, which ANDs the predicates into the one statement that fetches the rows
and returns, with each row, the patients whose compartments hold it (`Stored.patients`, what the
access record names). A row the caller may not see is never decrypted or returned: it is absent
(`NotFound`), or refused as the read refuses it (`TransferRefused`, the cross-border rule).
Inside a request nothing else may read stored content (`db/guard.py`): the gate's reads run
`bound`. The export worker binds a gate to a job's caller the same way (bulk/export.py), and the
subscription dispatcher to a subscription's owner (notify/dispatcher.py).

Over 400 lines as one module on purpose: it is the whole list of ways to read stored rows, and a
reviewer checks access by reading this one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, FromClause, and_, false, or_, select

from ..audit.records import AuditLog
from ..db import guard
from ..db.compiled import CompiledStatements
from ..db.schema import idx_token, resource
from ..fhir.errors import FhirError
from ..search.compiler import QueryCompiler
from ..search.executor import run_search
from ..search.lastn import lastn_pks
from ..search.model import AccessFn, Include, ParsedSearch, SearchPage
from ..search.params import ParamRegistry
from ..search.parser import parse_search
from ..search.sources import is_access_records, source_of
from ..storage.codec import parse_json
from ..storage.errors import Deleted, NotFound, StorageError, TransferRefused
from ..storage.includes import resolve_includes
from ..storage.repository import Head, PreparedWrite, Repository, Stored
from . import statements as sql

Predicates = list[ColumnElement[bool]]
TransferFn = Callable[[FromClause], ColumnElement[bool]]


@dataclass(frozen=True)
class EventRef:
    """One subscription event to check (`AccessGate.events`): the row, the version it
    announces, and the subscription's patient filter (empty: any patient)."""

    pk: int
    id: str
    version: int
    patients: tuple[str, ...] = ()


def _deny() -> Predicates:
    return [false()]


@dataclass
class Access:
    """The row predicates the authorize and consent stages granted a request, per permission.

    A permission the stages did not grant matches no row (fail closed). An empty list means
    unrestricted. `others` gives the predicates for reading other types (chains, `_has`,
    includes, `$everything`), None where the caller may not read that type; `transfer` the
    cross-border rule's predicate, when it applies, with `transfer_refusal` the read's 403 text."""

    read: Predicates = field(default_factory=_deny)  # read, vread, history
    search: Predicates = field(default_factory=_deny)  # search and operations, conditional matches
    create: Predicates = field(default_factory=_deny)
    update: Predicates = field(default_factory=_deny)
    delete: Predicates = field(default_factory=_deny)
    may_create: bool = False  # an update may create (update-as-create needs create permission)
    consent_read: Predicates = field(default_factory=_deny)  # a writer's consent view of the type's rows
    provenance: Predicates = field(default_factory=_deny)  # an X-Provenance the writer sends
    patient_rows: Predicates = field(default_factory=_deny)  # the Patient rows a writer's consent lets it see
    patient_ids: list[str] | None = field(default_factory=list)  # the scopes' compartments (None: not confined)
    others: AccessFn | None = None
    history_types: dict[str, Predicates] = field(default_factory=dict)  # system history: the types it may read
    transfer: TransferFn | None = None
    transfer_refusal: str = ""


def _no_others(rtype: str, res: FromClause) -> Predicates | None:
    return None


class AccessGate:
    def __init__(self, access: Access, repo: Repository, audit: AuditLog, compiler: QueryCompiler,
                 params: ParamRegistry, types: Sequence[str], statements: CompiledStatements) -> None:
        self.access = access
        self.statements = statements  # the Services' kept compiled statements
        self.repo = repo
        self.audit = audit
        self.compiler = compiler
        self.params = params
        self.types = list(types)
        self.others: AccessFn = access.others or _no_others

    # ------------------------------------------------------------------ refusals
    def _refuse(self, conn: Connection, pk: int, rtype: str, what: str) -> Exception:
        """The read's refusal of a hidden row: the cross-border rule's 403 where that is what
        hides it, else absent (404)."""
        transfer = self.access.transfer
        if transfer is not None and not self.holds(conn, pk, [transfer(source_of(rtype).res)], rtype):
            return TransferRefused(self.access.transfer_refusal)
        return NotFound(f"{what} is not known")

    def holds(self, conn: Connection, pk: int, preds: Predicates, rtype: str | None = None) -> bool:
        """Row `pk` (one this request wrote or addressed) passes `preds`."""
        if not preds:
            return True
        res = source_of(rtype).res if rtype else resource
        return self.statements.first(conn, ("holds", res, len(preds)), preds,
                                     lambda: sql.shown(preds, res), {"pk": pk}) is not None

    # ------------------------------------------------------------------ one resource
    def read(self, conn: Connection, rtype: str, rid: str, version: int | None = None,
             preds: Predicates | None = None) -> Stored:
        """The current (or given) version the caller may see; NotFound when absent or hidden,
        TransferRefused where the cross-border rule hides it, Deleted when it is deleted."""
        preds = self.access.read if preds is None else preds
        if is_access_records(rtype):
            return self.record(conn, rid, preds, version)
        transfer = self.access.transfer(resource) if self.access.transfer is not None else None
        versioned = version is not None
        params = {"t": rtype, "id": rid, "v": version}
        # compiled once per predicate shape, run on the cursor (db/compiled.py)
        row = self.statements.first(conn, ("read", versioned, len(preds)), [*preds, transfer],
                                    lambda: sql.read_row(conn.dialect.name, preds, transfer, versioned), params)
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if not row.shown:
            raise TransferRefused(self.access.transfer_refusal) if not row.transfer_ok else \
                NotFound(f"{rtype}/{rid} is not known")
        if row.version is None:
            raise NotFound(f"{rtype}/{rid}/_history/{version if version is not None else row.current} is not known")
        with guard.bound():
            stored = self.repo.open_row(rtype, rid, row, conn)
        stored.patients = sql.split_patients(row.patients)
        if stored.deleted:
            raise Deleted(f"{rtype}/{rid} has been deleted", etag=stored.etag)
        if version is not None and preds and not self._version_visible(conn, stored, preds):
            raise NotFound(f"{rtype}/{rid}/_history/{version} is not known")
        return stored

    def record(self, conn: Connection, rid: str, preds: Predicates, version: int | None = None) -> Stored:
        """An access record, rendered as its AuditEvent (records have one version)."""
        with guard.bound():
            stored = self.audit.read(conn, rid)
        if stored is None or version not in (None, 1) or not self.holds(conn, stored.pk, preds, "AuditEvent"):
            raise NotFound(f"AuditEvent/{rid} is not known")
        stored.patients = self.compartments_by_pk(conn, "AuditEvent", [stored.pk]).get(stored.pk, ())
        return stored

    def patient(self, conn: Connection, pid: str, preds: Predicates | None = None) -> Stored:
        """The current Patient `pid` the caller may see (by `preds`, default its search access)."""
        try:
            return self.read(conn, "Patient", pid, preds=self.access.search if preds is None else preds)
        except Deleted:
            raise NotFound(f"Patient/{pid} is not known") from None

    def _version_visible(self, conn: Connection, stored: Stored, preds: Predicates) -> bool:
        """Would this (older) version pass `preds` if it were current? Evaluated by the database:
        inside a savepoint the resource's index rows are replaced by the version's, the same
        predicates are checked, and the savepoint is rolled back."""
        if stored.body is None:
            return True  # a deletion marker reveals no content
        savepoint = conn.begin_nested()
        try:
            self.repo.reindex(conn, stored.pk, stored.type, parse_json(stored.body))
            return self.holds(conn, stored.pk, preds)
        finally:
            savepoint.rollback()

    # ------------------------------------------------------------------ writes
    def write_target(self, conn: Connection, rtype: str, rid: str, scope: Predicates, lock: bool = False) -> Head | None:
        """The current row a write would change, or None when there is none. A live row the caller
        may not see -- its write `scope` and its consent read view AND-ed -- refuses the write
        exactly as a read of it is refused."""
        with guard.bound():
            head = self.repo.current(conn, rtype, rid, lock=lock)
        if head is not None and not head.deleted and not self.holds(conn, head.pk, [*scope, *self.access.consent_read]):
            raise self._refuse(conn, head.pk, rtype, f"{rtype}/{rid}")
        return head

    def check_compartments(self, conn: Connection, prepared: PreparedWrite, present: frozenset[str]) -> None:
        """The written content adds to no patient's record the caller may not see: every patient
        whose compartment it joins lies within the scopes' compartments, and a stored Patient
        passes the caller's consent view of Patients (the cross-border rule included). Otherwise
        the write is refused as reading that Patient is, naming no patient. `present`: Patients
        a transaction creates in its other entries. References to patients not stored here are
        allowed (HL7's own examples carry them; docs/consent.md)."""
        wanted = [p for p in prepared.index.patients if not (prepared.type == "Patient" and p == prepared.id)
                  and p not in present]
        if not wanted:
            return
        unknown = FhirError(404, "not-found", f"The {prepared.type} belongs to the record of a patient who is not "
                                              "known", [prepared.type])
        confined = self.access.patient_ids
        if confined is not None and any(p not in confined for p in wanted):
            raise unknown  # outside the token's compartments, whether that patient is stored or not
        if not self.access.patient_rows:
            return  # the caller's view of Patients is unrestricted: every stored one is shown
        preds = self.access.patient_rows
        for pid in wanted:  # one kept statement (db/compiled.py), run per patient: a write names one or two
            row = self.statements.first(conn, ("patient-shown", len(preds)), preds,
                                        lambda: sql.live_patient_shown(preds), {"pid": pid})
            if row is not None and not row.shown:
                refusal = self._refuse(conn, row.pk, "Patient", "Patient")
                raise refusal if isinstance(refusal, TransferRefused) else unknown

    # ------------------------------------------------------------------ many resources
    def load(self, conn: Connection, rtype: str, pks: list[int]) -> list[Stored]:
        """Current versions of rows a gated statement of this request selected (in that order),
        with their patients."""
        if not pks:
            return []
        if is_access_records(rtype):
            with guard.bound():
                records = self.audit.load(conn, pks)
            patients = self.compartments_by_pk(conn, rtype, pks)
            for st in records:
                st.patients = patients.get(st.pk, ())
            return records
        by_pk: dict[int, Stored] = {}
        with guard.bound():
            for row in conn.execute(sql.current_rows(conn.dialect.name, pks)).all():
                stored = self.repo.open_row(row.type, row.id, row, conn)
                stored.patients = sql.split_patients(row.patients)
                by_pk[row.pk] = stored
        return [by_pk[pk] for pk in pks if pk in by_pk]

    def search(self, conn: Connection, parsed: ParsedSearch, preds: Predicates | None = None,
               extra: Sequence[ColumnElement[bool]] = ()) -> tuple[SearchPage, list[Stored]]:
        """One page of a search (its total exact over visible rows) and its rows."""
        with guard.bound():
            page = run_search(conn, parsed, self.compiler, self.access.search if preds is None else preds,
                              self.others, extra)
        return page, self.load(conn, parsed.resource_type, page.pks)

    def includes(self, conn: Connection, includes: list[Include], matches: list[Stored]) -> list[Stored]:
        """`_include` / `_revinclude` targets of a page, each through the caller's access."""
        with guard.bound():
            return resolve_includes(conn, self.load, self.types, self.others, includes, matches)

    def matches(self, conn: Connection, rtype: str, query: list[tuple[str, str]], limit: int = 2) -> list[tuple[int, str]]:
        """(pk, id) of the resources a conditional interaction's query matches, visible ones only."""
        return self._matching(conn, rtype, query, self.access.search, limit)

    def referenced(self, conn: Connection, rtype: str, query: list[tuple[str, str]]) -> list[tuple[int, str]]:
        """(pk, id) of up to two `rtype` resources a conditional reference's query matches, among
        those the caller may search (a type it may not search matches nothing: the reference
        then fails as an unmatched one does, revealing nothing)."""
        if is_access_records(rtype):
            return []  # access records are not reference targets
        preds = self.others(rtype, source_of(rtype).res)
        return [] if preds is None else self._matching(conn, rtype, query, preds, 2)

    def _matching(self, conn: Connection, rtype: str, query: list[tuple[str, str]], preds: Predicates,
                  limit: int) -> list[tuple[int, str]]:
        parsed = parse_search(self.params, rtype, query, limit, limit, strict=True)
        if not parsed.clauses:
            raise FhirError(400, "invalid", "A conditional request needs at least one search parameter")
        parsed.total = "none"
        with guard.bound():
            pks = run_search(conn, parsed, self.compiler, preds, self.others).pks
        ids = dict(conn.execute(select(resource.c.pk, resource.c.id).where(resource.c.pk.in_(pks))).all()) if pks else {}
        return [(pk, str(ids[pk])) for pk in pks]

    def everything(self, conn: Connection, pid: str, parsed: ParsedSearch, types: Sequence[str],
                   since_us: int | None) -> tuple[SearchPage, list[Stored]]:
        """A page of Patient/`pid`/$everything: the Patient and its compartment, per type through
        the caller's access for that type."""
        allowed = []
        for t in types:
            if is_access_records(t):
                continue  # the audit trail about a patient is not part of their record
            preds = self.others(t, resource)
            if preds is not None:
                allowed.append(and_(resource.c.type == t, *preds))
        extra = [sql.in_compartment(pid), or_(*allowed) if allowed else false()]
        if since_us is not None:
            extra.append(resource.c.last_updated_us >= since_us)
        return self.search(conn, parsed, [], extra)

    def lastn(self, conn: Connection, parsed: ParsedSearch, max_n: int, limit: int) -> list[Stored]:
        with guard.bound():
            pks = lastn_pks(conn, parsed, self.compiler, self.others, max_n, limit)
        return self.load(conn, "Observation", pks)

    def newest(self, conn: Connection, pid: str, rtype: str, category: tuple[str, str] | None,
               limit: int) -> list[Stored]:
        """The `limit` most recently written `rtype` resources of Patient/`pid` the caller may see
        (of a category: `(system, code)`), newest first."""
        preds = self.others(rtype, resource)
        if preds is None:
            return []
        stmt = (select(resource.c.pk).where(resource.c.type == rtype, resource.c.deleted.is_(False),
                                            sql.in_compartment(pid), *preds)
                .order_by(resource.c.last_updated_us.desc()).limit(limit))
        if category is not None:
            tok = idx_token.alias()
            stmt = stmt.where(select(tok.c.resource_pk).where(and_(
                tok.c.resource_pk == resource.c.pk, tok.c.param == "category", tok.c.code == category[1],
                tok.c.system == category[0])).exists())
        return self.load(conn, rtype, list(conn.execute(stmt).scalars()))

    def history(self, conn: Connection, rtype: str | None, rid: str | None, since_us: int | None, count: int,
                cursor: int | None, at: tuple[int, int] | None = None) -> tuple[list[tuple[int, Stored]], int | None]:
        """A page of instance (`rid`), type or system (`rtype` None: every type in
        `access.history_types`) history, newest first, of versions the caller may see, and the
        version pk the next page starts after (None: no more). Each version's patients are its
        resource's compartments."""
        if rtype is None:
            allowed = self.access.history_types  # each readable type, with its own predicates
            if not allowed:
                return [], None
            access = [or_(*[and_(resource.c.type == t, *preds) for t, preds in allowed.items()])]
        else:
            allowed = {rtype: self.access.read}
            access = self.access.read
        with guard.bound():
            if rtype is not None and rid is not None:
                head = self.repo.current(conn, rtype, rid)
                if head is None:
                    raise NotFound(f"{rtype}/{rid} is not known")
                if not self.holds(conn, head.pk, access):
                    raise self._refuse(conn, head.pk, rtype, f"{rtype}/{rid}")
                rows = self.repo.history(conn, rtype, head.pk, since_us, count + 1, cursor, at=at)
            else:
                rows = self.repo.history(conn, rtype, None, since_us, count + 1, cursor, access=access, at=at)
        after = rows[count - 1][0] if len(rows) > count else None
        # earlier versions may not have matched the predicates: each is checked as itself
        page = [(v, st) for v, st in rows[:count]
                if not allowed[st.type] or self._version_visible(conn, st, allowed[st.type])]
        # system history holds resource-table rows only: any of its types names their compartments
        comps = self.compartments_by_pk(conn, rtype or "Patient", sorted({st.pk for _v, st in page}))
        for _v, st in page:
            st.patients = comps.get(st.pk, ())
        return page, after

    def events(self, conn: Connection, rtype: str, wanted: Sequence[EventRef],
               filters: Sequence[tuple[str, str]]) -> dict[EventRef, Stored]:
        """Subscription events of one type as their owner may see them now (notify/, `$events`):
        each event whose resource's current row passes the owner's search access to `rtype`
        (scopes, consent, cross-border rule), the subscription's filters and its patient filter,
        and whose version the owner may read -> what it discloses; absent: withheld, never
        revealed. One statement decides which current rows pass the owner's access and the
        filters, one reads their compartments for each event's patient filter, and one loads the
        current versions; an event whose version is no longer current is read on its own, as a
        vread of the owner's would read it."""
        pks = list(dict.fromkeys(w.pk for w in wanted))
        current = self._event_rows(conn, rtype, pks, filters)
        if not current:
            return {}
        members = self.compartments_by_pk(conn, rtype, list(current))
        passed = [w for w in wanted if w.pk in current and
                  (not w.patients or (rtype == "Patient" and w.id in w.patients)
                   or not set(w.patients).isdisjoint(members.get(w.pk, ())))]
        loaded = {st.pk: st for st in self.load(conn, rtype, [w.pk for w in passed if current[w.pk] == w.version])}
        out: dict[EventRef, Stored] = {}
        for w in passed:
            if current[w.pk] == w.version:
                if w.pk in loaded:
                    out[w] = loaded[w.pk]
                continue
            with contextlib.suppress(StorageError):
                out[w] = self.read(conn, rtype, w.id, w.version, preds=self.others(rtype, source_of(rtype).res))
        return out

    def visible_events(self, conn: Connection, rtype: str, pks: Sequence[int],
                       filters: Sequence[tuple[str, str]]) -> set[int]:
        """Which of the changed `rtype` rows the owner may see now and meet the filters (matching,
        one statement for a batch: nothing is decrypted)."""
        return set(self._event_rows(conn, rtype, pks, filters))

    def _searchable(self, rtype: str, res: FromClause, filters: Sequence[tuple[str, str]]) -> Predicates | None:
        """The conditions for live `rtype` rows the caller may search that meet `filters` (search
        parameters); None when the caller may not read `rtype`."""
        preds = self.others(rtype, res)
        if preds is None:
            return None
        conds: Predicates = [res.c.type == rtype, res.c.deleted.is_(False), *preds]
        if self.access.transfer is not None:
            conds.append(self.access.transfer(res))
        if filters:
            parsed = parse_search(self.params, rtype, list(filters), 1, 1, strict=True)
            conds.extend(self.compiler.where(parsed, res, self.others))
        return conds

    def _event_rows(self, conn: Connection, rtype: str, pks: Sequence[int],
                    filters: Sequence[tuple[str, str]]) -> dict[int, int]:
        """pk -> current version, of the rows among `pks` that pass the caller's access and the filters."""
        res = source_of(rtype).res
        conds = self._searchable(rtype, res, filters)
        if conds is None:
            return {}
        stmt = select(res.c.pk, res.c.version).where(res.c.pk.in_(list(pks)), *conds)
        return {int(pk): int(v) for pk, v in conn.execute(stmt)}

    def matching_patients(self, conn: Connection, rtype: str, filters: Sequence[tuple[str, str]]) -> set[str] | None:
        """The patients who have an `rtype` resource the caller may search and that meets the
        filters (for Patient: the matching Patients themselves) -- a Group's member-filter
        (pipeline/export_ops.py); membership only, nothing decrypted. None: the caller may not
        read `rtype`."""
        source = source_of(rtype)
        res = source.res
        conds = self._searchable(rtype, res, filters)
        if conds is None:
            return None
        if rtype == "Patient":
            stmt = select(res.c.id).where(*conds)
        else:
            comp = source.compartment
            stmt = select(comp.c.patient_id).join(res, res.c.pk == comp.c.resource_pk).where(*conds).distinct()
        return {str(v) for v in conn.execute(stmt).scalars()}

    def compartments_by_pk(self, conn: Connection, rtype: str, pks: list[int]) -> dict[int, tuple[str, ...]]:
        """pk -> the patients whose compartments hold that `rtype` row (access records have their own)."""
        if not pks:
            return {}
        comp = source_of(rtype).compartment
        out: dict[int, set[str]] = {}
        for pk, pid in conn.execute(select(comp.c.resource_pk, comp.c.patient_id).where(comp.c.resource_pk.in_(pks))):
            out.setdefault(pk, set()).add(pid)
        return {pk: tuple(sorted(v)) for pk, v in out.items()}

    def compartments_of(self, conn: Connection, refs: Sequence[str], live_only: bool = False) -> dict[str, set[str]]:
        """`Type/id` -> the patients whose compartments hold that current resource: membership
        only, no content (an AuditEvent's per-patient projection, a Provenance's compartments)."""
        stmt = sql.compartment_rows(refs, live_only)
        out: dict[str, set[str]] = {}
        for rtype, rid, pid in conn.execute(stmt).all() if stmt is not None else []:
            out.setdefault(f"{rtype}/{rid}", set()).add(pid)
        return out

    def export_batch(self, conn: Connection, rtype: str, spec: dict[str, Any], after_pk: int,
                     limit: int) -> tuple[list[Stored], int]:
        """The rows of the next `limit` pks (after `after_pk`) of an export job of this caller:
        the job's level (system, all patients, one patient, a Group's members), `_since` and
        `_typeFilter` AND-ed with the caller's access to `rtype`; and the last pk looked at (0:
        the end). With `member_set` (a Group holding a large share of the patients) the statement
        is a system export's, and a row is kept when one of the patients whose compartments hold
        it is a member: one scan in pk order instead of one per chunk of members."""
        source = source_of(rtype)
        res = source.res
        preds = self.others(rtype, res)
        if preds is None:
            return [], 0
        members: frozenset[str] | None = spec.get("member_set")
        conds: list[ColumnElement[bool]] = [res.c.type == rtype, res.c.deleted.is_(False), *preds, res.c.pk > after_pk]
        if spec.get("since_us") is not None:
            conds.append(res.c.last_updated_us >= spec["since_us"])
        if spec["level"] in ("patient", "instance", "group") and members is None:
            comp = source.compartment.alias()
            pids = [spec["patient"]] if spec["level"] == "instance" else spec.get("patients")
            if pids is not None:  # one patient, a Group's members, or the patients a kick-off named
                in_compartments = res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id.in_(pids)))
                # the Patients themselves only for rtype Patient: an OR on every type kept SQLite
                # from driving the statement by the compartment rows
                conds.append(or_(res.c.id.in_(pids), in_compartments) if rtype == "Patient" else in_compartments)
            else:
                conds.append(or_(res.c.type == "Patient", res.c.pk.in_(select(comp.c.resource_pk))))
        if rtype == "Provenance" and spec.get("provenance_of") is not None:  # includeAssociatedData
            ref = source.tables["reference"].alias()
            conds.append(res.c.pk.in_(select(ref.c.resource_pk).where(
                ref.c.param == "target", ref.c.target_type.in_(spec["provenance_of"]))))
        filters = spec.get("type_filters", {}).get(rtype)
        if filters:
            alternatives = []
            for params in filters:
                parsed = parse_search(self.params, rtype, [tuple(p) for p in params], 1, 1, strict=True)
                alternatives.append(and_(*self.compiler.where(parsed, res, self.others)))
            conds.append(or_(*alternatives))
        rows = conn.execute(select(res.c.pk, res.c.id).where(*conds).order_by(res.c.pk).limit(limit)).all()
        if not rows:
            return [], 0
        pks = [r.pk for r in rows]
        if members is not None:
            held = self.compartments_by_pk(conn, rtype, pks)
            pks = [r.pk for r in rows if (rtype == "Patient" and r.id in members)
                   or not members.isdisjoint(held.get(r.pk, ()))]
        return self.load(conn, rtype, pks), rows[-1].pk
