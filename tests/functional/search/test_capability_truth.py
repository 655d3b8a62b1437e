"""The CapabilityStatement tells the truth about search: for every declared search parameter of
every served type, a search built from a stored HL7 R4 example's own value finds that resource and
one built from a value no resource has does not; no declared parameter errors; every parameter the
server answers is declared, and an undeclared one is refused in strict mode.

Values are read from the examples with the parameter's own FHIRPath expression (the registry's),
and turned into a query by type: token `system|code`, string a prefix, reference `Type/id`, uri
the value, date/quantity/number a prefix that any value satisfies (`lt2999`, `ge-1e12`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhirserver.fhir.fhirpath import compile_expression
from tests.conftest import REPO, BackendClient, example_files

# AuditEvent: the auditors' (tests/functional/audit); Binary: only the common parameters, and a scope naming it;
# Subscription: its owner's alone, admitted only to a registered endpoint (tests/functional/subscriptions)
SERVED = [t for t in json.loads((REPO / "profiles" / "resource-types.json").read_text())["types"]
          if t not in ("AuditEvent", "Binary", "Subscription")]
RECORD_EXAMPLES = sorted((REPO / "tests" / "fixtures" / "hl7-r4-examples").glob("*.json"))
NO_MATCH = {"token": "urn:zz:none|zz-nomatch", "string": "Zqxjkvw", "reference": "Patient/zz-nonexistent",
            "uri": "urn:zz:none", "date": "eq1801-01-01", "quantity": "gt1000000000000", "number": "gt1000000000000",
            "composite": "zz-none$zz-none"}


def _query_value(ptype: str, node: Any) -> str | None:
    if ptype == "token":
        if isinstance(node, dict):
            coding = (node.get("coding") or [node])[0] if isinstance(node.get("coding") or [node], list) else node
            code = coding.get("code") if isinstance(coding, dict) else None
            value = node.get("value") if isinstance(node.get("value"), str) else None
            system = (coding.get("system") if isinstance(coding, dict) else None) or node.get("system")
            got = code if isinstance(code, str) else value
            return f"{system}|{got}" if got and system else got
        if isinstance(node, bool):
            return "true" if node else "false"
        return node if isinstance(node, str) else None
    if ptype == "string":
        text = node if isinstance(node, str) else None
        if isinstance(node, dict):
            text = node.get("family") or (node.get("given") or [None])[0] or node.get("text") or node.get("city") \
                or (node.get("line") or [None])[0]
        return text[:4] if isinstance(text, str) and text.strip() else None
    if ptype == "reference":
        ref = node.get("reference") if isinstance(node, dict) else node if isinstance(node, str) else None
        return ref if isinstance(ref, str) and "/" in ref and not ref.startswith(("#", "urn:", "http")) else None
    if ptype == "uri":
        return node if isinstance(node, str) else None
    if ptype == "date":  # a date, dateTime, instant, Period, or Timing with events or bounds
        dated = isinstance(node, str) or (isinstance(node, dict) and (
            "start" in node or "end" in node or node.get("event")
            or isinstance((node.get("repeat") or {}).get("boundsPeriod"), dict)))
        return "lt2999" if dated else None
    if ptype in ("quantity", "number"):
        return "ge-1000000000000"
    return None


@pytest.fixture
def stored(http: Any, admin: BackendClient) -> list[dict[str, Any]]:
    """The served types' HL7 examples the server accepts, as stored."""
    out = []
    for path in [*example_files(), *RECORD_EXAMPLES]:
        body = json.loads(path.read_text())
        if body.get("resourceType") not in SERVED:
            continue
        body.pop("id", None)
        r = http.post(f"/fhir/{body['resourceType']}", json=body, headers=admin.headers())
        if r.status_code == 201:
            out.append(r.get_json())
    assert len({r["resourceType"] for r in out}) == len(SERVED)
    return out


def test_every_declared_parameter_finds_its_example_and_nothing_else(http: Any, admin: BackendClient,
                                                                    stored: list[dict[str, Any]]) -> None:
    h = {**admin.headers(), "Prefer": "handling=strict"}
    registry = http.application.extensions["fhirserver"].params
    cs = http.get("/fhir/metadata").get_json()
    checked, matched = 0, 0
    for entry in cs["rest"][0]["resource"]:
        rtype = entry["type"]
        declared = {p["name"]: p["type"] for p in entry["searchParam"]}
        answered = {code for code, p in registry.for_type(rtype).items()} | {"_id", "_lastUpdated"}
        assert set(declared) == answered, (rtype, set(declared) ^ answered)  # declared == answered
        if rtype not in SERVED:
            continue
        refused = http.get(f"/fhir/{rtype}?zz-undeclared=1", headers=h)
        assert refused.status_code == 400, rtype
        mine = [r for r in stored if r["resourceType"] == rtype]
        for name, ptype in declared.items():
            param = registry.get(rtype, name)
            miss = http.get(f"/fhir/{rtype}", query_string={name: NO_MATCH.get(ptype, "zz")}, headers=h)
            assert miss.status_code in (200, 400), (rtype, name, miss.get_data(as_text=True)[:200])
            if miss.status_code == 400:  # only a value this type cannot take may be refused, never a 5xx
                assert ptype in ("token", "composite", "reference"), (rtype, name, miss.get_json())
            checked += 1
            if param is None or not param.expression:
                continue
            extract = compile_expression(param.expression, rtype)
            if extract is None:
                continue
            for resource in mine:
                values = [_query_value(ptype, node) for node, t in extract(resource)
                          if ptype != "date" or t not in ("string", "String")]
                value = next((v for v in values if v), None)
                if value is None:
                    continue
                found = http.get(f"/fhir/{rtype}", query_string={"_id": resource["id"], name: value}, headers=h)
                assert found.status_code == 200, (rtype, name, value, found.get_data(as_text=True)[:200])
                ids = {e["resource"]["id"] for e in found.get_json().get("entry", [])}
                assert ids == {resource["id"]}, (rtype, name, value)
                none = http.get(f"/fhir/{rtype}", query_string={"_id": resource["id"], name: NO_MATCH[ptype]},
                                headers=h)
                if none.status_code == 200:
                    assert not none.get_json().get("entry"), (rtype, name, NO_MATCH[ptype])
                matched += 1
                break
    assert checked > 600 and matched > 400, (checked, matched)
