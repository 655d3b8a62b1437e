"""Patient/[id]/$erasure-request: a patient (or their guardian) asks for their record to be
erased (POST, a Parameters resource with an optional `reason`) and follows the request (GET).

Only the patient themself or a user linked to them may (403 for anyone else, whatever their
scopes; 404 for a patient they cannot see). The decision is an administrator's
(`fhirserver erasure approve|refuse`, exchange/erasure_requests.py). Answers are Parameters with
one `request` part per request: id, status, created, decided, note.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ..exchange.erasure_requests import KEY_SCOPE, RequestError, file_request, requests_of
from ..fhir.errors import FhirError
from .context import RequestContext, Result
from .handler import Handler
from .operation_params import parameters_of
from .request_body import parse_body


def _parameters(requests: list[Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "request", "part": [{"name": k, "valueString": str(v)} for k, v in r.to_json().items()
                                     if k in ("id", "status", "created", "decided", "note")]}
        for r in requests]}


class ErasureRequestOp(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        principal = ctx.principal
        if it.method not in ("GET", "POST"):
            raise FhirError(405, "not-supported", "Use POST to ask, GET to see the requests", headers={"Allow": "GET, POST"})
        decision = getattr(principal, "consent", None)
        own = set(decision.own_patients) if decision is not None else set()
        if principal is None or not principal.reads_own_records or (it.id or "") not in own:
            raise FhirError(403, "forbidden", "Only the patient (or a guardian or proxy linked to them) may ask for "
                                              "their erasure; administrators use $erase")
        ctx.services.keys.ensure(KEY_SCOPE)  # before the transaction

    def read_only(self, ctx: RequestContext) -> bool:
        return ctx.interaction.method == "GET"

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        pid = it.id or ""
        ctx.gate.patient(conn, pid)
        ctx.record.patients = [pid]
        ctx.record.target = f"Patient/{pid}"
        if it.method == "GET":
            return Result(200, _parameters(requests_of(s, conn, pid)))
        body = parse_body(ctx) if ctx.body else {"resourceType": "Parameters"}
        reason = next((p.value for p in parameters_of(body, "$erasure-request (with an optional `reason`)")
                       if p.name == "reason" and isinstance(p.value, str)), "")
        try:
            filed = file_request(s, conn, pid, ctx.principal.fhir_user or "", str(reason))  # type: ignore[union-attr]
        except RequestError as exc:
            raise FhirError(409, "conflict", str(exc)) from None
        ctx.record.outcome_desc = f"erasure request {filed.id} filed"
        return Result(201, _parameters([filed]))
