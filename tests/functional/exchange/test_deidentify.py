"""De-identified Bulk export (`_deidentify=safe-harbor`) through HTTP: no HIPAA Safe Harbor
identifier of the stored data survives (every HL7 example, the demo data), clinical content and
references within one export do, pseudonyms are unlinkable across exports unless the client is
registered for stable pseudonyms, and research exports must be de-identified."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirserver.demo import load_demo
from fhirserver.exchange.deidentify import AGE_90_PLUS, PSEUDONYM_SYSTEM
from tests.conftest import AUDITOR_SETTINGS, EXAMPLES, example_files
from tests.support.bulk import Server, _app, _local, client_token

FULL_DATE = re.compile(r"\d{4}-\d{2}")
RECORD_EXAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "hl7-r4-examples"  # issue 14's types
PEOPLE = {"", "Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Person", "Organization"}


@pytest.fixture
def server(tmp_path: Path) -> Any:
    app = _app(tmp_path)
    yield Server(app)
    app.extensions["fhirserver"].engine.dispose()




def export(srv: Server, token: str, **params: str) -> dict[str, list[dict[str, Any]]]:
    resp = srv.kickoff(token, _deidentify="safe-harbor", **params)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    done = srv.wait(token, resp.headers["Content-Location"])
    assert done.status_code == 200, done.get_data(as_text=True)
    assert done.get_json()["extension"] == {"deidentified": "safe-harbor"}
    return srv.files(token, done.get_json())


def strings(node: Any, key: str = "") -> list[tuple[str, str]]:
    """(element name, value) for every string in a JSON tree."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(v, k)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v, key)]
    return [(key, node)] if isinstance(node, str) else []


def identifiers_of(res: Any) -> set[str]:
    """The Safe Harbor identifiers a resource holds: names, contact details, address parts below
    the state, full dates, identifier values, reference displays, free text and attachments."""
    found: set[str] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, list):
            for v in node:
                walk(v, key)
            return
        if not isinstance(node, dict):
            return
        if key in ("name", "valueHumanName"):
            found.update(v for k, v in strings(node) if k in ("family", "given", "text"))
        elif key in ("telecom", "valueContactPoint"):
            found.update(v for k, v in strings(node) if k == "value")
        elif key in ("address", "valueAddress"):
            found.update(v for k, v in strings(node) if k in ("line", "city", "district", "text"))
            found.update(v for k, v in strings(node) if k == "postalCode" and len(v) > 3)
        elif key in ("identifier", "valueIdentifier", "accessionIdentifier", "groupIdentifier", "masterIdentifier",
                     "preAdmissionIdentifier", "requisition") and isinstance(node.get("value"), str):
            found.add(node["value"])
        elif key in ("photo", "valueAttachment", "sourceAttachment"):
            found.update(v for k, v in strings(node) if k in ("data", "url", "title"))
        target = str(node.get("reference", "")).split("/")[-2:-1] or [""]
        contained = str(node.get("reference", "")).startswith("#")  # e.g. a contained Condition "Obesity"
        if isinstance(node.get("display"), str) and target[0] in PEOPLE and "code" not in node and not contained:
            found.add(node["display"])  # "Peter Chalmers" as the display of a Patient reference
        for k, v in node.items():
            if k in ("valueString", "valueMarkdown") and isinstance(v, str) and " " in v and len(v) >= 12:
                found.add(v)  # free text (one-word answers such as "married" are generic words)
            elif k == "note":
                found.update(t for kk, t in strings(v) if kk == "text")
            elif k in ("birthDate", "deceasedDateTime") and isinstance(v, str):
                found.add(v)
            walk(v, k)

    walk(res)
    # short or generic values ("1", "Jim" as a code text) cannot be told apart from clinical text
    return {s for s in found if len(s) >= 5 and not s.isdigit() or (s.isdigit() and len(s) >= 6)}


