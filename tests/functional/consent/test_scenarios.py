"""Table-driven consent scenarios (issue 6, rules 1-5): each scenario writes its Consents, makes a
caller (backend client with purposes / organization / flags, or a signed-in user), and checks
that read, search, _summary=count, paging, _include, _revinclude, _has, chaining and $everything
all agree with the plain-Python reference evaluation (tests/consent/reference.py) over the whole
data set. Consents are deleted afterwards, which also exercises withdrawal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .harness import (
    ACT,
    ACT_REASON,
    CODES,
    ICD10,
    LOINC,
    RECORD_CODES,
    SCT,
    Caller,
    ConsentServer,
    check_everything,
    consent,
    start,
)

P = "Patient"
TREAT, HRESCH, HPAYMT, HOPERAT, HMARKT, PUBHLTH = "TREAT", "HRESCH", "HPAYMT", "HOPERAT", "HMARKT", "PUBHLTH"


def purpose(*codes: str) -> list[dict[str, str]]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def klass(*types: str) -> list[dict[str, str]]:
    return [{"system": "http://hl7.org/fhir/resource-types", "code": t} for t in types]


def code(*codes: str, system: str = LOINC) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": c}]} for c in codes]


def label(*codes: str) -> list[dict[str, str]]:
    return [{"system": ACT, "code": c} for c in codes]


def actor(*refs: str) -> list[dict[str, Any]]:
    return [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                  "code": "IRCP"}]}, "reference": {"reference": r}} for r in refs]


def data(*refs: str) -> list[dict[str, Any]]:
    return [{"meaning": "instance", "reference": {"reference": r}} for r in refs]


def deny(**kw: Any) -> dict[str, Any]:
    return {"type": "deny", **kw}


def permit(**kw: Any) -> dict[str, Any]:
    return {"type": "permit", **kw}


Caller_ = Callable[[ConsentServer], Caller]


def backend(**kw: Any) -> Caller_:
    return lambda srv: srv.backend(**kw)


def user(fhir_user: str, scope: str, **kw: Any) -> Caller_:
    return lambda srv: srv.user(fhir_user, scope, **kw)


# (name, [(patient, provision, status)], caller)
SCENARIOS: list[tuple[str, list[tuple[str, dict[str, Any], str]], Caller_]] = [
    ("no-consents-treat", [], backend()),
    ("no-consents-research-opt-in", [], backend(purposes=[HRESCH])),
    ("no-consents-payment", [], backend(purposes=[HPAYMT])),
    ("no-consents-marketing", [], backend(purposes=[HMARKT])),
    ("deny-treat", [("pa", deny(purpose=purpose(TREAT)), "active")], backend()),
    ("deny-everything", [("pa", deny(), "active")], backend()),
    ("deny-class-observation", [("pa", deny(**{"class": klass("Observation")}), "active")], backend()),
    ("deny-class-patient", [("pd", deny(**{"class": klass(P)}), "active")], backend()),
    ("deny-code", [("pa", deny(code=code(CODES["hr"])), "active")], backend()),
    ("deny-code-other-system", [("pa", deny(code=code(CODES["hr"], system="urn:other")), "active")], backend()),
    ("deny-data-period", [("pa", deny(dataPeriod={"start": "2024-01-01", "end": "2024-06-30"}), "active")],
     backend()),
    ("deny-data-period-late", [("pd", deny(dataPeriod={"start": "2024-07-01"}), "active")], backend()),
    ("deny-data-instance", [("pa", deny(data=data("Observation/pa-hr")), "active")], backend()),
    ("deny-data-unusable-reference", [("pa", deny(data=data("#contained-1")), "active")], backend()),
    ("deny-data-two-instances-nested-permit", [("pb", deny(data=data("Observation/pb-hr", "Patient/pb"), provision=[
        permit(**{"class": klass(P)})]), "active")], backend()),
    ("deny-actor-org-match", [("pa", deny(actor=actor("Organization/org-x")), "active")],
     backend(organization="Organization/org-x")),
    ("deny-actor-org-other", [("pa", deny(actor=actor("Organization/org-x")), "active")],
     backend(organization="Organization/org-y")),
    ("deny-actor-practitioner", [("pb", deny(actor=actor("Practitioner/dr-1")), "active")],
     user("Practitioner/dr-1", "user/*.rs")),
    ("deny-actor-other-practitioner", [("pb", deny(actor=actor("Practitioner/dr-1")), "active")],
     user("Practitioner/dr-2", "user/*.rs")),
    ("deny-purpose-list-not-mine", [("pa", deny(purpose=purpose(HPAYMT, HOPERAT)), "active")], backend()),
    ("deny-payment", [("pb", deny(purpose=purpose(HPAYMT)), "active")], backend(purposes=[HPAYMT])),
    ("deny-operations", [("pc", deny(purpose=purpose(HOPERAT)), "active")], backend(purposes=[HOPERAT])),
    ("inactive-deny", [("pa", deny(), "inactive")], backend()),
    ("future-deny", [("pa", deny(period={"start": "2999-01-01"}), "active")], backend()),
    ("expired-deny", [("pa", deny(period={"start": "2000-01-01", "end": "2001-01-01"}), "active")], backend()),
    ("permit-research", [("pa", permit(purpose=purpose(HRESCH)), "active")], backend(purposes=[HRESCH])),
    ("permit-research-observations", [("pa", permit(purpose=purpose(HRESCH), **{"class": klass("Observation")}),
                                       "active")], backend(purposes=[HRESCH])),
    ("permit-research-header", [("pb", permit(purpose=purpose(HRESCH)), "active")],
     backend(purposes=[TREAT, HRESCH], header=HRESCH)),
    ("first-purpose-is-default", [("pb", permit(purpose=purpose(HRESCH)), "active")],
     backend(purposes=[HRESCH, TREAT])),
    ("permit-public-health-period", [("pd", permit(purpose=purpose(PUBHLTH), dataPeriod={"start": "2024-01-01",
                                                                                        "end": "2024-12-31"}),
                                      "active")], backend(purposes=[PUBHLTH])),
    ("permit-marketing-other-purpose", [("pa", permit(purpose=purpose(HMARKT)), "active")],
     backend(purposes=[HRESCH])),
    ("deny-with-nested-permit-treat", [("pa", deny(provision=[permit(purpose=purpose(TREAT))]), "active")],
     backend()),
    ("deny-with-nested-permit-research", [("pa", deny(provision=[permit(purpose=purpose(HRESCH))]), "active")],
     backend(purposes=[HRESCH])),
    ("deny-with-nested-permit-other-purpose", [("pa", deny(provision=[permit(purpose=purpose(TREAT))]), "active")],
     backend(purposes=[HPAYMT])),
    ("permit-with-nested-deny-class", [("pb", permit(purpose=purpose(HRESCH), provision=[
        deny(**{"class": klass("QuestionnaireResponse")})]), "active")], backend(purposes=[HRESCH])),
    ("three-levels", [("pa", deny(provision=[permit(purpose=purpose(TREAT), provision=[
        deny(**{"class": klass("QuestionnaireResponse")})])]), "active")], backend()),
    ("no-root-type-nested-deny", [("pb", {"provision": [deny(code=code(CODES["bw"]))]}, "active")], backend()),
    ("deny-overrides-permit", [("pa", permit(purpose=purpose(HRESCH)), "active"),
                               ("pa", deny(purpose=purpose(HRESCH), code=code(CODES["bw"])), "active")],
     backend(purposes=[HRESCH])),
    ("sensitive-hidden-by-default-treat-permit", [("pa", permit(purpose=purpose(TREAT)), "active")], backend()),
    ("sensitive-permit-label", [("pa", permit(purpose=purpose(TREAT), securityLabel=label("HIV")), "active")],
     backend()),
    ("sensitive-permit-code", [("pb", permit(code=code(CODES["hiv"])), "active")], backend()),
    ("sensitive-permit-psy-label", [("pc", permit(securityLabel=label("PSY")), "active")], backend()),
    ("sensitive-permit-questionnaire", [("pa", permit(code=[{"coding": [{"code": "http://loinc.org/q/44249-1"}]}]),
                                         "active")], backend()),
    ("sensitive-sender-label", [("pd", permit(securityLabel=label("HIV")), "active")], backend()),
    ("sensitive-permit-then-deny", [("pa", permit(securityLabel=label("HIV")), "active"),
                                    ("pa", deny(securityLabel=label("HIV")), "active")], backend()),
    ("sensitive-research-permit-label", [("pb", permit(purpose=purpose(HRESCH), securityLabel=label("HIV")),
                                          "active")], backend(purposes=[HRESCH])),
    ("nested-permit-label-under-permit", [("pa", permit(purpose=purpose(TREAT), provision=[
        permit(securityLabel=label("HIV"))]), "active")], backend()),
    ("performer-compartment-deny", [("pb", deny(), "active")], backend()),
    ("deny-questionnaire-code", [("pb", deny(code=[{"coding": [{"code": "http://example.org/q/intake"}]}]),
                                  "active")], backend()),
    ("deny-every-patient", [(p, deny(), "active") for p in ("pa", "pb", "pc", "pd")], backend()),
    ("exempt-client", [(p, deny(), "active") for p in ("pa", "pb", "pc", "pd")], backend(exempt=True)),
    ("break-glass", [(p, deny(), "active") for p in ("pa", "pb")],
     backend(break_glass=True, header="ETREAT", reason="unconscious patient in ED")),
    ("break-glass-capable-without-glass", [("pa", deny(), "active")], backend(break_glass=True)),
    ("patient-self", [("pa", deny(), "active")], user("Patient/pa", "user/*.rs")),
    ("patient-self-other-denies", [("pa", deny(), "active"), ("pb", deny(), "active")],
     user("Patient/pa", "user/*.rs")),
    ("guardian-of-minor", [("pc", deny(), "active")],
     user("RelatedPerson/mum", "patient/*.rs", patient="pc", linked=["pc"])),
    ("practitioner-in-patient-context", [("pc", deny(), "active")],
     user("Practitioner/dr-1", "patient/*.rs", patient="pc")),
    ("actor-and-purpose", [("pa", deny(actor=actor("Organization/org-x"), purpose=purpose(HPAYMT)), "active")],
     backend(organization="Organization/org-x", purposes=[HPAYMT])),
    # the record types beyond the first four (issue 14): criteria per profiles/consent-elements.json
    ("deny-class-condition", [("pb", deny(**{"class": klass("Condition")}), "active")], backend()),
    ("deny-class-encounter-report", [("pa", deny(**{"class": klass("Encounter", "DiagnosticReport")}), "active")],
     backend()),
    ("deny-condition-code", [("pb", deny(code=code(RECORD_CODES["htn"][1], system=SCT)), "active")], backend()),
    ("deny-condition-code-any-system", [("pa", deny(code=[{"coding": [{"code": RECORD_CODES["htn"][1]}]}]),
                                         "active")], backend()),
    ("deny-encounter-type", [("pc", deny(code=code(RECORD_CODES["checkup"][1], system=SCT)), "active")], backend()),
    ("deny-report-code", [("pa", deny(code=code(RECORD_CODES["cbc"][1])), "active")], backend()),
    ("deny-data-period-records", [("pa", deny(dataPeriod={"start": "2024-02-01", "end": "2024-04-30"}), "active")],
     backend()),
    ("deny-data-period-encounter", [("pc", deny(dataPeriod={"start": "2024-07-01", "end": "2024-07-31"}), "active")],
     backend()),
    ("deny-data-period-condition-onset", [("pa", deny(dataPeriod={"start": "2024-05-01", "end": "2024-05-31"}),
                                          "active")], backend()),
    ("deny-data-period-recorded-condition", [("pb", deny(dataPeriod={"start": "2024-08-01"}), "active")], backend()),
    ("deny-data-condition-instance", [("pb", deny(data=data("Condition/pb-cond")), "active")], backend()),
    ("asserter-compartment-deny", [("pa", deny(**{"class": klass("Condition")}), "active")], backend()),
    ("sensitive-condition-permit-code", [("pa", permit(code=code(RECORD_CODES["hiv-dx"][1], system=SCT)), "active")],
     backend()),
    ("sensitive-encounter-permit-psy", [("pa", permit(securityLabel=label("PSY")), "active")], backend()),
    ("sensitive-encounter-permit-reason", [("pa", permit(code=code("F32.9", system=ICD10)), "active")], backend()),
    ("sensitive-report-permit-hiv-research", [("pb", permit(purpose=purpose(HRESCH), securityLabel=label("HIV")),
                                               "active")], backend(purposes=[HRESCH])),
    ("research-permit-reports-only", [("pa", permit(purpose=purpose(HRESCH), **{"class": klass("DiagnosticReport")}),
                                       "active")], backend(purposes=[HRESCH])),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = start(tmp_path_factory.mktemp("consent-scenarios"))
    yield server
    server.svc.engine.dispose()


@pytest.fixture(scope="module")
def pg_srv(tmp_path_factory: pytest.TempPathFactory, postgres):  # type: ignore[no-untyped-def]
    import os

    server = start(tmp_path_factory.mktemp("consent-pg"), postgres.create_database(f"consent_{os.getpid()}"))
    yield server
    server.svc.engine.dispose()


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 40
    assert len({name for name, _c, _k in SCENARIOS}) == len(SCENARIOS)


@pytest.mark.parametrize(("name", "consents", "make_caller"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(srv: ConsentServer, name: str, consents: list[tuple[str, dict[str, Any], str]],
                  make_caller: Caller_) -> None:
    bodies = [consent(f"{name}-{i}", pid, prov, status) for i, (pid, prov, status) in enumerate(consents)]
    srv.set_consents(bodies)
    try:
        caller = make_caller(srv)
        check_everything(srv, caller)
    finally:
        srv.clear_consents(bodies)


PG_SCENARIOS = ["deny-data-period-records", "sensitive-encounter-permit-reason", "deny-with-nested-permit-treat", "sensitive-permit-label", "deny-data-period", "permit-research",
                "patient-self", "deny-overrides-permit", "deny-questionnaire-code", "deny-actor-org-match"]


@pytest.mark.parametrize("name", PG_SCENARIOS)
def test_scenario_postgres(pg_srv: ConsentServer, name: str) -> None:
    """The same SQL on PostgreSQL (a sample of the scenarios: the semantics do not depend on the DB)."""
    _name, consents, make_caller = next(s for s in SCENARIOS if s[0] == name)
    test_scenario(pg_srv, name, consents, make_caller)
