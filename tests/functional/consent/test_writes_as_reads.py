"""A write answers a resource the caller may not read exactly as the read does (issue 29, items
1-3): PUT, PATCH in its three formats, DELETE, a POST that adds to a hidden patient's record and
the same writes as transaction entries are refused with the read's status (404 hidden, 403 for a
refused cross-border transfer) and store nothing -- so no write probes hidden values (PATCH
`test`), changes them, or tells a hidden resource from an absent one.

DELETE answers an absent resource with 204 ("nothing to delete"), so a hidden target answers
204 too, storing nothing: a 404 only for hidden ones would be the very oracle this forbids. (What
FHIR's update-as-create lets any writer learn -- that an id is taken -- is the one thing a write
can tell; docs/consent.md.)
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fhirserver.consent.rules import RECIPIENT_JURISDICTION

from .harness import ACT_REASON, LOINC, Caller, ConsentServer, consent, obs, start

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
WRITES = ["put", "json-patch", "fhirpath-patch", "merge-patch", "delete", "post-into", "transaction-put",
          "transaction-patch", "batch-put"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # the probes below are hundreds of refusals: penalties (tested elsewhere) must not suspend the callers
    server = start(tmp_path_factory.mktemp("writes-as-reads"), jurisdiction="cn",
                   penalty_policy="warn:100000,limit:200000,suspend:300000", denial_burst_threshold=0)
    transfer = {"type": "permit", "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
                "extension": [{"url": RECIPIENT_JURISDICTION, "valueCode": "US"}]}
    org_x = {"type": "deny", "actor": [{"role": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
        "reference": {"reference": "Organization/org-x"}}]}
    # pa: transfers to US recipients for treatment; pb: nothing for Organization/org-x
    server.set_consents([consent("w-pa", "pa", transfer), consent("w-pb", "pb", org_x)])
    server.callers = {  # type: ignore[attr-defined]
        "domestic": server.backend(scope="system/*.cruds"),
        "org-x": server.backend(organization="Organization/org-x", scope="system/*.cruds"),
        "research": server.backend(purposes=["HRESCH"], scope="system/*.cruds"),
        "abroad": server.backend(jurisdiction="US", scope="system/*.cruds"),
        "patient-pa": server.user("Patient/pa", "user/*.cruds"),
        "heart-rate-only": server.backend(scope=f"system/Observation.cruds?code={LOINC}|8867-4 system/Patient.rs"),
    }
    yield server
    server.svc.engine.dispose()


def caller(srv: ConsentServer, name: str) -> Caller:
    return srv.callers[name]  # type: ignore[attr-defined,no-any-return]


def version(srv: ConsentServer, rtype: str, rid: str) -> tuple[int, str]:
    """(status, versionId) as the consent-exempt back office sees the resource."""
    resp = srv.http.get(f"/fhir/{rtype}/{rid}", headers=srv.admin)
    return resp.status_code, (resp.get_json() or {}).get("meta", {}).get("versionId", "")


def observations_of(srv: ConsentServer, pid: str) -> int:
    resp = srv.http.get(f"/fhir/Observation?subject=Patient/{pid}&_summary=count", headers=srv.admin)
    return int(resp.get_json()["total"])


def changed(body: dict[str, Any]) -> dict[str, Any]:
    """The resource with one harmless change (what an attacker would try to store)."""
    out = copy.deepcopy(body)
    out.pop("meta", None)
    if out["resourceType"] == "Patient":
        out["gender"] = "unknown"
    elif "status" in out:
        out["status"] = "entered-in-error" if out["resourceType"] != "Consent" else "inactive"
    return out


def write(srv: ConsentServer, who: Caller, kind: str, rtype: str, rid: str) -> Any:
    """One write of `kind` aimed at rtype/rid (for post-into: at the record of Patient/rid)."""
    http, h = srv.http, who.headers
    body = changed(srv.data[(rtype, rid)]) if (rtype, rid) in srv.data else {"resourceType": rtype, "id": rid}
    url = f"/fhir/{rtype}/{rid}"
    if kind == "put":
        return http.put(url, json=body, headers=h)
    if kind == "json-patch":
        ops = [{"op": "test", "path": "/id", "value": rid}, {"op": "replace", "path": "/id", "value": rid}]
        return http.patch(url, json=ops, headers={**h, "Content-Type": JSON_PATCH})
    if kind == "fhirpath-patch":
        doc = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": f"{rtype}.id"},
            {"name": "value", "valueId": rid}]}]}
        return http.patch(url, json=doc, headers={**h, "Content-Type": "application/fhir+json"})
    if kind == "merge-patch":
        return http.patch(url, json={"id": rid}, headers={**h, "Content-Type": MERGE_PATCH})
    if kind == "delete":
        return http.delete(url, headers=h)
    if kind == "post-into":
        return http.post("/fhir/Observation", json=obs("ignored", rid, "8867-4", "2024-10-01"), headers=h)
    entry: dict[str, Any] = {"resource": body, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}
    if kind == "transaction-patch":
        patch = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": f"{rtype}.id"},
            {"name": "value", "valueId": rid}]}]}
        entry = {"resource": patch, "request": {"method": "PATCH", "url": f"{rtype}/{rid}"}}
    bundle = {"resourceType": "Bundle", "type": "batch" if kind == "batch-put" else "transaction", "entry": [entry]}
    resp = http.post("/fhir", json=bundle, headers=h)
    if kind != "batch-put" or resp.status_code != 200:
        return resp
    return _EntryAnswer(resp.get_json()["entry"][0]["response"])


class _EntryAnswer:
    """A batch entry's response seen like an HTTP response (status and OperationOutcome)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.status_code = int(response["status"].split()[0])
        self._outcome = response.get("outcome")

    def get_json(self) -> Any:
        return self._outcome

    def get_data(self, as_text: bool = False) -> str:
        return str(self._outcome)


