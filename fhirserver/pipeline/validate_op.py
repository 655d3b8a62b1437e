"""`$validate` (`[type]/$validate`, `[type]/[id]/$validate`): the same validation a write gets,
answered as an OperationOutcome, and nothing stored.

The resource comes as the body, or inside a `Parameters` body (`resource`, `mode`, `profile`);
`mode` and `profile` may also be query parameters. `mode=create|update|delete` adds that
interaction's rules: update needs the id of the URL, delete needs an existing resource. A
`profile` the server ships (profiles/StructureDefinition-*.json) is checked like a profile the
resource claims in `meta.profile` on a write; one it does not ship is reported as an error rather
than silently ignored (the caller asked for that check). Unknown profiles claimed in
`meta.profile` are only noted (information), as writes accept them.
Validation problems are a 200 with error issues (the operation ran); a malformed request is 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from ..fhir.errors import FhirError, Issue, operation_outcome
from ..storage.errors import Deleted, NotFound
from .context import RequestContext, Result
from .handler import Handler
from .operation_params import parameters_of
from .questionnaires import questionnaire_issues
from .request_body import parse_body

MODES = ("create", "update", "delete")


def _parameters(body: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    resource = None
    values: dict[str, str] = {}
    for param in parameters_of(body, "$validate"):
        if param.name == "resource" and isinstance(param.value, dict):
            resource = param.value
        elif param.name in ("mode", "profile") and isinstance(param.value, str):
            values[param.name] = param.value
    return resource, values


@dataclass(frozen=True)
class _Plan:
    resource: dict[str, Any] | None  # what to validate (None for mode=delete)
    mode: str | None  # create | update | delete (None: no mode)
    profile: str | None  # a canonical to validate against as well


class Validate(Handler):
    reads_only = True

    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        args = dict(it.params)
        resource: dict[str, Any] | None = None
        if it.method == "POST" and ctx.body:
            body = parse_body(ctx)
            if body.get("resourceType") == "Parameters":
                resource, values = _parameters(body)
                args.update(values)
            else:
                resource = body
        mode = args.get("mode")
        if mode is not None and mode not in MODES:
            raise FhirError(400, "invalid", f"mode must be one of {', '.join(MODES)}", ["mode"])
        if resource is None and mode != "delete":
            raise FhirError(400, "required", "$validate needs a resource (the body, or Parameters.resource)")
        ctx.plan = _Plan(resource, mode, args.get("profile"))

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        plan = ctx.plan_as(_Plan)
        resource, mode, profile = plan.resource, plan.mode, plan.profile
        rtype = it.resource_type or ""
        validator = ctx.services.validator
        known = validator.profiles.resolve(profile) if profile else None
        issues: list[Issue] = []
        if resource is not None:
            try:
                issues.extend(validator.validate(resource, rtype, profiles=[profile] if known and profile else [],
                                                 must_support=True))
            except FhirError as err:
                issues.extend(err.issues)
            if rtype == "QuestionnaireResponse" and not issues:
                found_issues, found = questionnaire_issues(ctx.services, conn, resource)
                issues.extend(found_issues)
                if not found and isinstance(resource.get("questionnaire"), str):
                    issues.append(Issue("informational", "The Questionnaire this response names is not stored on "
                                        "this server: the answers were not checked against it",
                                        severity="information", expression=["QuestionnaireResponse.questionnaire"]))
            if mode == "update" and (not it.id or resource.get("id") != it.id):
                issues.append(Issue("invalid", "mode=update needs [type]/[id]/$validate and the same id in the "
                                               "resource", expression=[f"{rtype}.id"]))
        if mode == "delete":
            try:  # what the caller may see: a hidden resource is as unknown as an absent one
                ctx.gate.read(conn, rtype, it.id or "", preds=ctx.access.search)
            except (NotFound, Deleted):
                raise FhirError(404, "not-found", f"{rtype}/{it.id} is not known") from None
        if profile and not known:
            issues.append(Issue("not-supported", f"Profile {profile[:200]} is not known to this server; the "
                                                 "resource was validated against the base FHIR R4 definitions only"))
        failed = any(i.severity in ("error", "fatal") for i in issues)
        if not failed:
            issues.insert(0, Issue("informational", "All OK", severity="information"))
        ctx.record.outcome_desc = f"$validate ({mode or 'no mode'}): {'invalid' if failed else 'valid'}"
        return Result(200, operation_outcome(issues))
