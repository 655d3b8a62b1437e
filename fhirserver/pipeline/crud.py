"""The instance and type interactions: capabilities, read/vread, create, update, delete."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Connection

from ..clock import now_us
from ..fhir.dates import instant_text
from ..fhir.errors import FhirError
from ..fhir.patch import JSON_PATCH, MERGE_PATCH, apply_fhirpath_patch, apply_json_patch, apply_merge_patch
from ..storage.codec import dump_json, parse_json
from ..storage.errors import NotFound, StorageError
from ..storage.repository import Stored
from . import subscription_writes
from .capability import capability_statement, smart_configuration
from .compartment_links import prepare_write
from .context import RequestContext, Result
from .errors import fhir_error
from .handler import Handler
from .provenance import prepare_provenance, write_provenance
from .questionnaires import check_before_write
from .render import render_resource, resource_headers, write_result
from .request_body import MAX_VERSION, parse_body, parse_etag, validated


class Capabilities(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        """Built and serialized once per Services (its registries do not change while it lives)."""
        s = ctx.services
        body = s.derived.get("capability-statement")
        if body is None:
            body = s.derived["capability-statement"] = dump_json(capability_statement(
                s.types, s.params, s.settings.fhir_base, s.settings.public_root, _START_DATE,
                profiles=s.validator.profiles.urls_by_type(), jurisdiction=s.settings.home_jurisdiction,
                topics=[t.url for t in s.topics]))
        return Result(200, body)


class SmartConfiguration(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        s = ctx.services
        scopes = [f"{c}/{t}.{p}" for c in ("patient", "user", "system") for t in ("*", *s.types.names())
                  for p in ("rs", "cruds", "read", "write")]
        return Result(200, smart_configuration(s.settings.public_root, scopes),
                      {"Content-Type": "application/json"})


class Read(Handler):
    def read_only(self, ctx: RequestContext) -> bool:
        # restricted access probes old versions (vread) in a savepoint; a plain read does not
        return ctx.interaction.kind == "read" or not ctx.access.read

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        assert it.resource_type and it.id
        version = None
        if it.kind == "vread":
            text = it.version or ""
            # this server's version ids are 64-bit integers: any other id names no version
            if not text.isascii() or not text.isdigit() or int(text) > MAX_VERSION:
                raise FhirError(404, "not-found", "Unknown version")
            version = int(text)
        return self._answer(ctx, ctx.gate.read(conn, it.resource_type, it.id, version))

    def _answer(self, ctx: RequestContext, stored: Stored) -> Result:
        ctx.capture.touched(stored)
        headers = resource_headers(stored, ctx.services.settings.fhir_base)
        if_none_match = (ctx.header("if-none-match") or "").strip()
        if if_none_match and (if_none_match == "*" or stored.version in
                              {parse_etag(tag, "If-None-Match") for tag in if_none_match.split(",")}):
            return Result(304, None, headers)
        return Result(200, render_resource(ctx, stored), headers)


class Create(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        body = validated(ctx)
        body.pop("id", None)  # the server assigns ids on create
        rtype = ctx.interaction.resource_type or ""
        p = ctx.write = prepare_write(ctx, rtype, body, ctx.assigned_id)
        prepare_provenance(ctx, amended=False)
        if not ctx.interaction.conditional:  # a conditional create may find a match instead
            ctx.capture.expect(201, f"{p.type}/{p.id}/_history/1", p.index.patients)

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        prepared = ctx.write
        assert prepared is not None
        if ctx.interaction.conditional:
            condition = ctx.header("if-none-exist") or ""
            if condition.startswith(f"{prepared.type}?"):  # "Patient?identifier=..." as HL7's XDS example sends it
                condition = condition[len(prepared.type) + 1:]
            query = parse_qsl(condition, keep_blank_values=True)
            matches = ctx.gate.matches(conn, prepared.type, query)
            if len(matches) > 1:
                raise FhirError(412, "duplicate", "If-None-Exist matched more than one resource")
            if matches:
                existing = ctx.gate.load(conn, prepared.type, [matches[0][0]])[0]
                ctx.capture.touched(existing)
                ctx.record.outcome_desc = "conditional create matched an existing resource"
                return write_result(ctx, existing, 200)
        check_before_write(ctx.services, conn, prepared.body)
        gate = ctx.gate
        gate.check_compartments(conn, prepared, ctx.bundle_patients)
        stored = ctx.services.repo.create(conn, prepared, fresh_id=True)
        if not gate.holds(conn, stored.pk, ctx.access.create):
            raise FhirError(403, "forbidden", "The access token does not permit creating this resource "
                                              "(outside the permitted compartment or scope restriction)")
        subscription_writes.written(ctx, conn, prepared.type, stored.pk, stored.id, prepared.body)
        ctx.capture.touched(stored, prepared.index.patients)
        write_provenance(ctx, conn, stored, None)
        if not gate.holds(conn, stored.pk, ctx.access.consent_read):
            ctx.prefer["return"] = "minimal"  # accepted, but consent does not let the writer read it back
        return write_result(ctx, stored, 201)


AMENDMENT_TAG = {"system": "http://fhirserver.dev/CodeSystem/record-origin", "code": "patient-amended",
                 "display": "Amended by the patient or their representative; review against the prior version"}
PATIENT_OWNED = {"Patient", "Consent", "QuestionnaireResponse"}  # the patient's own statements


def flag_patient_amendment(ctx: RequestContext, body: dict[str, Any]) -> bool:
    """A patient (or guardian) correcting a clinical record does not silently overwrite the
    clinician's data: the new version carries a `patient-amended` tag, the prior version stays in
    history, and the AuditEvent names the user. Their own demographics, Consents and answers are
    theirs to correct without a flag."""
    principal = ctx.principal
    user = (principal.fhir_user or "") if principal else ""
    if user.startswith(("Patient/", "RelatedPerson/")) and ctx.interaction.resource_type not in PATIENT_OWNED:
        meta = body.setdefault("meta", {})
        tags = [t for t in meta.get("tag", []) if t.get("code") != AMENDMENT_TAG["code"]]
        meta["tag"] = [*tags, dict(AMENDMENT_TAG)]
        return True
    return False


@dataclass(frozen=True)
class _Expected:
    """What an update expects to find in its transaction: a conditional update's match (pk, id),
    re-checked there, and a patch's base version (a concurrent change is a 412, not a lost update)."""

    matches: list[tuple[int, str]] | None
    version: int | None = None


