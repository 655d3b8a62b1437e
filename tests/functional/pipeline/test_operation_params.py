"""Every operation reads a POSTed Parameters body the same way (pipeline/operation_params.py):
the same mistakes get the same 400 from $validate, the terminology operations and the Bulk Data
kick-off, naming the parameter at fault; and a value of any primitive type is read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .test_validation import outcome, srv  # noqa: F401 - srv is the module's server fixture

OPERATIONS = {
    "$validate": ("/fhir/Patient/$validate", {}),
    "$lookup": ("/fhir/CodeSystem/$lookup", {}),
    "$export": ("/fhir/$export", {"Prefer": "respond-async", "Accept": "application/fhir+json"}),
}
MISTAKES: dict[str, tuple[dict[str, Any], str | None]] = {
    "unnamed parameter": ({"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "1"},
                                                                      {"valueString": "2"}]},
                          "Parameters.parameter[1]"),
    "blank name": ({"resourceType": "Parameters", "parameter": [{"name": "", "valueString": "2"}]},
                   "Parameters.parameter[0]"),
    "parameter not a list": ({"resourceType": "Parameters", "parameter": {"name": "x"}}, "Parameters.parameter"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("op", list(OPERATIONS))
def test_the_same_mistake_gets_the_same_400_from_every_operation(srv, op: str, mistake: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    url, extra = OPERATIONS[op]
    body, expression = MISTAKES[mistake]
    resp = http.post(url, data=json.dumps(body), headers={**h, **extra, "Content-Type": "application/fhir+json"})
    issue = outcome(resp, 400, "invalid")["issue"][0]
    assert issue.get("expression") == [expression]


def test_a_kickoff_reads_any_primitive_value_and_refuses_a_complex_one(srv) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    http, h = srv
    headers = {**h, **OPERATIONS["$export"][1], "Content-Type": "application/fhir+json"}
    ok = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Patient"},
                                                     {"name": "_since", "valueInstant": "2020-01-01T00:00:00Z"}]}
    accepted = http.post("/fhir/$export", data=json.dumps(ok), headers=headers)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    bad = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueCoding": {"code": "Patient"}}]}
    issue = outcome(http.post("/fhir/$export", data=json.dumps(bad), headers=headers), 400, "invalid")["issue"][0]
    assert issue["expression"] == ["Parameters.parameter[0]"] and "_type" in issue["diagnostics"]
