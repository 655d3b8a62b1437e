"""Consent engine behaviour through HTTP: purpose of use, the AuditEvent's decision record,
break-the-glass, consent-exempt access, the alert feed (API and CLI), withdrawal immediacy, writes
the writer may not read back, sensitivity labelling, minors, history/vread/$lastn, transparency
for patients, and denial bursts with automatic suspension."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from fhirserver.db.schema import access_record
from fhirserver.users.registry import create_user, link_patient
from tests.conftest import make_settings

from .harness import ACT, ACT_REASON, CODES, ConsentServer, consent, obs, start

CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PASSWORD = "correct horse battery staple 42!"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = start(tmp_path_factory.mktemp("consent-behaviour"))
    yield server
    server.svc.engine.dispose()


@pytest.fixture
def consents(srv: ConsentServer):  # type: ignore[no-untyped-def]
    """Write Consents for one test; they are deleted afterwards."""
    written: list[dict[str, Any]] = []

    def _add(*bodies: dict[str, Any]) -> None:
        srv.set_consents(list(bodies))
        written.extend(bodies)

    yield _add
    srv.clear_consents([b for b in written if ("Consent", b["id"]) in srv.data])


def purpose(*codes: str) -> list[dict[str, str]]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def last_audit(srv: ConsentServer) -> dict[str, Any]:
    with srv.svc.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(access_record.c.id).order_by(access_record.c.pk.desc())
                                          .limit(3)).all()]
    reader = srv.audit_reader()
    for event_id in ids:  # skip the admin's own reads of the audit trail
        body = srv.http.get(f"/fhir/AuditEvent/{event_id}", headers=reader).get_json()
        if not any(e.get("what", {}).get("identifier", {}).get("value") == "consent-exempt"
                   for e in body.get("entity", [])):
            return body
    raise AssertionError("no AuditEvent of the request found")


def entity_refs(event: dict[str, Any]) -> set[str]:
    return {e["what"].get("reference") or e["what"].get("identifier", {}).get("value")
            for e in event["entity"] if "what" in e}


def assert_forbidden(resp: Any, text: str) -> None:
    assert resp.status_code == 403, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "forbidden"
    assert text in body["issue"][0]["diagnostics"]


# ------------------------------------------------------------------ purpose of use
def test_purpose_header_must_be_one_of_the_clients(srv: ConsentServer) -> None:
    treat = srv.backend(purposes=["TREAT"])
    assert srv.get(treat, "/fhir/Patient/pa").status_code == 200
    for bad in ("HRESCH", "ETREAT", "nonsense"):
        resp = srv.http.get("/fhir/Patient/pa", headers={**treat.headers, "X-Purpose-Of-Use": bad})
        assert_forbidden(resp, bad)
    ok = srv.http.get("/fhir/Patient/pa", headers={**treat.headers, "X-Purpose-Of-Use": "TREAT"})
    assert ok.status_code == 200
    # the refusal is audited with outcome 4
    assert last_audit(srv)["outcome"] in ("0", "4")


def test_etreat_needs_the_break_glass_flag_and_a_reason(srv: ConsentServer) -> None:
    listed = srv.backend(purposes=["TREAT", "ETREAT"])
    resp = srv.http.get("/fhir/Patient/pa", headers={**listed.headers, "X-Purpose-Of-Use": "ETREAT",
                                                      "X-Break-Glass-Reason": "x"})
    assert_forbidden(resp, "break-the-glass")
    capable = srv.backend(break_glass=True)
    resp = srv.http.get("/fhir/Patient/pa", headers={**capable.headers, "X-Purpose-Of-Use": "ETREAT"})
    assert_forbidden(resp, "reason")


def test_audit_event_records_purpose_and_the_deciding_consents(srv: ConsentServer, consents: Any) -> None:
    consents(consent("aud-permit", "pb", {"type": "permit", "purpose": purpose("HRESCH")}),
             consent("aud-deny", "pa", {"type": "deny"}))
    research = srv.backend(purposes=["HRESCH"])
    assert srv.get(research, "/fhir/Observation/pb-hr").status_code == 200
    event = last_audit(srv)
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH"
    assert {"Consent/aud-permit", "default-policy:HRESCH"} <= entity_refs(event)
    # a search names the consents that permitted what it returned
    body = srv.bundle(research, "/fhir/Observation?_count=100")
    assert body["total"] >= 1
    assert "Consent/aud-permit" in entity_refs(last_audit(srv))
    # a hidden read is a 404 for the client; the audit trail says which consent denied it, and
    # the consent-denial metric counts it (by resource type only)
    treat = srv.backend()
    metric = 'fhirserver_consent_denials_total{resource_type="Observation"}'

    def denials() -> float:
        text = srv.http.get("/metrics").get_data(as_text=True)
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric)), 0.0)

    before = denials()
    resp = srv.get(treat, "/fhir/Observation/pa-hr")
    assert resp.status_code == 404
    assert denials() == before + 1
    event = last_audit(srv)
    assert event["outcome"] == "4" and "Consent/aud-deny" in entity_refs(event)
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"


def test_hidden_looks_exactly_like_absent(srv: ConsentServer, consents: Any) -> None:
    consents(consent("absent-deny", "pa", {"type": "deny"}))
    treat = srv.backend()
    hidden = srv.get(treat, "/fhir/Observation/pa-hr")
    absent = srv.get(treat, "/fhir/Observation/no-such-thing")
    assert hidden.status_code == absent.status_code == 404
    strip = lambda r: r.get_json()["issue"][0]["diagnostics"].split(" is not known")[0].split("/")[0]  # noqa: E731
    assert strip(hidden) == strip(absent) == "Observation"
    assert srv.get(treat, "/fhir/Observation/pa-hr/_history/1").status_code == 404
    assert srv.get(treat, "/fhir/Observation/pa-hr/_history").status_code == 404


# ------------------------------------------------------------------ break-the-glass, exempt, alerts
def admin_api_headers(srv: ConsentServer) -> dict[str, str]:
    key = generate_key("ES384")
    rec = register_backend_client(srv.svc.engine, "privacy office", "system/*.rs", jwks=public_jwks(key),
                                  settings={"admin": True})
    resp = srv.http.post("/auth/token", data=token_request_form(key, rec.client_id, srv.token_url, "system/*.rs"))
    return {"Authorization": f"Bearer {resp.get_json()['access_token']}"}


def test_break_the_glass_overrides_denies_and_is_audited_and_alerted(srv: ConsentServer, consents: Any,
                                                                     tmp_path: Any) -> None:
    consents(consent("btg-deny", "pa", {"type": "deny"}))
    glass = srv.backend(break_glass=True, header="ETREAT", reason="unconscious patient, ED bay 3")
    normal = srv.backend(break_glass=True)
    assert srv.get(normal, "/fhir/Observation/pa-hr").status_code == 404
    assert srv.get(glass, "/fhir/Observation/pa-hr").status_code == 200
    event = last_audit(srv)
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    assert {"Consent/btg-deny", "break-the-glass"} <= entity_refs(event)
    details = [d["valueString"] for e in event["entity"] for d in e.get("detail", [])]
    assert "unconscious patient, ED bay 3" in details
    # the alert feed (admin API) lists it with the overridden consent
    api = admin_api_headers(srv)
    alerts = srv.http.get("/api/admin/alerts?kind=break-glass", headers=api)
    assert alerts.status_code == 200, alerts.get_data(as_text=True)
    mine = [a for a in alerts.get_json() if a["client_id"] == glass.client_id]
    assert mine and mine[0]["detail"]["reason"] == "unconscious patient, ED bay 3"
    assert "Consent/btg-deny" in mine[0]["detail"]["overridden_consents"]
    # not for a normal client's token; documented in the OpenAPI document
    assert srv.http.get("/api/admin/alerts", headers=normal.headers).status_code == 403
    assert srv.http.get("/api/admin/alerts").status_code == 401
    assert "/api/admin/alerts" in srv.http.get("/api/openapi.json").get_json()["paths"]
    # and `fhirserver alerts list`
    from tests.functional.cli.test_cli import cli

    run = cli("alerts", "list", "--json", "--kind", "break-glass", data_dir=srv.svc.settings.data_dir)
    assert run.returncode == 0, run.stderr
    assert any(a["client_id"] == glass.client_id for a in json.loads(run.stdout))


def test_consent_exempt_access_is_audited_and_alerted(srv: ConsentServer, consents: Any) -> None:
    consents(consent("ex-deny", "pb", {"type": "deny"}))
    exempt = srv.backend(exempt=True)
    assert srv.get(exempt, "/fhir/Observation/pb-hiv").status_code == 200
    with srv.svc.engine.connect() as conn:
        event_id = conn.execute(select(access_record.c.id).order_by(access_record.c.pk.desc())).first()[0]
    event = srv.http.get(f"/fhir/AuditEvent/{event_id}", headers=srv.audit_reader()).get_json()
    assert "consent-exempt" in entity_refs(event)
    api = admin_api_headers(srv)
    alerts = srv.http.get(f"/api/admin/alerts?kind=consent-exempt&client_id={exempt.client_id}", headers=api)
    assert alerts.status_code == 200 and alerts.get_json()


# ------------------------------------------------------------------ withdrawal, writes, labels
def test_withdrawal_and_new_denies_take_effect_on_the_next_request(srv: ConsentServer, consents: Any) -> None:
    research = srv.backend(purposes=["HRESCH"])
    treat = srv.backend()
    c = consent("wd-1", "pd", {"type": "permit", "purpose": purpose("HRESCH")})
    consents(c)
    assert srv.get(research, "/fhir/Observation/pd-hr").status_code == 200
    srv.set_consents([{**c, "status": "inactive"}])  # withdrawn
    assert srv.get(research, "/fhir/Observation/pd-hr").status_code == 404
    assert srv.bundle(research, "/fhir/Observation?subject=Patient/pd&_summary=count")["total"] == 0
    srv.set_consents([c])  # given again
    assert srv.get(research, "/fhir/Observation/pd-hr").status_code == 200
    assert srv.get(treat, "/fhir/Observation/pd-hr").status_code == 200
    consents(consent("wd-2", "pd", {"type": "deny", "purpose": purpose("TREAT")}))  # a new deny
    assert srv.get(treat, "/fhir/Observation/pd-hr").status_code == 404
    assert srv.get(research, "/fhir/Observation/pd-hr").status_code == 200


def test_writes_the_writer_cannot_read_back_answer_minimal(srv: ConsentServer, consents: Any) -> None:
    lab = srv.backend(scope="system/Observation.cruds")
    resp = srv.http.post("/fhir/Observation", json=obs("x", "pb", CODES["hiv"], "2024-10-01"),
                         headers={**lab.headers, "Prefer": "return=representation"})
    assert resp.status_code == 201 and resp.data == b"" and resp.headers["Location"]
    rid = resp.headers["Location"].split("/Observation/")[1].split("/")[0]
    assert srv.get(lab, f"/fhir/Observation/{rid}").status_code == 404
    stored = srv.http.get(f"/fhir/Observation/{rid}", headers=srv.admin).get_json()
    labels = {(s["system"], s["code"]) for s in stored["meta"]["security"]}
    assert {(ACT, "HIV"), (CONF, "R")} <= labels
    # a visible write still returns the representation
    resp = srv.http.post("/fhir/Observation", json=obs("y", "pb", CODES["hr"], "2024-10-01"), headers=lab.headers)
    assert resp.status_code == 201 and resp.get_json()["resourceType"] == "Observation"
    srv.http.delete(f"/fhir/Observation/{rid}", headers=srv.admin)
    srv.http.delete(f"/fhir/Observation/{resp.get_json()['id']}", headers=srv.admin)


@pytest.mark.parametrize(("sent", "expected"), [
    ([], {(ACT, "HIV"), (CONF, "R")}),
    ([{"system": CONF, "code": "N"}], {(ACT, "HIV"), (CONF, "R")}),  # raised
    ([{"system": CONF, "code": "V"}], {(ACT, "HIV"), (CONF, "V")}),  # never lowered
    ([{"system": ACT, "code": "ETH"}], {(ACT, "ETH"), (ACT, "HIV"), (CONF, "R")}),  # sender labels kept
    ([{"system": ACT, "code": "HIV"}], {(ACT, "HIV"), (CONF, "R")}),  # not duplicated
])
def test_sensitivity_labels(srv: ConsentServer, sent: list[dict[str, str]], expected: set[tuple[str, str]]) -> None:
    body = obs("lbl", "pa", CODES["hiv"], "2024-01-01", security=sent or None)
    resp = srv.http.post("/fhir/Observation", json=body, headers=srv.admin)
    assert resp.status_code == 201
    got = resp.get_json()["meta"]["security"]
    assert {(s["system"], s["code"]) for s in got} == expected and len(got) == len(expected)
    srv.http.delete(f"/fhir/Observation/{resp.get_json()['id']}", headers=srv.admin)


def test_questionnaire_response_of_a_sensitive_questionnaire_is_labelled(srv: ConsentServer) -> None:
    labels = {(s["system"], s["code"]) for s in srv.data[("QuestionnaireResponse", "pa-qr")]["meta"]["security"]}
    assert (ACT, "PSY") in labels
    assert "meta" not in srv.data[("QuestionnaireResponse", "pb-qr")] or \
        not srv.data[("QuestionnaireResponse", "pb-qr")]["meta"].get("security")


SCT, ICD10, RXNORM = "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm", \
    "http://www.nlm.nih.gov/research/umls/rxnorm"


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


SUBJECT = {"subject": {"reference": "Patient/pa"}}


@pytest.mark.parametrize(("body", "expected"), [
    # diagnoses: ICD-10-CM categories by prefix, SNOMED CT concepts by code
    ({"resourceType": "Condition", "code": cc(ICD10, "F10.20"), **SUBJECT}, {"SUD"}),
    ({"resourceType": "Condition", "code": cc(ICD10, "F17.210"), **SUBJECT}, set()),  # nicotine: not listed
    ({"resourceType": "Condition", "code": cc(ICD10, "F32.9"), **SUBJECT}, {"PSY"}),
    ({"resourceType": "Condition", "code": cc(ICD10, "B20"), **SUBJECT}, {"HIV"}),
    ({"resourceType": "Condition", "code": cc(SCT, "86406008"), **SUBJECT}, {"HIV"}),
    ({"resourceType": "Condition", "code": cc(SCT, "38341003"), **SUBJECT}, set()),  # hypertension
    ({"resourceType": "Condition", "code": cc("urn:other", "F10.20"), **SUBJECT}, set()),  # the system counts
    # medications, procedures, reports, allergies, encounter reasons
    ({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
      "medicationCodeableConcept": cc(RXNORM, "1819"), **SUBJECT}, {"SUD"}),
    ({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
      "medicationCodeableConcept": cc(RXNORM, "197361"), "reasonCode": [cc(SCT, "35489007")], **SUBJECT}, {"PSY"}),
    ({"resourceType": "Procedure", "status": "completed", "code": cc(SCT, "714812005"), **SUBJECT}, {"SEX"}),
    ({"resourceType": "DiagnosticReport", "status": "final", "code": cc("http://loinc.org", "58410-2"),
      "conclusionCode": [cc(SCT, "76272004")], **SUBJECT}, {"STD"}),
    ({"resourceType": "AllergyIntolerance", "code": cc(SCT, "66590003"), "patient": {"reference": "Patient/pa"}},
     {"SUD"}),
    ({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "reasonCode": [cc(ICD10, "Z30.011")],
      **SUBJECT}, {"SEX"}),
    ({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, **SUBJECT}, set()),
])
def test_sensitivity_labels_of_record_types(srv: ConsentServer, body: dict[str, Any], expected: set[str]) -> None:
    """The record types are labelled on write from the same lists (profiles/sensitive-codes*.json),
    in the elements profiles/consent-elements.json names; a labelled one is hidden without an
    explicit permit (here: from a plain TREAT client), an unlabelled one is not."""
    resp = srv.http.post(f"/fhir/{body['resourceType']}", json=body, headers=srv.admin)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    stored = resp.get_json()
    labels = {s["code"] for s in stored.get("meta", {}).get("security", []) if s["system"] == ACT}
    assert labels == expected
    confidential = {s["code"] for s in stored.get("meta", {}).get("security", []) if s["code"] == "R"}
    assert confidential == ({"R"} if expected else set())
    url = f"/fhir/{body['resourceType']}/{stored['id']}"
    try:
        assert srv.get(srv.backend(), url).status_code == (404 if expected else 200)
    finally:
        srv.http.delete(url, headers=srv.admin)


# ------------------------------------------------------------------ minors
def test_minor_consent_must_come_from_a_guardian(srv: ConsentServer) -> None:
    engine, keys = srv.svc.engine, srv.svc.keys
    create_user(engine, keys, "mum.c", PASSWORD, "RelatedPerson/mum-c")
    link_patient(engine, "mum.c", "Patient/pc", "guardian")
    create_user(engine, keys, "uncle.c", PASSWORD, "RelatedPerson/uncle-c")
    link_patient(engine, "uncle.c", "Patient/pc", "proxy")
    body = consent("minor-1", "pc", {"type": "deny", "purpose": purpose("HRESCH")})
    child = srv.user("Patient/pc", "patient/Consent.cruds", patient="pc")
    for caller in (child, srv.backend(scope="system/Consent.cruds"),
                   srv.user("RelatedPerson/uncle-c", "patient/Consent.cruds", patient="pc", linked=["pc"])):
        resp = srv.put(body, caller.headers)
        assert resp.status_code == 422, resp.get_data(as_text=True)
        issue = resp.get_json()["issue"][0]
        assert issue["code"] == "business-rule" and "guardian" in issue["diagnostics"]
    mum = srv.user("RelatedPerson/mum-c", "patient/Consent.cruds", patient="pc", linked=["pc"])
    assert srv.put(body, mum.headers).status_code == 201
    adult = srv.user("Patient/pa", "patient/Consent.cruds", patient="pa")
    assert srv.put(consent("adult-1", "pa", {"type": "deny", "purpose": purpose("HMARKT")}), adult.headers).status_code == 201
    for cid in ("minor-1", "adult-1"):
        srv.http.delete(f"/fhir/Consent/{cid}", headers=srv.admin)


# ------------------------------------------------------------------ history, vread, $lastn
def test_history_vread_and_lastn_are_filtered(srv: ConsentServer, consents: Any) -> None:
    consents(consent("hist-deny", "pa", {"type": "deny", "code": [{"coding": [{"system": "http://loinc.org",
                                                                                "code": CODES["hr"]}]}]}))
    treat = srv.backend()
    assert srv.get(treat, "/fhir/Observation/pa-hr/_history/1").status_code == 404
    assert srv.get(treat, "/fhir/Observation/pa-bw/_history/1").status_code == 200
    hist = srv.bundle(treat, "/fhir/Observation/_history?_count=1000")
    ids = {e["resource"]["id"] for e in hist["entry"] if "resource" in e}
    assert "pa-hr" not in ids and "pa-bw" in ids and "pb-hr" in ids
    assert "pa-hiv" not in ids  # sensitive
    lastn = srv.bundle(treat, "/fhir/Observation/$lastn?patient=Patient/pa&max=5")
    ids = {e["resource"]["id"] for e in lastn["entry"]}
    assert ids == {"pa-bw", "pa-bp"}


# ------------------------------------------------------------------ transparency
def test_patient_sees_audit_events_about_their_own_data_only(srv: ConsentServer) -> None:
    treat = srv.backend()
    srv.get(treat, "/fhir/Observation/pa-bw")
    srv.get(treat, "/fhir/Observation/pb-bw")
    me = srv.user("Patient/pa", "patient/AuditEvent.rs", patient="pa")
    body = srv.bundle(me, "/fhir/AuditEvent?_count=1000")
    events = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
    assert events
    for event in events:
        assert "Patient/pa" in entity_refs(event) or any(a.get("who", {}).get("reference") == "Patient/pa"
                                                         for a in event["agent"])
    assert any("Observation/pa-bw" in r for ev in events for r in entity_refs(ev) if r)
    assert not any(ref and ref.startswith("Observation/pb-bw") for ev in events for ref in entity_refs(ev))
    # the search cannot probe what the projection hides: other patients, their resources, chains
    for probe, status in (("patient=Patient/pb", 403), ("patient=pb", 403), ("agent=Patient/pb", 403),
                          ("entity=Observation/pb-bw", 400), ("patient:Patient.gender=male", 400),
                          ("_include=AuditEvent:patient", 400), ("_has:Consent:patient:status=active", 400)):
        resp = srv.http.get(f"/fhir/AuditEvent?{probe}", headers=me.headers)
        assert resp.status_code == status, (probe, resp.get_data(as_text=True))
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert srv.http.get("/fhir/AuditEvent?patient=Patient/pa&date=ge2020", headers=me.headers).status_code == 200


def test_patient_sees_multi_patient_accesses_projected_to_themselves(srv: ConsentServer) -> None:
    """A clinician's search across patients is in each patient's list, showing only that patient."""
    treat = srv.backend()
    search = srv.http.get("/fhir/Observation?code=8867-4&_count=100", headers=treat.headers)
    assert search.status_code == 200
    names = {e["resource"]["subject"]["reference"] for e in search.get_json()["entry"]}
    assert {"Patient/pa", "Patient/pb"} <= names
    auditor = srv.audit_reader()
    full = srv.bundle(srv.backend(), "/fhir/Patient?_count=1")  # (another access, to be sure of ordering)
    assert full
    for pid, other in (("pa", "pb"), ("pb", "pa")):
        me = srv.user(f"Patient/{pid}", "patient/AuditEvent.rs", patient=pid)
        body = srv.bundle(me, f"/fhir/AuditEvent?agent=Device/{treat.client_id}&_count=100")
        events = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
        assert len(events) == 1, events  # the clinician's one search, seen by both
        event = events[0]
        text = json.dumps(event)
        assert f"Patient/{other}" not in text and f"{other}-hr" not in text
        assert f"Observation/{pid}-hr" in text
        mine = [e for e in event["entity"] if e.get("what", {}).get("reference") == f"Patient/{pid}"]
        assert len(mine) == 1 and "others are not shown" in mine[0]["description"]
        assert event["agent"][0]["who"]["display"]  # the app's registered name is shown
        # a single read of the event is the same projection; the auditor sees it whole
        read = srv.http.get(f"/fhir/AuditEvent/{event['id']}", headers=me.headers).get_json()
        assert f"Patient/{other}" not in json.dumps(read)
    whole = srv.http.get(f"/fhir/AuditEvent/{event['id']}", headers=auditor).get_json()
    assert {"Patient/pa", "Patient/pb"} <= entity_refs(whole)


def test_a_patient_is_told_why_someone_broke_the_glass(srv: ConsentServer) -> None:
    er = srv.backend(break_glass=True, header="ETREAT", reason="unconscious in the emergency room")
    assert srv.get(er, "/fhir/Patient/pc").status_code == 200
    me = srv.user("Patient/pc", "patient/AuditEvent.rs", patient="pc")
    body = srv.bundle(me, f"/fhir/AuditEvent?agent=Device/{er.client_id}")
    event = body["entry"][0]["resource"]
    reasons = [d.get("valueString") for e in event["entity"] for d in e.get("detail", [])
               if d.get("type") == "break-glass-reason"]
    assert reasons == ["unconscious in the emergency room"]
    # an auditor without the query-values permission still sees it redacted
    key = generate_key("ES384")
    rec = register_backend_client(srv.svc.engine, "plain auditor", "system/AuditEvent.rs", jwks=public_jwks(key),
                                  settings={"auditor": True, "purposes": ["HOPERAT"]})
    token = srv.http.post("/auth/token", data=token_request_form(key, rec.client_id, srv.token_url,
                                                                 "system/AuditEvent.rs")).get_json()["access_token"]
    event = srv.http.get(f"/fhir/AuditEvent/{event['id']}", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert [d.get("valueString") for e in event["entity"] for d in e.get("detail", [])
            if d.get("type") == "break-glass-reason"] == ["redacted"]


# ------------------------------------------------------------------ denial bursts
def test_denial_burst_raises_an_alert_and_suspends_the_client(tmp_path: Any) -> None:
    from fhirserver.app import create_app

    settings = make_settings(tmp_path, denial_burst_threshold=3, denial_burst_suspend=True)
    app = create_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    try:
        key = generate_key("ES384")
        rec = register_backend_client(svc.engine, "noisy", "system/Patient.rs", jwks=public_jwks(key))
        token = http.post("/auth/token", data=token_request_form(key, rec.client_id, settings.token_url,
                                                                 "system/Patient.rs")).get_json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(3):
            assert http.get("/fhir/Observation", headers=headers).status_code == 403  # no scope
        assert http.get("/fhir/Patient", headers=headers).status_code == 401  # suspended
        from fhirserver.consent.alerts import list_alerts

        kinds = {a.kind for a in list_alerts(svc.engine, client_id=rec.client_id)}
        # the burst is also a 2-point alert under the penalty policy: a warning (docs/operations.md)
        assert kinds == {"denial-burst", "client-suspended", "penalty"}
        from fhirserver.auth.clients import get_client

        assert get_client(svc.engine, rec.client_id).disabled  # type: ignore[union-attr]
    finally:
        svc.engine.dispose()