def assert_deidentified(originals: list[dict[str, Any]], files: dict[str, list[dict[str, Any]]],
                        svc: Any) -> None:
    # a Questionnaire's identifier ("phq-9") names a form, not a person, and a CodeSystem's or
    # ValueSet's identifiers and contacts name a terminology and its publisher: not Safe Harbor identifiers
    secret = set().union(*(identifiers_of(r) for r in originals
                           if r["resourceType"] not in ("Questionnaire", "CodeSystem", "ValueSet")))
    secret -= {r["resourceType"] for r in originals}  # a display "Patient" is generic, and in every reference
    # the text of a CodeableConcept is clinical content and kept ("Midwife" is both a role's text and
    # a contained Practitioner's family name in CarePlan/preg; Encounter/f202's reason text is also
    # the display of a reference): a secret inside such a text is not counted there
    concept_texts = [n["text"] for r in originals for n in _dicts(r)
                     if isinstance(n.get("text"), str) and "div" not in n and "status" not in n]
    concept_texts += [n["display"] for r in originals for n in _dicts(r)  # a coding's display ("Brand name")
                      if isinstance(n.get("display"), str) and "code" in n]

    def is_concept_text(key: str, value: str, s: str) -> bool:
        return key in ("text", "display") and any(s in t and value in t for t in concept_texts)

    ids = {f"{r['resourceType']}/{r['id']}" for r in originals if r.get("id")}
    for rtype, items in files.items():
        for res in items:
            svc.validator.validate(res, rtype)  # still valid FHIR R4
            assert f"{rtype}/{res['id']}" not in ids
            assert "text" not in res and {"PSEUDED", "REDACTED"} <= {s["code"] for s in res["meta"]["security"]}
            for key, value in strings(res):
                leaked = [s for s in secret if s in value and not is_concept_text(key, value, s)]
                assert not leaked, f"{rtype}.{key} keeps {leaked}"
                year_start = key == "recorded" and re.fullmatch(r"\d{4}-01-01T00:00:00Z", value)  # required instant
                if key not in ("url", "code") and not key.startswith("system") and not year_start:  # NDC: 0069-2587-10
                    assert not FULL_DATE.search(value), f"{rtype}.{key} keeps a full date {value}"
                if key == "reference" and not value.startswith("#"):
                    assert value not in ids and not any(value.endswith("/" + i) for i in ids), value
            for ident in _all(res, "identifier"):
                assert ident["system"] == PSEUDONYM_SYSTEM and len(ident["value"]) == 32


