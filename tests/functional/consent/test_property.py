"""Property test: random privacy Consents (nested provisions, every criterion kind, statuses and
periods) and random requests (purpose, organization); the server's search results for every type
must equal the plain-Python reference evaluation of the rules over all resources."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .harness import (
    ACT,
    ACT_REASON,
    CLINICAL,
    CODES,
    LOINC,
    RECORD_CODES,
    Caller,
    ConsentServer,
    consent,
    expected,
    start,
)

PATIENTS = ["pa", "pb", "pc", "pd"]
SLOTS = [(p, k) for p in PATIENTS for k in range(2)]
PURPOSES = ["TREAT", "HRESCH", "HPAYMT", "PUBHLTH"]
TYPES = ["Patient", "QuestionnaireResponse", *CLINICAL]
PERIODS = [{"start": "2024-01-01", "end": "2024-06-30"}, {"start": "2024-07-01"}, {"end": "2024-03-31"}]
INSTANCES = ["Observation/pa-hr", "Observation/pb-hiv", "Patient/pc", "QuestionnaireResponse/pb-qr", "Condition/pb-cond",
             "Encounter/pa-enc"]
ALL_CODES = [(LOINC, c) for c in CODES.values()] + list(RECORD_CODES.values())


def subset(options: list[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(options), min_size=1, max_size=2, unique=True)


def criteria() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "purpose": subset(PURPOSES).map(lambda xs: [{"system": ACT_REASON, "code": x} for x in xs]),
        "class": subset(TYPES).map(lambda xs: [{"system": "http://hl7.org/fhir/resource-types", "code": x}
                                               for x in xs]),
        "code": subset(ALL_CODES).map(lambda xs: [{"coding": [{"system": s, "code": c}]} for s, c in xs]),
        "securityLabel": subset(["HIV", "PSY", "SUD"]).map(lambda xs: [{"system": ACT, "code": x} for x in xs]),
        "dataPeriod": st.sampled_from(PERIODS),
        "data": subset(INSTANCES).map(lambda xs: [{"meaning": "instance", "reference": {"reference": x}}
                                                  for x in xs]),
        "actor": subset(["Organization/org-x", "Organization/org-y"]).map(
            lambda xs: [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                              "code": "IRCP"}]}, "reference": {"reference": x}} for x in xs]),
    })


def provision(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    children = st.lists(provision(depth - 1), max_size=2) if depth > 0 else st.just([])
    return st.builds(lambda t, c, kids: {**({"type": t} if t else {}), **c, **({"provision": kids} if kids else {})},
                     st.sampled_from(["permit", "deny"]), criteria(), children)


def root() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda t, c, kids: {**({"type": t} if t else {}), **c, **({"provision": kids} if kids else {})}
                     or {"type": "permit"},  # FHIR JSON has no empty objects
                     st.sampled_from(["permit", "deny", None]), criteria(), st.lists(provision(1), max_size=2))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = start(tmp_path_factory.mktemp("consent-property"))
    server.callers = {}  # type: ignore[attr-defined]
    yield server
    server.svc.engine.dispose()


def caller_for(srv: ConsentServer, purpose: str, org: str | None) -> Caller:
    cache: dict[Any, Caller] = srv.callers  # type: ignore[attr-defined]
    if (purpose, org) not in cache:
        cache[(purpose, org)] = srv.backend(purposes=[purpose], organization=org)
    return cache[(purpose, org)]


@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(slots=st.lists(st.tuples(st.sampled_from(["active", "active", "inactive"]), root()),
                      min_size=len(SLOTS), max_size=len(SLOTS)),
       purpose=st.sampled_from(PURPOSES), org=st.sampled_from([None, "Organization/org-x"]))
def test_search_matches_reference(srv: ConsentServer, slots: list[tuple[str, dict[str, Any]]], purpose: str,
                                  org: str | None) -> None:
    bodies = [consent(f"prop-{pid}-{k}", pid, prov, status) for (pid, k), (status, prov) in zip(SLOTS, slots,
                                                                                               strict=True)]
    srv.set_consents(bodies)  # PUT: every slot is rewritten, so earlier examples leave nothing behind
    caller = caller_for(srv, purpose, org)
    want = expected(srv, caller)
    for rtype in [*TYPES, "Consent"]:
        body = srv.bundle(caller, f"/fhir/{rtype}?_count=1000")
        got = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in body.get("entry", [])
               if e["search"]["mode"] == "match"}
        assert got == {k for k in want if k[0] == rtype}, (rtype, purpose, org, bodies)
        assert body["total"] == len(got)