def expected_status(kind: str, read_status: int) -> int:
    """What a write answers for a resource the read hides (module docstring: DELETE is 204)."""
    if kind == "delete" and read_status == 404:
        return 204
    return read_status


def assert_hidden_write(srv: ConsentServer, who: Caller, kind: str, rtype: str, rid: str) -> None:
    """`kind` aimed at a resource `who` cannot read answers as the read and stores nothing."""
    read_target = ("Patient", rid) if kind == "post-into" else (rtype, rid)
    read = srv.get(who, f"/fhir/{read_target[0]}/{read_target[1]}")
    assert read.status_code in (403, 404), (who.request, rtype, rid, read.status_code)
    before = version(srv, rtype, rid)
    count = observations_of(srv, rid) if kind == "post-into" else 0
    resp = write(srv, who, kind, rtype, rid)
    assert resp.status_code == expected_status(kind, read.status_code), \
        (kind, rtype, rid, who.request, resp.status_code, resp.get_data(as_text=True))
    if resp.status_code >= 400:
        outcome = resp.get_json()
        assert outcome["resourceType"] == "OperationOutcome"
        text = str(outcome)
        read_text = str(read.get_json())
        # nothing of the resource beyond what the read said (its own id, the read's wording)
        assert "entered-in-error" not in text and "version" not in text.lower().replace("versionid", "")
        if "Cross-border transfer refused" in read_text:
            assert "Cross-border transfer refused" in text
    assert version(srv, rtype, rid) == before, (kind, rtype, rid, "stored")
    if kind == "post-into":
        assert observations_of(srv, rid) == count