def _dicts(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [d for v in node for d in _dicts(v)]
    if not isinstance(node, dict):
        return []
    return [node] + [d for v in node.values() for d in _dicts(v)]


def _all(node: Any, name: str) -> list[Any]:
    if isinstance(node, list):
        return [x for v in node for x in _all(v, name)]
    if not isinstance(node, dict):
        return []
    found = [x for x in (node[name] if isinstance(node.get(name), list) else [node[name]])] if name in node else []
    return found + [x for k, v in node.items() for x in _all(v, name)]


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/fhir-examples not present")
def test_no_identifier_survives_on_any_hl7_example(server: Server) -> None:
    writer = client_token(server, "loader", "system/*.cruds system/Binary.cruds", consent_exempt=True)
    originals = []
    invalid = {"Questionnaire-qs1.json", "Questionnaire-zika-virus-exposure-assessment.json"}  # test_examples.py
    for path in [*example_files(), *(p for p in sorted(RECORD_EXAMPLES.glob("*.json")) if p.name not in invalid)]:
        res = json.loads(path.read_text())
        resp = server.http.put(f"/fhir/{res['resourceType']}/{res['id']}", json=res, headers=server.h(writer))
        assert resp.status_code in (200, 201), (path.name, resp.get_data(as_text=True))
        originals.append(res)
    reader = client_token(server, "exporter", "system/*.rs system/Binary.rs", consent_exempt=True)
    files = export(server, reader)
    by_type = {t: sum(1 for r in originals if r["resourceType"] == t) for t in {r["resourceType"] for r in originals}}
    assert {t: len(v) for t, v in files.items()} == by_type  # every example exported, none dropped
    assert_deidentified(originals, files, server.svc)
    assert files["Binary"] and not [b for b in files["Binary"] if "data" in b]  # a document's bytes never leave
    # clinical content stays: the codes and quantities of every Observation are all there
    def clinical(obs: dict[str, Any]) -> str:
        return json.dumps([obs.get("code"), obs.get("valueQuantity"), obs.get("component")], sort_keys=True)
    assert sorted(map(clinical, files["Observation"])) == sorted(
        clinical(r) for r in originals if r["resourceType"] == "Observation")
    # references between exported resources still resolve inside the export
    exported = {f"{r['resourceType']}/{r['id']}" for items in files.values() for r in items}
    linked = [o["subject"]["reference"] for o in files["Observation"]
              if o.get("subject", {}).get("reference", "").startswith("Patient/")]
    originally_linked = [o["subject"]["reference"] for o in originals if o["resourceType"] == "Observation"
                         and o.get("subject", {}).get("reference", "") in
                         {f"Patient/{p['id']}" for p in originals if p["resourceType"] == "Patient"}]
    assert originally_linked and sum(ref in exported for ref in linked) == len(originally_linked)


def test_no_identifier_survives_on_the_demo_data(server: Server) -> None:
    from fhirserver.demo import demo_resources

    load_demo(server.svc)
    reader = client_token(server, "demo exporter", "system/*.rs", consent_exempt=True)
    files = export(server, reader)
    originals = demo_resources()
    assert sum(map(len, files.values())) == len(originals)
    assert_deidentified(originals, files, server.svc)


def test_addresses_ages_and_dates_follow_safe_harbor(server: Server) -> None:
    token = client_token(server, "writer", consent_exempt=True)
    old = server.create(token, {
        "resourceType": "Patient", "birthDate": "1921-03-04", "gender": "female",
        "name": [{"family": "Oldenburg", "given": ["Ottilie"]}],
        "address": [{"line": ["12 Elm Street"], "city": "Keene", "state": "NH", "postalCode": "03601",
                     "country": "US"}]})
    young = server.create(token, {
        "resourceType": "Patient", "birthDate": "1990-07-08", "deceasedDateTime": "2020-01-02T03:04:05Z",
        "address": [{"line": ["1 Main St"], "city": "Cambridge", "state": "MA", "postalCode": "02138-1234"}],
        "telecom": [{"system": "email", "value": "young@example.org"}],
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "MR"}], "text": "Medical record number"}}]})
    server.create(token, {
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{young}",
                                                                       "display": "Young Person"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
        "effectivePeriod": {"start": "2021-05-06T07:08:09Z", "end": "2021-05-06T08:00:00Z"},
        "issued": "2021-05-06T09:00:00Z", "valueQuantity": {"value": 71, "unit": "/min",
                                                            "system": "http://unitsofmeasure.org", "code": "/min"},
        "note": [{"text": "Patient said her neighbour Mrs Miller drove her in"}]})
    server.create(token, {
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{old}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0", "display": "Age"}]},
        "valueQuantity": {"value": 104, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}})
    files = export(server, client_token(server, "reader", "system/*.rs", consent_exempt=True))
    age = next(o for o in files["Observation"] if o["code"]["coding"][0]["code"] == "30525-0")
    assert age["valueQuantity"] == {"value": 90, "comparator": ">=", "unit": "a",
                                    "system": "http://unitsofmeasure.org", "code": "a"}
    files["Observation"].remove(age)
    patients = sorted(files["Patient"], key=lambda p: "birthDate" in p)
    aged, other = patients
    assert "birthDate" not in aged and {"url": AGE_90_PLUS, "valueBoolean": True} in aged["extension"]
    assert aged["address"] == [{"state": "NH", "postalCode": "000", "country": "US"}]  # a < 20,000 zone
    assert aged["gender"] == "female" and "name" not in aged
    assert other["birthDate"] == "1990" and other["deceasedDateTime"] == "2020"
    assert other["address"] == [{"state": "MA", "postalCode": "021"}] and "telecom" not in other
    ident = other["identifier"][0]
    assert ident["type"]["coding"][0]["code"] == "MR" and ident["value"] not in ("12345",)
    obs = files["Observation"][0]
    assert obs["subject"] == {"reference": f"Patient/{other['id']}"}
    assert obs["effectivePeriod"] == {"start": "2021", "end": "2021"}
    assert "issued" not in obs and "note" not in obs
    assert obs["valueQuantity"]["value"] == 71 and obs["code"]["text"] == "Heart rate"
    assert {old, young}.isdisjoint({p["id"] for p in patients})


