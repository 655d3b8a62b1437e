"""Cross-border transfer (PIPL art. 38-40): a deployment in CN, clients registered in other
jurisdictions. A foreign client sees a patient's data only where that patient's Consent permits the
transfer to its jurisdiction for its purpose -- through read, search, totals, `_include`,
`_revinclude`, `$everything` and bulk export -- and a refused read is a 403, audited and alerted."""

from __future__ import annotations

from typing import Any

import pytest

from fhirserver.consent.alerts import list_alerts
from fhirserver.consent.rules import RECIPIENT_JURISDICTION
from tests.support.bulk import Server as BulkServer

from .harness import ACT_REASON, ConsentServer, consent, start


def transfer(purpose: str, place: str) -> dict[str, Any]:
    return {"type": "permit", "purpose": [{"system": ACT_REASON, "code": purpose}],
            "extension": [{"url": RECIPIENT_JURISDICTION, "valueCode": place}]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = start(tmp_path_factory.mktemp("cross-border"), jurisdiction="cn")
    # pa: treatment by US recipients; pb: research by US recipients; pd: treatment by EU recipients
    server.set_consents([consent("xb-pa", "pa", transfer("TREAT", "US")),
                         consent("xb-pb", "pb", transfer("HRESCH", "US")),
                         consent("xb-pd", "pd", transfer("TREAT", "EU"))])
    yield server
    server.svc.engine.dispose()


def ids(body: dict[str, Any], mode: str | None = None) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])
            if mode is None or e["search"]["mode"] == mode}


def patients_in(refs: set[str], srv: ConsentServer) -> set[str]:
    """The patients whose compartments hold `refs` (the Patient itself; subject and performer)."""
    out = set()
    for ref in refs:
        rtype, rid = ref.split("/")
        if rtype == "Patient":
            out.add(rid)
            continue
        body = srv.data[(rtype, rid)]
        for r in [body.get("subject", body.get("patient", {})), *body.get("performer", [])]:
            if r.get("reference", "").startswith("Patient/"):
                out.add(r["reference"].split("/")[-1])
    return out


def refused(resp: Any) -> None:
    assert resp.status_code == 403, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Cross-border transfer refused" in outcome["issue"][0]["diagnostics"]
    assert "pb" not in outcome["issue"][0]["diagnostics"]


def test_the_capability_statement_says_where_the_data_is(srv: ConsentServer) -> None:
    cs = srv.http.get("/fhir/metadata").get_json()
    assert cs["jurisdiction"][0]["coding"][0]["code"] == "CN"
    assert "recipient-jurisdiction" in cs["rest"][0]["security"]["description"]


def test_domestic_clients_are_not_affected(srv: ConsentServer) -> None:
    for place in (None, "CN", "cn"):
        home = srv.backend(jurisdiction=place)
        body = srv.bundle(home, "/fhir/Patient?_count=100")
        assert {"Patient/pa", "Patient/pb", "Patient/pc", "Patient/pd"} <= ids(body)


def test_a_foreign_client_reads_only_what_a_consent_permits(srv: ConsentServer) -> None:
    us = srv.backend(jurisdiction="US")
    assert srv.get(us, "/fhir/Patient/pa").status_code == 200
    assert srv.get(us, "/fhir/Observation/pa-hr").status_code == 200
    before = len(list_alerts(srv.svc.engine, kind="cross-border", client_id=us.client_id))
    for url in ("/fhir/Patient/pb", "/fhir/Observation/pb-hr", "/fhir/Patient/pd", "/fhir/Patient/pc"):
        refused(srv.get(us, url))
    alerts = list_alerts(srv.svc.engine, kind="cross-border", client_id=us.client_id)
    assert len(alerts) == before + 4
    assert alerts[0].detail["jurisdiction"] == "US" and alerts[0].detail["interaction"] == "read"
    # an id that does not exist is still a plain 404
    assert srv.get(us, "/fhir/Patient/nobody").status_code == 404


def test_search_totals_and_includes_hold_the_rule(srv: ConsentServer) -> None:
    us = srv.backend(jurisdiction="US")
    body = srv.bundle(us, "/fhir/Observation?_count=100&_include=Observation:subject")
    assert patients_in(ids(body), srv) == {"pa"}
    assert body["total"] == len(ids(body, "match"))
    assert ids(body, "include") == {"Patient/pa"}
    body = srv.bundle(us, "/fhir/Patient?_count=100&_revinclude=Observation:subject")
    assert patients_in(ids(body), srv) == {"pa"}
    # the total is the domestic result less everything in a compartment without a permit (pa-bp
    # is in pb's compartment too, as its performer)
    home = srv.bundle(srv.backend(), "/fhir/Observation?_count=100")
    only_pa = {r for r in ids(home) if patients_in({r}, srv) == {"pa"}}
    assert "Observation/pa-bp" not in only_pa
    assert ids(srv.bundle(us, "/fhir/Observation?_count=100")) == only_pa
    assert srv.bundle(us, "/fhir/Observation?_summary=count")["total"] == len(only_pa)
    # chained and _has searches cannot probe a refused patient either
    assert ids(srv.bundle(us, "/fhir/Observation?subject:Patient.gender=male")) == set()
    assert ids(srv.bundle(us, "/fhir/Patient?_has:Observation:subject:code=8867-4")) == {"Patient/pa"}