# ------------------------------------------------------------------ the red team's reproductions
def test_patch_test_ops_are_no_oracle_on_a_hidden_sensitive_value(srv: ConsentServer) -> None:
    """Item 1: the TREAT backend gets 404 on the HIV-labelled result; a PATCH `test` of its value
    answers 404 whether the guess is right or wrong, and no version is written."""
    who = caller(srv, "domestic")
    assert srv.get(who, "/fhir/Observation/pa-hiv").status_code == 404
    stored = srv.data[("Observation", "pa-hiv")]
    before = version(srv, "Observation", "pa-hiv")
    answers = []
    for guess in (stored["code"], {"coding": [{"system": LOINC, "code": "0000-0"}]}):
        ops = [{"op": "test", "path": "/code", "value": guess}]
        resp = srv.http.patch("/fhir/Observation/pa-hiv", json=ops, headers={**who.headers, "Content-Type": JSON_PATCH})
        answers.append((resp.status_code, resp.get_json()["issue"][0]["code"]))
    absent = srv.http.patch("/fhir/Observation/no-such-id", json=[{"op": "test", "path": "/id", "value": "x"}],
                            headers={**who.headers, "Content-Type": JSON_PATCH})
    assert answers == [(404, "not-found"), (404, "not-found")] == [(absent.status_code, "not-found")] * 2
    assert version(srv, "Observation", "pa-hiv") == before


def test_a_refused_foreign_client_cannot_probe_change_or_add_to_a_patient(srv: ConsentServer) -> None:
    """Items 1-2: a US client refused Patient/pb (no transfer permit) gets the read's 403 for every
    patch format, PUT and a POST into pb's record; nothing is stored; pa (permitted) still works."""
    who = caller(srv, "abroad")
    for kind in ("json-patch", "fhirpath-patch", "merge-patch", "put", "post-into", "transaction-put"):
        assert_hidden_write(srv, who, kind, "Patient", "pb")
    birth = srv.data[("Patient", "pb")]["birthDate"]
    probe = srv.http.patch("/fhir/Patient/pb", json=[{"op": "test", "path": "/birthDate", "value": birth}],
                           headers={**who.headers, "Content-Type": JSON_PATCH})
    assert probe.status_code == 403
    # the permitted patient is writable as before (the rule is no blanket refusal)
    resp = srv.http.post("/fhir/Observation", json=obs("x", "pa", "8867-4", "2024-10-02"), headers=who.headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)


def test_a_patient_token_cannot_tell_others_records_from_absent_ones(srv: ConsentServer) -> None:
    """Item 3: with pa's own token, bob's Observation and Patient answer every write like an id that
    does not exist."""
    who = caller(srv, "patient-pa")
    for rtype, rid in (("Observation", "pb-hr"), ("Patient", "pb")):
        for kind in ("json-patch", "merge-patch", "put"):
            hidden = write(srv, who, kind, rtype, rid)
            absent = write(srv, who, kind, rtype, "no-such-id") if kind != "put" else None
            assert hidden.status_code == 404, (kind, rtype, hidden.get_data(as_text=True))
            assert hidden.get_json()["issue"][0]["code"] == "not-found"
            if absent is not None:
                assert absent.status_code == 404
    assert_hidden_write(srv, who, "delete", "Observation", "pb-hr")
    assert_hidden_write(srv, who, "post-into", "Patient", "pb")


def test_a_write_of_a_visible_resource_still_works(srv: ConsentServer) -> None:
    """The control: every write kind succeeds where the read does (so the refusals above are about
    visibility, not about the writes themselves)."""
    who = caller(srv, "domestic")
    assert srv.get(who, "/fhir/Observation/pc-hr").status_code == 200
    for kind in ("put", "json-patch", "fhirpath-patch", "merge-patch", "transaction-put", "transaction-patch",
                 "batch-put"):
        before = version(srv, "Observation", "pc-hr")
        resp = write(srv, who, kind, "Observation", "pc-hr")
        assert resp.status_code == 200, (kind, resp.get_data(as_text=True))
        assert int(version(srv, "Observation", "pc-hr")[1]) == int(before[1]) + 1
    assert write(srv, who, "post-into", "Patient", "pc").status_code == 201
    assert write(srv, who, "delete", "Observation", "pc-hr").status_code == 204
    assert version(srv, "Observation", "pc-hr")[0] == 410
    srv.put(srv.data[("Observation", "pc-hr")])  # restore for the other tests


