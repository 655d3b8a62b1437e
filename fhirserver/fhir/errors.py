"""FhirError carries an HTTP status and OperationOutcome issues; the pipeline renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Issue:
    code: str  # OperationOutcome issue type: invalid, structure, not-found, forbidden, ...
    diagnostics: str
    severity: str = "error"
    expression: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = self.expression
        return out


class FhirError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        expression: list[str] | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issues = issues or [Issue(code=code, diagnostics=diagnostics, expression=expression or [])]
        self.headers = headers or {}

    @property
    def outcome_code(self) -> str:
        return self.issues[0].code


def operation_outcome(issues: list[Issue], request_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}
    if request_id:
        out["id"] = request_id
        for issue in out["issue"]:
            issue["diagnostics"] = f"{issue['diagnostics']} (request id {request_id})"
    return out
