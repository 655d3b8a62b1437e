"""Search results: paging (keyset cursors, also under concurrent writes), sorting, totals,
_summary/_elements, _include/_revinclude, chaining and _has, the consent hook's effect on all of
them, and the AuditEvent every search writes. Expected results come from the Python oracle over
the synthetic data set (see test_search_params.py), never from hard-coded counts.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from sqlalchemy import exists

from fhirserver.consent.hooks import NoConsentFiltering
from fhirserver.db.schema import idx_token
from tests.conftest import AUDITOR_SETTINGS
from tests.support.search import (
    LOCAL,
    LOINC,
    MRN,
    TAGS,
    Dataset,
    Item,
    Oracle,
    Server,
    build_dataset,
    entries,
    is_outcome,
    keys_of,
    link,
    load,
    start_server,
    store,
)

Key = tuple[str, str]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = start_server(tmp_path_factory.mktemp(f"results-{request.param}"), request, request.param)
    ds = build_dataset(seed=815)
    load(srv, ds)
    yield srv, ds
    srv.close()


# Chains, _has, consent and audit run on SQLite only here: on a freshly loaded PostgreSQL
# database (no planner statistics yet) chained and _has searches take seconds to minutes before
# ANALYZE (a nested _has over ~430 resources ran > 20 s; 0.03 s after ANALYZE), which would blow
# the time budget. That is reported as a product issue; the semantics do not depend on the DB.
sqlite_only = pytest.mark.parametrize("env", ["sqlite"], indirect=True)


def page_keys(pages: list[dict[str, Any]]) -> list[Key]:
    return [k for p in pages for k in keys_of(p)]


def check_totals(pages: list[dict[str, Any]], expected: int) -> None:
    """The first page carries the exact total; later pages may omit it (Bundle.total is 0..1),
    but if they give one it is exact too."""
    assert pages[0]["total"] == expected
    for p in pages[1:]:
        assert p.get("total", expected) == expected


def expect_sorted(srv: Server, ds: Dataset, rtype: str, params: list[tuple[str, str]], sort: str,
                  count: int) -> list[Key]:
    oracle = Oracle(ds)
    expected = oracle.sort(rtype, oracle.search(rtype, params), sort)
    pages = srv.walk(rtype, [*params, ("_sort", sort), ("_count", str(count))])
    got = page_keys(pages)
    assert got == expected, (sort, [ds.seq.get(k) for k in got], [ds.seq.get(k) for k in expected])
    check_totals(pages, len(expected))
    return got


# ================================================================== paging
def test_default_count_and_the_cap(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    expected = Oracle(ds).search("Observation", [("category", "vital-signs")])
    assert len(expected) > 20
    body = srv.search("Observation", [("category", "vital-signs")])
    assert len(entries(body)) == 20 and body["total"] == len(expected)
    assert link(body, "next") is not None and link(body, "previous") is None
    body = srv.search("Observation", [("category", "vital-signs"), ("_count", "5000")])
    assert "_count=1000" in link(body, "self")  # capped at max_page_size
    assert sorted(keys_of(body)) == sorted(expected) and link(body, "next") is None


@pytest.mark.parametrize("count", [1, 7, 20])
def test_walking_all_pages_returns_each_match_once(env, count) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    params = [("category", "vital-signs"), ("date", "ge2021")]
    expected = Oracle(ds).search("Observation", params)
    pages = srv.walk("Observation", [*params, ("_count", str(count))])
    got = page_keys(pages)
    assert len(got) == len(set(got)), "a resource was returned twice"
    assert set(got) == set(expected)
    assert got == expected  # no _sort: creation (pk) order
    assert len(pages) == math.ceil(len(expected) / count)
    assert all(len(entries(p)) == count for p in pages[:-1]) and 0 < len(entries(pages[-1])) <= count
    check_totals(pages, len(expected))
    assert link(pages[-1], "next") is None


@pytest.mark.parametrize("sort", ["", "-date", "code,-date"])
def test_previous_and_first_links_go_back_to_the_same_pages(env, sort) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    params = [("category", "vital-signs"), ("_count", "6")] + ([("_sort", sort)] if sort else [])
    forward = srv.walk("Observation", params)
    assert len(forward) >= 4
    assert link(forward[0], "previous") is None
    back = [forward[-1]]
    while (prev := link(back[-1], "previous")) is not None:
        back.append(srv.follow(prev))
        assert len(back) <= len(forward)
    back.reverse()
    assert [keys_of(p) for p in back] == [keys_of(p) for p in forward]
    # a previous page's next link leads forward again to the same page
    again = srv.follow(link(back[1], "next"))
    assert keys_of(again) == keys_of(forward[2])
    for p in forward[1:]:
        assert keys_of(srv.follow(link(p, "first"))) == keys_of(forward[0])


@pytest.mark.parametrize("sort", ["", "date", "-date"])
def test_paging_is_stable_under_concurrent_writes(env, sort) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    code = f"paging-{sort.strip('-') or 'pk'}{'-desc' if sort.startswith('-') else ''}"

    def obs(day: int, status: str = "final") -> dict[str, Any]:
        return {"resourceType": "Observation", "status": status,
                "code": {"coding": [{"system": LOCAL, "code": code}]},
                "effectiveDateTime": f"2020-02-{day:02d}T12:00:00Z",
                "valueQuantity": {"value": day, "unit": "U"}}

    made = [store(srv, ds, Item("Observation", obs(d), post=True)) for d in range(2, 25)]
    params = [("code", f"{LOCAL}|{code}")] + ([("_sort", sort)] if sort else [])
    before = Oracle(ds).search("Observation", params)
    assert set(made) == set(before)
    page1 = srv.search("Observation", [*params, ("_count", "5")])
    first = keys_of(page1)
    assert len(first) == 5
    unseen = [k for k in (Oracle(ds).sort("Observation", before, sort) if sort else before) if k not in first]

    # ---- concurrent writes between page fetches
    for day in (1, 13, 28):  # new matching resources: before, inside and after the walked range
        store(srv, ds, Item("Observation", obs(day), post=True))
    for key in (first[1], unseen[3]):  # updates that keep matching (same sort values)
        body = dict(ds.stored[key])
        body["status"] = "amended"
        store(srv, ds, Item("Observation", body))
    gone = [first[2], first[-1], unseen[5], unseen[-1]]  # first[-1] is the row the cursor points at
    for key in gone:  # deletions
        srv.delete(*key)
        ds.forget(key)
    stopped = unseen[7]  # an update that stops matching
    body = dict(ds.stored[stopped])
    body["code"] = {"coding": [{"system": LOCAL, "code": f"{code}-moved"}]}
    store(srv, ds, Item("Observation", body))

    rest: list[Key] = []
    page = page1
    while (nxt := link(page, "next")) is not None:
        page = srv.follow(nxt)
        rest.extend(keys_of(page))
    every = first + rest
    assert len(every) == len(set(every)), "a resource was returned twice"
    still = [k for k in before if k not in gone and k != stopped]
    for k in still:
        assert every.count(k) == 1, f"{k} matched before and after but was not returned exactly once"
    assert not [k for k in rest if k in gone or k == stopped], "returned after it was deleted / stopped matching"
    after = set(Oracle(ds).search("Observation", params))
    assert set(rest) <= after
    if sort:  # each page continues in sort order after the cursor
        assert Oracle(ds).sort("Observation", rest, sort) == rest


def _cursor(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    ["n", [[1]], 5], ["n", [{"a": 1}], 5], ["p", [None], 5], ["n", [1], 10**30], ["n", [1], True],
    ["n", [1, 2], 5], ["x", [1], 5], "not base64 at all!",
], ids=["list-value", "object-value", "null-value", "huge-pk", "bool-pk", "too-many-values", "bad-direction",
        "garbage"])
def test_tampered_cursor_is_400(env, cursor) -> None:  # type: ignore[no-untyped-def]
    """The cursor comes back from the client: whatever it holds must give a 400, never a 500."""
    srv, _ds = env
    text = cursor if isinstance(cursor, str) else _cursor(cursor)
    r = srv.get("/fhir/Observation", [("_sort", "date"), ("_cursor", text)])
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True)[:300])
    assert is_outcome(r.get_json())


def test_cursor_from_another_search_is_not_a_server_error(env) -> None:  # type: ignore[no-untyped-def]
    srv, _ds = env
    body = srv.search("Observation", [("_sort", "code"), ("_count", "3")])
    cursor = dict(parse_qsl(urlsplit(link(body, "next")).query))["_cursor"]
    r = srv.get("/fhir/Observation", [("_sort", "date"), ("_count", "3"), ("_cursor", cursor)])
    assert r.status_code in (200, 400), (r.status_code, r.get_data(as_text=True)[:300])
    assert r.get_json()["resourceType"] == ("Bundle" if r.status_code == 200 else "OperationOutcome")


# ================================================================== sorting
SORTS = ["date", "-date", "_lastUpdated", "-_lastUpdated", "_id", "-_id", "value-quantity", "-value-quantity",
         "code", "-code", "code,-date", "status,-value-quantity,_id", "-code,date"]


@pytest.mark.parametrize("sort", SORTS)
def test_sort_order_matches_a_python_sort(env, sort) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    expect_sorted(srv, ds, "Observation", [("status:not", "cancelled")], sort, 1000)


@pytest.mark.parametrize("sort", ["date", "-date", "code,-date", "-value-quantity"])
def test_sorted_paging_keeps_the_order_across_pages(env, sort) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    expect_sorted(srv, ds, "Observation", [("category", "vital-signs,laboratory")], sort, 9)


def test_sort_on_other_types(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    expect_sorted(srv, ds, "QuestionnaireResponse", [("status:not", "stopped")], "-authored,_id", 4)
    expect_sorted(srv, ds, "Consent", [("status", "active,inactive")], "date", 3)
    expect_sorted(srv, ds, "Patient", [("gender:missing", "false")], "-_id", 7)


@pytest.mark.parametrize("sort", ["family", "-name", "birthdate", "identifier", "code-value-quantity", "nonsense"])
def test_sort_refused(env, sort) -> None:  # type: ignore[no-untyped-def]
    srv, _ds = env
    rtype = "Observation" if sort == "code-value-quantity" else "Patient"
    body = srv.search(rtype, [("_sort", sort)], expect=400)
    assert is_outcome(body)


# ================================================================== totals and subsetting
def test_total_modes_and_summary_count(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    params = [("code", f"{LOINC}|8867-4,{LOINC}|29463-7")]
    expected = Oracle(ds).search("Observation", params)
    body = srv.search("Observation", [*params, ("_total", "none"), ("_count", "3")])
    assert "total" not in body and len(entries(body)) == 3 and link(body, "next")
    nxt = srv.follow(link(body, "next"))
    assert "total" not in nxt and "_total=none" in link(nxt, "self")
    pages = srv.walk("Observation", [*params, ("_total", "accurate"), ("_count", "3")])
    assert all(p["total"] == len(expected) for p in pages)  # accurate: on every page
    body = srv.search("Observation", [*params, ("_total", "estimate"), ("_count", "3")])
    assert body.get("total", len(expected)) == len(expected)
    body = srv.search("Observation", [*params, ("_summary", "count")])
    assert body["total"] == len(expected) and not body.get("entry")
    body = srv.search("Observation", [*params, ("_total", "bogus")], expect=400)
    assert is_outcome(body)


def test_elements_and_summary(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    params = [("category", "laboratory")]
    expected = Oracle(ds).search("Observation", params)
    body = srv.search("Observation", [*params, ("_elements", "subject,valueQuantity"), ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(expected)
    mandatory = {"status", "code"}
    for e in entries(body):
        res = e["resource"]
        orig = ds.stored[(res["resourceType"], res["id"])]
        want = {k for k in orig if k in {"subject", "valueQuantity"} | mandatory} | {"resourceType", "id", "meta"}
        assert set(res) == want, (set(res), want)
        for k in want - {"meta"}:
            assert res[k] == orig[k]
        assert any(t.get("code") == "SUBSETTED" for t in res["meta"].get("tag", []))
    body = srv.search("Observation", [*params, ("_summary", "true"), ("_count", "1000")])
    for e in entries(body):
        assert "method" not in e["resource"] and "category" not in e["resource"]
        assert any(t.get("code") == "SUBSETTED" for t in e["resource"]["meta"].get("tag", []))


# ================================================================== _include / _revinclude
def test_include_subject(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    params = [("code", f"{LOINC}|8867-4,{LOINC}|29463-7")]
    matches = oracle.search("Observation", params)
    body = srv.search("Observation", [*params, ("_include", "Observation:subject"), ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(matches) and body["total"] == len(matches)
    included = keys_of(body, "include")
    assert len(included) == len(set(included))
    assert set(included) == set(oracle.include(matches, "Observation", "subject")) != set()
    # per page: the includes of each page are that page's subjects
    for page in srv.walk("Observation", [*params, ("_include", "Observation:subject:Patient"), ("_count", "4")]):
        assert set(keys_of(page, "include")) == set(oracle.include(keys_of(page), "Observation", "subject", "Patient"))


def test_revinclude(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    params = [("family", "s,m")]
    matches = oracle.search("Patient", params)
    body = srv.search("Patient", [*params, ("_revinclude", "Observation:subject"),
                                  ("_revinclude", "QuestionnaireResponse:author"), ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(matches)
    included = keys_of(body, "include")
    assert len(included) == len(set(included))
    expected = set(oracle.revinclude(matches, "Observation", "subject")) | \
        set(oracle.revinclude(matches, "QuestionnaireResponse", "author"))
    assert set(included) == expected and expected


def test_include_iterate(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    params = [("derived-from:missing", "false")]
    matches = oracle.search("Observation", params)
    level1 = oracle.include(matches, "Observation", "derived-from")
    level2 = [k for k in oracle.include(level1, "QuestionnaireResponse", "subject") if k not in level1]
    assert level1 and level2
    body = srv.search("Observation", [*params, ("_include", "Observation:derived-from"),
                                      ("_include:iterate", "QuestionnaireResponse:subject"), ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(matches)
    included = keys_of(body, "include")
    assert len(included) == len(set(included))
    assert set(included) == set(level1) | set(level2)
    # without :iterate the second level is not followed
    body = srv.search("Observation", [*params, ("_include", "Observation:derived-from"),
                                      ("_include", "QuestionnaireResponse:subject"), ("_count", "1000")])
    assert set(keys_of(body, "include")) == set(level1)
    # Patient -> link, iterated from included subjects
    linking = {k[1] for k in ds.of_type("Patient") if ds.stored[k].get("link")}
    obs = [k for k in ds.of_type("Observation")
           if ds.stored[k].get("subject", {}).get("reference", "").split("/")[-1] in linking
           and ds.stored[k]["subject"]["reference"].split("/")[-2] == "Patient"]
    assert obs
    params = [("_id", ",".join(k[1] for k in obs))]
    subjects = oracle.include(obs, "Observation", "subject")
    linked = [k for k in oracle.include(subjects, "Patient", "link") if k not in subjects]
    body = srv.search("Observation", [*params, ("_include", "Observation:subject"),
                                      ("_include:iterate", "Patient:link"), ("_count", "1000")])
    assert set(keys_of(body, "include")) == set(subjects) | set(linked) and linked


# ================================================================== chaining and _has
CHAINS = [
    ("Observation", [("subject:Patient.name", "smi")]),
    ("Observation", [("subject:Patient.name", "mül")]),  # subject may also be a Location with a name: typed
    ("Observation", [("subject:Patient.family:exact", "Müller")]),
    ("Observation", [("patient.identifier", f"{MRN}|MRN0003,{MRN}|MRN0004,{MRN}|MRN0011")]),
    ("Observation", [("subject:Patient.birthdate", "1970")]),
    ("Observation", [("subject:Patient.gender", "female"), ("code", f"{LOINC}|8867-4")]),
    ("Observation", [("subject:Patient._tag", f"{TAGS}|needs-review")]),
    ("QuestionnaireResponse", [("subject:Patient.address-city", "ber")]),
    ("Observation", [("derived-from:QuestionnaireResponse.status", "completed")]),
    ("Observation", [("derived-from:QuestionnaireResponse.subject:Patient.gender", "male")]),
    ("Consent", [("patient.name", "jo")]),
    ("Patient", [("_has:Observation:patient:code", f"{LOINC}|2339-0")]),
    ("Patient", [("_has:Observation:subject:value-quantity", "gt90||kg,gt200||lb")]),
    ("Patient", [("_has:QuestionnaireResponse:subject:status", "completed")]),
    ("Patient", [("_has:Consent:patient:status", "active")]),
    ("Patient", [("_has:Observation:patient:_has:Observation:has-member:status", "final")]),
    ("Observation", [("_has:Observation:has-member:code", "85353-1")]),
    ("Patient", [("_has:Observation:patient:code", f"{LOINC}|8867-4"), ("gender", "female")]),
    ("Patient", [("_has:Observation:performer:status", "final,amended,preliminary")]),
]


@sqlite_only
@pytest.mark.parametrize("case", CHAINS, ids=lambda c: c[0][:3] + "?" + "&".join(f"{k}={v}" for k, v in c[1]))
def test_chaining_and_reverse_chaining(env, case) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    rtype, params = case
    expected = Oracle(ds).search(rtype, params)
    assert expected, "the data set should make this case non-trivial"
    body = srv.search(rtype, [*params, ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(expected) and body["total"] == len(expected)


@sqlite_only
@pytest.mark.parametrize("params", [
    [("subject:Patient.nonsense", "x")], [("code.name", "x")], [("_has:Observation:code:status", "final")],
    [("_has:Observation", "x")], [("subject:Patient.name:contains", "m")],
], ids=lambda p: "&".join(f"{k}={v}" for k, v in p))
def test_bad_chains_are_400(env, params) -> None:  # type: ignore[no-untyped-def]
    srv, _ds = env
    rtype = "Patient" if params[0][0].startswith("_has") else "Observation"
    assert is_outcome(srv.search(rtype, params, expect=400))


# ================================================================== consent: totals and pages in the database
class HideHook(NoConsentFiltering):
    """Consent hook under test: hides resources by id, and Observations by code."""

    def __init__(self, hidden: set[Key], codes: set[str]) -> None:
        self.hidden = hidden
        self.codes = codes

    def predicates(self, principal: Any, resource_type: str, interaction: str, res: Any) -> list[Any]:
        preds = []
        ids = sorted(i for t, i in self.hidden if t == resource_type)
        if ids:
            preds.append(res.c.id.not_in(ids))
        if resource_type == "Observation" and self.codes:
            t = idx_token.alias()
            preds.append(~exists().where(t.c.resource_pk == res.c.pk, t.c.param == "code",
                                         t.c.code.in_(sorted(self.codes))))
        return preds

    def visible(self, ds: Dataset) -> Any:
        def fn(key: Key) -> bool:
            if key in self.hidden:
                return False
            if key[0] == "Observation":
                coding = ds.stored[key].get("code", {}).get("coding", [])
                return not any(c.get("code") in self.codes for c in coding)
            return True
        return fn


@pytest.fixture
def consent(env):  # type: ignore[no-untyped-def]
    srv, ds = env
    obs = ds.of_type("Observation")
    subjects = [ds.stored[k]["subject"]["reference"].split("/")[-1] for k in obs
                if ds.stored[k].get("subject", {}).get("reference", "").split("/")[-2:-1] == ["Patient"]]
    hidden_patients = {("Patient", pid) for pid in sorted(set(subjects), key=subjects.count, reverse=True)[:3]}
    hidden_obs = {k for k in obs[5::17]}
    hook = HideHook(hidden_patients | hidden_obs, {"718-7"})
    svc = srv.svc
    svc.consent = hook
    try:
        yield srv, ds, hook, Oracle(ds, hook.visible(ds))
    finally:
        svc.consent = NoConsentFiltering()


@sqlite_only
def test_consent_totals_and_pages(env, consent) -> None:  # type: ignore[no-untyped-def]
    srv, ds, hook, oracle = consent
    for params in ([("category", "laboratory")], [("status", "final,amended,preliminary")]):
        visible = oracle.search("Observation", params)
        everything = Oracle(ds).search("Observation", params)
        assert len(visible) < len(everything)
        pages = srv.walk("Observation", [*params, ("_count", "4")])
        got = page_keys(pages)
        assert got == visible
        check_totals(pages, len(visible))
        accurate = srv.walk("Observation", [*params, ("_count", "7"), ("_total", "accurate")])
        assert all(p["total"] == len(visible) for p in accurate)
        assert all(len(keys_of(p)) == 4 for p in pages[:-1]), "a page was not full: filtering after paging?"
        assert len(pages) == math.ceil(len(visible) / 4)
        body = srv.search("Observation", [*params, ("_summary", "count")])
        assert body["total"] == len(visible)
        sorted_pages = srv.walk("Observation", [*params, ("_count", "5"), ("_sort", "-date")])
        assert page_keys(sorted_pages) == oracle.sort("Observation", visible, "-date")
    patients = oracle.search("Patient", [])
    body = srv.search("Patient", [("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(patients) and body["total"] == len(patients)


@sqlite_only
def test_consent_applies_to_includes_chains_and_has(env, consent) -> None:  # type: ignore[no-untyped-def]
    srv, ds, hook, oracle = consent
    # _include: hidden patients are not included
    params = [("code", f"{LOINC}|8867-4,{LOINC}|29463-7,{LOINC}|2339-0")]
    matches = oracle.search("Observation", params)
    body = srv.search("Observation", [*params, ("_include", "Observation:subject"), ("_count", "1000")])
    assert sorted(keys_of(body)) == sorted(matches)
    assert set(keys_of(body, "include")) == set(oracle.include(matches, "Observation", "subject"))
    assert not set(keys_of(body, "include")) & hook.hidden
    # _revinclude: hidden Observations (by id or by code) are not revincluded
    body = srv.search("Patient", [("_revinclude", "Observation:subject"), ("_count", "1000")])
    pats = oracle.search("Patient", [])
    assert sorted(keys_of(body)) == sorted(pats)
    assert set(keys_of(body, "include")) == set(oracle.revinclude(pats, "Observation", "subject"))
    # chains: nothing is matched through a hidden patient
    hidden_pid = sorted(i for t, i in hook.hidden if t == "Patient")[0]
    family = ds.stored[("Patient", hidden_pid)]["name"][0]["family"]
    for chain in ([("subject:Patient.family:exact", family)], [("subject:Patient._id", hidden_pid)],
                  [("patient.identifier", ds.stored[("Patient", hidden_pid)]["identifier"][0]["value"])]):
        expected = oracle.search("Observation", chain)
        assert Oracle(ds).search("Observation", chain) != expected
        body = srv.search("Observation", [*chain, ("_count", "1000")])
        assert sorted(keys_of(body)) == sorted(expected) and body["total"] == len(expected)
    # _has: nothing is matched through hidden observations
    for has in ([("_has:Observation:patient:code", f"{LOINC}|718-7")],
                [("_has:Observation:patient:code", f"{LOINC}|8867-4,{LOINC}|2339-0")],
                [("_has:Observation:patient:_has:Observation:has-member:status", "final,amended,preliminary")]):
        expected = oracle.search("Patient", has)
        body = srv.search("Patient", [*has, ("_count", "1000")])
        assert sorted(keys_of(body)) == sorted(expected) and body["total"] == len(expected)
    # reads of hidden resources are 404, visible ones 200
    hidden_obs = [k for k in ds.of_type("Observation") if not hook.visible(ds)(k)]
    for key in [("Patient", hidden_pid), *hidden_obs[:3]]:
        r = srv.get(f"/fhir/{key[0]}/{key[1]}")
        assert r.status_code == 404 and is_outcome(r.get_json())
    visible_obs = oracle.keys("Observation")[0]
    assert srv.get(f"/fhir/Observation/{visible_obs[1]}").status_code == 200
    # $everything: hidden members are left out, a hidden patient is unknown
    pids = [k[1] for k in oracle.keys("Patient")]
    pid = max(pids, key=lambda p: len(Oracle(ds).compartment(p)) - len(oracle.compartment(p)))
    assert oracle.compartment(pid) != Oracle(ds).compartment(pid)
    pages = srv.walk("", [("_count", "4")], path=f"/fhir/Patient/{pid}/$everything")
    got = page_keys(pages)
    assert set(got) == oracle.compartment(pid) and len(got) == len(set(got))
    assert all(len(keys_of(p)) == 4 for p in pages[:-1])
    r = srv.get(f"/fhir/Patient/{hidden_pid}/$everything")
    assert r.status_code == 404


@sqlite_only
def test_scopes_limit_includes_chains_and_revincludes(env) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    oracle = Oracle(ds)
    obs_only = srv.other_client("system/Observation.rs")
    h = obs_only.headers("system/Observation.rs")
    params = [("code", f"{LOINC}|8867-4")]
    body = srv.search("Observation", [*params, ("_include", "Observation:subject"), ("_count", "1000")], headers=h)
    assert sorted(keys_of(body)) == sorted(oracle.search("Observation", params))
    assert keys_of(body, "include") == [], "Patients included without a Patient scope"
    r = srv.get("/fhir/Observation", [("subject:Patient.name", "s")], headers=h)
    assert r.status_code == 403 or (r.status_code == 200 and not keys_of(r.get_json()) and r.get_json()["total"] == 0)
    pat_only = srv.other_client("system/Patient.rs")
    h = pat_only.headers("system/Patient.rs")
    body = srv.search("Patient", [("_revinclude", "Observation:subject"), ("_count", "1000")], headers=h)
    assert sorted(keys_of(body)) == sorted(oracle.search("Patient", [])) and keys_of(body, "include") == []
    r = srv.get("/fhir/Patient", [("_has:Observation:patient:code", f"{LOINC}|8867-4")], headers=h)
    assert r.status_code == 403 or (r.status_code == 200 and r.get_json()["total"] == 0)


# ================================================================== audit
def _audit_for(srv: Server, request_id: str) -> list[dict[str, Any]]:
    auditor = srv.other_client("system/AuditEvent.rs", AUDITOR_SETTINGS)
    body = srv.search("AuditEvent", [("_sort", "-_lastUpdated"), ("_count", "30")],
                      headers=auditor.headers("system/AuditEvent.rs"))
    found = []
    for e in entries(body):
        ev = e["resource"]
        if any(ent.get("what", {}).get("identifier", {}).get("value") == request_id for ent in ev.get("entity", [])):
            found.append(ev)
    return found


@sqlite_only
@pytest.mark.parametrize("case", [
    ("Observation", [("code", f"{LOINC}|8867-4"), ("_include", "Observation:subject"), ("_count", "5")]),
    ("Patient", [("family", "s"), ("_count", "1000")]),
    ("QuestionnaireResponse", [("status", "completed"), ("_count", "1000")]),
    ("Observation", [("subject:Patient.name", "jo"), ("_sort", "-date"), ("_count", "3")]),
], ids=lambda c: c[0])
def test_every_search_writes_one_audit_event(env, case) -> None:  # type: ignore[no-untyped-def]
    srv, ds = env
    rtype, params = case
    request_id = f"search-audit-{rtype}-{len(params)}-{params[0][1][-4:].replace('|', '')}"
    r = srv.get(f"/fhir/{rtype}", params, headers=srv.headers(**{"X-Request-Id": request_id}))
    assert r.status_code == 200
    body = r.get_json()
    returned = keys_of(body) + keys_of(body, "include")
    events = _audit_for(srv, request_id)
    assert len(events) == 1
    ev = events[0]
    assert ev["action"] == "E" and ev["outcome"] == "0"
    queries = [ent for ent in ev["entity"] if ent.get("role", {}).get("code") == "24"]
    assert len(queries) == 1
    assert parse_qsl(base64.b64decode(queries[0]["query"]).decode(), keep_blank_values=True) == params
    oracle = Oracle(ds)
    patients = set().union(*[oracle.patients_of(k) for k in returned]) if returned else set()
    listed = {ent["what"]["reference"] for ent in ev["entity"] if ent.get("role", {}).get("code") == "1"}
    assert listed == {f"Patient/{p}" for p in patients}
    objects = {ent["what"]["reference"].split("/_history")[0] for ent in ev["entity"]
               if ent.get("role", {}).get("code") == "4"}
    assert objects == {f"{t}/{i}" for t, i in returned}


@sqlite_only
def test_a_refused_search_is_audited_too(env) -> None:  # type: ignore[no-untyped-def]
    srv, _ds = env
    request_id = "search-audit-refused-1"
    r = srv.get("/fhir/Patient", [("family:contains", "x")], headers=srv.headers(**{"X-Request-Id": request_id}))
    assert r.status_code == 400
    events = _audit_for(srv, request_id)
    assert len(events) == 1 and events[0]["outcome"] == "4"