def test_a_post_outside_the_tokens_compartment_does_not_tell_stored_patients_from_absent_ones(
        srv: ConsentServer) -> None:
    """A patient's token adding to another record: 404 whether that patient is stored or not, and
    the answer names neither."""
    who = caller(srv, "patient-pa")
    stored = write(srv, who, "post-into", "Patient", "pb")
    absent = write(srv, who, "post-into", "Patient", "nobody-here")
    assert stored.status_code == absent.status_code == 404
    assert stored.get_json()["issue"][0]["code"] == absent.get_json()["issue"][0]["code"] == "not-found"
    assert "pb" not in str(stored.get_json()) and "nobody-here" not in str(absent.get_json())
    assert observations_of(srv, "nobody-here") == 0


def test_a_transaction_may_create_a_patient_and_its_data_in_any_entry_order(srv: ConsentServer) -> None:
    """The compartment check runs when the whole transaction is written: an entry may refer to a
    patient that a later entry (POST or PUT) creates."""
    who = caller(srv, "domestic")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("x", "tx-new", "8867-4", "2024-10-03") | {"subject": {"reference": "urn:uuid:9f0c7c59-"
                                                                                         "4b37-4f38-9c58-0c3e0f1f2a01"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("y", "tx-put", "8867-4", "2024-10-03"), "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:9f0c7c59-4b37-4f38-9c58-0c3e0f1f2a01",
         "resource": {"resourceType": "Patient", "gender": "female"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": "tx-put", "gender": "male"},
         "request": {"method": "PUT", "url": "Patient/tx-put"}},
    ]}
    resp = srv.http.post("/fhir", json=bundle, headers=who.headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert [e["response"]["status"][:3] for e in resp.get_json()["entry"]] == ["201", "201", "201", "201"]


# ------------------------------------------------------------------ the property
HIDDEN_KEYS = [("Observation", "pa-hiv"), ("Observation", "pb-hiv"), ("Observation", "pd-lab"),
               ("Observation", "pb-hr"), ("Observation", "pd-hr"), ("Observation", "pa-bp"), ("Patient", "pb"),
               ("Patient", "pc"), ("Patient", "pd"), ("Condition", "pa-cond"), ("Condition", "pb-cond"),
               ("QuestionnaireResponse", "pb-qr"), ("Encounter", "pa-enc"), ("DiagnosticReport", "pb-dr"),
               ("Consent", "w-pb")]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(who=st.sampled_from(["domestic", "org-x", "research", "abroad", "patient-pa", "heart-rate-only"]),
       key=st.sampled_from(HIDDEN_KEYS), kind=st.sampled_from(WRITES))
def test_every_write_answers_a_hidden_resource_as_the_read(srv: ConsentServer, who: str, key: tuple[str, str],
                                                            kind: str) -> None:
    """For random (caller, resource, write) triples whose read is refused (consent denials,
    sensitivity labels, the cross-border rule, scopes), the write answers exactly as the read
    (DELETE: as for an absent resource) and stores nothing. Triples whose read succeeds are skipped:
    the control test above covers them."""
    c = caller(srv, who)
    rtype, rid = key
    if kind == "post-into":
        rtype, rid = "Patient", (key[1] if key[0] == "Patient" else _patient_of(srv, key))
    target = srv.get(c, f"/fhir/{rtype}/{rid}")
    event(f"read {target.status_code}")
    if target.status_code not in (403, 404):
        return
    assert_hidden_write(srv, c, kind, rtype, rid)


def _patient_of(srv: ConsentServer, key: tuple[str, str]) -> str:
    body = srv.data[key]
    ref = (body.get("subject") or body.get("patient") or {}).get("reference", "Patient/pa")
    return str(ref).split("/", 1)[1]