class Update(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        body = validated(ctx)
        amended = flag_patient_amendment(ctx, body)
        rtype = it.resource_type or ""
        if it.conditional:
            matches = ctx.gate.matches(ctx.reading(), rtype, it.params)
            if len(matches) > 1:
                raise FhirError(412, "multiple-matches", "The conditional update matched more than one resource")
            target = matches[0][1] if matches else None
            if target and body.get("id") not in (None, target):
                raise FhirError(400, "invalid", "Resource id does not match the resource found by the condition",
                                ["id"])
            rid = target or body.get("id") or str(uuid.uuid4())
            ctx.interaction.id = rid
            ctx.write, ctx.plan = prepare_write(ctx, rtype, body, rid), _Expected(matches[:1])
            prepare_provenance(ctx, amended)
            return
        if "id" not in body:
            raise FhirError(400, "required", "The resource must contain an id matching the URL", [f"{rtype}.id"])
        if body["id"] != it.id:
            raise FhirError(400, "invalid", f"Resource id '{str(body['id'])[:64]}' does not match the URL id '{it.id}'",
                            [f"{rtype}.id"])
        ctx.write, ctx.plan = prepare_write(ctx, rtype, body, it.id), _Expected(None)
        prepare_provenance(ctx, amended)

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        # the conditional update's match, re-checked in the transaction
        return self.write(ctx, conn, ctx.plan_as(_Expected).matches, parse_etag(ctx.header("if-match"), "If-Match"))

    def write(self, ctx: RequestContext, conn: Connection, expected: list[tuple[int, str]] | None,
              if_match: int | None) -> Result:
        prepared = ctx.write
        assert prepared is not None
        repo = ctx.services.repo
        if expected is not None:
            now = ctx.gate.matches(conn, prepared.type, ctx.interaction.params)
            if now != expected:
                raise FhirError(412, "conflict", "The resources matching the condition changed; retry")
        gate = ctx.gate
        try:
            head = gate.write_target(conn, prepared.type, prepared.id, ctx.access.update)
        except NotFound:
            if not ctx.access.may_create:
                raise _no_create() from None  # what an absent id answers this caller
            raise
        if (head is None or head.deleted) and not ctx.access.may_create:
            raise _no_create()  # update-as-create needs create permission too
        check_before_write(ctx.services, conn, prepared.body)
        gate.check_compartments(conn, prepared, ctx.bundle_patients)
        stored, created = repo.update(conn, prepared, if_match)
        check = ctx.access.create if created else ctx.access.update
        if not gate.holds(conn, stored.pk, check):
            raise FhirError(403, "forbidden", "The access token does not permit this resource content "
                                              "(outside the permitted compartment or scope restriction)")
        subscription_writes.written(ctx, conn, prepared.type, stored.pk, stored.id, prepared.body)
        ctx.capture.touched(stored, prepared.index.patients)
        write_provenance(ctx, conn, stored, None if head is None or head.deleted else head.version)
        if not gate.holds(conn, stored.pk, ctx.access.consent_read):
            ctx.prefer["return"] = "minimal"  # accepted, but consent does not let the writer read it back
        return write_result(ctx, stored, 201 if created else 200)


class Patch(Update):
    """PATCH [type]/[id]: JSON Patch (application/json-patch+json), FHIRPath Patch (a Parameters
    resource) or JSON Merge Patch (a partial resource, application/merge-patch+json or JSON). The current version is read and patched before the transaction, the result is
    validated as a PUT body is, and it is written as an update conditional on that version: a
    concurrent change makes it a 409/412 instead of a lost update. Scopes, consent and audit as
    for an update."""

    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        rtype = it.resource_type or ""
        matches = None
        if it.conditional:  # PATCH [type]?[search]: exactly one match is patched
            matches = ctx.gate.matches(ctx.reading(), rtype, it.params)
            if len(matches) > 1:
                raise FhirError(412, "multiple-matches", "The conditional patch matched more than one resource")
            if not matches:
                raise FhirError(404, "not-found", "The conditional patch matched no resource")
            it.id = matches[0][1]
            ctx.record.target = f"{rtype}/{it.id}"
        rid = it.id or ""
        ctype = (ctx.header("content-type") or "").split(";")[0].strip().lower()
        if ctype == JSON_PATCH:
            try:
                document: Any = parse_json(ctx.body) if ctx.body else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise FhirError(400, "structure", "The JSON Patch document is not valid JSON") from None
        else:  # application/fhir+json: a FHIRPath Patch Parameters, or a partial resource (merge patch)
            document = parse_body(ctx, also=(MERGE_PATCH,))
        wanted = parse_etag(ctx.header("if-match"), "If-Match")
        # the current version, as the caller may both read and update it (hidden = absent)
        try:
            current = ctx.gate.read(ctx.reading(), rtype, rid, preds=[*ctx.access.read, *ctx.access.update,
                                                                      *ctx.access.consent_read])
        except StorageError as err:  # 404 unknown or hidden, 410 deleted, 403 a refused transfer
            raise fhir_error(err) from None
        if wanted is not None and wanted != current.version:
            raise FhirError(412, "conflict", f"If-Match names version {wanted}; the current version is "
                                             f"{current.version}")
        assert current.body is not None
        resource = parse_json(current.body)
        if ctype == JSON_PATCH:
            patched = apply_json_patch(resource, document)
        elif document.get("resourceType") == "Parameters":
            patched = apply_fhirpath_patch(resource, document, ctx.services.settings.profiles_dir)
        else:  # a partial resource: JSON Merge Patch (RFC 7386), as fhirpy and others send it
            patched = apply_merge_patch(resource, document)
        if patched.get("resourceType") != rtype or patched.get("id") != rid:
            raise FhirError(422, "processing", "A patch may not change the resource type or id")
        ctx.services.validator.validate(patched, rtype)
        amended = flag_patient_amendment(ctx, patched)
        ctx.write, ctx.plan = prepare_write(ctx, rtype, patched, rid), _Expected(matches, current.version)
        prepare_provenance(ctx, amended)

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        # a conditional patch's match is re-checked in the transaction, as a conditional update's
        plan = ctx.plan_as(_Expected)
        return self.write(ctx, conn, plan.matches, plan.version)


class Delete(Handler):
    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        rtype = it.resource_type or ""
        repo = ctx.services.repo
        if it.conditional:
            matches = ctx.gate.matches(conn, rtype, it.params)
            if len(matches) > 1:
                raise FhirError(412, "multiple-matches", "The conditional delete matched more than one resource")
            if not matches:
                return Result(204)
            it.id = matches[0][1]
        assert it.id
        try:
            ctx.gate.write_target(conn, rtype, it.id, ctx.access.delete)
        except NotFound:
            # indistinguishable from deleting something that does not exist (which is a 204)
            ctx.record.outcome_desc = "target not visible to this client: nothing deleted"
            return Result(204)
        stored = repo.delete(conn, rtype, it.id, parse_etag(ctx.header("if-match"), "If-Match"))
        if stored is None:
            return Result(204)
        subscription_writes.written(ctx, conn, rtype, stored.pk, stored.id, None)
        ctx.capture.touched(stored, list(ctx.gate.compartments_by_pk(conn, rtype, [stored.pk]).get(stored.pk, ())))
        return Result(204, None, {"ETag": stored.etag})


_START_DATE = instant_text(now_us())[:10]


def _no_create() -> FhirError:
    return FhirError(403, "forbidden", "The access token does not permit creating resources of this type")
