"""A consent test server: one app, a fixed data set of patients, observations and questionnaire
responses (some sensitive), clients registered with purposes/flags, patient-user tokens, and
helpers that run every kind of read a client can do and compare it with the reference."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from fhirserver.auth.tokens import issue_token
from tests.conftest import AUDITOR_SETTINGS, BASE, make_settings
from tests.support.apps import fresh_app

from .reference import Request, patients_of, visible

LOINC = "http://loinc.org"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
SCT = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
CODES = {"hr": "8867-4", "bw": "29463-7", "hiv": "7918-6", "phq": "44261-6", "bp": "85354-9"}
# codes of the record types beyond the first four (issue 14): (system, code)
RECORD_CODES = {"hiv-dx": (SCT, "86406008"), "htn": (SCT, "38341003"), "checkup": (SCT, "185349003"),
                "depression": (ICD10, "F32.9"), "cbc": (LOINC, "58410-2"), "hiv-panel": (LOINC, "75622-1")}
# the clinical types of the compartment the checks run over, with the search parameter of their code
CLINICAL = {"Observation": "code", "Condition": "code", "Encounter": "type", "DiagnosticReport": "code"}
_n = itertools.count()
Key = tuple[str, str]


def obs(oid: str, pid: str, code: str, when: str, performer: str | None = None,
        security: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                            "code": {"coding": [{"system": LOINC, "code": code}]},
                            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when}
    if performer:
        body["performer"] = [{"reference": f"Patient/{performer}"}]
    if security:
        body["meta"] = {"security": security}
    return body


def base_data() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    people = [("pa", "female", "1980-04-12"), ("pb", "male", "1975-09-30"), ("pc", "female", "2015-06-02"),
              ("pd", "other", "1990-01-20")]
    for pid, gender, birth in people:
        out.append({"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth})
        out.append(obs(f"{pid}-hr", pid, CODES["hr"], "2024-02-10"))
        out.append(obs(f"{pid}-bw", pid, CODES["bw"], "2024-08-20"))
    out.append(obs("pa-hiv", "pa", CODES["hiv"], "2024-05-05"))
    out.append(obs("pb-hiv", "pb", CODES["hiv"], "2024-03-01"))
    out.append(obs("pc-phq", "pc", CODES["phq"], "2024-03-03"))
    out.append(obs("pa-bp", "pa", CODES["bp"], "2024-04-01", performer="pb"))
    out.append(obs("pd-lab", "pd", CODES["bp"], "2024-09-09", security=[{"system": ACT, "code": "HIV"}]))
    out.append({"resourceType": "QuestionnaireResponse", "id": "pa-qr", "status": "completed",
                "questionnaire": "http://loinc.org/q/44249-1", "subject": {"reference": "Patient/pa"},
                "authored": "2024-03-01T10:00:00Z"})
    out.append({"resourceType": "QuestionnaireResponse", "id": "pb-qr", "status": "completed",
                "questionnaire": "http://example.org/q/intake", "subject": {"reference": "Patient/pb"},
                "authored": "2024-07-01T10:00:00Z"})
    out += record_data()
    return out


def concept(key: str) -> dict[str, Any]:
    system, code = RECORD_CODES[key]
    return {"coding": [{"system": system, "code": code}]}


def record_data() -> list[dict[str, Any]]:
    """Conditions, Encounters and DiagnosticReports, some sensitive by their codes (labelled by the
    server on write from profiles/sensitive-codes-clinical.json), one in two compartments."""
    return [
        {"resourceType": "Condition", "id": "pa-cond", "code": concept("hiv-dx"),
         "subject": {"reference": "Patient/pa"}, "onsetDateTime": "2024-05-01"},
        {"resourceType": "Condition", "id": "pb-cond", "code": concept("htn"), "subject": {"reference": "Patient/pb"},
         "asserter": {"reference": "Patient/pa"}, "recordedDate": "2024-08-01"},
        {"resourceType": "Encounter", "id": "pa-enc", "status": "finished", "class": {"code": "AMB"},
         "type": [concept("checkup")], "reasonCode": [concept("depression")], "subject": {"reference": "Patient/pa"},
         "period": {"start": "2024-02-10T09:00:00Z", "end": "2024-02-10T10:00:00Z"}},
        {"resourceType": "Encounter", "id": "pc-enc", "status": "finished", "class": {"code": "AMB"},
         "type": [concept("checkup")], "subject": {"reference": "Patient/pc"},
         "period": {"start": "2024-07-15", "end": "2024-07-16"}},
        {"resourceType": "DiagnosticReport", "id": "pa-dr", "status": "final", "code": concept("cbc"),
         "subject": {"reference": "Patient/pa"}, "effectiveDateTime": "2024-04-01",
         "result": [{"reference": "Observation/pa-bp"}]},
        {"resourceType": "DiagnosticReport", "id": "pb-dr", "status": "final", "code": concept("hiv-panel"),
         "subject": {"reference": "Patient/pb"}, "effectiveDateTime": "2024-03-01"},
    ]


def codes_of(res: dict[str, Any]) -> set[tuple[str | None, str]]:
    """The (system, code) pairs a clinical resource carries in the element its CLINICAL search
    parameter covers (an Encounter's type)."""
    concepts: list[Any] = res.get("type", []) if res["resourceType"] == "Encounter" else [res.get("code")]
    return {(c.get("system"), c["code"]) for cc in concepts if isinstance(cc, dict) for c in cc.get("coding", [])}


def consent(cid: str, pid: str, provision: dict[str, Any], status: str = "active") -> dict[str, Any]:
    return {"resourceType": "Consent", "id": cid, "status": status, "scope": SCOPE,
            "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"}, "provision": provision}


