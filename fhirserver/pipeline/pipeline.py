"""The request pipeline: authenticate -> authorize -> consent -> execute -> audit.

Every /fhir request goes through `Pipeline.handle`, and only there are tokens checked, scopes and
consent turned into row predicates, the transaction opened and the AuditEvent written. The audit
record is appended inside the same transaction as the access; if it cannot be written the
transaction rolls back and the client gets a 500 (fail closed). Failed requests are audited in
a fresh transaction after the rollback.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import ColumnElement, Connection, FromClause

from .. import logs, metrics
from ..access import Access
from ..audit.events import AuditRecord
from ..auth.principal import Principal
from ..auth.tokens import lookup_token
from ..clock import now_us
from ..consent.alerts import account_of
from ..db import guard
from ..db.engine import Snapshot, database_unavailable, write_transaction
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.interaction import Interaction, negotiate_format, parse_interaction
from ..search.model import AccessFn
from ..search.sources import is_access_records, source_of
from ..services import Services
from ..storage.errors import StorageError
from ..storage.repository import CorruptDataError
from .authorize import Authorizer
from .context import RequestContext, Result
from .errors import fhir_error
from .handler import Handler, Need
from .provenance import wanted as provenance_wanted
from .routes import handler_for

log = logging.getLogger("fhirserver.pipeline")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9\-_.]{8,64}$")
RETRY_AFTER_SECONDS = 5  # a Patroni failover takes about its TTL (10 s by default; docs/operations.md)
RETRY_PAUSE_SECONDS = 1.0  # before the one retry of an idempotent request

# For each interaction kind: the access its handler needs unless the handler declares its own
# (Handler.needs). `required` ones raise 403 when absent.
ACCESS_NEEDS: dict[str, tuple[Need, ...]] = {
    "read": (Need("read", "read"),),
    "vread": (Need("read", "vread"),),
    "history-instance": (Need("read", "history-instance"),),
    "history-type": (Need("read", "history-type"),),
    "search-type": (Need("search", "search-type"),),
    "create": (Need("create", "create"),),
    "update": (Need("update", "update"), Need("create", "create", required=False)),
    "delete": (Need("delete", "delete"),),
    # a patch reads the current version (its `test` ops, its result): it needs read as well as update
    "patch": (Need("update", "update"), Need("read", "read")),
    "operation": (Need("search", "search-type"),),
}
READING = {"read", "search"}
WRITING = frozenset({"create", "update", "patch", "delete"})


def _parse_prefer(value: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (value or "").split(";"):
        for item in part.split(","):
            key, _, val = item.strip().partition("=")
            if key:
                out[key.strip().lower()] = val.strip().strip('"')
    return out


def _check_role(principal: Principal, role: str | None) -> None:
    """The role a handler declares (Handler.role), or a 403 before anything is read."""
    if role is None:
        return
    if role == "admin-backend":
        if principal.client_settings.get("admin") and not principal.fhir_user and not principal.patient:
            return
        raise FhirError(403, "forbidden", "This operation is reserved to administrator backend clients")
    raise FhirError(403, "forbidden", "This operation needs a role this server does not know")  # fail closed


def run_handler(handler: Handler, ctx: RequestContext, conn: Connection) -> Result:
    """Execute a handler; a storage refusal becomes its FHIR error here (pipeline/errors.py)."""
    try:
        return handler.execute(ctx, conn)
    except StorageError as err:
        raise fhir_error(err) from None


class Pipeline:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.authorizer = Authorizer(services.params, services.compiler, services.types)

    # ---- stage 1: authenticate
    def authenticate(self, ctx: RequestContext) -> None:
        header = ctx.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirError(401, "login", "An access token is required (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": 'Bearer realm="fhirserver"'})
        info, reason = lookup_token(ctx.reading(), token.strip())
        if info is None:
            raise FhirError(401, "login", f"The access token is not valid ({reason})",
                            headers={"WWW-Authenticate": f'Bearer realm="fhirserver", error="invalid_token", '
                                                         f'error_description="{reason}"'})
        ctx.principal = Principal.from_token(info)
        ctx.record.client_id = info.client_id
        ctx.record.client_name = info.client_name
        ctx.record.user = ctx.principal.fhir_user
        wait = self.services.penalties.retry_after(info.client_id, ctx.principal.fhir_user, ctx.reading())
        if wait is not None:  # a penalty (docs/operations.md): audited like any refusal
            raise FhirError(429, "throttled", "This account is rate-limited after privacy alerts about its access; "
                                              f"retry after {wait} s", headers={"Retry-After": str(wait)})

    # ---- stage 2 + 3: authorize (scopes, compartment) and consent
    def authorize(self, ctx: RequestContext, handler: Handler) -> None:
        it = ctx.interaction
        principal = ctx.principal
        assert principal is not None
        _check_role(principal, handler.role)
        consent = self.services.consent
        decision = consent.begin(ctx)  # purpose of use, break-the-glass, exemption (403 before any data)
        if decision is not None:  # this request's caller: the token's principal plus the decision
            principal = ctx.principal = replace(principal, consent=decision, purpose=[decision.purpose])
        if it.resource_type is None:  # a system-level operation ($export): access per type via `others`
            if it.kind == "history-system":
                ctx.access.history_types = self._history_access(principal)
            self._bind(ctx, principal)
            return
        rows = source_of(it.resource_type).res  # the type's own rows (search/sources.py)
        needs = handler.needs if handler.needs is not None else ACCESS_NEEDS.get(it.kind, ())
        if it.conditional:
            needs = (*needs, Need("search", "search-type"))
        for need in needs:
            try:
                preds = self.authorizer.predicates(principal, it.resource_type, need.scope)
            except FhirError:
                if need.required:
                    raise
                continue
            if need.field in READING:
                preds = preds + consent.predicates(principal, it.resource_type, need.scope, rows)
            setattr(ctx.access, need.field, preds)
            if need.field == "create":
                ctx.access.may_create = True
        if it.kind in ("create", "update", "patch") and provenance_wanted(ctx):
            # an X-Provenance is a Provenance the writer creates: it needs a scope for that (403)
            ctx.access.provenance = self.authorizer.predicates(principal, "Provenance", "create")
        if it.kind in WRITING:
            # a write sees the resources it changes as a read would (consent, labels, cross-border):
            # a row the caller may not read is refused as the read refuses it (pipeline/access.py)
            ctx.access.consent_read = consent.predicates(principal, it.resource_type, "read", rows)
        if it.kind in ("create", "update", "patch"):
            # ...and adds to no patient's record the caller may not see
            ctx.access.patient_rows = consent.predicates(principal, "Patient", "read", source_of("Patient").res)
            ctx.access.patient_ids = self.authorizer.compartments(
                principal, it.resource_type, "update" if it.kind == "patch" else it.kind)
        self._bind(ctx, principal)

    def _history_access(self, principal: Principal) -> dict[str, list[ColumnElement[bool]]]:
        """System history: each type whose history the caller may read, with its predicates
        (scopes and consent, as a type history of it would have); 403 when there is none."""
        access = self.access_fn(principal, "history-type")
        # access records have their own trail (AuditEvent search), not versions
        found = {rtype: access(rtype, source_of(rtype).res) for rtype in self.services.types.names()
                 if not is_access_records(rtype)}
        allowed = {rtype: preds for rtype, preds in found.items() if preds is not None}
        if not allowed:
            raise FhirError(403, "forbidden", "The access token permits reading the history of no resource type")
        return allowed

    def _bind(self, ctx: RequestContext, principal: Principal) -> None:
        """Complete the request's Access (other types, the cross-border rule) and bind its gate."""
        ctx.access.others = self.access_fn(principal)
        ctx.access.transfer, ctx.access.transfer_refusal = self.services.consent.transfer_rule(principal)
        ctx.bound = self.services.gate(ctx.access)

    def access_fn(self, principal: Principal, interaction: str = "search-type") -> AccessFn:
        """Row predicates (scopes and consent) for reading other types by `interaction` (chains,
        _has, includes by search; system history by type history): None = not permitted."""

        def access(rtype: str, res: FromClause) -> list[ColumnElement[bool]] | None:
            try:
                preds = self.authorizer.predicates(principal, rtype, interaction, res)
            except FhirError:
                return None
            return preds + self.services.consent.predicates(principal, rtype, interaction, res)

        return access

    # ---- the whole road
    def handle(self, method: str, path: str, query: str, form: list[tuple[str, str]] | None,
               headers: dict[str, str], body: bytes, remote_addr: str,
               body_too_large: bool = False, url_too_long: bool = False) -> tuple[Result, str, str]:
        """The whole road for one /fhir request; one access log line (no patient data) per request.
        Returns the result, the request id and the response format the request negotiated
        ("json" or "xml": the web layer writes the body in it)."""
        started = time.perf_counter()
        result, request_id, record, fmt = self._handle(method, path, query, form, headers, body, remote_addr,
                                                       body_too_large, url_too_long)
        if result.database_unavailable and method in ("GET", "HEAD"):
            # idempotent work is retried once, after a moment: a pooled connection may have died with
            # the old primary, and the next checkout connects to whichever node is primary now
            time.sleep(RETRY_PAUSE_SECONDS)
            result, request_id, record, fmt = self._handle(method, path, query, form, headers, body, remote_addr,
                                                           body_too_large, url_too_long)
        seconds = time.perf_counter() - started
        logs.access(request_id, method, record.interaction, record.resource_type, result.status, seconds,
                    record.client_id)
        metrics.observe(record.interaction, record.resource_type, result.status, seconds)
        return result, request_id, fmt

    def _handle(self, method: str, path: str, query: str, form: list[tuple[str, str]] | None,
               headers: dict[str, str], body: bytes, remote_addr: str,
               body_too_large: bool = False, url_too_long: bool = False) -> tuple[Result, str, AuditRecord, str]:
        lower = {k.lower(): v for k, v in headers.items()}
        client_rid = lower.get("x-request-id", "")
        request_id = client_rid if REQUEST_ID_RE.match(client_rid) else str(uuid.uuid4())
        record = AuditRecord(interaction="unknown", request_id=request_id, network_address=remote_addr,
                             recorded_us=now_us())
        ctx = RequestContext(self.services, Interaction("unknown", method), record, lower, body, pipeline=self,
                             bound=self.services.gate(Access()))
        # a GET's reads may come from a read replica that has caught up with the primary
        ctx.snapshot = Snapshot(self.services.engine, self.services.replicas if method in ("GET", "HEAD") else None)
        try:
            with guard.request_scope():  # from here on, stored rows are read through ctx.gate only
                result, rid, rec = self._serve(ctx, request_id, record, lower, method, path, query, form,
                                               body_too_large, url_too_long)
                return result, rid, rec, ctx.response_format
        finally:
            ctx.release_reading()

    def _serve(self, ctx: RequestContext, request_id: str, record: AuditRecord, lower: dict[str, str], method: str,
               path: str, query: str, form: list[tuple[str, str]] | None, body_too_large: bool,
               url_too_long: bool) -> tuple[Result, str, AuditRecord]:
        try:
            if url_too_long:
                raise FhirError(414, "too-costly", f"The request URL exceeds the limit of "
                                                   f"{self.services.settings.max_url_bytes} bytes; use POST [type]/_search")
            ctx.prefer = _parse_prefer(lower.get("prefer"))
            ctx.interaction = parse_interaction(method, path, query, form, self.services.types,
                                                "if-none-exist" in lower)
            record.interaction = ctx.interaction.kind
            record.resource_type = ctx.interaction.resource_type
            if ctx.interaction.id:
                record.target = f"{ctx.interaction.resource_type}/{ctx.interaction.id}"
            fmt = negotiate_format(lower.get("accept"), dict(ctx.interaction.params).get("_format"),
                                   ndjson=ctx.interaction.operation == "export-file")
            if fmt == "xml" and (ctx.interaction.operation or "").startswith("export"):
                raise FhirError(406, "not-supported", "Bulk Data answers in application/fhir+json only")
            ctx.response_format = fmt  # errors from here on answer in it too
            if body_too_large:
                raise FhirError(413, "too-costly", f"The request body exceeds the limit of "
                                                   f"{self.services.settings.max_body_bytes} bytes")
            if not ctx.interaction.public:
                self.authenticate(ctx)
            handler = self._prepare(ctx, authorize=not ctx.interaction.public)
            audit = self.services.audit
            if handler.read_only(ctx):
                # Read in a plain transaction, then append the (already built and encrypted)
                # AuditEvent in a short write transaction; the response leaves only after it
                # committed, so a read is never served without its audit record.
                conn = ctx.reading()  # the snapshot authentication and consent read from
                result = run_handler(handler, ctx, conn)
                self.services.consent.annotate(ctx, conn)  # the Consents that decided, for the audit
                held = ctx.hand_over_reading()  # the record is written on the connection the read used
                record.status = result.status
                prepared = audit.prepare(record)
                with write_transaction(self.services.engine, held) as conn:
                    self.services.consent.finish(ctx, conn)  # alerts (break-the-glass, exempt access)
                    audit.append(conn, record, prepared)
                audit.committed(prepared)
            else:
                # the record a write expects to capture, built and encrypted before the write lock
                expected = ctx.capture.expectation()
                ahead = audit.prepare(expected) if expected is not None else None
                held = ctx.hand_over_reading()  # the write runs on the connection the request read on
                with write_transaction(self.services.engine, held) as conn:
                    result = self._execute(ctx, handler, conn)
                    kept = ahead if ahead is not None and ctx.capture.as_expected() else None
                    appended = audit.append(conn, record, kept)
                audit.committed(appended)
            return result, request_id, record
        except FhirError as err:
            return self._fail(ctx, err.status, err.issues, err.headers, err), request_id, record
        except CorruptDataError:
            log.error("request %s: stored data failed authentication or its key is unavailable", request_id)
            return self._fail(ctx, 500, [Issue("exception", "Stored data failed an integrity check; nothing was "
                                                             "returned. The incident has been recorded.")], {}, None), \
                request_id, record
        except Exception as exc:
            if database_unavailable(exc, self.services.engine):
                # the primary is gone (a failover is under way) or unreachable: nothing was served;
                # a write whose commit got no answer may or may not have happened -- the client
                # retries it safely with If-Match or a conditional create (docs/operations.md)
                log.warning("request %s: the database is unavailable (%s)", request_id, type(exc).__name__)
                failed = self._fail(ctx, 503, [Issue("transient", "The database is unavailable (a failover may be "
                                                                  "under way); retry shortly")],
                                    {"Retry-After": str(RETRY_AFTER_SECONDS)}, None)
                return replace(failed, database_unavailable=True), request_id, record
            log.exception("request %s failed", request_id)
            return self._fail(ctx, 500, [Issue("exception", "Internal server error")], {}, None), request_id, record

    # ---- stages shared by requests and by the entries of a batch/transaction Bundle
    def _prepare(self, ctx: RequestContext, authorize: bool = True) -> Handler:
        """Authorize (role, scopes, compartment, consent) and prepare (outside any transaction)."""
        handler = handler_for(ctx.interaction.kind, ctx.interaction.operation)
        if authorize:
            self.authorize(ctx, handler)
        handler.prepare(ctx)
        if ctx.principal is not None:
            self.services.consent.check_write(ctx)  # minors' privacy Consents (422)
        return handler

    def _execute(self, ctx: RequestContext, handler: Handler, conn: Connection) -> Result:
        result = run_handler(handler, ctx, conn)
        ctx.record.status = result.status
        self.services.consent.annotate(ctx, conn)
        self.services.consent.finish(ctx, conn)
        return result

    def prepare_entry(self, ctx: RequestContext) -> Handler:
        """Authorize and prepare one Bundle entry (the Bundle request was authenticated)."""
        return self._prepare(ctx)

    def execute_entry(self, ctx: RequestContext, handler: Handler, conn: Connection) -> Result:
        """Execute one entry inside the Bundle's transaction and append its AuditEvent there."""
        result = self._execute(ctx, handler, conn)
        self.services.audit.append(conn, ctx.record)
        return result

    def audit_entry_failure(self, ctx: RequestContext, conn: Connection, status: int, issues: list[Issue]) -> None:
        ctx.record.status = status
        ctx.record.outcome_desc = issues[0].diagnostics if issues else ""
        self.services.audit.append(conn, ctx.record)

    def _fail(self, ctx: RequestContext, status: int, issues: list[Issue], headers: dict[str, str],
              err: FhirError | None) -> Result:
        rec = ctx.record
        rec.status = status
        rec.outcome_desc = issues[0].diagnostics if issues else ""
        held = ctx.hand_over_reading()  # a refused read's record goes on the connection it read on
        try:
            with write_transaction(self.services.engine, held) as conn:
                self.services.consent.finish(ctx, conn)  # deny basis of a hidden read, denial bursts
                if rec.client_id and status in (403, 404):  # its alerts may raise the account's penalty
                    self.services.penalties.assess(conn, *account_of(rec.client_id, rec.user))
                    if rec.user:  # ...and the app's, once many of its users misbehave
                        self.services.penalties.assess(conn, "client", rec.client_id)
                self.services.audit.append(conn, rec)
        except Exception as exc:
            if status == 503 and database_unavailable(exc, self.services.engine):
                body: dict[str, Any] = operation_outcome(issues, rec.request_id)  # nothing was disclosed
                return Result(status, body, headers)
            log.exception("request %s: could not write the AuditEvent for a failed request", rec.request_id)
            if status < 500:
                status, issues, headers = 500, [Issue("exception", "The audit record could not be written")], {}
        outcome: dict[str, Any] = operation_outcome(issues, rec.request_id)
        return Result(status, outcome, headers)
