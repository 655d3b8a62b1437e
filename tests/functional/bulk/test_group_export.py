"""Group and Group/[id]/$export (Bulk Data 2.0), through HTTP as a Bulk client does it: kick-off,
poll, download, delete. The export holds the current members' records only, each member's
Consents and the caller's scopes applied when the job runs; a member who withdrew consent is
absent from the files and their counts; a Group never joins its members' compartments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BASE
from tests.support.bulk import Server, _app, _local

SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}


@pytest.fixture
def server(tmp_path: Path) -> Any:
    app = _app(tmp_path)
    yield Server(app)
    app.extensions["fhirserver"].engine.dispose()


def _patients(srv: Server, token: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        pid = srv.create(token, {"resourceType": "Patient", "name": [{"family": f"Cohort{i}"}]})
        srv.create(token, {"resourceType": "Observation", "status": "final", "code": {"text": f"obs {i}"},
                           "subject": {"reference": f"Patient/{pid}"}})
        ids.append(pid)
    return ids


def _group(srv: Server, token: str, members: list[dict[str, Any]]) -> str:
    return srv.create(token, {"resourceType": "Group", "type": "person", "actual": True, "member": members})


def _export(srv: Server, token: str, gid: str, **params: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    resp = srv.kickoff(token, path=f"Group/{gid}/$export", **params)
    assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
    done = srv.wait(token, resp.headers["Content-Location"])
    assert done.status_code == 200, done.get_data(as_text=True)[:300]
    manifest = done.get_json()
    return manifest, srv.files(token, manifest)


def test_group_export_holds_the_current_members_records_only(server: Server) -> None:
    token = server.token()
    a, b, c, gone = _patients(server, token, 4)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}},
                                 {"entity": {"reference": f"Patient/{b}"}},
                                 {"entity": {"reference": f"Patient/{gone}"}, "inactive": True},
                                 {"entity": {"reference": f"Patient/{c}"}, "period": {"end": "2001-01-01"}}])
    resp = server.kickoff(token, path=f"Group/{gid}/$export")
    status_url = resp.headers["Content-Location"]
    manifest, files = _export(server, token, gid)
    assert manifest["request"] == f"{BASE}/Group/{gid}/$export"
    assert sorted(p["id"] for p in files["Patient"]) == sorted([a, b])
    assert {o["subject"]["reference"] for o in files["Observation"]} == {f"Patient/{a}", f"Patient/{b}"}
    assert {item["type"]: item["count"] for item in manifest["output"]} == {"Patient": 2, "Observation": 2}
    assert "Group" not in files  # the cohort list is not part of any member's record
    # _type narrows as for every export; DELETE cancels and removes the job
    _m, only = _export(server, token, gid, _type="Patient")
    assert set(only) == {"Patient"}
    assert server.http.delete(_local(status_url), headers=server.h(token)).status_code == 202
    assert server.http.get(_local(status_url), headers=server.h(token)).status_code == 404


@pytest.mark.parametrize("chunk,share", [(200, 0.25), (1, 2.0), (1, 0.25)],
                         ids=["few-members", "member-chunks", "one-scan-kept-to-members"])
def test_a_member_who_withdrew_consent_is_absent_from_files_and_counts(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                                      chunk: int, share: float) -> None:
    from fhirserver.bulk import export

    monkeypatch.setattr(export, "MEMBER_CHUNK", chunk)
    monkeypatch.setattr(export, "SCAN_SHARE", share)
    token = server.token()
    a, b = _patients(server, token, 2)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}, {"entity": {"reference": f"Patient/{b}"}}])
    server.create(token, {"resourceType": "Consent", "status": "active", "scope": SCOPE,
                          "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                          "patient": {"reference": f"Patient/{b}"}, "provision": {"type": "deny"}})
    manifest, files = _export(server, token, gid)
    assert [p["id"] for p in files["Patient"]] == [a]
    assert {o["subject"]["reference"] for o in files["Observation"]} == {f"Patient/{a}"}
    assert {item["type"]: item["count"] for item in manifest["output"]} == {"Patient": 1, "Observation": 1}


def test_group_export_needs_a_backend_client_and_a_group_it_may_read(server: Server) -> None:
    token = server.token()
    (a,) = _patients(server, token, 1)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}])
    assert server.kickoff(token, path="Group/nobody/$export").status_code == 404
    no_group = server.token("system/Patient.rs system/Observation.rs", name="nogroup")
    denied = server.kickoff(no_group, path=f"Group/{gid}/$export")
    assert denied.status_code == 403 and denied.get_json()["resourceType"] == "OperationOutcome"


def test_a_group_is_not_in_its_members_compartments(server: Server) -> None:
    token = server.token()
    (a,) = _patients(server, token, 1)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}])
    everything = server.http.get(f"/fhir/Patient/{a}/$everything", headers=server.h(token)).get_json()
    assert f"Group/{gid}" not in {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything["entry"]}
    found = server.http.get("/fhir/Group", query_string={"member": f"Patient/{a}"}, headers=server.h(token)).get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [gid]


def _post_kickoff(srv: Server, token: str, path: str, parameters: list[dict[str, Any]]) -> Any:
    return srv.http.post(f"/fhir/{path}", json={"resourceType": "Parameters", "parameter": parameters},
                         headers=srv.h(token, **{"Prefer": "respond-async", "Accept": "application/fhir+json"}))


def test_a_post_kickoff_takes_parameters_and_patient_narrows_it(server: Server) -> None:
    token = server.token()
    a, b, c = _patients(server, token, 3)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}, {"entity": {"reference": f"Patient/{b}"}}])
    resp = _post_kickoff(server, token, f"Group/{gid}/$export", [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{b}"}},
        {"name": "patient", "valueReference": {"reference": f"Patient/{c}"}}])  # c is no member: not exported
    assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
    files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
    assert [p["id"] for p in files["Patient"]] == [b]
    # Patient/$export narrowed to the named patients
    resp = _post_kickoff(server, token, "Patient/$export", [{"name": "patient", "valueReference": {"reference": f"Patient/{c}"}}])
    files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
    assert [p["id"] for p in files["Patient"]] == [c]
    assert {o["subject"]["reference"] for o in files["Observation"]} == {f"Patient/{c}"}
    # a system-level export takes no patient; a bad reference or body is a 400
    for path, params in (("$export", [{"name": "patient", "valueReference": {"reference": f"Patient/{a}"}}]),
                         ("Patient/$export", [{"name": "patient", "valueReference": {"reference": "Group/x"}}]),
                         ("Patient/$export", [{"name": "_type", "valueBoolean": True}])):
        bad = _post_kickoff(server, token, path, params)
        assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome", (path, params)


def test_elements_subsets_the_exported_resources(server: Server) -> None:
    token = server.token()
    (a,) = _patients(server, token, 1)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}])
    _m, files = _export(server, token, gid, _elements="Observation.code,name")
    obs = files["Observation"][0]
    assert "code" in obs and "subject" not in obs  # code kept (asked), subject dropped
    assert "status" in obs  # mandatory elements are always kept
    assert any(t.get("code") == "SUBSETTED" for t in obs["meta"].get("tag", []))
    assert "name" in files["Patient"][0]  # a bare element applies to every type


def test_include_associated_data_adds_the_provenance_of_the_exported_types(server: Server) -> None:
    token = server.token()
    (a,) = _patients(server, token, 1)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}])
    oid = server.create(token, {"resourceType": "Observation", "status": "final", "code": {"text": "with provenance"},
                                "subject": {"reference": f"Patient/{a}"}})
    recorded = "2024-01-02T10:00:00Z"
    of_obs = server.create(token, {"resourceType": "Provenance", "target": [{"reference": f"Observation/{oid}"}],
                                   "recorded": recorded, "agent": [{"who": {"display": "Lab"}}]})
    server.create(token, {"resourceType": "Provenance", "target": [{"reference": f"Patient/{a}"}],
                          "recorded": recorded, "agent": [{"who": {"display": "Registration"}}]})
    _m, files = _export(server, token, gid, _type="Observation", includeAssociatedData="RelevantProvenanceResources")
    assert set(files) == {"Observation", "Provenance"}
    assert [p["id"] for p in files["Provenance"]] == [of_obs]  # not the Patient's: Patient is not exported
    bad = server.kickoff(token, path=f"Group/{gid}/$export", includeAssociatedData="LatestProvenanceResources")
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"


def test_a_group_the_caller_may_not_read_is_answered_as_an_absent_one(server: Server) -> None:
    token = server.token()
    (a,) = _patients(server, token, 1)
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{a}"}}])  # type person
    scopes = "system/Group.rs?type=animal system/Patient.rs system/Observation.rs"
    herds_only = server.token(scopes, name="herds")
    hidden = server.kickoff(herds_only, path=f"Group/{gid}/$export")
    absent = server.kickoff(herds_only, path="Group/no-such-group/$export")
    assert hidden.status_code == absent.status_code == 404
    said = [r.get_json()["issue"][0]["diagnostics"].split(" (request id")[0] for r in (hidden, absent)]
    assert said[0].replace(gid, "X") == said[1].replace("no-such-group", "X")  # the asked id, nothing more
    assert a not in hidden.get_data(as_text=True)


MEMBER_FILTER = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/member-filter"
DIABETES = "http://snomed.info/sct|44054006"


def _cohort(srv: Server, token: str, *queries: str) -> str:
    return srv.create(token, {"resourceType": "Group", "type": "person", "actual": False,
                              "modifierExtension": [{"url": MEMBER_FILTER, "valueExpression": {
                                  "language": "application/x-fhir-query", "expression": q}} for q in queries]})


def test_a_group_defined_by_member_filters_exports_the_patients_meeting_every_one(server: Server) -> None:
    token = server.token()
    f1, f2, male, healthy, consent_out = (
        server.create(token, {"resourceType": "Patient", "gender": g, "name": [{"family": f"F{i}"}]})
        for i, g in enumerate(["female", "female", "male", "female", "female"]))
    for pid in (f1, f2, male, consent_out):
        server.create(token, {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
                              "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}})
    server.create(token, {"resourceType": "Condition", "subject": {"reference": f"Patient/{healthy}"},
                          "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}})
    server.create(token, {"resourceType": "Consent", "status": "active", "scope": SCOPE,
                          "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                          "patient": {"reference": f"Patient/{consent_out}"}, "provision": {"type": "deny"}})
    gid = _cohort(server, token, "Patient?gender=female", f"Condition?code={DIABETES}")
    manifest, files = _export(server, token, gid)
    # female AND diabetic; the patient whose Consent denies this client is not a member at all
    assert sorted(p["id"] for p in files["Patient"]) == sorted([f1, f2])
    assert {c["subject"]["reference"] for c in files["Condition"]} == {f"Patient/{f1}", f"Patient/{f2}"}
    assert {i["type"]: i["count"] for i in manifest["output"]}["Patient"] == 2

    one = _cohort(server, token, "Patient?gender=male")
    _m, files = _export(server, token, one)
    assert [p["id"] for p in files["Patient"]] == [male]


@pytest.mark.parametrize(("query", "status"), [("Nope?x=1", 400), ("Condition?no-such-param=1", 400),
                                               ("Condition", 200)])
def test_member_filters_are_checked_at_kickoff(server: Server, query: str, status: int) -> None:
    token = server.token()
    gid = _cohort(server, token, query)
    resp = server.kickoff(token, path=f"Group/{gid}/$export")
    if status == 400:
        assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
        issue = resp.get_json()["issue"][0]
        assert issue["expression"] == ["Group.modifierExtension[0]"]
    else:
        assert resp.status_code == 202  # every patient with a Condition (none here): an empty export


def test_a_member_filter_on_a_type_the_client_may_not_read_is_403(server: Server) -> None:
    token = server.token()
    gid = _cohort(server, token, f"Condition?code={DIABETES}")
    narrow = server.token("system/Patient.rs system/Group.rs")
    resp = server.kickoff(narrow, path=f"Group/{gid}/$export")
    assert resp.status_code == 403, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["issue"][0]["expression"] == ["Group.modifierExtension[0]"]


@pytest.mark.parametrize("share", [2.0, 0.25], ids=["member-chunks", "one-scan-kept-to-members"])
def test_a_large_group_is_exported_each_member_row_once(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                        share: float) -> None:
    """A Group of more than MEMBER_CHUNK members (2 here) is exported a chunk of members at a
    time, or -- when its members are at least SCAN_SHARE of the stored patients -- by one scan of
    each type kept to the rows in a member's compartment. Either way a row in the compartments of
    several members is written once, non-members' rows are not, and the counts say so."""
    from fhirserver.bulk import export

    monkeypatch.setattr(export, "MEMBER_CHUNK", 2)
    monkeypatch.setattr(export, "SCAN_SHARE", share)
    token = server.token()
    a, b, c, d, e, outsider, other = _patients(server, token, 7)  # each with one Observation of their own
    shared = server.create(token, {"resourceType": "Observation", "status": "final", "code": {"text": "shared"},
                                   "subject": {"reference": f"Patient/{a}"},
                                   "performer": [{"reference": f"Patient/{d}"}]})
    seen_by_member = server.create(token, {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                           "subject": {"reference": f"Patient/{outsider}"},
                                           "performer": [{"reference": f"Patient/{e}"}]})
    gid = _group(server, token, [{"entity": {"reference": f"Patient/{p}"}} for p in (a, b, c, d, e)])
    manifest, files = _export(server, token, gid)
    assert sorted(p["id"] for p in files["Patient"]) == sorted([a, b, c, d, e])
    ids = [o["id"] for o in files["Observation"]]
    assert len(ids) == len(set(ids)) == 7 and {shared, seen_by_member} <= set(ids)
    assert not any(o["subject"]["reference"] == f"Patient/{other}" for o in files["Observation"])
    assert {i["type"]: i["count"] for i in manifest["output"]} == {"Patient": 5, "Observation": 7}


def test_a_group_defined_by_characteristics_only_is_refused_not_exported_empty(server: Server) -> None:
    """FHIR leaves the evaluation of `characteristic` to each server; this one does not guess, and
    says how to define the cohort instead (member-filter)."""
    token = server.token()
    _patients(server, token, 1)
    gid = server.create(token, {"resourceType": "Group", "type": "person", "actual": False, "characteristic": [
        {"code": {"text": "diabetic"}, "valueBoolean": True, "exclude": False}]})
    resp = server.kickoff(token, path=f"Group/{gid}/$export")
    assert resp.status_code == 422, resp.get_data(as_text=True)[:300]
    outcome = resp.get_json()
    assert outcome["issue"][0]["expression"] == ["Group.characteristic"]
    assert "member-filter" in outcome["issue"][0]["diagnostics"]