@dataclass
class Caller:
    headers: dict[str, str]
    request: Request
    client_id: str | None = None


@dataclass
class ConsentServer:
    app: Any
    http: Any
    svc: Any
    token_url: str
    admin: dict[str, str]
    data: dict[Key, dict[str, Any]] = field(default_factory=dict)

    # ---- clients
    def audit_reader(self) -> dict[str, str]:
        """Headers of a privacy-office auditor (the only backend clients that read AuditEvents)."""
        key = generate_key("ES384")
        rec = register_backend_client(self.svc.engine, f"auditor {next(_n)}", "system/AuditEvent.rs",
                                      jwks=public_jwks(key), settings=AUDITOR_SETTINGS)
        resp = self.http.post("/auth/token", data=token_request_form(key, rec.client_id, self.token_url,
                                                                     "system/AuditEvent.rs"))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return {"Authorization": f"Bearer {resp.get_json()['access_token']}"}

    def backend(self, purposes: list[str] | None = None, organization: str | None = None,
                exempt: bool = False, break_glass: bool = False, scope: str = "system/*.rs",
                header: str | None = None, reason: str | None = None, jurisdiction: str | None = None) -> Caller:
        key = generate_key("ES384")
        settings: dict[str, Any] = {"jurisdiction": jurisdiction} if jurisdiction else {}
        if purposes is not None:
            settings["purposes"] = purposes
        if exempt:
            settings["consent_exempt"] = True
        if break_glass:
            settings["break_glass"] = True
        rec = register_backend_client(self.svc.engine, f"consent client {next(_n)}", "system/*.cruds",
                                      jwks=public_jwks(key), organization=organization, settings=settings)
        resp = self.http.post("/auth/token", data=token_request_form(key, rec.client_id, self.token_url, scope))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        headers = {"Authorization": f"Bearer {resp.get_json()['access_token']}"}
        purpose = (purposes or ["TREAT"])[0]
        if header:
            headers["X-Purpose-Of-Use"] = header
            purpose = header
        if reason:
            headers["X-Break-Glass-Reason"] = reason
        mode = "exempt" if exempt else "filter"
        if break_glass and header == "ETREAT" and reason:
            mode = "break-glass"
        actors = {f"Device/{rec.client_id}"} | ({organization} if organization else set())
        return Caller(headers, Request(purpose, mode, actors), rec.client_id)

    def user(self, fhir_user: str, scope: str, patient: str | None = None, linked: list[str] | None = None,
             purposes: list[str] | None = None) -> Caller:
        """A token as the SMART launch would issue it to an app acting for a signed-in user."""
        key = generate_key("ES384")
        settings = {"purposes": purposes} if purposes else {}
        rec = register_backend_client(self.svc.engine, f"consent app {next(_n)}", scope, jwks=public_jwks(key),
                                      settings=settings)
        context: dict[str, Any] = {"fhirUser": fhir_user, "linked_patients": linked or []}
        if patient:
            context["patient"] = patient
        with self.svc.engine.begin() as conn:
            token, _exp = issue_token(conn, rec.client_id, scope, 3600, context)
        own: set[str] = set()
        if fhir_user.startswith("Patient/"):
            own.add(fhir_user.split("/")[1])
        own |= set(linked or [])
        scope_patients: set[str] | None = None
        if scope.startswith("patient/"):
            scope_patients = {patient} if patient else set()
        elif scope.startswith("user/") and fhir_user.startswith("Patient/"):
            scope_patients = {fhir_user.split("/")[1], *(linked or [])}
        req = Request((purposes or ["TREAT"])[0], "filter", {f"Device/{rec.client_id}", fhir_user}, own, scope_patients)
        return Caller({"Authorization": f"Bearer {token}"}, req, rec.client_id)

    # ---- data
    def put(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=headers or self.admin)

    def load(self, bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            resp = self.put(body)
            assert resp.status_code in (200, 201), resp.get_data(as_text=True)
            stored = self.http.get(f"/fhir/{body['resourceType']}/{body['id']}", headers=self.admin).get_json()
            self.data[(body["resourceType"], body["id"])] = stored

    def set_consents(self, consents: list[dict[str, Any]]) -> None:
        for c in consents:
            resp = self.put(c)
            assert resp.status_code in (200, 201), resp.get_data(as_text=True)
            self.data[("Consent", c["id"])] = self.http.get(f"/fhir/Consent/{c['id']}", headers=self.admin).get_json()

    def clear_consents(self, consents: list[dict[str, Any]]) -> None:
        for c in consents:
            assert self.http.delete(f"/fhir/Consent/{c['id']}", headers=self.admin).status_code == 204
            self.data.pop(("Consent", c["id"]), None)

    # ---- FHIR calls
    def get(self, caller: Caller, url: str) -> Any:
        return self.http.get(url, headers=caller.headers)

    def bundle(self, caller: Caller, url: str) -> dict[str, Any]:
        resp = self.get(caller, url)
        assert resp.status_code == 200, (url, resp.get_data(as_text=True))
        return resp.get_json()

    def all_pages(self, caller: Caller, url: str) -> tuple[list[Key], list[Key], int | None]:
        """(match keys over every page, include keys, first page's total)."""
        matches: list[Key] = []
        includes: list[Key] = []
        body = self.bundle(caller, url)
        total = body.get("total")
        for _ in range(200):
            for e in body.get("entry", []):
                key = (e["resource"]["resourceType"], e["resource"]["id"])
                mode = e["search"]["mode"]
                (matches if mode == "match" else includes if mode == "include" else []).append(key)
            nxt = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None)
            if not nxt:
                break
            parts = urlsplit(nxt)
            assert nxt.startswith(BASE)
            body = self.bundle(caller, parts.path + "?" + parts.query)
        return matches, includes, total


