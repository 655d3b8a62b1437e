"""QuestionnaireResponses are checked against their stored Questionnaire on every REST write
(create, update, patch, Bundle entries) and in `$validate` (issue 14).

The Questionnaire is found by the response's canonical `questionnaire` (`url`, or `url|version`)
among the stored Questionnaires, whatever the caller's scopes: a Questionnaire is a form, not a
patient's data, and checking answers needs its structure. When none is stored, the response is
accepted as before (the Questionnaire may live on another server); `$validate` says so.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ..db import guard
from ..fhir.errors import FhirError, Issue
from ..fhir.questionnaire import check_response
from ..search.executor import run_search
from ..search.parser import parse_search
from ..services import Services
from ..storage.codec import parse_json

CANDIDATES = 20  # Questionnaires sharing one url (versions) considered


def stored_questionnaire(services: Services, conn: Connection, canonical: str) -> dict[str, Any] | None:
    """The stored Questionnaire `canonical` names: that version, else the newest active one."""
    url, _sep, version = canonical.partition("|")
    query = [("url", url)] + ([("version", version)] if version else [])
    try:
        parsed = parse_search(services.params, "Questionnaire", query, CANDIDATES, CANDIDATES, strict=True)
    except FhirError:
        return None  # not a usable url: nothing stored can match
    parsed.total = "none"
    with guard.system_path("questionnaire-check"):  # a form's structure, read to check answers (never returned)
        page = run_search(conn, parsed, services.compiler, [])
        bodies = [parse_json(s.body) for s in services.repo.load_current(conn, page.pks) if s.body]
    if not bodies:
        return None
    # several versions under one url: an active one first, then the latest written
    best: dict[str, Any] = max(bodies, key=lambda b: (b.get("status") == "active",
                                                      str(b.get("meta", {}).get("lastUpdated", ""))))
    return best


def questionnaire_issues(services: Services, conn: Connection, body: dict[str, Any]) -> tuple[list[Issue], bool]:
    """(violations, whether a stored Questionnaire was found) for a QuestionnaireResponse body."""
    canonical = body.get("questionnaire")
    if body.get("resourceType") != "QuestionnaireResponse" or not isinstance(canonical, str) or not canonical:
        return [], False
    questionnaire = stored_questionnaire(services, conn, canonical)
    if questionnaire is None:
        return [], False
    return check_response(body, questionnaire), True


def check_before_write(services: Services, conn: Connection, body: dict[str, Any]) -> None:
    """Refuse (422, every violation listed) a QuestionnaireResponse its Questionnaire rejects."""
    issues, _found = questionnaire_issues(services, conn, body)
    if issues:
        raise FhirError(422, issues[0].code, issues[0].diagnostics, issues=issues)