def test_pseudonyms_are_unlinkable_across_exports_unless_the_client_is_stable(server: Server) -> None:
    token = client_token(server, "writer", consent_exempt=True)
    for i in range(3):
        server.create(token, {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": f"MRN-{i}"}]})

    def pseudonyms(tok: str) -> tuple[set[str], set[str]]:
        pats = export(server, tok, _type="Patient")["Patient"]
        return {p["id"] for p in pats}, {p["identifier"][0]["value"] for p in pats}

    plain = client_token(server, "plain", "system/*.rs", consent_exempt=True)
    first, second = pseudonyms(plain), pseudonyms(plain)
    assert len(first[0]) == 3 and first[0].isdisjoint(second[0]) and first[1].isdisjoint(second[1])
    stable = client_token(server, "stable", "system/*.rs", consent_exempt=True, stable_pseudonyms=True)
    third, fourth = pseudonyms(stable), pseudonyms(stable)
    assert third == fourth and third[0].isdisjoint(first[0]) and third[0].isdisjoint(second[0])


def test_research_exports_must_be_deidentified(server: Server) -> None:
    writer = client_token(server, "writer", consent_exempt=True)
    pid = server.create(writer, {"resourceType": "Patient", "name": [{"family": "Researchable"}]})
    server.create(writer, {
        "resourceType": "Consent", "status": "active", "patient": {"reference": f"Patient/{pid}"},
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                     "code": "HRESCH"}]}})
    research = client_token(server, "research", "system/*.rs", purposes=["HRESCH"])
    resp = server.kickoff(research)
    assert resp.status_code == 403 and "de-identified" in resp.get_data(as_text=True)
    files = export(server, research, _type="Patient")
    assert len(files["Patient"]) == 1 and "Researchable" not in json.dumps(files)
    # the audit trail says what left, for which purpose, and that it was de-identified
    auditor = client_token(server, "auditor", "system/AuditEvent.rs", **AUDITOR_SETTINGS)
    events = server.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=server.h(auditor)).get_json()
    runs = [e["resource"] for e in events["entry"]
            if e["resource"].get("outcomeDesc", "").startswith("export complete")]
    assert len(runs) == 1 and runs[0]["outcomeDesc"] == "export complete: Patient 1; de-identified (safe-harbor)"
    assert runs[0]["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH"


def test_capability_statement_documents_deidentify(server: Server) -> None:
    from fhirserver.pipeline.capability import DEIDENTIFY_EXTENSION

    cap = server.http.get("/fhir/metadata").get_json()
    ops = cap["rest"][0]["operation"] + [op for r in cap["rest"][0]["resource"] for op in r.get("operation", [])]
    exports = [op for op in ops if op["name"] == "export"]
    assert len(exports) >= 2
    for op in exports:
        assert {"url": DEIDENTIFY_EXTENSION, "valueCode": "safe-harbor"} in op["extension"]
        assert "_deidentify=safe-harbor" in op["documentation"]


def test_an_exports_pseudonym_key_goes_with_the_export(server: Server) -> None:
    import sqlalchemy as sa

    token = client_token(server, "writer", consent_exempt=True)
    server.create(token, {"resourceType": "Patient", "name": [{"family": "Keyed"}]})
    resp = server.kickoff(token, _deidentify="safe-harbor")
    job = resp.headers["Content-Location"].split("_jobId=")[-1].split("&")[0]
    assert server.wait(token, resp.headers["Content-Location"]).status_code == 200

    def scopes() -> set[str]:
        with server.svc.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.text("SELECT scope FROM data_key"))}

    assert f"pseudonym:export:{job}" in scopes()
    assert server.http.delete(_local(resp.headers["Content-Location"]), headers=server.h(token)).status_code == 202
    assert f"pseudonym:export:{job}" not in scopes() and f"export:{job}" not in scopes()


def test_record_types_lose_documents_names_and_free_text() -> None:
    """The types added with the whole US Core record go through the same generic walk: a
    DocumentReference keeps of its (required) attachment only the content type, not the letter
    itself, a RelatedPerson or Practitioner no
    name, telecom or address detail, an Encounter only years."""
    from fhirserver.exchange.deidentify import Deidentifier

    deid = Deidentifier(b"k" * 32, today=date(2026, 1, 1))
    doc = deid.apply({"resourceType": "DocumentReference", "id": "d1", "status": "current",
                      "subject": {"reference": "Patient/p1", "display": "Ann Smith"},
                      "content": [{"attachment": {"contentType": "application/pdf", "data": "SGVsbG8=",
                                                  "title": "Discharge letter of Ann Smith"},
                                   "format": {"code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"}}]})
    text = json.dumps(doc)
    assert "SGVsbG8=" not in text and "Ann Smith" not in text and "Discharge" not in text
    assert doc["content"][0]["attachment"] == {"contentType": "application/pdf"}
    rp = deid.apply({"resourceType": "RelatedPerson", "id": "r1", "patient": {"reference": "Patient/p1"},
                     "name": [{"family": "Smith"}], "telecom": [{"value": "555"}],
                     "address": [{"line": ["1 Main St"], "city": "Springfield", "state": "IL", "postalCode": "62704"}]})
    assert "Smith" not in json.dumps(rp) and "555" not in json.dumps(rp) and "Main St" not in json.dumps(rp)
    enc = deid.apply({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
                      "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-03-05T10:00:00Z"}})
    assert enc["period"] == {"start": "2024"}
