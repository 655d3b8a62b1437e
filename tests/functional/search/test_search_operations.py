"""Search operations: Patient/$everything, Observation/$lastn, and a custom SearchParameter added
to a copy of profiles/ and made searchable with `fhirserver db reindex`. Expected results are
derived from the synthetic data set by the Python oracle (see test_search_params.py).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from typing import Any

import pytest
from click.testing import CliRunner

from fhirserver.app import create_app
from fhirserver.cli import main as cli
from tests.conftest import BASE, REPO, make_settings
from tests.support.search import (
    LOINC,
    METHOD,
    PARAMS,
    Dataset,
    Item,
    Oracle,
    P,
    Server,
    build_dataset,
    codings,
    entries,
    is_outcome,
    keys_of,
    link,
    load,
    start_server,
    store,
)

Key = tuple[str, str]


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = start_server(tmp_path_factory.mktemp("operations"), request, "sqlite")
    ds = build_dataset(seed=2024)
    load(srv, ds)
    yield srv, ds
    srv.close()


def everything(srv: Server, pid: str, params: list[tuple[str, str]], headers: dict[str, str] | None = None
               ) -> list[dict[str, Any]]:
    return srv.walk("", params, headers, path=f"/fhir/Patient/{pid}/$everything")


def interesting_patients(ds: Dataset) -> list[str]:
    """The patient with the largest compartment, one that others link to, one that performed an
    Observation for someone else, one authoring a QuestionnaireResponse about another patient."""
    oracle = Oracle(ds)
    pids = [k[1] for k in ds.of_type("Patient")]
    chosen = [max(pids, key=lambda p: len(oracle.compartment(p)))]
    linked = [lk["other"]["reference"].split("/")[1] for k in ds.of_type("Patient") for lk in ds.stored[k].get("link", [])]
    performers = [r["reference"].split("/")[1] for k in ds.of_type("Observation")
                  for r in ds.stored[k].get("performer", []) if r["reference"].startswith("Patient/")]
    authors = [ds.stored[k]["author"]["reference"].split("/")[1] for k in ds.of_type("QuestionnaireResponse")
               if ds.stored[k].get("author", {}).get("reference", "").startswith("Patient/")
               and ds.stored[k]["author"]["reference"].split("/")[1]
               not in ds.stored[k]["subject"]["reference"]]
    for group in (linked, performers, authors):
        assert group, "the data set should contain this case"
        if group[0] not in chosen:
            chosen.append(group[0])
    return chosen


# ================================================================== $everything
def test_everything_returns_exactly_the_compartment(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    for pid in interesting_patients(ds):
        expected = oracle.compartment(pid)
        assert ("Patient", pid) in expected and len(expected) > 1
        pages = everything(srv, pid, [("_count", "5")])
        got = [k for p in pages for k in keys_of(p)]
        assert len(got) == len(set(got)), "a resource was returned twice"
        assert set(got) == expected, (pid, set(got) ^ expected)
        assert not [k for k in got if k[0] == "AuditEvent"]
        assert len(pages) == math.ceil(len(expected) / 5)
        assert all(len(keys_of(p)) == 5 for p in pages[:-1])
        assert pages[0]["total"] == len(expected)
        assert all(p.get("total", len(expected)) == len(expected) for p in pages)
        assert pages[0]["type"] == "searchset"


def test_everything_type_filter(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    pid = interesting_patients(ds)[0]
    comp = oracle.compartment(pid)
    for types in ("Observation", "Observation,Consent", "QuestionnaireResponse,Patient"):
        wanted = set(types.split(","))
        expected = {k for k in comp if k[0] in wanted}
        pages = everything(srv, pid, [("_type", types), ("_count", "4")])
        got = [k for p in pages for k in keys_of(p)]
        assert len(got) == len(set(got)) and set(got) == expected, types
        for p in pages[:-1]:
            assert f"_type={types.replace(',', '%2C')}" in link(p, "next")
    r = srv.get(f"/fhir/Patient/{pid}/$everything", [("_type", "Nonsense")])
    assert r.status_code == 400 and is_outcome(r.get_json())


def test_everything_since(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    pid = interesting_patients(ds)[0]
    # touch two compartment members so the newest changes are not just creation order
    members = sorted(oracle.compartment(pid), key=lambda k: ds.seq[k])
    for key in (members[0], members[len(members) // 2]):
        body = dict(ds.stored[key])
        if key[0] == "Observation":
            body["status"] = "amended"
        store(srv, ds, Item(key[0], body))
    comp = oracle.compartment(pid)
    stamps = sorted(ds.stored[k]["meta"]["lastUpdated"] for k in comp)
    since = stamps[len(stamps) // 2]
    expected = {k for k in comp if ds.stored[k]["meta"]["lastUpdated"] >= since}
    assert 0 < len(expected) < len(comp)
    pages = everything(srv, pid, [("_since", since), ("_count", "3")])
    got = [k for p in pages for k in keys_of(p)]
    assert len(got) == len(set(got)) and set(got) == expected
    assert members[0] in got  # the old but recently updated resource


def test_everything_unknown_patient_is_404(env) -> None:  # type: ignore[no-untyped-def]
    srv, _ds = env
    r = srv.get("/fhir/Patient/no-such-patient/$everything")
    assert r.status_code == 404 and is_outcome(r.get_json())


def test_everything_with_patient_scope_only(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    reader = srv.other_client("system/Patient.rs")
    headers = reader.headers("system/Patient.rs")
    for pid in interesting_patients(ds):
        expected = {k for k in oracle.compartment(pid) if k[0] == "Patient"}
        pages = everything(reader, pid, [("_count", "50")], headers)
        got = [k for p in pages for k in keys_of(p)]
        assert set(got) == expected and ("Patient", pid) in got
    # ... and may not search Observations directly
    r = srv.get("/fhir/Observation", [], headers=headers)
    assert r.status_code == 403


# ================================================================== $lastn
def _code_key(o: dict[str, Any]) -> str:
    return min(f"{s or ''}|{c}" for s, c in codings(o["code"]))


def expected_lastn(ds: Dataset, params: list[tuple[str, str]], n: int) -> list[Key]:
    """Per code, the n most recent matching Observations (by the end of their effective time,
    missing last; ties: newest first), codes in order."""
    oracle = Oracle(ds)
    groups: dict[str, list[Key]] = defaultdict(list)
    for k in oracle.search("Observation", params):
        groups[_code_key(ds.stored[k])].append(k)
    out: list[Key] = []
    for code in sorted(groups):
        def recency(k: Key) -> tuple[int, float, int]:
            ends = [e for _s, e in PARAMS["Observation"]["date"].values(ds.stored[k])]
            return (0, -max(ends), -ds.seq[k]) if ends else (1, 0.0, -ds.seq[k])
        out.extend(sorted(groups[code], key=recency)[:n])
    return out


def test_lastn(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    pids = [k[1] for k in ds.of_type("Patient")]
    per_patient = {p: oracle.search("Observation", [("patient", p), ("category", "vital-signs")]) for p in pids}
    busy = sorted(pids, key=lambda p: len(per_patient[p]), reverse=True)[:3]
    checked = 0
    for pid in busy:
        for n in (1, 2, 3):
            params = [("patient", pid), ("category", "vital-signs")]
            expected = expected_lastn(ds, params, n)
            r = srv.get("/fhir/Observation/$lastn", [*params, ("max", str(n))])
            assert r.status_code == 200, r.get_data(as_text=True)
            got = keys_of(r.get_json())
            assert got == expected, (pid, n)
            checked += len(expected) < len(per_patient[pid])
    assert checked, "max should have cut at least one group"
    # across all patients, default max=1, and with a code filter
    for params in ([("category", "vital-signs")], [("code", f"{LOINC}|8867-4,{LOINC}|8310-5")]):
        r = srv.get("/fhir/Observation/$lastn", params)
        assert r.status_code == 200
        assert keys_of(r.get_json()) == expected_lastn(ds, params, 1)
    r = srv.get("/fhir/Observation/$lastn", [("category", "vital-signs"), ("max", "0")])
    assert r.status_code == 400 and is_outcome(r.get_json())


# ================================================================== custom SearchParameter + reindex
CUSTOM = [
    {"resourceType": "SearchParameter", "id": "bench-method", "url": "http://example.org/SearchParameter/bench-method",
     "name": "BenchMethod", "status": "active", "description": "Observation.method (test)", "code": "bench-method",
     "base": ["Observation"], "type": "token", "expression": "Observation.method"},
    {"resourceType": "SearchParameter", "id": "bench-int", "url": "http://example.org/SearchParameter/bench-int",
     "name": "BenchInt", "status": "active", "description": "integer values (test)", "code": "bench-int",
     "base": ["Observation"], "type": "number", "expression": "Observation.value.ofType(integer)"},
]

NUMBER_CASES = ["5", "5.0", "4.6", "gt10", "lt3", "ge10", "le2", "ne5", "ap10", "sa15", "eb1", "gt-1", "7,9"]


def test_custom_search_parameter_after_reindex(request, tmp_path_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("custom-param")
    profiles = tmp / "profiles"
    shutil.copytree(REPO / "profiles", profiles)
    srv = start_server(tmp, request, "sqlite", profiles_dir=str(profiles))
    ds = build_dataset(seed=99, n_patients=6, n_obs=40)
    try:
        load(srv, ds)
        for i in range(16):  # integer values for the number parameter
            store(srv, ds, Item("Observation", {
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "9269-2", "display": "Glasgow coma score total"}]},
                "valueInteger": (i * 7) % 17 - 1}, post=True))
        before = srv.search("Observation", [("bench-method", f"{METHOD}|auto")])
        assert entries(before, "outcome"), "unknown before the SearchParameter exists"
    finally:
        srv.close()

    (profiles / "searchparameters").mkdir()
    for sp in CUSTOM:
        (profiles / "searchparameters" / f"{sp['id']}.json").write_text(json.dumps(sp))
    result = CliRunner().invoke(cli, ["db", "reindex"], env={
        "FHIRSERVER_DATA_DIR": str(tmp / "data"), "FHIRSERVER_PROFILES_DIR": str(profiles),
        "FHIRSERVER_BASE_URL": BASE})
    assert result.exit_code == 0, result.output
    assert int(result.output.split()[1]) >= len(ds.order)

    app = create_app(make_settings(tmp, profiles_dir=str(profiles)))
    after = Server(app, app.test_client(), srv.settings, srv.key, srv.client_id, srv.tokens)
    monkeypatch.setitem(PARAMS["Observation"], "bench-method", P("token", lambda o: codings(o.get("method"))))
    monkeypatch.setitem(PARAMS["Observation"], "bench-int",
                        P("number", lambda o: [o["valueInteger"]] if "valueInteger" in o else []))
    try:
        oracle = Oracle(ds)
        cases = [[("bench-method", f"{METHOD}|auto")], [("bench-method", "manual")],
                 [("bench-method:missing", "true")], [("bench-method:not", f"{METHOD}|auto")],
                 [("bench-method", f"{METHOD}|"), ("code", f"{LOINC}|8867-4")],
                 *[[("bench-int", v)] for v in NUMBER_CASES], [("bench-int:missing", "false")]]
        for params in cases:
            expected = oracle.search("Observation", params)
            body = after.search("Observation", [*params, ("_count", "1000")])
            assert not entries(body, "outcome"), body
            assert sorted(keys_of(body)) == sorted(expected) and body["total"] == len(expected), params
        assert oracle.search("Observation", [("bench-method", f"{METHOD}|auto")])
        assert oracle.search("Observation", [("bench-int", "gt10")])
        # the CapabilityStatement lists the new parameters with their types
        r = after.http.get("/fhir/metadata")
        assert r.status_code == 200
        obs = next(res for res in r.get_json()["rest"][0]["resource"] if res["type"] == "Observation")
        listed = {sp["name"]: sp for sp in obs["searchParam"]}
        assert listed["bench-method"]["type"] == "token"
        assert listed["bench-method"]["definition"] == CUSTOM[0]["url"]
        assert listed["bench-int"]["type"] == "number"
        # sorting by the new number parameter works like any other
        for sort in ("bench-int", "-bench-int,_id"):
            matched = oracle.search("Observation", [("code", f"{LOINC}|9269-2")])
            pages = after.walk("Observation", [("code", f"{LOINC}|9269-2"), ("_sort", sort), ("_count", "5")])
            assert [k for p in pages for k in keys_of(p)] == oracle.sort("Observation", matched, sort)
    finally:
        after.close()