def test_everything_is_refused_or_filtered(srv: ConsentServer) -> None:
    us = srv.backend(jurisdiction="US")
    body = srv.bundle(us, "/fhir/Patient/pa/$everything?_count=100")
    assert patients_in(ids(body), srv) == {"pa"} and "Patient/pa" in ids(body)
    refused(srv.get(us, "/fhir/Patient/pb/$everything"))


def test_the_permit_is_for_exactly_that_recipient_and_purpose(srv: ConsentServer) -> None:
    research = srv.backend(purposes=["HRESCH"], jurisdiction="US")
    assert patients_in(ids(srv.bundle(research, "/fhir/Observation?_count=100")), srv) == {"pb"}
    eu = srv.backend(jurisdiction="EU")
    assert patients_in(ids(srv.bundle(eu, "/fhir/Observation?_count=100")), srv) == {"pd"}
    japan = srv.backend(jurisdiction="JP")
    assert ids(srv.bundle(japan, "/fhir/Observation?_count=100")) == set()
    refused(srv.get(japan, "/fhir/Patient/pa"))
    # a domestic researcher is not helped by a permit addressed to US recipients
    home_research = srv.backend(purposes=["HRESCH"])
    assert "pb" not in patients_in(ids(srv.bundle(home_research, "/fhir/Observation?_count=100")), srv)


def test_withdrawal_refuses_the_next_request(srv: ConsentServer) -> None:
    us = srv.backend(jurisdiction="US")
    srv.set_consents([consent("xb-pa2", "pa", transfer("TREAT", "US"))])
    srv.set_consents([consent("xb-pa", "pa", transfer("TREAT", "US"), status="inactive")])
    assert srv.get(us, "/fhir/Patient/pa").status_code == 200  # the second consent still permits
    srv.set_consents([consent("xb-pa2", "pa", transfer("TREAT", "US"), status="inactive")])
    refused(srv.get(us, "/fhir/Patient/pa"))
    srv.set_consents([consent("xb-pa", "pa", transfer("TREAT", "US"))])
    assert srv.get(us, "/fhir/Patient/pa").status_code == 200


def test_break_the_glass_is_not_held_by_the_rule_but_alerted(srv: ConsentServer) -> None:
    er = srv.backend(jurisdiction="US", break_glass=True, header="ETREAT", reason="unconscious traveller")
    assert srv.get(er, "/fhir/Patient/pb").status_code == 200
    assert list_alerts(srv.svc.engine, kind="break-glass", client_id=er.client_id)


def test_bulk_export_holds_the_rule(srv: ConsentServer) -> None:
    bulk = BulkServer(srv.app)
    us = srv.backend(jurisdiction="US")
    token = us.headers["Authorization"].split()[1]
    kick = bulk.kickoff(token, "$export", _type="Patient,Observation")
    assert kick.status_code == 202, kick.get_data(as_text=True)
    done = bulk.wait(token, kick.headers["Content-Location"])
    assert done.status_code == 200, done.get_data(as_text=True)
    files = bulk.files(token, done.get_json())
    refs = {f"{r['resourceType']}/{r['id']}" for rows in files.values() for r in rows}
    assert refs and patients_in(refs, srv) == {"pa"}
    # a de-identified research export follows the configured rule: a permit is needed (the default) here
    research = srv.backend(purposes=["HRESCH"], jurisdiction="US")
    token = research.headers["Authorization"].split()[1]
    kick = bulk.kickoff(token, "$export", _type="Observation", _deidentify="safe-harbor")
    done = bulk.wait(token, kick.headers["Content-Location"])
    rows = [r for rs in bulk.files(token, done.get_json()).values() for r in rs]
    searched = ids(srv.bundle(research, "/fhir/Observation?_count=100"))
    assert patients_in(searched, srv) == {"pb"}
    assert len(rows) == len(searched)


def test_deidentified_exports_abroad_can_be_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start(tmp_path_factory.mktemp("cross-border-allow"), jurisdiction="CN", cross_border_deidentified=True)
    try:
        bulk = BulkServer(server.app)
        research = server.backend(purposes=["HRESCH"], jurisdiction="US", exempt=True)
        token = research.headers["Authorization"].split()[1]
        plain = bulk.kickoff(token, "$export", _type="Observation")
        assert plain.status_code == 403  # research exports must be de-identified
        kick = bulk.kickoff(token, "$export", _type="Observation", _deidentify="safe-harbor")
        done = bulk.wait(token, kick.headers["Content-Location"])
        rows = [r for rs in bulk.files(token, done.get_json()).values() for r in rs]
        assert len(rows) == len([k for k in server.data if k[0] == "Observation"])
        # identified data still needs the patient's consent: the same client reading is refused
        refused(server.get(research, "/fhir/Patient/pa"))
    finally:
        server.svc.engine.dispose()