def expected(srv: ConsentServer, caller: Caller) -> set[Key]:
    consents = [b for (t, _i), b in srv.data.items() if t == "Consent"]
    return {k for k, body in srv.data.items() if visible(body, consents, caller.request)}


def check_everything(srv: ConsentServer, caller: Caller) -> None:
    """read, search, _summary=count, paging, _include, _revinclude, _has, chaining and $everything
    all agree with the reference evaluation over the whole data set."""
    vis = expected(srv, caller)
    data = srv.data

    def of_type(t: str) -> set[Key]:
        return {k for k in vis if k[0] == t}

    # read (hidden = 404, exactly like absent)
    for key in data:
        resp = srv.get(caller, f"/fhir/{key[0]}/{key[1]}")
        assert resp.status_code == (200 if key in vis else 404), (key, resp.status_code, caller.request)
    for t in ("Patient", "QuestionnaireResponse", "Consent", *CLINICAL):
        # search, and totals
        m, _i, total = srv.all_pages(caller, f"/fhir/{t}?_count=1000")
        assert set(m) == of_type(t), (t, sorted(set(m) ^ of_type(t)), caller.request)
        assert total == len(of_type(t))
        # _summary=count
        body = srv.bundle(caller, f"/fhir/{t}?_summary=count")
        assert body["total"] == len(of_type(t)) and not body.get("entry")
    # paging: pages of 2 hold exactly the visible rows, each once, and the total is exact
    m, _i, total = srv.all_pages(caller, "/fhir/Observation?_count=2")
    assert sorted(m) == sorted(of_type("Observation")) and len(m) == len(set(m)) and total == len(m)

    def subject(key: Key) -> Key | None:
        ref = data[key].get("subject", {}).get("reference")
        return ("Patient", ref.split("/")[1]) if ref else None

    for t, code_param in CLINICAL.items():
        # _include: subjects of visible resources, only when the subject is visible too
        m, inc, _t = srv.all_pages(caller, f"/fhir/{t}?_count=1000&_include={t}:subject")
        want_inc = {subject(k) for k in of_type(t)} & vis
        assert set(m) == of_type(t) and set(inc) == want_inc, (t, sorted(inc), sorted(want_inc))  # type: ignore[type-var]
        # _revinclude: visible resources of visible patients
        m, inc, _t = srv.all_pages(caller, f"/fhir/Patient?_count=1000&_revinclude={t}:subject")
        want_rev = {k for k in of_type(t) if subject(k) in of_type("Patient")}
        assert set(m) == of_type("Patient") and set(inc) == want_rev, (t, sorted(inc), sorted(want_rev))
        # _has: patients with a visible resource of a code (a hidden one must not reveal them)
        for code in sorted({c for k in data if k[0] == t for _s, c in codes_of(data[k])}):
            m, _i, total = srv.all_pages(caller, f"/fhir/Patient?_count=1000&_has:{t}:subject:{code_param}={code}")
            want = {subject(k) for k in of_type(t) if code in {c for _s, c in codes_of(data[k])}} & of_type("Patient")
            assert set(m) == want and total == len(want), (t, code, sorted(m), sorted(want))  # type: ignore[type-var]
        # chaining: resources whose (visible) subject has a gender
        for gender in ("female", "male"):
            m, _i, _t = srv.all_pages(caller, f"/fhir/{t}?_count=1000&subject:Patient.gender={gender}")
            want = {k for k in of_type(t) if subject(k) in of_type("Patient")
                    and data[subject(k)]["gender"] == gender}  # type: ignore[index]
            assert set(m) == want, (t, gender, sorted(m), sorted(want))
    # $everything: 404 for a hidden patient; else the visible members of the compartment
    for pkey in [k for k in data if k[0] == "Patient"]:
        resp = srv.get(caller, f"/fhir/Patient/{pkey[1]}/$everything?_count=1000")
        if pkey not in vis:
            assert resp.status_code == 404
            continue
        m, _i, _t = srv.all_pages(caller, f"/fhir/Patient/{pkey[1]}/$everything?_count=1000")
        want = {k for k in vis if pkey[1] in patients_of(data[k])}
        assert set(m) == want, (pkey, sorted(set(m) ^ want))


def start(tmp: Path, database_url: str = "", **settings_kw: Any) -> ConsentServer:
    settings = make_settings(tmp, database_url, **settings_kw)
    app = fresh_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "consent back office", "system/*.cruds", jwks=public_jwks(key),
                                  settings={"consent_exempt": True})
    resp = http.post("/auth/token", data=token_request_form(key, rec.client_id, settings.token_url, "system/*.cruds"))
    admin = {"Authorization": f"Bearer {resp.get_json()['access_token']}"}
    srv = ConsentServer(app, http, svc, settings.token_url, admin)
    srv.load(base_data())
    return srv


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True)
