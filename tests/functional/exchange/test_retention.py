"""Retention (issue 15, item 1): per-type (and per-purpose) policies erase or de-identify data
older than their period; `plan` lists what is due; a run interrupted half-way and resumed acts on
every due resource exactly once, on nothing recent and on nothing a policy does not name; every
batch is an AuditEvent; an erased Patient policy crypto-shreds the whole patient."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from fhirserver.cli import main
from fhirserver.clock import now_us
from fhirserver.db.schema import consent_rule, resource
from fhirserver.exchange.retention import TAG_SYSTEM, parse_policies, plan, run
from fhirserver.storage import repository
from tests.conftest import BackendClient
from tests.functional.exchange.test_load import cli_env

DAY = 86_400_000_000
POLICY = ("Observation[category=survey]=30d:erase, QuestionnaireResponse=30d:deidentify, "
          "Consent[purpose=HMARKT]=30d:erase, Patient[_tag=urn:example|archive]=1y:erase")
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}


@pytest.fixture
def settings(tmp_path: Any, db_url: str):  # type: ignore[no-untyped-def]
    from tests.conftest import make_settings

    return make_settings(tmp_path, db_url, retention_policy=POLICY)


def obs(pid: str, category: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}


def consent(pid: str, purpose: str) -> dict[str, Any]:
    return {"resourceType": "Consent", "status": "active", "scope": SCOPE, "patient": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "provision": {"type": "permit", "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}]}}


def create(http: Any, h: dict[str, str], body: dict[str, Any]) -> str:
    resp = http.post(f"/fhir/{body['resourceType']}", json=body, headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return f"{body['resourceType']}/{resp.get_json()['id']}"


def test_retention_plans_runs_resumes_and_audits(http: Any, admin: BackendClient, app: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    svc = app.extensions["fhirserver"]
    h = admin.headers()
    p1 = create(http, h, {"resourceType": "Patient", "name": [{"family": "Keep"}]}).split("/")[1]
    # data written 40 days ago (the repository's clock moved back while it is written)
    real = repository.now_us
    monkeypatch.setattr(repository, "now_us", lambda: real() - 40 * DAY)
    surveys = [create(http, h, obs(p1, "survey")) for _ in range(3)]
    vitals = create(http, h, obs(p1, "vital-signs"))
    answers = [create(http, h, {"resourceType": "QuestionnaireResponse", "status": "completed",
                                "subject": {"reference": f"Patient/{p1}"}, "authored": "2024-01-02"})
               for _ in range(2)]
    marketing = create(http, h, consent(p1, "HMARKT"))
    treatment = create(http, h, consent(p1, "TREAT"))
    archived = create(http, h, {"resourceType": "Patient", "meta": {"tag": [{"system": "urn:example", "code": "archive"}]},
                                "name": [{"family": "Gone"}]})
    monkeypatch.setattr(repository, "now_us", lambda: real() - 400 * DAY)
    old_patient = create(http, h, {"resourceType": "Patient", "meta": {"tag": [{"system": "urn:example",
                                                                              "code": "archive"}]}})
    old_obs = create(http, h, obs(old_patient.split("/")[1], "laboratory"))
    monkeypatch.setattr(repository, "now_us", real)
    recent = create(http, h, obs(p1, "survey"))

    policies = parse_policies(svc.settings.retention_policy, svc.types, svc.params)
    due = {r.policy: r for r in plan(svc, policies)}
    assert [due[p.text].due for p in policies] == [3, 2, 1, 1]
    assert set(due[policies[0].text].sample) == set(surveys)
    assert due[policies[3].text].sample == [old_patient]  # the archived patient of 40 days is not due yet

    started = now_us()
    first = run(svc, policies, batch=2, limit=2)  # interrupted after two resources
    assert sum(r.done for r in first) == 2
    assert {r.policy: r.due for r in plan(svc, policies)}[policies[0].text] == 1
    second = run(svc, policies, batch=2)
    assert [r.done for r in second] == [1, 2, 1, 1]
    assert sum(r.done for r in run(svc, policies)) == 0  # nothing twice

    # erased: gone (410); not named by a policy or too recent: untouched
    for ref in [*surveys, marketing, old_patient, old_obs]:
        assert http.get(f"/fhir/{ref}", headers=h).status_code == 410, ref
    for ref in (vitals, treatment, recent, archived, f"Patient/{p1}"):
        assert http.get(f"/fhir/{ref}", headers=h).status_code == 200, ref
    # de-identified in place: tagged, no longer the patient's, its identified history gone
    for ref in answers:
        body = http.get(f"/fhir/{ref}", headers=h).get_json()
        assert {"system": TAG_SYSTEM, "code": "deidentified"}.items() <= body["meta"]["tag"][-1].items()
        assert body["subject"]["reference"] != f"Patient/{p1}"
        history = http.get(f"/fhir/{ref}/_history", headers=h).get_json()
        assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [body["meta"]["versionId"]]
    everything = http.get(f"/fhir/Patient/{p1}/$everything?_count=100", headers=h).get_json()
    kept = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything["entry"]}
    assert kept == {f"Patient/{p1}", vitals, recent, treatment}
    # the marketing consent's rules went with it; the treatment consent's stayed
    with svc.engine.connect() as conn:
        ids = {r[0] for r in conn.execute(select(resource.c.id).join(
            consent_rule, consent_rule.c.consent_pk == resource.c.pk)).all()}
    assert ids == {treatment.split("/")[1]}
    # every batch is an AuditEvent naming what it did; each resource appears exactly once
    auditor = _auditor(app, http)
    url = f"/fhir/AuditEvent?subtype=retention-erase,retention-deidentify&date=ge{_instant(started)}&_count=100"
    bundle = http.get(url, headers=auditor).get_json()
    events = [x["what"]["reference"].split("/_history")[0] for e in bundle.get("entry", [])
              for x in e["resource"].get("entity", []) if "reference" in x.get("what", {})]
    counted = Counter(r for r in events if not r.startswith("Patient/"))
    assert set(counted) == {*surveys, *answers, marketing}
    assert set(counted.values()) == {1}


def _instant(us: int) -> str:
    from fhirserver.fhir.dates import instant_text

    return instant_text(us)


def _auditor(app: Any, http: Any) -> dict[str, str]:
    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client
    from tests.conftest import AUDITOR_SETTINGS

    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "auditor", "system/AuditEvent.rs", jwks=public_jwks(key),
                                  settings=AUDITOR_SETTINGS)
    resp = http.post("/auth/token", data=token_request_form(key, rec.client_id, svc.settings.token_url,
                                                            "system/AuditEvent.rs"))
    return {"Authorization": f"Bearer {resp.get_json()['access_token']}"}


def test_the_cli_plans_and_refuses_bad_policies(app: Any, settings: Any) -> None:
    out = CliRunner().invoke(main, ["retention", "plan", "--json"],
                             env={**cli_env(settings), "FHIRSERVER_RETENTION_POLICY": POLICY})
    assert out.exit_code == 0, out.output
    assert [r["due"] for r in json.loads(out.stdout)] == [0, 0, 0, 0]
    none = CliRunner().invoke(main, ["retention", "run", "--json"], env=cli_env(settings))
    assert none.exit_code == 0 and json.loads(none.stdout) == {"policies": [], "access_records": None}
    bad = CliRunner().invoke(main, ["retention", "plan"], env={**cli_env(settings),
                                                               "FHIRSERVER_RETENTION_POLICY": "Observation=10x:erase"})
    assert bad.exit_code == 1 and "is not Type[search]" in bad.output
    bad = CliRunner().invoke(main, ["retention", "run"], env={**cli_env(settings),
                                                              "FHIRSERVER_RETENTION_POLICY": "Observation[nope=1]=1y:erase"})
    assert bad.exit_code == 1 and "nope" in bad.output
